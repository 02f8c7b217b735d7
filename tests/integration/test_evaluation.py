"""Generation-based OCR evaluation: the untrained model's CER against a trained one's, the
predictions and label-mask artifacts, and a sweep that optimizes eval_cer."""

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


def test_training_brings_cer_clearly_below_the_untrained_model(tiny_assets: Path, tmp_path: Path) -> None:
    """On a small fixed set of synthetic images, trained for a while, CER falls from garbage
    (the untrained model rambles: CER > 1) to well under half of it."""
    from raytune_qvl.assets.synth import write_dataset

    data = write_dataset(tmp_path / "data", "ocr_doc", 16, 1, seed=5)["train"]
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
        f"data.train_path={data}",
        f"data.eval_path={data}",
        "training.num_epochs=24",
        "training.per_device_train_batch_size=4",
        "training.gradient_accumulation_steps=1",
        "training.eval_steps=24",
        "training.logging_steps=24",
        "training.save_steps=96",
        "training.eval_on_start=true",
        "training.learning_rate=3e-3",
        "lora.lora_dropout=0.0",
        "evaluation.generation_samples=16",
        "training.metric_for_best_model=eval_cer",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = _evals(result.stderr)
    start, end = evals[0]["eval_cer"], evals[max(evals)]["eval_cer"]
    assert start > 1.0, evals
    assert end < 0.5 * start and end < 0.5, evals
    best = json.loads((tmp_path / "out" / "best" / "best.json").read_text())
    assert best["eval_cer"] == min(e["eval_cer"] for e in evals.values())
    rows = json.loads((tmp_path / "out" / "best" / "predictions.json").read_text())["rows"]
    assert len(rows) == 16 and all(set(r) >= {"image", "reference", "prediction", "error"} for r in rows)


def test_sweep_optimizes_eval_cer(cer_sweep: Path) -> None:
    """A joint TPE sweep with metric eval_cer / mode min picks its best trial by it."""
    from mlflow.tracking import MlflowClient

    tmp_path = cer_sweep
    state = json.loads((tmp_path / "sweeps" / "cer" / "sweep_state.json").read_text())
    trials = [t for t in state["trials"] if t["value"] is not None]
    assert len(trials) == 2
    best = json.loads((tmp_path / "sweeps" / "cer" / "best" / "best.json").read_text())
    assert best["metric"] == "eval_cer" and best["value"] == min(t["value"] for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cer").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 2 and all("eval_cer" in r.data.metrics for r in children)
    parent = next(r for r in runs if r.data.tags.get("raytune_qvl.kind") == "sweep")
    assert parent.data.metrics["best_eval_cer"] == pytest.approx(best["value"])
    assert {"data/audit.json", "data/audit.txt"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "data")}
    assert [s for s in state["stages"]] == ["stage1-joint"]
