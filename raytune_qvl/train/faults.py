"""Fault injection for the fault suite, at named optimizer steps (never on a timer), through
environment variables that reach every Ray worker (the trainer passes RAYTUNE_QVL_* on):

    RAYTUNE_QVL_FAULT_NAN="section.key=value"
        the loss is NaN from optimizer step 2 in every run whose config has that value
        (e.g. one trial of a sweep)
    RAYTUNE_QVL_FAULT_PAUSE="STEP" | "section.key=value@STEP"
        after optimizer step STEP (and its report and checkpoint, where it has them), every
        worker stops there and waits; rank 0 prints PAUSED_MESSAGE. A test can then interrupt the
        run or kill a worker knowing exactly where it stands, however slowly the machine or the
        reader of its output runs
    RAYTUNE_QVL_FAULT_KILL="STEP[,STEP...]" | "section.key=value@STEP[,STEP...]"
        the last worker kills itself (SIGKILL) right after optimizer step STEP (and its report)
    RAYTUNE_QVL_FAULT_OOM="MICRO" | "section.key=value@MICRO[;...]"
        every worker raises torch.OutOfMemoryError at its first optimizer step when the run's micro
        batch (training.per_device_train_batch_size) is above MICRO: a point that fits only at a
        smaller micro batch (MICRO 0: at none); specs separated by ";", the first that names a value
        of the run's config applies, else one without a value
    RAYTUNE_QVL_FAULT_CHAOS="SEED[:KILLS]"
        chaos in the spirit of Ray's node-kill release tests, without a timer: every run draws
        KILLS (default 1) distinct steps before its last and, for each, the worker that kills
        itself (SIGKILL) after it, from SEED and the run's training config, so that a point of
        a sweep is killed at the same steps in every rerun (`chaos_kills`)

A spec that names a config value applies only to runs (trials) with that value. Each pause and
kill happens once per run: a marker in <output.dir>/.faults/ remembers it, so the run resumed
after it (a restarted worker group, a rerun of the same command) goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from raytune_qvl.config.overrides import flatten
from raytune_qvl.config.schema import Config
from raytune_qvl.train.outputs import training_fingerprint

__all__ = [
    "FAULT_NAN_ENV",
    "FAULT_PAUSE_ENV",
    "FAULT_KILL_ENV",
    "FAULT_CHAOS_ENV",
    "FAULT_OOM_ENV",
    "PAUSED_MESSAGE",
    "nan_fault",
    "chaos_kills",
    "Faults",
]

FAULT_NAN_ENV = "RAYTUNE_QVL_FAULT_NAN"
FAULT_PAUSE_ENV = "RAYTUNE_QVL_FAULT_PAUSE"
FAULT_KILL_ENV = "RAYTUNE_QVL_FAULT_KILL"
FAULT_CHAOS_ENV = "RAYTUNE_QVL_FAULT_CHAOS"
FAULT_OOM_ENV = "RAYTUNE_QVL_FAULT_OOM"
PAUSED_MESSAGE = "fault injection: paused at optimizer step"


def _has(cfg: Config, assignment: str) -> bool:
    """Whether `section.key=value` holds in this run's config (numbers compared as numbers)."""
    key, _, value = assignment.partition("=")
    have = flatten({**cfg.training_dict(), **cfg.lora_dict()}).get(key)
    try:
        return have is not None and float(have) == float(value)
    except (TypeError, ValueError):
        return str(have) == value


def nan_fault(cfg: Config) -> bool:
    spec = os.environ.get(FAULT_NAN_ENV)
    return bool(spec) and "=" in spec and _has(cfg, spec)


def _steps(cfg: Config, env: str) -> set[int]:
    spec = os.environ.get(env)
    if not spec:
        return set()
    assignment, _, steps = spec.rpartition("@")
    if assignment and not _has(cfg, assignment):
        return set()
    return {int(s) for s in steps.split(",") if s.strip()}


def _memory_limit(cfg: Config) -> int | None:
    """The largest micro batch that 'fits' under RAYTUNE_QVL_FAULT_OOM for this run, or None."""
    spec = os.environ.get(FAULT_OOM_ENV)
    if not spec:
        return None
    fallback = None
    for part in (p.strip() for p in spec.split(";") if p.strip()):
        assignment, _, micro = part.rpartition("@")
        if not assignment:
            fallback = int(micro) if fallback is None else fallback
        elif _has(cfg, assignment):
            return int(micro)
    return fallback


def chaos_kills(cfg: Config, total_steps: int, world_size: int) -> dict[int, int]:
    """Step -> the rank that kills itself after it, for this run under RAYTUNE_QVL_FAULT_CHAOS."""
    spec = os.environ.get(FAULT_CHAOS_ENV)
    if not spec or total_steps < 2:
        return {}
    seed, _, kills = spec.partition(":")
    training = json.dumps(training_fingerprint(cfg), sort_keys=True)  # what it trains, not where it writes
    rng = random.Random(hashlib.sha256(f"{seed}|{training}".encode()).hexdigest())
    steps = rng.sample(range(1, total_steps), min(int(kills or 1), total_steps - 1))
    return {step: rng.randrange(world_size) for step in sorted(steps)}


class Faults:
    """The pauses and kills planned for this worker of this run."""

    def __init__(self, cfg: Config, rank: int, world_size: int, total_steps: int = 0):
        self.rank, self.world_size = rank, world_size
        self.folder = Path(cfg.output.dir) / ".faults"
        self.pauses = _steps(cfg, FAULT_PAUSE_ENV)
        self.kills = _steps(cfg, FAULT_KILL_ENV) if rank == world_size - 1 else set()
        self.kills |= {step for step, who in chaos_kills(cfg, total_steps, world_size).items() if who == rank}
        self.memory_limit = _memory_limit(cfg)
        self.micro = cfg.training.per_device_train_batch_size

    def before_step(self) -> None:
        """Out of memory (injected) when the run's micro batch is above RAYTUNE_QVL_FAULT_OOM's."""
        if self.memory_limit is not None and self.micro > self.memory_limit:
            import torch

            raise torch.OutOfMemoryError(
                f"CUDA out of memory (fault injection: micro batch {self.micro} is above {self.memory_limit})"
            )

    def _first_time(self, kind: str, step: int) -> bool:
        """True once per run for this kind, step and rank (the marker is made here)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.folder / f"{kind}-{step}-rank{self.rank}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def after_report(self, step: int) -> None:
        if step in self.kills and self._first_time("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if step in self.pauses and self._first_time("pause", step):
            if self.rank == 0:
                print(f"{PAUSED_MESSAGE} {step}", file=sys.stderr, flush=True)
            while True:  # until the process is interrupted or killed
                time.sleep(0.5)
