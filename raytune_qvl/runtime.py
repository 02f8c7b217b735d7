"""Process-level set-up shared by the CLIs and Ray workers: library noise, CPU/GPU defaults."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

__all__ = ["quiet_libraries", "quiet_ray_worker", "has_gpu_hint", "setup_logging"]


def has_gpu_hint() -> bool:
    """A cheap guess (no torch import) whether this machine has an NVIDIA GPU."""
    return Path("/dev/nvidia0").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def quiet_libraries() -> None:
    """Environment defaults set before torch/transformers/deepspeed are imported."""
    if not has_gpu_hint():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # avoids DeepSpeed's accelerator probe warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenizing
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # DeepSpeed JIT-compiles ops (~1 min each) into this cache; keep it across runs and trials
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))


# Library warnings a normal run prints and nobody can act on, by message (never a whole category:
# the first run on a new machine needs the rest, e.g. an attention fallback or a use_cache note)
KNOWN_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # torch's pytree, from DeepSpeed
    (UserWarning, r"Warning only once for all operators"),  # a kernel re-registered by an import
    (UserWarning, r'Field name "schema" in "JsonSchemaSpec" shadows'),  # MLflow's pydantic types
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # transformers, from peft
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),  # DeepSpeed's ZeRO-3 collectives
)


def quiet_known_warnings() -> None:
    import warnings

    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


# Ray's own messages from its processes that a normal run prints and nobody acts on
_ROUTINE_RAY_LOGGERS = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
)  # "controller is dead. Cleaning up"


def quiet_ray_worker() -> None:
    """The worker_process_setup_hook of the local clusters raytune_qvl starts: Ray's routine
    per-run messages (a finished run's placement group cleaned up) stay out of the progress view."""
    for name in _ROUTINE_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg


def setup_logging(level: int = logging.INFO) -> None:
    """raytune_qvl's own messages as plain lines on stderr ("warning: ...")."""
    logger = logging.getLogger("raytune_qvl")
    if not any(getattr(h, "_raytune_qvl", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Format())
        handler._raytune_qvl = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its table-creation chatter
