"""The driver of one training run: pre-flight (config, data audit, plan) before any worker
starts, one MLflow run, a TorchTrainer (or the loop in-process with --no-ray), one progress
view, and the outputs logged at the end."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raytune_qvl.config.schema import Config
from raytune_qvl.config.uris import default_tracking_uri
from raytune_qvl.errors import ConfigError, Problem, UserError, worker_error
from raytune_qvl.reports import unpack
from raytune_qvl.train.outputs import (
    BEST_DIR,
    FINAL_DIR,
    PREDICTIONS_FILE,
    RUN_FILE,
    check_output,
    fetch_outputs,
    make_output,
    ray_run_name,
    training_fingerprint,
)
from raytune_qvl.train.preflight import preflight

__all__ = ["TrainResult", "TrainingFailed", "run_training", "format_progress"]

log = logging.getLogger("raytune_qvl")


class TrainingFailed(UserError):
    """The run started but did not finish (diverged, workers failed past max_failures)."""

    exit_code = 1


def format_progress(m: dict[str, Any], started: float) -> str:
    """One progress line of a report: step, epoch, loss, learning rate, speed, eval metrics, ETA."""
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


def run_training(
    cfg: Config, *, resume: str | None = None, use_ray: bool = True, overwrite: bool = False
) -> TrainResult:
    from raytune_qvl.cluster import check_outputs_outside_job_dir
    from raytune_qvl.track.runs import log_training_outputs, open_training_run
    from raytune_qvl.track.tracker import TAG_ATTENTION, check_server, connect

    launched = time.time()
    if not use_ray:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_workers": 1})})
    if resume is not None and not Path(resume).is_dir():
        raise ConfigError([Problem("command line", "--resume", "checkpoint folder not found", resume)])
    uri = default_tracking_uri(cfg.output.tracking_uri) if cfg.output.report_to != "none" else None
    source = cfg.paths.training or "config"
    check_outputs_outside_job_dir(
        [
            (source, "output.dir", cfg.output.dir),
            (source, "ray.storage_path", cfg.ray.storage_path),
            (source, "output.tracking_uri", uri),
        ]
    )
    record = check_output(cfg, overwrite=overwrite)
    if uri:
        check_server(uri)  # before any data work or worker
    pre = preflight(cfg)
    _check_ops(cfg, pre)  # this machine's; a joined cluster's nodes are checked once Ray is up
    print(pre.plan.format(), file=sys.stderr)
    for split in (pre.train, pre.eval, pre.test):
        if split is not None and split.audit.kept < split.audit.total:
            log.warning("%s", split.audit.summary())
    make_output(cfg, overwrite=overwrite, resume=resume)

    tracker, run_id = None, None
    if uri:
        tracker = connect(uri, cfg.output.experiment_name)
        previous = record.get("mlflow_run_id") if record.get("tracking_uri") == uri else None
        run_id = open_training_run(tracker, cfg, pre, previous)
    # what a rerun of this folder resumes: its MLflow run, and the config it must still have
    record = {"mlflow_run_id": run_id, "tracking_uri": uri, "ray_run_name": ray_run_name(cfg)}
    record["config"] = training_fingerprint(cfg)
    (Path(cfg.output.dir) / RUN_FILE).write_text(json.dumps(record))

    history: list[dict[str, Any]] = []
    started = time.perf_counter()

    def on_metrics(report: dict[str, Any]) -> None:
        for m in unpack(report):  # the rows a worker held back come first
            history.append(m)
            print(format_progress(m, started), file=sys.stderr, flush=True)
            if tracker is not None:
                tracker.log_metrics(run_id, m, step=int(m.get("step", 0)))
                if m.get("attention"):  # the final report: what the workers ran
                    tracker.set_tags(run_id, {TAG_ATTENTION: m["attention"]})

    def fit() -> dict[str, Any]:
        metrics = (
            _fit_ray(cfg, pre, resume, on_metrics, launched)
            if use_ray
            else _fit_local(cfg, resume, on_metrics, launched)
        )
        if metrics.get("diverged"):
            raise TrainingFailed([f"training diverged: {metrics['diverged']}"])
        return metrics

    if tracker is None:
        metrics = fit()
    else:
        with tracker.outcome(run_id):
            metrics = fit()
            out = Path(cfg.output.dir)
            log_training_outputs(tracker, run_id, out / FINAL_DIR, out / BEST_DIR / PREDICTIONS_FILE)
    return TrainResult(Path(cfg.output.dir), metrics, run_id, uri, history)


def _check_ops(cfg: Config, pre: Any) -> None:
    """DeepSpeed's compiled ops are there (or buildable) where the workers run, before any starts."""
    from raytune_qvl.train.ops import check_ops_on_workers
    from raytune_qvl.train.engine import device_config

    ds, _ = device_config(pre.plan.deepspeed, on_gpu=cfg.ray.use_gpu)
    check_ops_on_workers(ds, on_gpu=cfg.ray.use_gpu, source=cfg.paths.deepspeed or "DeepSpeed config")


def _fit_local(
    cfg: Config, resume: str | None, on_metrics: Callable, started_at: float | None = None
) -> dict[str, Any]:
    from raytune_qvl.train.engine import WorkerContext
    from raytune_qvl.train.loop import train
    from raytune_qvl.train.session import LocalReporter
    from raytune_qvl.train.worker import quiet_worker

    quiet_worker(0)
    ctx = WorkerContext(on_gpu=cfg.ray.use_gpu)
    return train(cfg, ctx, LocalReporter(cfg, on_metrics, resume), started_at=started_at)


def _fit_ray(
    cfg: Config, pre: Any, resume: str | None, on_metrics: Callable, started_at: float | None = None
) -> dict[str, Any]:
    from ray.util.queue import Empty, Queue

    from raytune_qvl.cluster import check_storage, ray_session
    from raytune_qvl.train.trainer import QueueCallback, build_trainer

    workers = cfg.ray.num_workers
    cpus = int((cfg.ray.resources_per_worker or {}).get("CPU", 1))
    with ray_session(cfg.ray.address, min_cpus=workers * cpus + 1):
        source = cfg.paths.training or "config"
        check_storage(cfg.ray.storage_path, shared=cfg.ray.shared_storage, source=source, key="ray.storage_path")
        if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
            _check_ops(cfg, pre)
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
            last = unpack(item)[-1]
            on_metrics(item)
        thread.join()
        if "error" in outcome:
            raise TrainingFailed([f"training failed: {worker_error(outcome['error'])}"])
        fetched = fetch_outputs(outcome["result"].checkpoint, Path(cfg.output.dir))
        if fetched:
            log.info("%s fetched from rank 0's node through %s", ", ".join(fetched), cfg.ray.storage_path)
        return last
