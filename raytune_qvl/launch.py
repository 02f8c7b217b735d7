"""The driver of one training run: pre-flight (config, data audit, plan) before any worker
starts, one MLflow run, a TorchTrainer (or the loop in-process with --no-ray), one progress
view, and the outputs logged at the end."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

from raytune_qvl import runtime
from raytune_qvl.config import Config, flatten
from raytune_qvl.errors import ConfigError, Problem, UserError
from raytune_qvl.loop import BEST_DIR, COMPLETE_MARKER, DIVERGED_FILE, FINAL_DIR
from raytune_qvl.plan import Plan, make_plan

__all__ = ["Preflight", "preflight", "TrainResult", "TrainingFailed", "run_training", "ray_run_name", "format_progress"]

log = logging.getLogger("raytune_qvl")
RUN_FILE = ".raytune_qvl_run.json"  # the MLflow run id of this output folder, for resumes


class TrainingFailed(UserError):
    """The run started but did not finish (diverged, workers failed past max_failures)."""

    exit_code = 1


@dataclass
class Preflight:
    processor: Any
    train: Any  # PreparedSplit
    eval: Any  # PreparedSplit | None
    plan: Plan


def preflight(cfg: Config, *, progress: bool | None = None) -> Preflight:
    """Everything that can fail before a worker starts: processor, data audit, the plan.
    The prepared data is cached, so workers (and later trials) read it instead of redoing it."""
    runtime.quiet_libraries()
    from raytune_qvl.data import check_audit, load_or_prepare
    from raytune_qvl.model import load_processor

    progress = sys.stderr.isatty() if progress is None else progress
    processor = load_processor(cfg)
    train = load_or_prepare(cfg, processor, "train", progress=progress)
    check_audit(train.audit, cfg.data)
    eval_split = load_or_prepare(cfg, processor, "eval", progress=progress)
    if eval_split is not None:
        check_audit(eval_split.audit, cfg.data)
    return Preflight(processor, train, eval_split, make_plan(cfg, num_samples=len(train.items)))


def ray_run_name(cfg: Config) -> str:
    """Stable for one output folder: the same command finds its checkpoints again."""
    base = cfg.output.run_name or Path(cfg.output.dir).name
    digest = hashlib.sha1(cfg.output.dir.encode()).hexdigest()[:8]
    return f"{base}-{digest}"


def format_progress(m: dict[str, Any], started: float) -> str:
    step, total = m.get("step", 0), m.get("total_steps", 0)
    parts = [f"step {step:>5}/{total} ({100 * step / max(total, 1):3.0f}%)", f"epoch {m.get('epoch', 0):.2f}"]
    if "loss" in m:
        parts += [f"loss {m['loss']:.4f}", f"lr {m['learning_rate']:.2e}", f"{m['samples_per_second']:.1f} samples/s"]
    if "setup_seconds" in m:
        parts.append(f"set-up {m['setup_seconds']:.1f}s (data {m['data_prep_seconds']:.2f}s)")
    evals = [f"{k} {v:.4f}" for k, v in m.items() if k.startswith("eval_") and isinstance(v, float)]
    if evals:
        parts.append("| " + " ".join(evals))
    elapsed = time.perf_counter() - started
    if 0 < step < total:
        parts.append(f"ETA {elapsed / step * (total - step):.0f}s")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- MLflow


def log_inputs(tracker: Any, run_id: str, cfg: Config, pre: Preflight) -> None:
    """Params (the flattened resolved config), resolved config files, the filled DeepSpeed
    JSON, the data audit (metrics + artifact) and the label-mask view."""
    from raytune_qvl.loop import write_resolved_configs
    from raytune_qvl.views import label_mask_html

    params = flatten({**cfg.training_dict(), **cfg.lora_dict()})
    params.update({
        "derived.world_size": pre.plan.world_size,
        "derived.effective_batch_size": pre.plan.effective_batch,
        "derived.total_steps": pre.plan.total_steps,
        "derived.warmup_steps": pre.plan.warmup_steps,
        "derived.zero_stage": pre.plan.zero_stage,
        "derived.lora_scale": cfg.lora.lora_alpha / cfg.lora.r,
    })
    tracker.log_params(run_id, params)
    folder = Path(tempfile.mkdtemp(prefix="raytune_qvl-config-"))
    write_resolved_configs(cfg, pre.plan.deepspeed, folder)
    tracker.log_artifact(run_id, folder, "config")
    shutil.rmtree(folder, ignore_errors=True)
    log_audit(tracker, run_id, pre)
    n = cfg.evaluation.label_mask_samples
    if n:
        html = label_mask_html(pre.train.items[:n], pre.processor.tokenizer, pre.processor.image_token_id, "Label mask: training samples")
        tracker.log_text(run_id, html, "data/label_mask.html")


def log_audit(tracker: Any, run_id: str, pre: Preflight) -> None:
    audits = {"train": pre.train.audit} | ({"eval": pre.eval.audit} if pre.eval is not None else {})
    for split, audit in audits.items():
        tracker.log_metrics(run_id, audit.metrics(f"data_{split}"), step=0)
    tracker.log_dict(run_id, {split: a.to_dict() for split, a in audits.items()}, "data/audit.json")
    tracker.log_text(run_id, "\n".join(a.format() for a in audits.values()) + "\n", "data/audit.txt")


def log_outputs(tracker: Any, run_id: str, output_dir: Path) -> None:
    """The final adapter and, from the best checkpoint, the predictions table."""
    final_dir = output_dir / FINAL_DIR
    if final_dir.is_dir():
        tracker.log_artifact(run_id, final_dir, "final")
    log_predictions(tracker, run_id, output_dir / BEST_DIR)


def log_predictions(tracker: Any, run_id: str, best_dir: Path) -> None:
    """The eval samples at the best checkpoint (image, reference, prediction, error) as an
    MLflow table and an HTML page, when generation eval made them."""
    from raytune_qvl.evaluate import PREDICTIONS_FILE
    from raytune_qvl.views import predictions_html

    predictions = best_dir / PREDICTIONS_FILE
    if predictions.is_file():
        data = json.loads(predictions.read_text())
        rows = data["rows"]
        tracker.log_text(run_id, predictions_html(rows, data["task"], data.get("step"), "Predictions at the best checkpoint"), "eval/predictions.html")
        tracker.log_table(run_id, [_table_row(r) for r in rows], "eval/predictions_table.json")


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    import mlflow
    from PIL import Image

    out = {k: row[k] for k in ("id", "reference", "prediction", "error")}
    if row.get("image") and Path(row["image"]).is_file():
        with Image.open(row["image"]) as img:
            out["image"] = mlflow.Image(img.convert("RGB"))
    return out


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]
    run_id: str | None
    tracking_uri: str | None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_dir(self) -> Path:
        return self.output_dir / FINAL_DIR

    def summary(self) -> str:
        lines = [f"done: {self.metrics.get('step', '?')} optimizer steps"]
        evals = {k: v for k, v in self.metrics.items() if k.startswith("eval_")}
        if evals:
            lines.append("  final " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
        lines.append(f"  adapter: {self.final_dir}")
        if self.run_id:
            lines.append(f"  MLflow run {self.run_id} in {self.tracking_uri}")
            lines.append(f"  open the UI: python -m raytune_qvl.ui --tracking_uri {self.tracking_uri}")
        return "\n".join(lines)


def writable_dir_problem(path: Path) -> str | None:
    """Why a folder could not be created and written here, checked without creating it."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "no existing parent folder"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:  # a real attempt (permission bits say little to root, or on /proc and read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".raytune_qvl_probe_", dir=probe))
    except OSError as exc:
        return f"{probe} is not writable ({exc.strerror})"
    return None


def make_dir(path: Path, source: str, key: str) -> None:
    """Create a folder and prove it is writable, or fail with one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError([Problem(source, key, f"{path} is not writable ({exc.strerror}); choose another folder", show_value=False)]) from None


def _check_output(cfg: Config, *, overwrite: bool) -> dict[str, Any]:
    """Before anything is written: refuse to silently redo a finished (or diverged) run, and a
    folder that cannot be written. Returns the previous run record (MLflow run id) to resume."""
    out = Path(cfg.output.dir)
    problem = writable_dir_problem(out)
    if problem:
        raise ConfigError([Problem(cfg.paths.training or "config", "output.dir", f"cannot write {out}: {problem}; choose another output.dir", show_value=False)])
    if overwrite:
        return {}
    if (out / FINAL_DIR / COMPLETE_MARKER).exists():
        raise ConfigError(
            [Problem(str(out), "output.dir", "holds a finished run; pass --overwrite to start over or choose another output.dir", show_value=False)]
        )
    ray_run = Path(cfg.ray.storage_path) / ray_run_name(cfg)
    diverged = sorted((out / "checkpoints").glob(f"*/{DIVERGED_FILE}"))  # --no-ray runs
    if "://" not in cfg.ray.storage_path:
        diverged += sorted(ray_run.glob(f"*/{DIVERGED_FILE}"))
    if diverged:
        message = json.loads(diverged[-1].read_text()).get("message", "the loss diverged")
        raise ConfigError([Problem(str(out), "output.dir", f"this run diverged ({message}); change the config and pass --overwrite to start over", show_value=False)])
    record_file = out / RUN_FILE
    return json.loads(record_file.read_text()) if record_file.exists() else {}


def _make_output(cfg: Config, *, overwrite: bool) -> None:
    out = Path(cfg.output.dir)
    if overwrite:
        for name in (FINAL_DIR, BEST_DIR, "checkpoints", RUN_FILE):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        if "://" not in cfg.ray.storage_path:
            shutil.rmtree(Path(cfg.ray.storage_path) / ray_run_name(cfg), ignore_errors=True)
    make_dir(out, cfg.paths.training or "config", "output.dir")


def run_training(cfg: Config, *, resume: str | None = None, use_ray: bool = True, overwrite: bool = False) -> TrainResult:
    from raytune_qvl.cluster import check_outputs_outside_job_dir
    from raytune_qvl.tracking import default_tracking_uri

    launched = time.time()
    if not use_ray:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_workers": 1})})
    if resume is not None and not Path(resume).is_dir():
        raise ConfigError([Problem("command line", "--resume", "checkpoint folder not found", resume)])
    uri = default_tracking_uri(cfg.output.tracking_uri) if cfg.output.report_to != "none" else None
    source = cfg.paths.training or "config"
    check_outputs_outside_job_dir([(source, "output.dir", cfg.output.dir), (source, "ray.storage_path", cfg.ray.storage_path), (source, "output.tracking_uri", uri)])
    record = _check_output(cfg, overwrite=overwrite)
    if uri:
        check_tracking_server(uri)  # before any data work or worker
    pre = preflight(cfg)
    print(pre.plan.format(), file=sys.stderr)
    for split in (pre.train, pre.eval):
        if split is not None and split.audit.kept < split.audit.total:
            log.warning("%s", split.audit.summary())
    _make_output(cfg, overwrite=overwrite)

    tracker, run_id = None, None
    if uri:
        tracker = _connect_tracker(uri, cfg.output.experiment_name)
        run_id = record.get("mlflow_run_id") if record.get("tracking_uri") == uri else None
        if run_id and tracker.reopen(run_id):
            log.info("continuing MLflow run %s", run_id)
        else:
            run_id = tracker.start_run(cfg.output.run_name or Path(cfg.output.dir).name, {"raytune_qvl.kind": "train"})
            log_inputs(tracker, run_id, cfg, pre)
        (Path(cfg.output.dir) / RUN_FILE).write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri, "ray_run_name": ray_run_name(cfg)}))

    history: list[dict[str, Any]] = []
    started = time.perf_counter()

    def on_metrics(m: dict[str, Any]) -> None:
        history.append(m)
        print(format_progress(m, started), file=sys.stderr, flush=True)
        if tracker is not None:
            tracker.log_metrics(run_id, m, step=int(m.get("step", 0)))

    try:
        metrics = _fit_ray(cfg, resume, on_metrics, launched) if use_ray else _fit_local(cfg, resume, on_metrics, launched)
        if metrics.get("diverged"):
            raise TrainingFailed([f"training diverged: {metrics['diverged']}"])
    except BaseException as exc:
        if tracker is not None:
            reason = "; ".join(exc.lines()) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tracker.set_tags(run_id, {"raytune_qvl.status": "failed" if status == "FAILED" else "interrupted", "raytune_qvl.reason": reason})
            tracker.end(run_id, status)
        raise
    if tracker is not None:
        log_outputs(tracker, run_id, Path(cfg.output.dir))
        tracker.set_tags(run_id, {"raytune_qvl.status": "completed"})
        tracker.end(run_id, "FINISHED")
    return TrainResult(Path(cfg.output.dir), metrics, run_id, uri, history)


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """A tracking server must answer now: MLflow's client would otherwise retry for minutes
    and fail after the first trial."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from raytune_qvl.tracking import redact

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise ConfigError([Problem(redact(uri), "tracking_uri", f"MLflow tracking server unreachable ({reason}); start it or fix the URI", show_value=False)])


def _connect_tracker(uri: str, experiment: str) -> Any:
    """The tracking store, reached before anything starts (an unreachable server is a clear
    error, not a crash after the first trial)."""
    from raytune_qvl.tracking import Tracker, redact

    try:
        return Tracker(uri, experiment)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for an unreachable store
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            [Problem(redact(uri), "output.tracking_uri", f"MLflow tracking store unreachable ({first[:160]}); start the server or fix the URI", show_value=False)]
        ) from None


def _fit_local(cfg: Config, resume: str | None, on_metrics: Any, started_at: float | None = None) -> dict[str, Any]:
    from raytune_qvl.engine import WorkerContext
    from raytune_qvl.loop import LocalReporter, train
    from raytune_qvl.worker import quiet_worker

    quiet_worker(0)
    on_gpu = cfg.ray.use_gpu
    return train(cfg, WorkerContext(on_gpu=on_gpu), LocalReporter(cfg, on_metrics, resume), started_at=started_at)


def _fit_ray(cfg: Config, resume: str | None, on_metrics: Any, started_at: float | None = None) -> dict[str, Any]:
    from ray.util.queue import Empty, Queue

    from raytune_qvl.cluster import check_storage, ray_session

    workers = cfg.ray.num_workers
    cpus = int((cfg.ray.resources_per_worker or {}).get("CPU", 1))
    with ray_session(cfg.ray.address, min_cpus=workers * cpus + 1):
        check_storage(cfg.ray.storage_path, shared=cfg.ray.shared_storage, source=cfg.paths.training or "config", key="ray.storage_path")
        progress: Queue = Queue()
        trainer = build_trainer(cfg, resume, callbacks=[QueueCallback(progress)], started_at=started_at)
        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                outcome["error"] = exc

        thread = threading.Thread(target=fit, name="fit", daemon=True)
        thread.start()
        last: dict[str, Any] = {}
        while thread.is_alive() or not progress.empty():
            try:
                item = progress.get(timeout=0.5)
            except Empty:
                continue
            last = item
            on_metrics(item)
        thread.join()
        if "error" in outcome:
            raise TrainingFailed([f"training failed: {_worker_error(outcome['error'])}"])
        return last


class QueueCallback(UserCallback):
    """Runs in the Train controller: forwards rank 0's metrics to the driver's queue."""

    def __init__(self, q: Any):
        self.q = q

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.q.put(dict(metrics[0]))



def build_trainer(
    cfg: Config,
    resume: str | None,
    callbacks: list[Any],
    name: str | None = None,
    storage_path: str | None = None,
    verbose: bool = True,
    started_at: float | None = None,
) -> Any:
    """The TorchTrainer of one run: the worker count, devices and failure handling from the
    config; checkpoints kept by recency (the best adapter is kept aside by the loop)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    resources = dict(cfg.ray.resources_per_worker or {})
    resources.setdefault("CPU", 1)
    if cfg.ray.use_gpu:
        resources.setdefault("GPU", 1)
    return TorchTrainer(
        train_loop_per_worker=_entry,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "resume": resume, "verbose": verbose, "started_at": started_at or time.time()},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.ray.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name or ray_run_name(cfg),
            storage_path=storage_path or cfg.ray.storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.save_total_limit),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),  # the driver shows progress
            # our settings reach workers on every node (cache folder, fault injection)
            worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("RAYTUNE_QVL_")}},
        ),
    )


def _entry(config: dict[str, Any]) -> None:
    from raytune_qvl.worker import train_loop_per_worker

    train_loop_per_worker(config)


def _worker_error(exc: BaseException) -> str:
    """The first worker's error, in one line."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        text = str(err).strip().splitlines()
        last = next((line for line in reversed(text) if line.strip()), type(err).__name__)
        return f"worker {rank}: {last.strip()[:300]}"
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:300]
