"""Where runs are tracked: the MLflow store URI a run uses (made absolute: Ray workers and later
commands run in other folders), the local path behind it, and URIs with their passwords struck
out for everything the project writes or prints. Pure: no MLflow import."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["default_tracking_uri", "local_store_path", "redact"]


def default_tracking_uri(configured: str | None) -> str:
    """The configured URI, else MLFLOW_TRACKING_URI, else MLflow's own default made absolute
    (sqlite:///<cwd>/mlflow.db): Ray workers and later commands run in other directories."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().absolute() / 'mlflow.db'}"
    if "://" not in uri:  # a plain folder: a file store
        return Path(uri).absolute().as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).absolute()}"
    return uri


def local_store_path(uri: str) -> Path | None:
    """The file or folder behind a local store URI (sqlite:///..., file://...), None for a server
    or another database."""
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix):
            return Path(uri[len(prefix) :])
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
