"""Everything MLflow. Only the driver writes (one writer: SQLite allows one), through an
explicit `MlflowClient`, never the process-global active run."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

__all__ = ["default_tracking_uri", "local_store_path", "redact", "Tracker", "TAG_STAGE", "TAG_STATUS", "TAG_REASON"]

log = logging.getLogger("raytune_qvl")

TAG_STAGE = "raytune_qvl.stage"
TAG_STATUS = "raytune_qvl.status"  # completed | stopped | failed
TAG_REASON = "raytune_qvl.reason"
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.I)
_PARAM_LIMIT = 6000  # MLflow's maximum param value length


def default_tracking_uri(configured: str | None) -> str:
    """The configured URI, else MLFLOW_TRACKING_URI, else MLflow's own default made absolute
    (sqlite:///<cwd>/mlflow.db): Ray workers and later commands run in other directories."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().absolute() / 'mlflow.db'}"
    if "://" not in uri:  # a plain folder: a file store
        return Path(uri).absolute().as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).absolute()}"
    return uri


def local_store_path(uri: str) -> Path | None:
    """The file or folder behind a local store URI (sqlite:///..., file://...), None for a server
    or another database."""
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix):
            return Path(uri[len(prefix):])
    return None


def redact(value: Any) -> Any:
    """Strip passwords from URIs (postgresql://user:pw@host -> postgresql://user:***@host)."""
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return value


def _clean_params(params: Mapping[str, Any]) -> dict[str, str]:
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

    def start_run(self, name: str, tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
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

        cleaned = _clean_params(params)
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in cleaned.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in _numeric(metrics).items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i : i + 500])

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
        self.client.set_terminated(run_id, status=status)

    def runs(self, filter_string: str = "") -> list[Any]:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=10_000)

