"""What the sweep driver knows of each trial after its stage, and how trials are ranked. Pure: the
records are plain data, kept in the sweep state file and rebuilt from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from raytune_qvl.sweep.space import LR_FACTOR, LR_KEY, SearchSpace

__all__ = [
    "TrialRecord",
    "StageOutcome",
    "RANKED",
    "point_key",
    "rank",
    "best_record",
    "last_value",
    "resolved_point",
    "tune_results",
    "INFEASIBLE",
    "memory_fit",
]

# the reason of a failed trial whose point cannot fit in memory at any micro batch: never tried again
INFEASIBLE = "infeasible"


def point_key(overrides: Mapping[str, Any]) -> tuple:
    """A hashable identity of a trained configuration (floats to 10 significant digits).

    >>> a = point_key({"lora.r": 8, "training.learning_rate": 0.00030000000001})
    >>> a == point_key({"training.learning_rate": 3e-4, "lora.r": 8})
    True
    """
    return tuple(sorted((k, float(f"{v:.10g}") if isinstance(v, float) else v) for k, v in overrides.items()))


@dataclass
class TrialRecord:
    """One trial of a stage, as the sweep driver sees it after the stage."""

    trial_id: str
    stage: str
    sampled: dict[str, Any]
    overrides: dict[str, Any]
    value: float | None
    status: str  # completed | stopped | failed | reused (trained in an earlier stage: trial_id is that trial)
    reason: str = ""
    epoch: float = 0.0
    samples_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    point: dict[str, Any] = field(default_factory=dict)  # every searched parameter, fixed ones included
    sampler: str = ""  # what suggested the point: grid, random, tpe start-up (random), tpe
    cost: dict[str, float] = field(default_factory=dict)  # sweep/cost.py: worker_seconds, samples, ...
    # the micro batch and accumulation the trial fitted in memory with, when it had to halve its micro
    # batch (same effective batch): what best/ and a confirmation run train with
    fit: dict[str, int] = field(default_factory=dict)
    origin: str = ""  # the folder of the sweep that trained it, when imported by a warm start (warm.py)


@dataclass
class StageOutcome:
    stage: str
    records: list[TrialRecord]
    interrupted: bool = False


# who may win: trials that ran their full budget (and those of earlier stages counted again). A trial
# ASHA stopped has a value at a partial budget: it informs the searcher, it never outranks a full run.
RANKED = ("completed", "reused")


def rank(records: Iterable[TrialRecord], mode: str) -> list[TrialRecord]:
    """The records that ran their full budget with a finite value, best first (ties: launch order)."""
    scored = [r for r in records if r.status in RANKED and r.value is not None and math.isfinite(r.value)]
    return sorted(scored, key=lambda r: r.value if mode == "min" else -r.value)


def memory_fit(metrics: Mapping[str, Any], micro: int) -> dict[str, int]:
    """The micro batch x accumulation a trial's last report says it ran with, when that is not the
    `micro` it was given (it ran out of memory and halved it; see trial.run_trial), else {}."""
    ran = metrics.get("micro_batch")
    if ran is None or int(ran) == micro:
        return {}
    return {
        "training.per_device_train_batch_size": int(ran),
        "training.gradient_accumulation_steps": int(metrics["accumulation_steps"]),
    }


def best_record(records: Iterable[TrialRecord], mode: str) -> TrialRecord | None:
    ranked = rank(records, mode)
    return ranked[0] if ranked else None


def last_value(history: list[dict[str, Any]], metric: str) -> float | None:
    """A trial's value: its last report of the metric that is a number."""
    for row in reversed(history):
        value = row.get(metric)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None


def resolved_point(space: SearchSpace, fixed: dict[str, Any], record: TrialRecord) -> dict[str, Any]:
    """The best trial as parameter values, with the learning rate it actually trained with."""
    point = {k: v for k, v in {**fixed, **record.sampled}.items() if k != LR_FACTOR}
    if LR_KEY in record.overrides:
        point[LR_KEY] = record.overrides[LR_KEY]
    return {k: point[k] for k in space.parameters if k in point}


def tune_results(results: Any, keep: Callable[[str], bool]) -> Iterator[tuple[Any, str, Any, list[dict[str, Any]]]]:
    """Each result of a Tune fit with its trial id, its Tune Trial (None when unknown) and the rows it
    reported, cut to the columns `keep` accepts."""
    analysis = getattr(results, "_experiment_analysis", None)
    trials = {t.trial_id: t for t in (getattr(analysis, "trials", None) or [])}
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "?")
        df = result.metrics_dataframe
        history = df[[c for c in df.columns if keep(c)]].to_dict("records") if df is not None and len(df) else []
        yield result, trial_id, trials.get(trial_id), history
