"""One trial end to end on a real local Ray cluster with 2 CPU workers, real DeepSpeed engines and
a real MLflow store: ZeRO-2 and ZeRO-3 + offload, a killed worker, interrupt and resume,
reproducibility, the adapter reload, and what lands in MLflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_LORA, TINY_TRAIN, ZERO2, ZERO3, as_in_a_terminal, reaped
from raytune_qvl.train.faults import FAULT_PAUSE_ENV as FAULT_PAUSE

pytestmark = pytest.mark.slow

SHORT = [
    "training.num_epochs=2",
    "training.eval_steps=8",
    "training.save_steps=8",
    "training.logging_steps=4",
    "evaluation.generation_samples=8",
]


def _eval_history(history: list[dict]) -> list[tuple[int, float]]:
    return [(int(m["step"]), m["eval_loss"]) for m in history if "eval_loss" in m]


def test_zero2_two_workers_learns_and_tracks_one_mlflow_run(tiny_config, ray_cluster, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from raytune_qvl.train.run import run_training

    cfg = tiny_config(*SHORT)
    result = run_training(cfg)
    evals = _eval_history(result.history)
    assert [s for s, _ in evals] == [8, 16, 24, 32]
    assert evals[-1][1] < evals[0][1] - 0.3, evals
    assert result.metrics["step"] == 32 and result.metrics["finished"] is True

    # exactly one run, with the flattened config, every log/eval step and the artifacts
    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.output.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["training.learning_rate"] == "0.003"  # configs/tiny
    assert run.data.params["lora.r"] == "16" and run.data.params["derived.effective_batch_size"] == "16"
    assert run.data.tags["raytune_qvl.attention"] == "sdpa"  # as the workers resolved it
    history = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [m.step for m in history] == [8, 16, 24, 32]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 8  # every logging step
    assert "eval_cer" in run.data.metrics and "data_train_records" in run.data.metrics
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config", "data", "final", "eval"} <= artifacts
    config_files = {f.path for f in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/training_config.yaml", "config/lora_config.yaml", "config/ds_config.json"} <= config_files
    filled = json.loads(
        Path(client.download_artifacts(run.info.run_id, "config/ds_config.json", str(tmp_path))).read_text()
    )
    assert filled["scheduler"]["type"] == "WarmupCosineLR" and "auto" not in json.dumps(filled)
    final = {f.path for f in client.list_artifacts(run.info.run_id, "final")}
    assert "final/adapter_model.safetensors" in final
    # OCR evaluation: the label-mask view, the data audit and the predictions at the best checkpoint
    data_files = {f.path for f in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/label_mask.html", "data/audit.json", "data/audit.txt"} <= data_files
    eval_files = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/predictions.html", "eval/predictions_table.json"} <= eval_files
    table = json.loads(
        Path(client.download_artifacts(run.info.run_id, "eval/predictions_table.json", str(tmp_path))).read_text()
    )
    assert len(table["data"]) == 8 and "image" in table["columns"]  # the generation subset, from both workers
    mask = Path(client.download_artifacts(run.info.run_id, "data/label_mask.html", str(tmp_path))).read_text()
    assert "class='tok trained'" in mask and "class='tok masked'" in mask
    # generation metrics are in range; CER and WER can exceed 1 for long garbage, never go below 0
    assert run.data.metrics["eval_cer"] >= 0 and 0 <= run.data.metrics["eval_exact_match"] <= 1
    predictions = json.loads((Path(cfg.output.dir) / "best" / "predictions.json").read_text())
    assert sorted(r["index"] for r in predictions["rows"]) == sorted(set(r["index"] for r in predictions["rows"]))

    # the final folder holds a loadable adapter, the processor and the resolved configs
    final_dir = result.final_dir
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "processor_config.json",
        "training_config.yaml",
        "ds_config.json",
    ):
        assert (final_dir / name).exists(), name
    # and its configs reproduce the run: they load and pass validation
    from raytune_qvl.config.load import load_config

    again = load_config(
        final_dir / "training_config.yaml",
        final_dir / "lora_config.yaml",
        final_dir / "ds_config.json",
        check_files=True,
    )
    assert again.training.learning_rate == cfg.training.learning_rate

    # running the finished command again is refused, not silently redone
    from raytune_qvl.errors import ConfigError

    with pytest.raises(ConfigError, match="holds a finished run"):
        run_training(cfg)


def test_zero3_offload_two_workers_saves_a_full_adapter(tiny_config, ray_cluster) -> None:
    """ZeRO-3 with CPU offload, with the settings real configs run: gradient checkpointing (DeepSpeed +
    peft, non-reentrant) and DataLoader worker processes inside the Ray Train workers."""
    from safetensors.torch import load_file

    from raytune_qvl.train.run import run_training

    cfg = tiny_config(
        *SHORT,
        "evaluation.generation_samples=4",
        "environment.gradient_checkpointing=true",
        "data.num_workers=1",
        deepspeed=ZERO3,
    )
    assert cfg.environment.gradient_checkpointing and cfg.data.num_workers == 1
    result = run_training(cfg)
    evals = _eval_history(result.history)
    assert evals[-1][1] < evals[0][1] - 0.3, evals
    # under ZeRO-3 each worker holds a shard: an ungathered save writes empty tensors
    weights = load_file(result.final_dir / "adapter_model.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(t.numel() > 0 for t in weights.values())
    assert all(t.shape[1] == 16 for t in lora_b)  # rank 16
    assert sum(float(t.float().abs().sum()) for t in lora_b) > 0  # trained (lora_B starts at zero)


def _ray_worker_pids() -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            pids.append(proc.info["pid"])
    return pids


@pytest.mark.faults
def test_killed_worker_resumes_from_checkpoint_with_exact_step_count(
    tiny_config, ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raytune_qvl.train.outputs import ray_run_name
    from raytune_qvl.train.run import run_training

    cfg = tiny_config(
        "training.num_epochs=3", "training.save_steps=8", "training.eval_steps=8", "evaluation.generation_samples=0"
    )
    # both workers stop after step 12 (once per run): the kill lands there, whatever the machine's speed
    monkeypatch.setenv("RAYTUNE_QVL_FAULT_PAUSE", "12")
    paused = [Path(cfg.output.dir) / ".faults" / f"pause-12-rank{rank}" for rank in (0, 1)]
    snapshot = Path(cfg.ray.storage_path) / ray_run_name(cfg) / "checkpoint_manager_snapshot.json"
    killed: list[int] = []

    def committed() -> bool:  # Ray has registered the step-8 checkpoint (not just begun its upload)
        try:
            return '"checkpoint-000008"' in snapshot.read_text()
        except OSError:
            return False

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not (committed() and all(p.exists() for p in paused)):
            time.sleep(0.05)
        pids = _ray_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    result = run_training(cfg)
    watcher.join(timeout=5)
    assert killed, "no worker was killed"
    steps = [int(m["step"]) for m in result.history]
    assert result.metrics["step"] == 48 and result.metrics["finished"] is True
    # the restarted workers continued from the step-8 checkpoint, not from 0
    assert {int(m["start_step"]) for m in result.history} == {0, 8}
    assert steps.count(4) == 1 and set(range(4, 49, 4)) <= set(steps), steps
    complete = json.loads((result.final_dir / "training_complete.json").read_text())
    assert complete["total_steps"] == 48 and complete["step"] == 48


@pytest.mark.faults
def test_a_worker_lost_after_the_final_report_finds_the_run_finished(
    tiny_config, ray_cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step's checkpoint of a sweep trial is the adapter alone (training.final_checkpoint
    adapter): a worker killed right after the final report makes Ray Train restart the group from
    it, which finds the run finished and loads nothing; the earlier checkpoint keeps its engine."""
    from raytune_qvl.train.checkpoint import ADAPTER_DIR, STATE_FILE, has_engine_state
    from raytune_qvl.train.faults import FAULT_KILL_ENV
    from raytune_qvl.train.outputs import ray_run_name
    from raytune_qvl.train.run import run_training

    cfg = tiny_config(
        "training.num_epochs=1",
        "training.save_steps=8",
        "training.eval_steps=8",
        "training.final_checkpoint=adapter",
        "evaluation.generation_samples=0",
    )
    monkeypatch.setenv(FAULT_KILL_ENV, "16")  # the last step, after its report
    result = run_training(cfg)
    assert result.metrics["step"] == 16 and result.metrics["finished"] is True
    assert (Path(cfg.output.dir) / ".faults" / "kill-16-rank1").exists()  # the kill happened
    run = Path(cfg.ray.storage_path) / ray_run_name(cfg)
    last, middle = run / "checkpoint-000016", run / "checkpoint-000008"
    assert not has_engine_state(last) and not list(last.glob("rng_state_*"))
    assert (last / ADAPTER_DIR / "adapter_model.safetensors").is_file() and (last / STATE_FILE).is_file()
    assert has_engine_state(middle)  # a restart before the end resumes from this one
    assert json.loads((result.final_dir / "training_complete.json").read_text())["step"] == 16


@pytest.mark.faults
@pytest.mark.parametrize(
    "mode", [("--no-ray", ZERO2, 1), ("ray", ZERO3, 2)], ids=["local-zero2", "ray-zero3-offload-2-workers"]
)
def test_interrupt_and_resume_continues_with_the_same_data_order(
    mode: tuple[str, Path, int], tiny_assets: Path, tmp_path: Path
) -> None:
    """Ctrl-C the CLI after its first checkpoint (every worker paused at step 12 by the fault
    hook, and under Ray the step-8 checkpoint registered, so the signal lands there however slowly
    this test runs); the same command continues from step 8 and ends where an uninterrupted run
    with the same seed ends, with the same eval losses: in one process under ZeRO-2, and under Ray
    with two ZeRO-3 workers (partitioned parameters and optimizer state offloaded to the CPU). The
    tiny ZeRO-3 file's live cap makes DeepSpeed check its prefetch queue against the modules at each
    step of the resumed run, which stopped it while a loaded engine held its small weights gathered."""
    launcher, zero, workers = mode
    common = [
        "raytune_qvl.train",
        "--config",
        str(TINY_TRAIN),
        "--lora_config",
        str(TINY_LORA),
        "--deepspeed",
        str(zero),
        "training.max_steps=32" if workers == 1 else "training.max_steps=16",
        "training.save_steps=8",
        "training.eval_steps=8",
        "evaluation.generation_samples=0",
        f"ray.num_workers={workers}",
        f"output.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *(["--no-ray"] if launcher == "--no-ray" else []),
    ]
    ends = 32 if workers == 1 else 16

    def command(out: str) -> list[str]:
        return [sys.executable, "-m", *common, f"output.dir={tmp_path / out}", f"ray.storage_path={tmp_path / out}-ray"]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = subprocess.run(command("a"), cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]

    paused = [tmp_path / "b" / ".faults" / f"pause-12-rank{rank}" for rank in range(workers)]
    snapshots = tmp_path / "b-ray"

    def there() -> bool:  # every worker waits after step 12, and Ray has registered step 8's checkpoint
        if not all(p.exists() for p in paused):
            return False
        if launcher == "--no-ray":
            return (tmp_path / "b" / "checkpoints" / "checkpoint-000008").exists()
        return any('"checkpoint-000008"' in f.read_text() for f in snapshots.glob("*/checkpoint_manager_snapshot.json"))

    log_file = tmp_path / "b.log"
    with (
        log_file.open("w") as log,
        reaped(
            subprocess.Popen(
                command("b"),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env={**env, FAULT_PAUSE: "12"},
                preexec_fn=as_in_a_terminal,
            )
        ) as proc,
    ):
        deadline = time.time() + 600
        while not there():
            assert proc.poll() is None and time.time() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    seen = log_file.read_text()
    assert proc.returncode != 0, seen[-3000:]
    assert not (tmp_path / "b" / "final").exists()

    resumed = subprocess.run(command("b"), cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 8" in resumed.stderr, resumed.stderr[-3000:]

    def evals(text: str) -> dict[int, str]:
        out = {}
        for line in text.splitlines():
            if line.startswith("step ") and "eval_loss" in line:
                out[int(line.split()[1].split("/")[0])] = line.split("eval_loss ")[1].split()[0]
        return out

    ref_evals = evals(reference.stderr)
    assert set(ref_evals) == set(range(8, ends + 1, 8))
    before = evals(seen)
    after = evals(resumed.stderr)
    assert before[8] == ref_evals[8]  # same seed, same start: the same history
    later = range(16, ends + 1, 8)
    assert {s: after[s] for s in later} == {s: ref_evals[s] for s in later}  # same data order after resume
    assert json.loads((tmp_path / "b" / "final" / "training_complete.json").read_text())["step"] == ends


# LoRA variants, each trained and reloaded: DoRA (a magnitude per output, with rsLoRA's scale and the
# merger trained in full), PiSSA (the base changes: saved converted to a rank-2r LoRA for the unchanged base)
# with LoRA+ and per-module rates, under ZeRO-2 and ZeRO-3 (its SVD and DoRA's norms read gathered weights)
VARIANTS = {
    "zero2": (ZERO2, []),
    "zero3": (ZERO3, []),
    "dora-rslora-merger-zero2": (ZERO2, ["lora.use_dora=true", "lora.use_rslora=true", "training.train_merger=true"]),
    "dora-zero3": (ZERO3, ["lora.use_dora=true"]),
    "pissa-loraplus-zero2": (
        ZERO2,
        ["lora.init_lora_weights=pissa", "lora.loraplus_lr_ratio=16", "training.vision_lr_ratio=0.5"],
    ),
    # DoRA's direction is the same matrix before and after the conversion, so its magnitudes carry over
    "pissa-dora-zero3": (ZERO3, ["lora.init_lora_weights=pissa_niter_4", "lora.use_rslora=true", "lora.use_dora=true"]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reloaded_adapter_reproduces_the_trained_logits(variant: str, tiny_assets: Path, tmp_path: Path) -> None:
    """Train (under ZeRO-3: partitioned weights, saved through the gather) with vision LoRA and a
    module trained in full (`modules_to_save`, whose save once crashed), reload the adapter on a
    fresh base model with plain peft: the logits match the engine's, for every LoRA variant."""
    zero, extra = VARIANTS[variant]
    code = f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from raytune_qvl import runtime; runtime.quiet_libraries()
from raytune_qvl.config.load import load_config
from raytune_qvl.train.engine import WorkerContext
from raytune_qvl.train.session import setup, LocalReporter
from raytune_qvl.train.loop import run
from raytune_qvl.data.cache import load_or_prepare
from raytune_qvl.data.batches import TrainDataset, Collator
from raytune_qvl.train.model import load_model
from raytune_qvl.data.processor import load_processor
from peft import PeftModel
cfg = load_config({str(TINY_TRAIN)!r}, {str(TINY_LORA)!r}, {str(zero)!r}, [
    "ray.num_workers=1", "training.max_steps=6", "training.eval_steps=3", "training.logging_steps=3",
    "evaluation.generation_samples=0", "output.dir={tmp_path / "z3"}",
    "model.torch_dtype=float32", "environment.bf16=false", "deepspeed.bf16.enabled=false", "lora.lora_dropout=0.0",
    "lora.modules_to_save=[lm_head]", *{extra!r}])
assert cfg.lora.vision_lora.enabled and cfg.lora.modules_to_save == ["lm_head"]
processor = load_processor(cfg)
items = load_or_prepare(cfg, processor, "eval").items[:2]
batch = Collator(processor.tokenizer.pad_token_id)([TrainDataset(items, processor)[i] for i in range(2)])
batch = {{k: v for k, v in batch.items() if k != "labels"}}
session = setup(cfg, WorkerContext(), LocalReporter(cfg))
run(session)
engine = session.engine
engine.eval()
with torch.no_grad():
    trained = engine(**batch).logits.float()
base = load_model(cfg)
reloaded = PeftModel.from_pretrained(base, {str(tmp_path / "z3" / "final")!r}).eval()
with torch.no_grad():
    again = reloaded(**batch).logits.float()
print("MAXDIFF", (trained - again).abs().max().item(), trained.abs().max().item())
untouched = load_model(cfg).eval()
with torch.no_grad():
    print("BASEDIFF", (trained - untouched(**batch).logits.float()).abs().max().item())
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("MAXDIFF"))
    diff, scale = map(float, line.split()[1:])
    assert scale > 1 and diff < 1e-4 * scale, line
    trained_away = float(next(l for l in result.stdout.splitlines() if l.startswith("BASEDIFF")).split()[1])
    assert trained_away > 100 * diff, (trained_away, line)  # training moved the logits: the match is not trivial
    if "pissa" in variant:  # saved as a plain LoRA of twice the rank for the unchanged base
        saved = json.loads((tmp_path / "z3" / "final" / "adapter_config.json").read_text())
        assert saved["r"] == 2 * 16 and saved["init_lora_weights"] is True


@pytest.mark.faults
def test_nan_loss_stops_the_run_naming_the_step(tiny_config, ray_cluster, tiny_assets: Path, tmp_path: Path) -> None:
    """A checkpoint with an infinite weight (a corrupted download, say) makes the loss NaN: the
    run stops at that step on every worker, fails in MLflow, and writes no final adapter."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file, save_file

    from raytune_qvl.train.run import TrainingFailed, run_training

    poisoned = tmp_path / "poisoned-model"
    shutil.copytree(tiny_assets / "tiny-qwen25vl", poisoned)
    weights = load_file(poisoned / "model.safetensors")
    key = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[key][0, 0] = float("inf")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})

    cfg = tiny_config(f"model.name={poisoned}", "training.max_steps=6", "evaluation.generation_samples=0")
    with pytest.raises(TrainingFailed, match=r"loss is NaN or infinite at optimizer step 1\b") as info:
        run_training(cfg)
    assert len(info.value.lines()) == 1
    client = MlflowClient(cfg.output.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.output.experiment_name).experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["raytune_qvl.status"] == "failed" and "optimizer step 1" in run.data.tags["raytune_qvl.reason"]
    assert not (Path(cfg.output.dir) / "final").exists()


def test_resume_from_an_explicit_checkpoint(tiny_assets: Path, tmp_path: Path) -> None:
    """`--resume PATH` starts a new run from another run's checkpoint."""
    from conftest import run_cli

    common = [
        "raytune_qvl.train",
        "--config",
        str(TINY_TRAIN),
        "--lora_config",
        str(TINY_LORA),
        "--deepspeed",
        str(ZERO2),
        "--no-ray",
        "training.max_steps=16",
        "training.save_steps=8",
        "training.eval_steps=8",
        "evaluation.generation_samples=0",
        f"output.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    first = run_cli(*common, f"output.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-000008"
    assert checkpoint.is_dir()
    second = run_cli(*common, f"output.dir={tmp_path / 'b'}", "--resume", str(checkpoint))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "at step 8" in second.stderr
    steps = [int(line.split()[1].split("/")[0]) for line in second.stderr.splitlines() if line.startswith("step ")]
    assert steps[0] == 9 and steps[-1] == 16  # it began after the checkpoint's step


def test_concurrent_runs_on_one_node_do_not_collide(tiny_assets: Path, tmp_path: Path) -> None:
    """Two training commands at once, each with its own local Ray cluster and process group."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "raytune_qvl.train",
                "--config",
                str(TINY_TRAIN),
                "--lora_config",
                str(TINY_LORA),
                "--deepspeed",
                str(ZERO2),
                "ray.num_workers=1",
                "training.max_steps=8",
                "evaluation.generation_samples=0",
                f"output.dir={tmp_path / name}",
                f"ray.storage_path={tmp_path / ('ray-' + name)}",
                f"output.tracking_uri=sqlite:///{tmp_path / (name + '.db')}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("one", "two")
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    for name in ("one", "two"):
        assert json.loads((tmp_path / name / "final" / "training_complete.json").read_text())["step"] == 8
