"""Batch arithmetic (pure)."""

from __future__ import annotations

import sys

import pytest

from raytune_qvl.config import batch_math as bm


def test_effective_batch_and_accumulation() -> None:
    assert bm.effective_batch(micro=2, workers=4, accum=8) == 64
    assert bm.accumulation_for(target=64, micro=2, workers=4) == 8
    assert bm.accumulation_for(target=16, micro=4, workers=2) == 2
    for target in (12, 4):  # 12 is not a multiple of 8; 4 is below one micro-batch per worker
        with pytest.raises(bm.BatchMathError, match="not a multiple"):
            bm.accumulation_for(target=target, micro=2, workers=4)


def test_linear_scaling() -> None:
    assert bm.scale_lr(2e-4, new_batch=64, base_batch=32) == pytest.approx(4e-4)
    assert bm.scale_lr(2e-4, new_batch=16, base_batch=32) == pytest.approx(1e-4)


def test_steps_and_warmup() -> None:
    assert bm.steps_per_epoch(1000, micro=2, workers=4, accum=8) == 15  # 1000 // 64
    assert bm.total_steps(1000, 2, 4, 8, epochs=3) == 45
    assert bm.total_steps(1000, 2, 4, 8, epochs=3, max_steps=7) == 7
    assert bm.warmup_steps(45, 0.05) == 3  # ceil(2.25)
    assert bm.warmup_steps(100, 0.0) == 0
    with pytest.raises(bm.BatchMathError, match="fewer than one effective batch"):
        bm.steps_per_epoch(10, micro=2, workers=4, accum=8)


def test_pure_modules_import_no_heavy_libraries() -> None:
    """config, batch math, DeepSpeed filling, the plan and search spaces stay light."""
    import subprocess

    code = (
        "import sys, raytune_qvl.config.load, raytune_qvl.config.batch_math, raytune_qvl.config.deepspeed, "
        "raytune_qvl.config.plan, raytune_qvl.config.write, raytune_qvl.sweep.load, raytune_qvl.sweep.points, "
        "raytune_qvl.sweep.plan, raytune_qvl.sweep.records, raytune_qvl.sweep.state, raytune_qvl.train.metrics, "
        "raytune_qvl.train.cli, raytune_qvl.sweep.cli, raytune_qvl.data.cli;"
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'transformers', 'mlflow', 'optuna') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
