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


def test_plain_reference_loop_runs(tiny_assets: Path) -> None:
    result = run_cli("bench.plain_loop", "--steps", "3", "--warmup", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["samples_per_second"] > 0
