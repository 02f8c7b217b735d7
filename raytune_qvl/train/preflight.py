"""Everything that can fail before a worker starts: the processor, the data audit of every split
and the plan. The prepared data is cached, so workers (and later trials) read it instead of
preparing it again."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from raytune_qvl import runtime
from raytune_qvl.config.plan import Plan, make_plan
from raytune_qvl.config.schema import Config

__all__ = ["Preflight", "preflight"]


@dataclass
class Preflight:
    processor: Any
    train: Any  # PreparedSplit
    eval: Any  # PreparedSplit | None
    plan: Plan
    test: Any = None  # PreparedSplit | None: audited here, read only at the end


def preflight(cfg: Config, *, progress: bool | None = None) -> Preflight:
    runtime.quiet_libraries()
    from raytune_qvl.data.audit import check_audit
    from raytune_qvl.data.cache import load_or_prepare
    from raytune_qvl.data.processor import load_processor

    progress = sys.stderr.isatty() if progress is None else progress
    processor = load_processor(cfg)
    train = load_or_prepare(cfg, processor, "train", progress=progress)
    check_audit(train.audit, cfg.data)
    eval_split = load_or_prepare(cfg, processor, "eval", progress=progress)
    test_split = load_or_prepare(cfg, processor, "test", progress=progress)
    for split in (eval_split, test_split):
        if split is not None:
            check_audit(split.audit, cfg.data)
    return Preflight(
        processor,
        train,
        eval_split,
        make_plan(cfg, num_samples=len(train.items), lengths=train.audit.lengths()),
        test_split,
    )
