"""Quality against cost. Every trial's cost is measured (worker-seconds, GPU-seconds on GPUs,
trained samples, trainable parameters, peak memory); a finished sweep reports the front of its
metric against one cost measure and names the cheapest config within a tolerance of the best.
Multi-objective search does not mix with ASHA (a stopped trial's cost is partial), so the front is
reported over the full-budget trials rather than searched on. Pure: plain data in, plain data out."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

__all__ = ["COSTS", "COST_UNITS", "trial_cost", "resolve_measure", "FrontEntry", "CostFront", "cost_front"]

# what a trial costs, as logged on its MLflow child run (cost_<name>)
COSTS = ("worker_seconds", "gpu_seconds", "samples", "trainable_params", "peak_memory_gb")
COST_UNITS = {
    "worker_seconds": "worker-s",
    "gpu_seconds": "GPU-s",
    "samples": "samples",
    "trainable_params": "params",
    "peak_memory_gb": "GiB",
}


def trial_cost(last: Mapping[str, Any], resources: Any) -> dict[str, float]:
    """A trial's cost from its last report: Tune's wall time of the trial (Ray Train's start-up and
    any retry included: what it occupied) times its workers, and times their GPUs on GPUs; the
    samples it trained; its trainable parameters and peak memory per worker (device memory on GPUs,
    else host RSS) where the run reported them (its last step: a stopped trial has neither)."""
    workers, use_gpu = resources.workers_per_trial, resources.use_gpu
    cost: dict[str, float] = {}
    seconds = last.get("time_total_s")
    if seconds is not None:
        cost["worker_seconds"] = float(seconds) * workers
        if use_gpu:
            cost["gpu_seconds"] = float(seconds) * workers * resources.gpus_per_worker
    if last.get("samples_seen") is not None:
        cost["samples"] = float(last["samples_seen"])
    if last.get("trainable_params") is not None:
        cost["trainable_params"] = float(last["trainable_params"])
    peak = last.get("peak_gpu_memory_gb_max") if use_gpu else last.get("peak_host_rss_gb_max")
    if peak is not None:
        cost["peak_memory_gb"] = float(peak)
    return cost


def resolve_measure(measure: str, use_gpu: bool) -> str:
    """`auto`: GPU-seconds where trials use GPUs (what a cluster bills), else worker-seconds."""
    if measure != "auto":
        return measure
    return "gpu_seconds" if use_gpu else "worker_seconds"


@dataclass
class FrontEntry:
    """One config: its value (the mean over its runs where it was confirmed) and mean cost."""

    trial_id: str
    overrides: dict[str, Any]
    value: float
    runs: int  # runs behind the value: 1, or the search run plus its confirmation runs
    cost: dict[str, float] = field(default_factory=dict)


@dataclass
class CostFront:
    metric: str
    mode: str
    measure: str
    within: float  # relative tolerance: within x |best| of the best value
    entries: list[FrontEntry]  # every config with the measure, cheapest first
    front: list[FrontEntry]  # the Pareto front: no other config is both cheaper and better
    best: FrontEntry
    cheapest: FrontEntry  # the cheapest config within the tolerance of the best

    def limit(self) -> float:
        """The worst value still within the tolerance of the best."""
        slack = self.within * abs(self.best.value)
        return self.best.value + slack if self.mode == "min" else self.best.value - slack

    def to_dict(self) -> dict[str, Any]:
        def row(e: FrontEntry) -> dict[str, Any]:
            return {"trial": e.trial_id, "value": e.value, "runs": e.runs, "cost": e.cost, "overrides": e.overrides}

        return {
            "metric": self.metric,
            "measure": self.measure,
            "within": self.within,
            "limit": self.limit(),
            "best": self.best.trial_id,
            "cheapest_within": self.cheapest.trial_id,
            "front": [e.trial_id for e in self.front],
            "configs": [row(e) for e in self.entries],
        }


def _mean_costs(costs: Iterable[Mapping[str, float]]) -> dict[str, float]:
    pooled: dict[str, list[float]] = {}
    for cost in costs:
        for key, value in cost.items():
            pooled.setdefault(key, []).append(value)
    return {key: statistics.fmean(values) for key, values in pooled.items()}


def cost_front(
    records: list[Any],
    confirmations: list[Any],
    confirmation_records: list[Any],
    *,
    metric: str,
    mode: str,
    measure: str,
    within: float,
    best_trial: str,
) -> CostFront | None:
    """The front over `records` (the full-budget trials, TrialRecords) in `measure`; a confirmed
    config (Confirmed) counts with its mean value and the mean cost of its runs
    (`confirmation_records`: the confirmation TrialRecords). `best_trial` is the sweep's winner.
    None when fewer than one config has the measure."""
    confirmed = {c.trial_id: c for c in confirmations}
    reruns: dict[str, list[dict[str, float]]] = {}
    for rec in confirmation_records:
        if rec.status == "confirmation" and rec.cost:
            reruns.setdefault(rec.sampled.get("of"), []).append(rec.cost)
    entries = []
    for rec in records:
        if rec.value is None or not math.isfinite(rec.value):
            continue
        c = confirmed.get(rec.trial_id)
        value, runs = (c.mean, len(c.values)) if c is not None else (rec.value, 1)
        cost = _mean_costs([rec.cost, *reruns.get(rec.trial_id, [])]) if c is not None else dict(rec.cost)
        if measure in cost:
            entries.append(FrontEntry(rec.trial_id, dict(rec.overrides), value, runs, cost))
    if not entries:
        return None
    sign = 1 if mode == "min" else -1
    entries.sort(key=lambda e: (e.cost[measure], sign * e.value))
    front, best_so_far = [], math.inf
    for e in entries:  # cheapest first: a config is on the front when it beats every cheaper one
        if sign * e.value < best_so_far:
            front.append(e)
            best_so_far = sign * e.value
    best = next((e for e in entries if e.trial_id == best_trial), None)
    if best is None:  # the winner has no cost measured: the best value among those that do
        best = min(entries, key=lambda e: sign * e.value)
    result = CostFront(metric, mode, measure, within, entries, front, best, best)
    limit = result.limit()
    near = [e for e in entries if (e.value <= limit if mode == "min" else e.value >= limit)]
    result.cheapest = min(near, key=lambda e: e.cost[measure]) if near else best
    return result
