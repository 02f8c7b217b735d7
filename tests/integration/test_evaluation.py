"""A sweep that optimizes eval_cer (generation-based OCR evaluation). Training that lowers CER is in
test_learning.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


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
