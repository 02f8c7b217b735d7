"""The training command: one run of DeepSpeed LoRA workers under a Ray Train TorchTrainer, one
MLflow run.

Run as:
    python -m raytune_qvl.train --config configs/training_config.yaml \\
        --lora_config configs/lora_config.yaml --deepspeed configs/ds_config_zero2.json \\
        [section.key=value ...] [--dry-run] [--resume PATH] [--address ADDR] [--no-ray]

Run again with the same command after an interruption and it continues from the latest
checkpoint; `--resume PATH` starts from a given checkpoint folder instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from raytune_qvl import runtime
from raytune_qvl.config.load import load_config
from raytune_qvl.config.schema import Config
from raytune_qvl.errors import run_cli

__all__ = ["build_parser", "load_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raytune_qvl.train",
        description="LoRA fine-tuning of Qwen2.5-VL with DeepSpeed workers under Ray Train, tracked in MLflow.",
        epilog="Overrides: section.key=value, e.g. training.learning_rate=1e-4 lora.r=16 ray.num_workers=4",
    )
    parser.add_argument("--config", required=True, help="training config YAML (the seed's training_config.yaml format)")
    parser.add_argument("--lora_config", default=None, help="LoRA config YAML (default: the seed's LoRA defaults)")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON; wins over environment.deepspeed")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    parser.add_argument("--resume", default=None, metavar="PATH", help="start from this checkpoint folder")
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)"
    )
    parser.add_argument("--tracking_uri", default=None, help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: output.experiment_name)")
    parser.add_argument("--no-ray", action="store_true", help="run the loop in this process (one worker), without Ray")
    parser.add_argument("--overwrite", action="store_true", help="start over even if output.dir holds a finished run")
    return parser


def load_from_args(args: argparse.Namespace) -> Config:
    # quoted, so a value like "2024" or "on" stays the string it was given
    extra = [
        f"{key}={json.dumps(value)}"
        for key, value in (
            ("ray.address", args.address),
            ("output.tracking_uri", args.tracking_uri),
            ("output.experiment_name", args.experiment),
        )
        if value is not None
    ]
    return load_config(args.config, args.lora_config, args.deepspeed, [*args.overrides, *extra])


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    runtime.setup_logging()

    def run() -> None:
        from raytune_qvl.config.plan import make_plan

        cfg = load_from_args(args)
        if args.dry_run:
            print(make_plan(cfg).format())
            return
        from raytune_qvl.train.run import run_training

        result = run_training(cfg, resume=args.resume, use_ray=not args.no_ray, overwrite=args.overwrite)
        print(result.summary(), file=sys.stdout)

    run_cli(run)


if __name__ == "__main__":
    main()
