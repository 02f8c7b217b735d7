"""The embedded default learns for real: the pre-trained base reads its own domain (the random model
of the same architecture does not), reads the demo's target domain badly, and one LoRA run on the
target brings its CER down by a margin, through the project's own CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_LORA, TINY_TRAIN, ZERO2, run_cli

pytestmark = pytest.mark.slow


def _evals(stderr: str) -> dict[int, dict[str, float]]:
    out = {}
    for line in stderr.splitlines():
        if line.startswith("step ") and "eval_cer" in line:
            step = int(line.split()[1].split("/")[0])
            fields = line.split("| ")[1].split()
            out[step] = {
                fields[i]: float(fields[i + 1]) for i in range(0, len(fields) - 1, 2) if fields[i].startswith("eval_")
            }
    return out


def test_the_model_card_reports_a_base_that_reads_and_a_target_it_does_not(tiny_assets: Path) -> None:
    build = json.loads((tiny_assets / "tiny-qwen25vl" / "build.json").read_text())
    assert build["cer_base"] <= 0.10, build
    assert build["cer_forms"] >= 0.35, build
    card = (tiny_assets / "tiny-qwen25vl" / "MODEL_CARD.md").read_text()
    assert f"**{build['cer_base']:.3f}**" in card and f"**{build['cer_forms']:.3f}**" in card


def test_the_pretrained_base_reads_and_the_random_model_does_not(tiny_assets: Path, tmp_path: Path) -> None:
    from raytune_qvl.assets.base import read_cer
    from raytune_qvl.assets.synth import write_dataset

    random_model = tmp_path / "random"
    result = run_cli("raytune_qvl.tiny", str(random_model), "--random")
    assert result.returncode == 0, result.stderr[-2000:]
    data = write_dataset(tmp_path / "base", "ocr_doc", 1, 64, seed=77, domain="base")["eval"]
    trained, _ = read_cer(tiny_assets / "tiny-qwen25vl", data)
    untrained, _ = read_cer(random_model, data)
    assert trained <= untrained - 0.5, (trained, untrained)


def test_one_lora_run_on_the_target_lowers_cer(tiny_assets: Path, tmp_path: Path) -> None:
    """The tiny default's own training command on the forms domain, evaluated before and after."""
    result = run_cli(
        "raytune_qvl.train",
        "--config",
        str(TINY_TRAIN),
        "--lora_config",
        str(TINY_LORA),
        "--deepspeed",
        str(ZERO2),
        "--no-ray",
        f"output.dir={tmp_path / 'out'}",
        f"output.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "training.per_device_train_batch_size=8",
        "training.gradient_accumulation_steps=2",
        "training.eval_steps=32",
        "training.logging_steps=16",
        "training.save_steps=1000",
        "training.eval_on_start=true",
        "training.metric_for_best_model=eval_cer",  # best/ is the checkpoint that reads best
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = _evals(result.stderr)
    start, end = evals[0]["eval_cer"], evals[max(evals)]["eval_cer"]
    assert start >= 0.35, evals  # the target is a domain the base reads badly
    assert end <= start - 0.2, evals
    best = json.loads((tmp_path / "out" / "best" / "best.json").read_text())
    assert best["eval_cer"] == pytest.approx(min(e["eval_cer"] for e in evals.values() if "eval_cer" in e), abs=1e-4)
    rows = json.loads((tmp_path / "out" / "best" / "predictions.json").read_text())["rows"]
    assert len(rows) == 64 and all(set(r) >= {"image", "reference", "prediction", "error", "truncated"} for r in rows)
    assert not any(r["truncated"] for r in rows)  # max_new_tokens null covers the longest reference
