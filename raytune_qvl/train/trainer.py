"""The Ray Train side of one run: the TorchTrainer (worker count, devices, failure handling and
checkpoints from the config) whose workers run `worker.train_loop_per_worker`, and the callback
that forwards rank 0's reports to the driver's progress view."""

from __future__ import annotations

import os
import time
from typing import Any

from ray.train.v2.api.callback import UserCallback

from raytune_qvl.config.schema import Config
from raytune_qvl.train.outputs import ray_run_name

__all__ = ["build_trainer", "QueueCallback"]


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
    driver_node: str | None = None,
) -> Any:
    """The TorchTrainer of one run: the worker count, devices and failure handling from the
    config; checkpoints kept by recency (the best adapter is kept aside by the loop).
    `driver_node`: the Ray node of the process that reads the run's outputs (default this one);
    a rank 0 elsewhere sends them through storage_path."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    resources = dict(cfg.ray.resources_per_worker or {})
    resources.setdefault("CPU", 1)
    if cfg.ray.use_gpu:
        resources.setdefault("GPU", 1)
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "resume": resume,
        "verbose": verbose,
        "started_at": started_at or time.time(),
        "driver_node": driver_node or ray.get_runtime_context().get_node_id(),
    }
    return TorchTrainer(
        train_loop_per_worker=_entry,
        train_loop_config=loop_config,
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
    from raytune_qvl.train.worker import train_loop_per_worker

    train_loop_per_worker(config)
