"""The benchmark scripts stay runnable: the GPU step script on a tiny shape on CPU (the same code
path a GPU runs), and the plain reference loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_gpu_step_script_runs_on_a_tiny_shape(tiny_assets: Path) -> None:
    result = run_cli(
        "bench.gpu_step",
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--seq",
        "128",
        "--image",
        "112",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["finite"] and report["tokens_per_second"] > 0 and report["image_tokens"] == 16
    assert report["lora_params"] > 0 and report["params"] > report["lora_params"]
    # MFU's FLOPs: the language model's matmuls (no embedding lookup) and the vision tower apart
    assert 0 < report["vision_params"] and report["text_matmul_params"] + report["vision_params"] < report["params"]
    assert report["flops_per_token"] > 4 * report["text_matmul_params"] and report["gradient_checkpointing"]


def test_plain_reference_loop_runs(tiny_assets: Path) -> None:
    result = run_cli("bench.plain_loop", "--steps", "3", "--warmup", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["samples_per_second"] > 0


def test_gpu_check_plans_and_says_when_there_is_no_gpu(tiny_assets: Path, tmp_path: Path) -> None:
    """`make gpu-check` cannot rot on machines without a GPU: its plan, its no-GPU exit, and the
    sweep it runs validate here."""
    import torch

    from bench.gpu_check import sweep_space

    plan = run_cli("bench.gpu_check", "--plan")
    assert plan.returncode == 0, plan.stderr[-3000:]
    for fragment in ("gpu_step 3b sdpa ZeRO-2", "gpu_step 7b sdpa ZeRO-3", "tiny sweep on the GPU", "ZeRO-3 adapter"):
        assert fragment in plan.stdout, plan.stdout
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run `make gpu-check` itself")
    bare = run_cli("bench.gpu_check", "--out", str(tmp_path / "gpu.json"))
    assert bare.returncode == 0 and "no CUDA GPU" in bare.stdout and not (tmp_path / "gpu.json").exists()
    # the GPU sweep's file passes every check but the one this machine cannot: it has no GPU
    dry = run_cli("raytune_qvl.sweep", str(sweep_space(tmp_path)), "--dry-run")
    errors = [line for line in dry.stderr.splitlines() if line.startswith("error: ")]
    assert dry.returncode == 2 and len(errors) == 1 and "needs 0.5 GPUs; the cluster has 0" in errors[0], dry.stderr
