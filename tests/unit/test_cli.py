"""The CLIs as a user runs them: the dry-run plan, one-line errors, the data audit."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import ROOT, TINY_LORA, TINY_TRAIN, ZERO2, ZERO3, run_cli

DRY = (
    "raytune_qvl.train",
    "--config",
    str(TINY_TRAIN),
    "--lora_config",
    str(TINY_LORA),
    "--deepspeed",
    str(ZERO2),
    "--dry-run",
)


def test_dry_run_prints_the_plan_fast(tiny_assets: Path) -> None:
    started = time.perf_counter()
    result = run_cli(*DRY)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "effective batch size  16  (= 4 x 2 x 2)" in out
    assert "world size            2 Ray Train worker(s) on CPU" in out
    assert "r=16, alpha=32, scale=2" in out
    assert "attention sdpa" in out and "ZeRO-2" in out
    assert '"train_batch_size": 16' in out and '"auto"' not in out
    assert elapsed < 10  # no Ray, no torch, no model load


def test_dry_run_with_zero3_and_overrides(tiny_assets: Path) -> None:
    args = [a if a != str(ZERO2) else str(ZERO3) for a in DRY]
    result = run_cli(*args, "ray.num_workers=1", "training.gradient_accumulation_steps=4")
    assert result.returncode == 0, result.stderr
    assert "effective batch size  16  (= 4 x 1 x 4)" in result.stdout
    assert "ZeRO-3 + CPU offload" in result.stdout


def test_misspelt_override_is_one_line_and_exit_2(tiny_assets: Path) -> None:
    result = run_cli(*DRY, "training.learning_rat=1e-4")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "training.learning_rat" in lines[0] and "learning_rate" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("raytune_qvl.train", "--config", str(tmp_path / "nope.yaml"), "--dry-run")
    assert result.returncode == 2
    assert "nope.yaml: training config not found" in result.stderr and "Traceback" not in result.stderr


def test_data_audit_cli(tiny_assets: Path) -> None:
    data = tiny_assets / "data" / "forms" / "train.jsonl"
    result = run_cli("raytune_qvl.data", str(data), "--config", str(TINY_TRAIN))
    assert result.returncode == 0, result.stderr
    assert "256 records, 256 kept, 0 dropped" in result.stdout
    assert "text p50" in result.stdout and "image p50" in result.stdout


def test_train_in_a_ray_jobs_temporary_folder_refuses_relative_outputs(tiny_assets: Path, tmp_path: Path) -> None:
    """Under `ray job submit --working-dir`, the entrypoint runs in an unpacked copy Ray deletes
    when the job ends: outputs resolving there are refused before anything is written."""
    job_dir = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    job_dir.mkdir(parents=True)
    assets = ROOT / ".assets"
    paths = [
        f"model.name={assets / 'tiny-qwen25vl'}",
        f"data.train_path={assets / 'data/forms/train.jsonl'}",
        f"data.eval_path={assets / 'data/forms/eval.jsonl'}",
        f"data.test_path={assets / 'data/forms/test.jsonl'}",
    ]
    args = [
        "raytune_qvl.train",
        "--config",
        str(TINY_TRAIN),
        "--lora_config",
        str(TINY_LORA),
        "--deepspeed",
        str(ZERO2),
        *paths,
    ]
    result = run_cli(
        *args,
        "output.dir=./out",
        f"ray.storage_path={tmp_path / 'ray'}",
        "output.tracking_uri=postgresql://u:pw@db/mlflow",
        cwd=job_dir,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "output.dir:" in result.stderr
        and "temporary working directory" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert "ray.storage_path" not in result.stderr and "tracking_uri" not in result.stderr  # absolute / remote are fine
    assert list(job_dir.iterdir()) == []
