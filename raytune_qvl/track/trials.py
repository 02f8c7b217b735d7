"""A sweep's child run per trial, logged from the Tune driver (one writer): the trial's sampled and
derived params, every report as metrics, and its end as status completed | stopped (by ASHA, with
the budget reached) | failed (with the reason)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raytune_qvl.errors import trial_error
from raytune_qvl.reports import unpack
from raytune_qvl.track.runs import log_predictions
from raytune_qvl.track.tracker import (
    TAG_ATTENTION,
    TAG_BUDGET_EPOCH,
    TAG_BUDGET_SAMPLES,
    TAG_REASON,
    TAG_STAGE,
    TAG_STATUS,
    TAG_TRIAL_ID,
    Tracker,
)

__all__ = ["SweepTracking"]

log = logging.getLogger("raytune_qvl")

_TUNE_INTERNAL = {
    "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "time_since_restore",
    "iterations_since_restore", "pid", "date", "node_ip", "hostname", "done", "timesteps_total",
    "episodes_total", "timesteps_since_restore", "checkpoint_dir_name", "should_checkpoint",
}  # fmt: skip


class SweepTracking(Callback):
    """`describe(sampled) -> params` gives a trial's MLflow params (the sweep's PointResolver);
    `predictions` is the path of a trial's predictions file, with `{trial_id}` in it;
    `cost(last_result) -> {name: value}` what the trial cost, logged as cost_<name> at its end."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        parent_run_id: str,
        stage: str,
        describe: Any,
        predictions: str,
        cost: Any = None,
    ):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.parent_run_id, self.stage, self.describe = parent_run_id, stage, describe
        self.predictions, self.cost = predictions, cost
        self.runs: dict[str, str] = {}
        self.pending: dict[str, list[tuple[dict, int]]] = {}  # trial id -> reports not written yet
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
            found = self.tracker.runs(f"tags.`{TAG_TRIAL_ID}` = '{trial.trial_id}'")
            if found:
                run_id = found[0].info.run_id
                self.tracker.reopen(run_id)
            else:
                tags = {TAG_STAGE: self.stage, TAG_TRIAL_ID: trial.trial_id, TAG_STATUS: "running"}
                run_id = self.tracker.start_run(
                    f"{self.stage}-{trial.trial_id}", tags, parent_run_id=self.parent_run_id
                )
                self.tracker.log_params(run_id, self.describe(trial.config))
            self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        """Reports are written in batches, at each evaluation and at the trial's end: a write per
        report would keep the driver (and SQLite's one writer) busy on a loaded machine."""
        pending = self.pending.setdefault(trial.trial_id, [])
        for row in unpack(result):  # the rows the worker held back, then the report itself
            metrics = {k: v for k, v in row.items() if k not in _TUNE_INTERNAL and not k.startswith("config")}
            pending.append((metrics, int(row.get("step", 0))))
        if any(k.startswith("eval_") for k in result):
            self._flush(trial)

    def _flush(self, trial: Any) -> None:
        rows = self.pending.pop(trial.trial_id, [])
        if rows:
            self.tracker.log_metric_rows(self._run_for(trial), rows, wait=False)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            self._flush(trial)
        self.tracker.flush()

    def _log_cost(self, run_id: str, last: dict) -> None:
        if self.cost is not None:
            cost = {f"cost_{k}": v for k, v in self.cost(last).items()}
            if cost:
                self.tracker.log_metrics(run_id, cost, step=int(last.get("step", 0) or 0))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        run_id = self._run_for(trial)
        self._flush(trial)
        self._log_cost(run_id, last)
        if last.get("finished"):
            tags = {TAG_STATUS: "completed"}
            if last.get("attention"):  # what the workers ran, resolved on them
                tags[TAG_ATTENTION] = last["attention"]
        else:
            epoch, samples = last.get("epoch", 0), last.get("samples_seen", 0)
            tags = {
                TAG_STATUS: "stopped",
                TAG_REASON: f"stopped by ASHA at epoch {epoch:.2f} ({samples} samples)",
                TAG_BUDGET_EPOCH: f"{epoch:.3f}",
                TAG_BUDGET_SAMPLES: str(samples),
            }
        self.tracker.set_tags(run_id, tags)
        try:  # the predictions at the trial's best evaluation (its folder is on rank 0's node)
            log_predictions(self.tracker, run_id, Path(self.predictions.replace("{trial_id}", trial.trial_id)))
        except Exception as exc:  # noqa: BLE001 - a missing view must not fail the sweep
            log.warning("predictions of trial %s not logged: %s", trial.trial_id, exc)
        self.tracker.end(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_for(trial)
        self._flush(trial)
        self._log_cost(run_id, trial.last_result or {})  # what it used before it failed
        self.tracker.set_tags(run_id, {TAG_STATUS: "failed", TAG_REASON: trial_error(trial)})
        error_file = getattr(trial, "error_file", None)
        if error_file and Path(str(error_file)).is_file():  # the whole traceback, where people look for it
            self.tracker.log_artifact(run_id, str(error_file), "error")
        self.tracker.end(run_id, "FAILED")
