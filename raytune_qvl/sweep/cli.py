"""The sweep command: the documented priority order (learning rate, LoRA rank, effective batch,
epochs) searched stage by stage with Optuna TPE and ASHA, every trial a Ray Train run, tracked in
MLflow, the best configuration written out, resumable.

Run as:
    python -m raytune_qvl.sweep search_spaces/ocr_doc.yaml [key=value ...] [--dry-run] [--resume]
        [--warm-start outputs/sweeps/<earlier sweep>]

`key=value` overrides the search-space file (e.g. resources.max_concurrent_trials=2).
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

from raytune_qvl import runtime
from raytune_qvl.errors import run_cli
from raytune_qvl.sweep.load import load_with_overrides

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m raytune_qvl.sweep",
        description="A staged Optuna + ASHA sweep of Ray Train LoRA trials, tracked in MLflow.",
    )
    parser.add_argument("search_space", help="a search-space file (search_spaces/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the search-space file")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the stages, trial counts and batch arithmetic; start nothing"
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous sweep of this name and start over")
    parser.add_argument(
        "--warm-start",
        metavar="PATH",
        default=None,
        help="seed this sweep from an earlier sweep of the same task (its folder, <output_dir>/<name>): its trials "
        "are known results, never trained again; its best is the starting point",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)"
    )
    args = parser.parse_intermixed_args(argv)
    runtime.setup_logging()

    def run() -> None:
        overrides = list(args.overrides)
        space, base = load_with_overrides(args.search_space, overrides, check_files=True)
        if args.address:
            base = base.model_copy(update={"ray": base.ray.model_copy(update={"address": args.address})})
        if args.dry_run:
            from raytune_qvl.sweep.plan import dry_run

            print(dry_run(space, base))
            return
        from raytune_qvl.sweep.run import run_sweep

        started = time.perf_counter()
        run_sweep(space, base, resume=args.resume, overwrite=args.overwrite, warm_start=args.warm_start)
        print(f"sweep finished in {time.perf_counter() - started:.0f}s")

    run_cli(run)
