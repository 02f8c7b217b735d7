"""Faults at the start of a sweep: an unreachable tracking server and an output folder that
cannot be written stop it with one clear line before any trial (or Ray) starts. The faults
during runs (killed worker, Ctrl-C, NaN loss) are in test_train_ray.py and test_sweep.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import run_cli, tiny_space

pytestmark = pytest.mark.faults


def test_unreachable_tracking_server_stops_the_sweep_before_any_trial(tiny_assets: Path, tmp_path: Path) -> None:
    space = tiny_space(tmp_path, mlflow={"tracking_uri": "http://127.0.0.1:9", "experiment": "x"})
    started = time.perf_counter()
    result = run_cli("raytune_qvl.sweep", str(space))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "MLflow tracking server unreachable" in result.stderr and "Traceback" not in result.stderr
    assert time.perf_counter() - started < 60  # no minutes of client retries
    assert not (tmp_path / "ray").exists() and not (tmp_path / "sweeps").exists()  # no trial, no Ray run


def test_unwritable_output_stops_the_sweep(tiny_assets: Path, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    space = tiny_space(tmp_path, output_dir=str(tmp_path / "blocker" / "sweeps"))
    result = run_cli("raytune_qvl.sweep", str(space))
    assert result.returncode == 2
    assert (
        "output_dir" in result.stderr
        and "is a file, not a folder" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_unwritable_output_for_a_training_run(tiny_assets: Path, tmp_path: Path) -> None:
    """/proc refuses new folders even to root."""
    from conftest import TINY_LORA, TINY_TRAIN

    result = run_cli(
        "raytune_qvl.train",
        "--config",
        str(TINY_TRAIN),
        "--lora_config",
        str(TINY_LORA),
        "output.dir=/proc/raytune_qvl_out",
        f"output.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        f"ray.storage_path={tmp_path / 'ray'}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "output.dir" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "m.db").exists()
