"""The one MLflow writer. Only the driver writes (SQLite allows one writer), through an explicit
`MlflowClient`, never the process-global active run. Tag names are the constants below; `outcome`
maps how a run's block ended (finished, interrupted, failed) to its status tag, reason and end
state, for a training run and a sweep alike."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from raytune_qvl.config.uris import redact
from raytune_qvl.errors import ConfigError, Problem, UserError

__all__ = [
    "Tracker",
    "connect",
    "check_server",
    "clean_params",
    "TAG_KIND",
    "TAG_STRATEGY",
    "TAG_STAGE",
    "TAG_STATUS",
    "TAG_REASON",
    "TAG_TRIAL_ID",
    "TAG_BEST_TRIAL",
    "TAG_ATTENTION",
    "TAG_BUDGET_EPOCH",
    "TAG_BUDGET_SAMPLES",
    "TAG_BOUNDARY",
    "TAG_PARENT",
    "TAG_EXPERIMENT_KIND",
]

log = logging.getLogger("raytune_qvl")

TAG_KIND = "raytune_qvl.kind"  # train | sweep
TAG_STRATEGY = "raytune_qvl.strategy"  # a sweep's strategy
TAG_SWEEP_DIR = "raytune_qvl.sweep_dir"  # a sweep's folder (its state, best/, optuna.db), absolute
TAG_STAGE = "raytune_qvl.stage"  # a trial's stage label
TAG_STATUS = "raytune_qvl.status"  # running | completed | stopped | failed | interrupted
TAG_REASON = "raytune_qvl.reason"  # why a run failed or was stopped
TAG_TRIAL_ID = "raytune_qvl.trial_id"  # a trial's Tune id
TAG_BEST_TRIAL = "raytune_qvl.best_trial"  # a sweep's best trial
TAG_ATTENTION = "raytune_qvl.attention"  # the attention implementation the workers ran (resolved on them)
TAG_BUDGET_EPOCH = "raytune_qvl.budget_epoch"  # where ASHA stopped a trial
TAG_BUDGET_SAMPLES = "raytune_qvl.budget_samples"
TAG_BOUNDARY = "raytune_qvl.boundary"  # a sweep winner at the edge of its range, and what to try next
TAG_CHEAPEST = "raytune_qvl.cheapest_within"  # a sweep's cheapest trial within cost.within of the best
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"  # which view MLflow's UI opens an experiment in
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.I)
_PARAM_LIMIT = 6000  # MLflow's maximum param value length
_REASON_LIMIT = 4000


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Param values as MLflow stores them: secrets struck out, cut to MLflow's length limit."""
    out = {}
    for key, value in params.items():
        if _SECRET_KEY.search(key):
            value = "***"
        text = str(redact(value))
        out[key] = text if len(text) <= _PARAM_LIMIT else text[: _PARAM_LIMIT - 3] + "..."
    return out


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker:
    """One experiment in one tracking store."""

    def __init__(self, tracking_uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        existing = self.client.get_experiment_by_name(experiment)
        if existing is None:
            self.experiment_id = self.client.create_experiment(experiment)
        elif existing.lifecycle_stage == "deleted":
            self.client.restore_experiment(existing.experiment_id)
            self.experiment_id = existing.experiment_id
        else:
            self.experiment_id = existing.experiment_id
        # open the experiment in MLflow's model-training view (runs, params, metrics), not the GenAI one
        self.client.set_experiment_tag(self.experiment_id, TAG_EXPERIMENT_KIND, "custom_model_development")

    def start_run(self, name: str, tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def reopen(self, run_id: str) -> bool:
        """Mark a run RUNNING again (resuming); False if it does not exist here."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing run
            return False
        if run.info.experiment_id != self.experiment_id:
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        cleaned = clean_params(params)
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in cleaned.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.log_metric_rows(run_id, [(metrics, step or 0)])

    def log_metric_rows(self, run_id: str, rows: list[tuple[Mapping[str, Any], int]], wait: bool = True) -> None:
        """Several reports (metrics at their step) in as few writes as MLflow allows.
        `wait=False`: MLflow's asynchronous logging, for a caller that must not block on the
        store (a sweep's driver thread); `end` waits for what is queued."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for metrics, step in rows for k, v in _numeric(metrics).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i : i + 1000], synchronous=wait)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(redact(v))[:5000]) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_text(run_id, json.dumps(data, indent=2, default=str, ensure_ascii=False), artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        import pandas as pd

        self.client.log_table(run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(run_id, status=status)

    @staticmethod
    def flush() -> None:
        """Wait for the metric writes queued with `wait=False`."""
        import mlflow

        mlflow.flush_async_logging()

    def runs(self, filter_string: str = "") -> list[Any]:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=10_000)

    @contextmanager
    def outcome(self, run_id: str, finished_tags: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """The run's end state from how the block ends: normally -> status completed (plus the
        tags the block put in the yielded dict), FINISHED; Ctrl-C (or an error with exit code 130)
        -> interrupted, KILLED; any other exception -> failed with its one-line reason, FAILED.
        SystemExit leaves the run as it is."""
        tags: dict[str, Any] = dict(finished_tags or {})
        try:
            yield tags
        except SystemExit:
            raise
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", None) == 130
            if interrupted:
                self.set_tags(run_id, {TAG_STATUS: "interrupted", TAG_REASON: "interrupted (Ctrl-C)"})
                self.end(run_id, "KILLED")
            else:
                reason = "; ".join(exc.lines()) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                self.set_tags(run_id, {TAG_STATUS: "failed", TAG_REASON: reason[:_REASON_LIMIT]})
                self.end(run_id, "FAILED")
            raise
        self.set_tags(run_id, {TAG_STATUS: "completed", **tags})
        self.end(run_id, "FINISHED")


def connect(uri: str, experiment: str, *, source: str | None = None, key: str = "output.tracking_uri") -> Tracker:
    """The tracking store, reached before anything starts (an unreachable server is a clear
    error, not a crash after the first trial)."""
    try:
        return Tracker(uri, experiment)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for an unreachable store
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        rule = f"MLflow tracking store unreachable ({first[:160]}); start the server or fix the URI"
        raise ConfigError([Problem(source or redact(uri), key, rule, show_value=False)]) from None


def check_server(uri: str, timeout: float = 5.0) -> None:
    """A tracking server must answer now: MLflow's client would otherwise retry for minutes
    and fail after the first trial."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    rule = f"MLflow tracking server unreachable ({reason}); start it or fix the URI"
    raise ConfigError([Problem(redact(uri), "tracking_uri", rule, show_value=False)])
