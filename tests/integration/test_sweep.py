"""A real staged sweep on the tiny model: Optuna TPE + ASHA over Ray Train trials, one trial made
to diverge, the driver interrupted with Ctrl-C mid-sweep and resumed; then Tune's outcome, the
sweep state, MLflow's parent and child runs and the best/ files must all agree."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, as_in_a_terminal, reaped, run_cli, tiny_space

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _space(tmp_path: Path) -> Path:
    return tiny_space(
        tmp_path,
        "itest",
        overrides={
            "training.learning_rate": 1.0e-3,
            "lora.r": 8,
            "training.per_device_train_batch_size": 4,
            "training.gradient_accumulation_steps": 4,
            "training.num_epochs": 1,
            "evaluation.generation_samples": 4,
            "evaluation.generation_every": 4,
            "evaluation.max_new_tokens": 2,  # every answer is cut: a worker's warning, which the sweep shows once
        },
        parameters={
            "training.learning_rate": {"choices": [2.0e-4, 6.0e-4, 1.5e-3, 3.0e-3]},
            "lora.r": {"choices": [4, 8, 16]},
            "effective_batch": {"choices": [8, 16]},
            "training.num_epochs": {"choices": [1, 2]},
        },
        trials_per_stage={"training.learning_rate": 4, "lora.r": 2, "effective_batch": 1, "training.num_epochs": 1},
        metric="eval_loss",
        mode="min",
        lr_scaling={"rule": "linear", "local_search": 0.5},  # reaches the sqrt rule's rate at batch 8
        evals_per_epoch=4,
        asha={"time_attr": "epoch", "grace_period": 0.25, "reduction_factor": 2},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "itest"},
        keep_best_adapters=2,
        confirm={"top_k": 1, "seeds": 1},  # the winner once more with another seed, scored on test
        seed=7,
    )


PLANNED = 4 + 2 + 1 + 1  # trials per stage; the incumbent is never retrained


def test_staged_sweep_with_a_failure_an_interrupt_and_a_resume(tiny_assets: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    space_file = _space(tmp_path)
    # one learning rate diverges (NaN loss from step 2): that trial fails, the sweep goes on
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAYTUNE_QVL_FAULT_NAN": "training.learning_rate=0.0006"}
    # stage 2's rank-4 trial stops after its step 2 and waits: the Ctrl-C lands mid-stage, mid-trial
    paused_env = {**env, "RAYTUNE_QVL_FAULT_PAUSE": "lora.r=4@2"}
    cmd = [sys.executable, "-m", "raytune_qvl.sweep", str(space_file)]
    log_file = tmp_path / "first.log"
    with (
        log_file.open("w") as out,
        reaped(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=paused_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=as_in_a_terminal,
            )
        ) as proc,
    ):
        # the paused worker leaves its marker in the trial's output folder (worker logs stay in Ray's)
        paused = tmp_path / "sweeps" / "itest" / "trials"
        deadline = time.time() + 900
        while not list(paused.glob("*/.faults/pause-2-rank0")):
            assert proc.poll() is None and time.time() < deadline, log_file.read_text()[-4000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    output = log_file.read_text()
    assert proc.returncode == 130, output[-4000:]
    # the diverged trial is one line in the terminal (its traceback stays in its error file and MLflow run)
    assert "Traceback" not in output and "Fatal Python error" not in output, output[-4000:]
    failures = [line for line in output.splitlines() if " failed: " in line]
    assert len(failures) == 1 and "NaN" in failures[0], output[-4000:]
    # a warning of the trials' workers (their output stays in Ray's logs) shows once in the sweep's terminal
    cut = [line for line in output.splitlines() if "warning: " in line and "hit evaluation.max_new_tokens" in line]
    assert len(cut) == 1, output[-4000:]
    assert "invalid value" not in output, output[-4000:]  # the report's warnings pass Tune's loggers
    assert "--resume" in output
    state_path = tmp_path / "sweeps" / "itest" / "sweep_state.json"
    state = json.loads(state_path.read_text())
    assert state["stages"]["stage1-training_learning_rate"]["status"] == "done"
    assert state["stages"]["stage2-lora_r"]["status"] == "running"

    # without --resume the sweep refuses to start over silently
    again = run_cli("raytune_qvl.sweep", str(space_file), env=env)
    assert again.returncode == 2 and "--resume" in again.stderr
    # a resume refuses a changed task, naming the key, and a parent run it cannot reopen; both leave the state as it was
    import yaml

    before = state_path.read_text()
    for change, named in (
        (
            {"overrides": {**yaml.safe_load(space_file.read_text())["overrides"], "training.warmup_ratio": 0.2}},
            "base.training.warmup_ratio",
        ),
        (
            {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "renamed"}},
            "mlflow.experiment",
        ),
    ):
        changed = tmp_path / "changed.yaml"
        changed.write_text(yaml.safe_dump({**yaml.safe_load(space_file.read_text()), **change}))
        refused = run_cli("raytune_qvl.sweep", str(changed), "--resume", env=env)
        assert refused.returncode == 2 and named in refused.stderr and "--overwrite" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and state_path.read_text() == before

    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "stage1-training_learning_rate: already done" in resumed.stderr
    assert "Traceback" not in resumed.stdout + resumed.stderr and "Fatal Python error" not in resumed.stdout

    state = json.loads(state_path.read_text())
    assert state["finished"] is True
    confirmation = [t for t in state["trials"] if t["stage"] == "confirm"]
    trials = [t for t in state["trials"] if t["status"] != "reused" and t["stage"] != "confirm"]
    assert len(trials) == PLANNED, [t["trial_id"] for t in trials]
    assert len({t["trial_id"] for t in trials}) == PLANNED
    keys = {json.dumps(t["overrides"], sort_keys=True) for t in trials}
    assert len(keys) == PLANNED  # no configuration trained twice
    by_stage = {}
    for t in trials:
        by_stage.setdefault(t["stage"], []).append(t)
    assert [len(by_stage[s]) for s in sorted(by_stage)] == [4, 2, 1, 1]
    failed = [t for t in trials if t["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["sampled"]["training.learning_rate"] == pytest.approx(6e-4)
    assert "NaN" in failed[0]["reason"]
    stopped = [t for t in trials if t["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial"
    for t in stopped:  # stopped with a budget below the trial's full length
        assert t["epoch"] < float(t["overrides"]["training.num_epochs"])
    assert all(t["sampler"] for t in trials)  # each point says what suggested it
    # a stopped trial never wins: the best is the best full run
    completed = [t for t in trials if t["status"] == "completed"]
    best_value = min(t["value"] for t in completed)
    winner = next(t for t in completed if t["value"] == best_value)
    # the winner trained once more with another seed, and scored on the held-out test split
    assert len(confirmation) == 1 and confirmation[0]["status"] == "confirmation"
    assert confirmation[0]["sampled"]["of"] == winner["trial_id"] and confirmation[0]["sampled"]["seed"] == 1
    assert confirmation[0]["overrides"] == winner["overrides"]
    assert any(h.get("test_loss") is not None for h in confirmation[0]["history"])

    # MLflow agrees with Tune: one parent, a child per trial, the same statuses and best value
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("itest")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("raytune_qvl.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert len(children) == PLANNED + 1  # a child per trial, the confirmation run included
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    searched = [c for c in children if c.data.tags["raytune_qvl.stage"] != "confirm"]
    status_of = {c.data.tags["raytune_qvl.trial_id"]: c.data.tags["raytune_qvl.status"] for c in searched}
    assert status_of == {t["trial_id"]: t["status"] for t in trials}
    for c in searched:
        assert c.data.tags["raytune_qvl.stage"].startswith("stage")
        assert "training.learning_rate" in c.data.params and "training.gradient_accumulation_steps" in c.data.params
        if c.data.tags["raytune_qvl.status"] == "failed":
            assert c.info.status == "FAILED" and "NaN" in c.data.tags["raytune_qvl.reason"]
        else:
            assert c.info.status == "FINISHED"
            history = client.get_metric_history(c.info.run_id, "eval_loss")
            assert len(history) >= 1
        # what every trial cost: worker-seconds, samples; full runs also parameters and peak memory
        assert c.data.metrics["cost_worker_seconds"] > 0 and "cost_samples" in c.data.metrics
        if c.data.tags["raytune_qvl.status"] == "completed":
            record = next(t for t in trials if t["trial_id"] == c.data.tags["raytune_qvl.trial_id"])
            assert c.data.metrics["cost_samples"] == record["samples_seen"] == record["cost"]["samples"]
            assert c.data.metrics["cost_trainable_params"] > 0 and c.data.metrics["cost_peak_memory_gb"] > 0
            assert c.data.tags["raytune_qvl.attention"] == "sdpa"  # as the trial's workers resolved it
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(best_value)
    mean = (best_value + confirmation[0]["value"]) / 2
    assert parent.data.metrics["best_eval_loss_mean"] == pytest.approx(mean)
    # one test score (one confirmation seed): a mean and no spread; two eval values: both
    assert parent.data.metrics["test_loss_mean"] > 0 and "test_loss_std" not in parent.data.metrics
    assert "best_eval_loss_std" in parent.data.metrics
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_stopped"] == len(stopped)
    # the front of eval loss against cost names the winner and the cheapest config within 1% of it
    front = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "cost_front.json", str(tmp_path))).read_text()
    )
    assert front["best"] == winner["trial_id"] and front["measure"] == "worker_seconds"
    assert {c["trial"] for c in front["configs"]} == {t["trial_id"] for t in completed}
    assert front["cheapest_within"] in front["front"]
    cheapest = next(c for c in front["configs"] if c["trial"] == front["cheapest_within"])
    assert cheapest["value"] <= front["limit"] and parent.data.metrics["cheapest_eval_loss"] == cheapest["value"]
    assert parent.data.tags["raytune_qvl.cheapest_within"] == front["cheapest_within"]
    assert "cost front (eval_loss against worker-s" in resumed.stdout
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {
        "plots/cost_front.png",
        "plots/optimization_history.png",
        "plots/learning_curves.png",
        "plots/parallel_coordinates.png",
        "plots/sweep_report.html",
    } <= artifacts

    # the best configuration, written out, passes the trainer's dry run
    best = tmp_path / "sweeps" / "itest" / "best"
    summary = json.loads((best / "best.json").read_text())
    assert summary["value"] == pytest.approx(best_value) and summary["trial"] == winner["trial_id"]
    assert (best / "adapter" / "adapter_model.safetensors").exists()
    dry = run_cli(
        "raytune_qvl.train",
        "--config",
        str(best / "training_config.yaml"),
        "--lora_config",
        str(best / "lora_config.yaml"),
        "--dry-run",
    )
    assert dry.returncode == 0, dry.stderr
    assert f"{summary['overrides']['training.learning_rate']:g}" in dry.stdout
    assert "raytune_qvl.train --config" in (best / "command.txt").read_text()

    # sweeps do not fill the disk: engine checkpoints are gone, adapters kept for the best 2
    assert not list((tmp_path / "ray" / "itest" / "trials").glob("*/checkpoint-*"))
    finals = [p for p in (tmp_path / "sweeps" / "itest" / "trials").glob("*/final") if p.is_dir()]
    assert len(finals) == 2


def test_a_sweep_whose_workers_are_killed_finishes_every_planned_trial_at_its_last_step(
    tiny_assets: Path, tmp_path: Path
) -> None:
    """Chaos in the spirit of Ray's node-kill release test, at seeded steps instead of a timer: in
    a 6-trial sweep every trial's worker is SIGKILLed once, after a step drawn from the seed and
    the trial's config; Ray Train restarts it from its last checkpoint. The sweep ends with
    exactly the 6 planned trials, each completed at its planned last step."""

    forms, data = ROOT / ".assets" / "data" / "forms", tmp_path / "data"  # 96 training and 16 eval records
    (data / "images").mkdir(parents=True)
    for split, n in (("train", 96), ("eval", 16)):
        lines = (forms / f"{split}.jsonl").read_text().splitlines(keepends=True)[:n]
        (data / f"{split}.jsonl").write_text("".join(lines))
        for line in lines:
            image = json.loads(line)["image"]
            shutil.copy(forms / image, data / image)
    space = tiny_space(
        tmp_path,
        "chaos",
        config_overrides={
            "data.train_path": str(data / "train.jsonl"),
            "data.eval_path": str(data / "eval.jsonl"),
            "training.num_epochs": 1,
            "training.per_device_train_batch_size": 4,
            "training.gradient_accumulation_steps": 2,
            "evaluation.generation_samples": 0,
        },
        strategy="joint",
        joint_trials=6,
        parameters={"training.learning_rate": {"choices": [3e-4, 1e-3, 3e-3]}, "lora.r": {"choices": [4, 8]}},
        trials_per_stage=6,
        metric="eval_loss",
        evals_per_epoch=2,
        asha={"enabled": False},
        keep_best_adapters=6,
        resources={"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
    )
    env = {**os.environ, "RAYTUNE_QVL_FAULT_CHAOS": "7:1"}
    result = run_cli("raytune_qvl.sweep", str(space), env=env, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "chaos"
    trials = [t for t in json.loads((sweep / "sweep_state.json").read_text())["trials"] if t["status"] != "reused"]
    assert len(trials) == 6 and all(t["status"] == "completed" for t in trials), [
        (t["trial_id"], t["status"], t["reason"]) for t in trials
    ]
    assert len({json.dumps(t["overrides"], sort_keys=True) for t in trials}) == 6
    for t in trials:
        folder = sweep / "trials" / t["trial_id"]
        complete = json.loads((folder / "final" / "training_complete.json").read_text())
        total = complete["total_steps"]
        assert total == 96 // 8 and complete["step"] == total, complete
        assert t["history"][-1]["step"] == total
        (kill,) = [p.name for p in (folder / ".faults").glob("kill-*")]  # it was killed, once
        assert 1 <= int(kill.split("-")[1]) < total, kill
