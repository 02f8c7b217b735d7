"""The Tuner of one stage: OptunaSearch (TPE, seeded, its study in SQLite) wrapped so a stage
never trains the same configuration twice, ASHA on a budget-fair time attribute, and the MLflow
child runs logged from the Tune driver."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

from ray import tune
from ray.tune import Callback
from ray.tune.search import ConcurrencyLimiter, Searcher

from raytune_qvl.config import Config
from raytune_qvl.search_space import EFFECTIVE_BATCH, LR_FACTOR, Domain, SearchSpace, Stage, grid, point_overrides
from raytune_qvl.tracking import TAG_REASON, TAG_STAGE, TAG_STATUS, Tracker

__all__ = ["PointResolver", "UniqueSearch", "SweepTracking", "StageOutcome", "TrialRecord", "build_tuner", "optuna_space", "point_key"]

log = logging.getLogger("raytune_qvl")

_TUNE_INTERNAL = {
    "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "time_since_restore",
    "iterations_since_restore", "pid", "date", "node_ip", "hostname", "done", "timesteps_total",
    "episodes_total", "timesteps_since_restore", "checkpoint_dir_name", "should_checkpoint",
}


def point_key(overrides: Mapping[str, Any]) -> tuple:
    """A hashable identity of a trained configuration (floats to 10 significant digits)."""
    return tuple(sorted((k, float(f"{v:.10g}") if isinstance(v, float) else v) for k, v in overrides.items()))


@dataclass
class PointResolver:
    """Sampled values -> the full point and the config overrides it means (picklable)."""

    space: dict[str, Any]
    base: dict[str, Any]
    fixed: dict[str, Any]
    lr_batch: int

    def point(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.fixed, **sampled}

    @cached_property
    def _space(self) -> SearchSpace:
        return SearchSpace.model_validate(self.space)

    @cached_property
    def _base(self) -> Config:
        return Config.model_validate(self.base)

    def overrides(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        return point_overrides(self._space, self._base, self.point(sampled), self.lr_batch)

    def __getstate__(self) -> dict[str, Any]:  # the cached objects are rebuilt where it lands
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def describe(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """What MLflow shows for a trial: the sampled values and the derived ones."""
        out = {f"sampled.{k}": v for k, v in sampled.items()}
        point = self.point(sampled)
        if EFFECTIVE_BATCH in point:
            out["derived.effective_batch_size"] = point[EFFECTIVE_BATCH]
        out.update({k: v for k, v in self.overrides(sampled).items()})
        if LR_FACTOR in sampled or EFFECTIVE_BATCH in sampled:
            out["derived.lr_scaled_from_batch"] = self.lr_batch
        return out


def optuna_space(params: Mapping[str, Domain], types: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna distributions: choices -> categorical, integer ranges -> IntDistribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, d in params.items():
        if d.choices is not None:
            out[key] = CategoricalDistribution(list(d.choices))
        elif types.get(key) is int:
            out[key] = IntDistribution(int(d.low), int(d.high), log=d.log, step=int(d.step or 1))
        else:
            out[key] = FloatDistribution(d.low, d.high, log=d.log, step=d.step)
    return out


class UniqueSearch(Searcher):
    """Wraps OptunaSearch so a stage never trains a configuration twice: a suggestion equal to
    one already trained (in this stage or an earlier one) is told to Optuna with the known
    result instead of being trained, and a finite space that is used up ends the stage."""

    def __init__(self, inner: Any, resolver: PointResolver, params: Mapping[str, Domain], known: dict[tuple, float | None], seed: int):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner = inner
        self.resolver = resolver
        self.known = dict(known)  # point key -> value (None: trained, no result yet)
        self.grid = grid(params)
        self.ids: dict[str, str] = {}  # Tune trial id -> Optuna-side id
        self.keys: dict[str, tuple] = {}
        self.rng = random.Random(seed)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        ok = self.inner.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.inner.metric, self.inner.mode
        return ok

    def _unused(self) -> list[dict[str, Any]]:
        if self.grid is None:
            return []
        return [g for g in self.grid if point_key(self.resolver.overrides(g)) not in self.known]

    def suggest(self, trial_id: str) -> dict | None:
        for attempt in range(60):
            if self.grid is not None and attempt >= 3:
                unused = self._unused()
                if not unused:
                    return Searcher.FINISHED
                self.inner._ot_study.enqueue_trial(self.rng.choice(unused))  # steer TPE off repeats
            internal = trial_id if attempt == 0 else f"{trial_id}~{attempt}"
            params = self.inner.suggest(internal)
            if params is None or params == Searcher.FINISHED:
                return params
            key = point_key(self.resolver.overrides(params))
            if key in self.known:  # trained already: Optuna learns its result, nothing is trained
                value = self.known[key]
                self.inner.on_trial_complete(internal, result={self.metric: value} if value is not None else None)
                continue
            self.known[key] = None
            self.ids[trial_id], self.keys[trial_id] = internal, key
            return params
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result and trial_id in self.ids:  # log-step reports carry no eval metric
            self.inner.on_trial_result(self.ids[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.ids:
            return
        value = (result or {}).get(self.metric)
        if error or value is None or (isinstance(value, float) and not math.isfinite(value)):
            self.inner.on_trial_complete(self.ids[trial_id], result=None, error=True)
        else:
            self.inner.on_trial_complete(self.ids[trial_id], result=result)
            self.known[self.keys[trial_id]] = value

    def get_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "inner"} | {"inner": self.inner.__dict__.copy()}

    def set_state(self, state: dict) -> None:
        inner_state = state.pop("inner")
        self.__dict__.update(state)
        self.inner.__dict__.update(inner_state)

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


class SweepTracking(Callback):
    """MLflow from the Tune driver: a child run per trial under the sweep's parent run; every
    report as metrics; status completed | stopped (by ASHA, with the budget reached) | failed."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, stage: str, resolver: PointResolver, metric: str, sweep_dir: str):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.parent_run_id, self.stage, self.resolver, self.metric = parent_run_id, stage, resolver, metric
        self.sweep_dir = sweep_dir
        self.runs: dict[str, str] = {}
        self._tracker: Tracker | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_tracker"} | {"_tracker": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, self.experiment)
        return self._tracker

    def get_state(self) -> dict:
        return {"runs": dict(self.runs)}

    def set_state(self, state: dict) -> None:
        self.runs.update(state.get("runs", {}))

    def _run_for(self, trial: Any) -> str:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:  # a restored sweep: find the run made before the interruption
            found = self.tracker.runs(f"tags.`raytune_qvl.trial_id` = '{trial.trial_id}'")
            if found:
                run_id = found[0].info.run_id
                self.tracker.reopen(run_id)
            else:
                run_id = self.tracker.start_run(
                    f"{self.stage}-{trial.trial_id}",
                    {TAG_STAGE: self.stage, "raytune_qvl.trial_id": trial.trial_id, TAG_STATUS: "running"},
                    parent_run_id=self.parent_run_id,
                )
                self.tracker.log_params(run_id, self.resolver.describe(trial.config))
            self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        metrics = {k: v for k, v in result.items() if k not in _TUNE_INTERNAL and not k.startswith("config")}
        self.tracker.log_metrics(self._run_for(trial), metrics, step=int(result.get("step", 0)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        run_id = self._run_for(trial)
        if last.get("finished"):
            tags = {TAG_STATUS: "completed"}
        else:
            tags = {TAG_STATUS: "stopped", TAG_REASON: f"stopped by ASHA at epoch {last.get('epoch', 0):.2f} ({last.get('samples_seen', 0)} samples)"}
            tags["raytune_qvl.budget_epoch"] = f"{last.get('epoch', 0):.3f}"
            tags["raytune_qvl.budget_samples"] = str(last.get("samples_seen", 0))
        self.tracker.set_tags(run_id, tags)
        try:  # the predictions at the trial's best evaluation (its folder is on rank 0's node)
            from raytune_qvl.launch import log_predictions

            log_predictions(self.tracker, run_id, Path(self.sweep_dir) / "trials" / trial.trial_id / "best")
        except Exception as exc:  # noqa: BLE001 - a missing view must not fail the sweep
            log.warning("predictions of trial %s not logged: %s", trial.trial_id, exc)
        self.tracker.end(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_for(trial)
        self.tracker.set_tags(run_id, {TAG_STATUS: "failed", TAG_REASON: trial_error(trial)})
        self.tracker.end(run_id, "FAILED")


def trial_error(trial: Any) -> str:
    """The last meaningful line of a trial's error (our TrialFailed message when it is ours)."""
    text = ""
    path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
    if path and Path(str(path)).is_file():
        text = Path(str(path)).read_text(errors="replace")
    text = text or str(getattr(trial, "error_msg", "") or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "TrialFailed:" in line:
            return line.split("TrialFailed:", 1)[1].strip()[:500]
    return (lines[-1] if lines else "unknown error")[:500]


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


@dataclass
class StageOutcome:
    stage: str
    records: list[TrialRecord]
    interrupted: bool = False


def build_tuner(
    trainable: Callable,
    stage: Stage,
    space: SearchSpace,
    searcher: Searcher,
    scheduler: Any,
    concurrency: int,
    storage: str,
    callbacks: list[Any],
) -> Any:
    limited = ConcurrencyLimiter(searcher, max_concurrent=concurrency)
    return tune.Tuner(
        tune.with_resources(trainable, {"CPU": 1}),
        tune_config=tune.TuneConfig(
            search_alg=limited,
            scheduler=scheduler,
            num_samples=stage.trials,
            metric=space.metric,
            mode=space.mode,
        ),
        run_config=tune.RunConfig(
            name=stage.label,
            storage_path=storage,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )
