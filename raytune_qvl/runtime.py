"""Process-level set-up shared by the CLIs and Ray workers: library noise, CPU/GPU defaults."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

__all__ = [
    "quiet_libraries",
    "quiet_ray_worker",
    "has_gpu_hint",
    "setup_logging",
    "show_warnings_once",
    "take_warnings",
    "WARNINGS_KEY",
]


def has_gpu_hint() -> bool:
    """A cheap guess (no torch import) whether this machine has an NVIDIA GPU."""
    return Path("/dev/nvidia0").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def quiet_libraries() -> None:
    """Environment defaults set before torch/transformers/deepspeed are imported."""
    if not has_gpu_hint():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # avoids DeepSpeed's accelerator probe warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenizing
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # the interpreter's own scripts folder on PATH, as a venv's activate does: ninja, which DeepSpeed's
    # op builds run, is there when the venv's python is run without activating it (Ray's workers inherit it)
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(p for p in (scripts, os.environ.get("PATH")) if p)
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


# Library log messages a normal run prints and nobody can act on, by message (the rest of the
# libraries' warnings show, each once)
KNOWN_LOG_MESSAGES = (
    # DeepSpeed, at the scheduler's step(0) that makes the first optimizer step train (engine.build_engine)
    re.compile(r"Attempting to get learning rate from scheduler before it has started"),
    # torch, building DeepSpeed's CPU Adam on a machine without CUDA
    re.compile(r"No CUDA runtime is found, using CUDA_HOME"),
)
# the libraries whose warnings a worker shows: DeepSpeed's, transformers' and some of torch's loggers
# have handlers of their own and do not propagate to the root logger
LIBRARY_LOGGERS = ("DeepSpeed", "transformers", "peft", "torch", "raytune_qvl")
WARNINGS_KEY = "warnings"  # in a worker's report: its warnings since the last report, [key, text] pairs as JSON
# (a string: Tune's result loggers skip it, where a list is refused as a histogram with a warning)


class _OnceAndNotNoise(logging.Filter):
    """A warning shows once per process (by logger and message template: "%d of %d answers were cut"
    is one message whatever the numbers), and the known noise not at all. Other levels pass. The
    decision is kept on the record, so every handler the record reaches agrees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        shown = getattr(record, "_raytune_qvl_shown", None)
        if shown is None:
            key = (record.name, str(record.msg))
            shown = record.levelno != logging.WARNING or (
                key not in self.seen and not any(p.search(record.getMessage()) for p in KNOWN_LOG_MESSAGES)
            )
            self.seen.add(key)
            record._raytune_qvl_shown = shown  # type: ignore[attr-defined]
        return shown


class WarningCollector(logging.Handler):
    """The warnings a worker showed since its last report, for the report (a sweep's workers write
    to Ray's log files: its driver shows each warning once, naming the trial)."""

    LIMIT = 20  # per report: a flood is cut

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.new: list[list[str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.new) < self.LIMIT:
            text = (record.getMessage().strip().splitlines() or [""])[0][:400]
            prefix = "" if record.name.startswith("raytune_qvl") else f"{record.name}: "
            self.new.append([f"{record.name}|{record.msg}", prefix + text])

    def take(self) -> list[list[str]]:
        new, self.new = self.new, []
        return new


_collector: WarningCollector | None = None


def show_warnings_once() -> WarningCollector:
    """In a worker: the libraries' warnings at WARNING (not silenced by level: an attention fallback,
    a use_cache note or an overflow is what a first run needs), each once, the known noise dropped;
    Python warnings through logging too; all of them collected for the worker's next report."""
    global _collector
    if _collector is not None:
        return _collector
    once, collector = _OnceAndNotNoise(), WarningCollector()
    collector.addFilter(once)
    logging.captureWarnings(True)  # Python warnings (those KNOWN_WARNINGS leaves) as records of py.warnings
    root = logging.getLogger()
    if not root.handlers:  # what logging's last resort printed, printed the same way
        plain = logging.StreamHandler(sys.stderr)
        plain.setLevel(logging.WARNING)
        plain.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        root.addHandler(plain)
    # a library logger with a handler of its own shows its records there and stops them, not shown
    # again by the root's (transformers propagates where the environment says CI, as CI machines do);
    # so each logger here is where its records stop, and collects them
    for logger in [root, *_library_loggers()]:
        if logger is not root:
            logger.propagate = False
        for handler in logger.handlers:
            handler.addFilter(once)
        logger.addHandler(collector)
    _collector = collector
    return collector


def _library_loggers() -> list[logging.Logger]:
    """The libraries' loggers that have handlers of their own (as the libraries set them up on import)."""
    return [
        logger
        for name, logger in list(logging.Logger.manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and name.split(".")[0] in LIBRARY_LOGGERS and logger.handlers
    ]


def take_warnings() -> list[list[str]]:
    """This worker's warnings since the last call ([] where `show_warnings_once` did not run)."""
    return _collector.take() if _collector is not None else []


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
