"""The Ray Train worker: `train_loop_per_worker` runs the loop with a Reporter that goes
through `ray.train.report`, and resumes from `ray.train.get_checkpoint()`."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from raytune_qvl import runtime

__all__ = ["RayReporter", "train_loop_per_worker", "quiet_worker"]


def quiet_worker(rank: int, verbose: bool = True) -> None:
    """One progress view for the user: workers keep their logs to warnings (rank 0 also
    says what it trains), so the driver's progress lines are not buried."""
    runtime.quiet_libraries()
    runtime.setup_logging(logging.INFO if rank == 0 and verbose else logging.WARNING)
    runtime.quiet_known_warnings()
    try:  # DeepSpeed's logger resets its level when first imported: set it after that
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # not its per-step INFO lines
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")  # its own handler is made here: show_warnings_once filters it
    except ImportError:
        pass
    runtime.show_warnings_once()
    try:  # Ray Train logs every report at INFO through a logger named after its file
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def report_interval() -> float:
    """Seconds between the Train controller's polls of a worker: it takes one report per poll,
    and a worker's next report waits for the previous one to be taken."""
    from ray.train.v2._internal.constants import DEFAULT_HEALTH_CHECK_INTERVAL_S, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    return float(os.environ.get(HEALTH_CHECK_INTERVAL_S_ENV_VAR, DEFAULT_HEALTH_CHECK_INTERVAL_S))


class RayReporter:
    def __init__(self, explicit_resume: str | None, ships_outputs: bool = False):
        self.explicit_resume = explicit_resume
        self.ships_outputs = ships_outputs
        self._download: Path | None = None
        self._interval = report_interval()
        self._last = float("-inf")

    def due(self) -> bool:
        return time.monotonic() - self._last >= self._interval

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        self._last = time.monotonic()
        warned = runtime.take_warnings()
        if warned:  # a sweep's driver shows each once (this worker's output goes to Ray's log files)
            metrics = {**metrics, runtime.WARNINGS_KEY: json.dumps(warned)}
        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                checkpoint_dir_name=checkpoint.name,
            )

    def resume_checkpoint(self) -> Path | None:
        """Ray's latest checkpoint (after a worker restart or a rerun) wins over --resume."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return Path(self.explicit_resume) if self.explicit_resume else None
        if getattr(ckpt.filesystem, "type_name", "") == "local":
            return Path(ckpt.path)
        self._download = Path(tempfile.mkdtemp(prefix="raytune_qvl-resume-"))
        return Path(ckpt.to_directory(str(self._download)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    from raytune_qvl.config.schema import Config
    from raytune_qvl.train.engine import WorkerContext
    from raytune_qvl.train.loop import train

    context = ray.train.get_context()
    quiet_worker(context.get_world_rank(), verbose=config.get("verbose", True))
    cfg = Config.model_validate(config["cfg"])
    ctx = WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        on_gpu=cfg.ray.use_gpu,
        node=ray.get_runtime_context().get_node_id(),
    )
    if ctx.on_gpu:
        import torch
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())
    driver_node = config.get("driver_node")
    reporter = RayReporter(config.get("resume"), ships_outputs=bool(driver_node) and ctx.node != driver_node)
    train(cfg, ctx, reporter, started_at=config.get("started_at"))
