"""A real MLflow tracking server backed by PostgreSQL (Debian's postgresql), as on a cluster:
a training run on Ray logs to it over HTTP end to end, artifacts included; and no secret from
a URI reaches MLflow params."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import TINY_LORA, TINY_TRAIN, ZERO2, free_port, run_cli, wait_for_http

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _as_postgres(*cmd: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


@pytest.fixture(scope="module")
def postgres():
    pytest.importorskip("psycopg", reason="psycopg[binary] is a dev dependency")
    if not PG_BIN:
        pytest.skip("PostgreSQL is not installed: `make test` installs Debian's postgresql when run as root")
    bin_dir = Path(PG_BIN[-1])
    # not under pytest's folder: it is private to root, and PostgreSQL runs as its own user
    root = Path(tempfile.mkdtemp(prefix="raytune_qvl_pg_"))
    data, sock = root / "data", root / "sock"
    data.mkdir()
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    subprocess.run(
        _as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        _as_postgres(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "-o",
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1",
            "start",
        ),
        check=True,
        capture_output=True,
    )
    psql = [str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c"]
    subprocess.run([*psql, "CREATE USER mlflow WITH PASSWORD 's3cret-pw'"], check=True, capture_output=True)
    subprocess.run([*psql, "CREATE DATABASE mlflow OWNER mlflow"], check=True, capture_output=True)
    yield f"postgresql://mlflow:s3cret-pw@127.0.0.1:{port}/mlflow"
    subprocess.run(_as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"), capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def tracking_server(postgres: str, tmp_path: Path):
    from raytune_qvl.track.ui import server_command, server_env

    port = free_port()
    cmd = server_command(postgres, "127.0.0.1", port) + ["--artifacts-destination", str(tmp_path / "artifacts")]
    proc = subprocess.Popen(
        cmd, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/health", proc, "mlflow server")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn child
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.multinode
def test_training_run_logs_to_a_postgres_backed_server(tracking_server: str, tiny_assets: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    result = run_cli(
        "raytune_qvl.train",
        "--config",
        str(TINY_TRAIN),
        "--lora_config",
        str(TINY_LORA),
        "--deepspeed",
        str(ZERO2),
        "--tracking_uri",
        tracking_server,
        "--experiment",
        "server-e2e",
        f"output.dir={tmp_path / 'out'}",
        f"ray.storage_path={tmp_path / 'ray'}",
        "training.max_steps=8",
        "evaluation.generation_samples=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_server)
    (run,) = client.search_runs([client.get_experiment_by_name("server-e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [8]
    assert "final/adapter_model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "final")}
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server: workers need no shared disk
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_secrets_never_reach_params() -> None:
    from raytune_qvl.config.uris import redact
    from raytune_qvl.track.tracker import clean_params

    assert redact("postgresql://mlflow:s3cret@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    cleaned = clean_params({"output.tracking_uri": "https://user:pw123@host/x", "env.HF_TOKEN": "hf_abc", "lora.r": 8})
    assert (
        "pw123" not in cleaned["output.tracking_uri"] and cleaned["env.HF_TOKEN"] == "***" and cleaned["lora.r"] == "8"
    )
