"""Audit a data file before training on it: records, drops by reason with line numbers, token
counts at p50/p99.

Run as: python -m raytune_qvl.data PATH --config configs/tiny/training_config.yaml
"""

from __future__ import annotations

import argparse
import sys

from raytune_qvl import runtime
from raytune_qvl.config.load import load_config
from raytune_qvl.config.schema import Config, ModelConfig
from raytune_qvl.data.audit import check_audit, prepare_split
from raytune_qvl.errors import run_cli

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m raytune_qvl.data",
        description="Audit a data file: records, drops by reason (with line numbers), text/image token p50/p99.",
    )
    parser.add_argument("path", help="a JSONL or JSON data file")
    parser.add_argument("--config", help="training config: its model, image sizes and max_length are used")
    parser.add_argument("--model", help="a model folder or hub id whose processor counts tokens (instead of --config)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_intermixed_args(argv)

    def run() -> None:
        runtime.quiet_libraries()
        runtime.setup_logging()
        cfg = load_config(args.config, overrides=args.overrides, check_files=False) if args.config else None
        if cfg is None:
            cfg = Config()
            if args.model:
                cfg = cfg.model_copy(update={"model": ModelConfig(name=args.model)})
        processor = None
        if args.config or args.model:
            from raytune_qvl.data.processor import load_processor

            processor = load_processor(cfg)
        prepared = prepare_split(args.path, processor, cfg.data, progress=sys.stderr.isatty())
        print(prepared.audit.format())
        check_audit(prepared.audit, cfg.data)

    run_cli(run)
