"""Open the project's MLflow store in the MLflow UI, or a sweep's Optuna study in Optuna
Dashboard, on 127.0.0.1 unless told otherwise.

Run as: python -m raytune_qvl.ui [--tracking_uri sqlite:////abs/mlflow.db] [--port 5000] [--host 127.0.0.1]
        python -m raytune_qvl.ui --optuna [SWEEP_DIR | optuna.db] [--port 8080]
  (--optuna alone: the latest sweep's study, found through its MLflow parent run)

Lean server settings: one worker and no job execution (~6 s to start, ~550 MB, instead of
~18 s and ~2.4 GB with MLflow's defaults).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from raytune_qvl import runtime
from raytune_qvl.errors import ConfigError, Problem, run_cli
from raytune_qvl.track.tracker import TAG_KIND, TAG_PARENT, TAG_SWEEP_DIR

__all__ = [
    "UI_ADDRESS",
    "server_command",
    "optuna_command",
    "server_env",
    "compare_url",
    "sweep_trials",
    "latest_sweep",
    "latest_sweep_dir",
    "serve",
    "main",
]

log = logging.getLogger("raytune_qvl")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
UI_ADDRESS = "http://localhost:5000"  # where `python -m raytune_qvl.ui` serves by default


def server_command(tracking_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    """The `mlflow server` command line for a store (a database URI or a file store)."""
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow") or "mlflow"
    return [
        mlflow,
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def optuna_command(study_db: Path, host: str, port: int) -> list[str]:
    """The `optuna-dashboard` command line for a sweep's study database."""
    dashboard = shutil.which("optuna-dashboard", path=os.path.dirname(sys.executable)) or "optuna-dashboard"
    return [dashboard, f"sqlite:///{study_db}", "--host", host, "--port", str(port)]


def latest_sweep_dir(tracking_uri: str) -> Path | None:
    """The folder of the newest sweep in a store that recorded one (its parent run's tag)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    sweeps = f"tags.`{TAG_KIND}` = 'sweep'"
    for run in client.search_runs(experiments, filter_string=sweeps, order_by=["attributes.start_time DESC"]):
        folder = run.data.tags.get(TAG_SWEEP_DIR)
        if folder:
            return Path(folder)
    return None


def compare_url(base_url: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """MLflow's page that shows these runs side by side: every param and metric in columns, and a
    parallel-coordinates plot of them."""
    runs, experiments = quote(json.dumps(list(run_ids))), quote(json.dumps([experiment_id]))
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def sweep_trials(client: Any, parent_run_id: str) -> list[str]:
    """A sweep's child runs (its trials), best first by the sweep's metric, failed ones last."""
    parent = client.get_run(parent_run_id)
    metric, mode = parent.data.params.get("metric"), parent.data.params.get("mode", "min")
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=10_000
    )

    def order(run: Any) -> tuple:
        value = run.data.metrics.get(metric) if metric else None
        if value is None:
            return (1, 0.0)
        return (0, value if mode == "min" else -value)

    return [run.info.run_id for run in sorted(children, key=order)]


def latest_sweep(tracking_uri: str) -> tuple[str, str, list[str]] | None:
    """(name, experiment id, trial run ids) of the newest sweep in a store, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    sweeps, newest = f"tags.`{TAG_KIND}` = 'sweep'", ["attributes.start_time DESC"]
    found = client.search_runs(experiments, filter_string=sweeps, order_by=newest, max_results=1)
    if not found:
        return None
    parent = found[0]
    return parent.info.run_name, parent.info.experiment_id, sweep_trials(client, parent.info.run_id)


def server_env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def main(argv: Sequence[str] | None = None) -> None:
    from raytune_qvl.config.uris import default_tracking_uri, local_store_path, redact

    parser = argparse.ArgumentParser(
        prog="python -m raytune_qvl.ui", description="Open the MLflow UI on the project's tracking store."
    )
    parser.add_argument(
        "--tracking_uri", default=None, help="default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None, help="default 5000 (MLflow) or 8080 (--optuna)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--optuna",
        nargs="?",
        const="",
        default=None,
        metavar="SWEEP_DIR|optuna.db",
        help="serve a sweep's Optuna study in Optuna Dashboard instead (alone: the latest sweep's)",
    )
    args = parser.parse_args(argv)
    runtime.setup_logging()

    def run() -> None:
        if args.optuna is not None:
            return _serve_optuna(args, default_tracking_uri(args.tracking_uri))
        args.port = args.port or 5000
        uri = default_tracking_uri(args.tracking_uri)
        if uri.startswith(("http://", "https://")):
            raise ConfigError(
                [
                    Problem(
                        "command line",
                        "--tracking_uri",
                        f"{redact(uri)} is already a tracking server: open it in a browser",
                        show_value=False,
                    )
                ]
            )
        if uri.startswith("sqlite:///") and not local_store_path(uri).exists():
            raise ConfigError(
                [
                    Problem(
                        "command line",
                        "--tracking_uri",
                        f"no MLflow store at {uri}: run a training or a sweep first, or pass --tracking_uri",
                        show_value=False,
                    )
                ]
            )
        _warn_if_open(args.host, args.port, "the MLflow UI")
        shown = "localhost" if args.host in LOOPBACK else args.host
        address = f"http://{shown}:{args.port}"
        print(f"MLflow UI for {redact(uri)} at {address} (Ctrl-C to stop)", flush=True)
        sweep = _quietly(lambda: latest_sweep(uri), uri)
        if sweep is not None:
            name, experiment_id, trials = sweep
            print(f"the latest sweep, {name}: its {len(trials)} trials side by side at", flush=True)
            print(f"  {compare_url(address, experiment_id, trials)}", flush=True)
        serve(server_command(uri, args.host, args.port, args.workers))

    run_cli(run)


def _warn_if_open(host: str, port: int, what: str) -> None:
    if host not in LOOPBACK:
        log.warning(
            "binding %s to %s: anyone who reaches this machine on port %d can read and change it", what, host, port
        )


def _study_db(given: str, uri: str) -> Path:
    """The optuna.db of `given` (a sweep folder or the file itself), or of the store's latest sweep."""
    from raytune_qvl.config.uris import redact

    if given:
        path = Path(given)
        db = path / "optuna.db" if path.is_dir() else path
        if not db.is_file():
            rule = f"no Optuna study at {db}: give a sweep folder (it holds optuna.db) or the optuna.db file"
            raise ConfigError([Problem("command line", "--optuna", rule, show_value=False)])
        return db.absolute()
    folder = _quietly(lambda: latest_sweep_dir(uri), uri)
    if folder is None:
        rule = f"no sweep recorded in {redact(uri)}: pass --optuna SWEEP_DIR (or --tracking_uri of the sweep's store)"
        raise ConfigError([Problem("command line", "--optuna", rule, show_value=False)])
    if not (folder / "optuna.db").is_file():
        rule = f"the latest sweep's folder {folder} has no optuna.db (moved or deleted?): pass --optuna SWEEP_DIR"
        raise ConfigError([Problem("command line", "--optuna", rule, show_value=False)])
    return folder / "optuna.db"


def _serve_optuna(args: argparse.Namespace, uri: str) -> None:
    db = _study_db(args.optuna, uri)
    port = args.port or 8080
    _warn_if_open(args.host, port, "Optuna Dashboard")
    shown = "localhost" if args.host in LOOPBACK else args.host
    print(f"Optuna Dashboard for {db} at http://{shown}:{port} (Ctrl-C to stop)", flush=True)
    serve(optuna_command(db, args.host, port))


def _quietly(lookup: Any, uri: str) -> Any:
    try:
        return lookup()
    except Exception as exc:  # noqa: BLE001 - a store it cannot search is reported as no sweep
        log.warning("could not look up the latest sweep in %s: %s", uri, str(exc).splitlines()[0][:200])
        return None


def serve(command: list[str]) -> int:
    """Run the server in its own process group and take the whole group down with us: `mlflow
    server` starts a uvicorn child that would outlive a plain terminate."""
    proc = subprocess.Popen(command, env=server_env(), start_new_session=True)

    def stop() -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, lambda s, f: (stop(), sys.exit(143)))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
