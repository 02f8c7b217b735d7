"""A warm start on the tiny model: a first sweep over the learning rate, then a second one that adds
the LoRA rank and more rates, seeded from the first with --warm-start. The second must train none
of the first's points, start from the first's best, tell Optuna the first's results, and say so on
its MLflow parent run; a source of another task is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, tiny_space
from raytune_qvl.sweep.records import point_key

pytestmark = pytest.mark.slow

LR = "training.learning_rate"


def _space(tmp_path: Path, name: str, parameters: dict, trials: dict) -> Path:
    return tiny_space(
        tmp_path,
        name,
        overrides={
            LR: 1.0e-3,
            "lora.r": 8,
            "lora.lora_alpha": 16,  # the space's alpha for rank 8 (lora_alpha_ratio 2)
            "training.per_device_train_batch_size": 4,
            "training.gradient_accumulation_steps": 4,
            "training.num_epochs": 1,
            "evaluation.generation_samples": 4,
            "evaluation.max_new_tokens": 8,
        },
        parameters=parameters,
        trials_per_stage=trials,
        metric="eval_loss",
        mode="min",
        evals_per_epoch=2,
        asha={"enabled": False},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "warm"},
        seed=3,
    )


def _own_trials(name: str, tmp_path: Path) -> list[dict]:
    state = json.loads((tmp_path / "sweeps" / name / "sweep_state.json").read_text())
    return [t for t in state["trials"] if t["status"] not in ("reused",) and not t.get("origin")]


def test_a_warm_started_sweep_trains_none_of_its_sources_points(tiny_assets: Path, tmp_path: Path) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    first = _space(tmp_path, "first", {LR: {"choices": [3.0e-4, 1.5e-3]}}, {LR: 2})
    done = run_cli("raytune_qvl.sweep", str(first), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    source = _own_trials("first", tmp_path)
    assert len(source) == 2 and all(t["status"] == "completed" for t in source)
    best = json.loads((tmp_path / "sweeps" / "first" / "best" / "best.json").read_text())

    # a new dimension first (the rank), then the rate with one more choice
    params = {"lora.r": {"choices": [4, 8]}, LR: {"choices": [3.0e-4, 1.5e-3, 3.0e-3]}}
    second = _space(tmp_path, "second", params, {"lora.r": 1, LR: 3})
    folder = str(tmp_path / "sweeps" / "first")

    # a source of another task (another warm-up here) is refused before anything runs
    other = run_cli("raytune_qvl.sweep", str(second), "overrides.training.warmup_ratio=0.3", "--warm-start", folder)
    assert other.returncode == 2 and "another task" in other.stderr and "Traceback" not in other.stderr
    assert not (tmp_path / "sweeps" / "second" / "sweep_state.json").exists()

    run = run_cli("raytune_qvl.sweep", str(second), "--warm-start", folder, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "warm start from" in run.stdout and "status warm" in run.stdout
    trained = _own_trials("second", tmp_path)
    assert {point_key(t["overrides"]) for t in trained}.isdisjoint({point_key(t["overrides"]) for t in source})

    # the rank stage starts at the first sweep's best rate: rank 8 there is the source's best (told,
    # a candidate), so the stage trains rank 4 only, at that rate
    stage1 = [t for t in trained if t["stage"] == "stage1-lora_r"]
    assert len(stage1) == 1 and stage1[0]["overrides"]["lora.r"] == 4
    assert stage1[0]["overrides"][LR] == pytest.approx(best["overrides"][LR])
    state = json.loads((tmp_path / "sweeps" / "second" / "sweep_state.json").read_text())
    reused = [t for t in state["trials"] if t["status"] == "reused" and t["stage"] == "stage1-lora_r"]
    assert [t["trial_id"] for t in reused] == [best["trial"]]
    assert state["warm_start"]["trials"] == 2 and state["warm_start"]["best"] == best["trial"]
    study = optuna.load_study(
        study_name="second-stage1-lora_r", storage=f"sqlite:///{tmp_path}/sweeps/second/optuna.db"
    )
    told = [t for t in study.trials if t.state.name == "COMPLETE" and t.params == {"lora.r": 8}]
    assert len(told) == 1 and told[0].value == pytest.approx(best["value"])
    # the rate stage at the stage's best rank: only rates the source did not train there
    stage2 = [t for t in trained if t["stage"] == "stage2-training_learning_rate"]
    winner_r = state["stages"]["stage1-lora_r"]["best"]["lora.r"]
    expected = {3.0e-3} if winner_r == 8 else {3.0e-4, 1.5e-3, 3.0e-3} - {best["overrides"][LR]}
    assert sorted(t["overrides"][LR] for t in stage2) == pytest.approx(sorted(expected))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("warm")
    parents = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("raytune_qvl.kind") == "sweep" and r.info.run_name == "second"
    ]
    assert len(parents) == 1
    params = parents[0].data.params
    assert params["warm_start.source"] == str(Path(folder).absolute()) and params["warm_start.trials"] == "2"
    assert params["warm_start.best"] == best["trial"]
    children = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    ]
    assert len(children) == len(trained)  # a child per trial this sweep trained; the source's are its own
