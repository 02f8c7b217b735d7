"""What the steps of a sweep share, built once by `run.run_sweep` and handed to each stage and to
the outputs: the search space, the base config and its pre-flight, the state file, the MLflow
tracker with the parent run, and how many trials run at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_qvl.config.schema import Config
from raytune_qvl.sweep.space import SearchSpace
from raytune_qvl.sweep.state import STATE_FILE, SweepState

__all__ = ["Sweep"]


@dataclass
class Sweep:
    space: SearchSpace
    base: Config
    pre: Any  # the base config's Preflight: processor, prepared splits, plan
    state: SweepState
    tracker: Any  # track.tracker.Tracker
    parent: str  # the MLflow parent run
    concurrency: int = 1  # trials at once
    resume: bool = False  # continue an interrupted stage's Tune experiment
    warned: set[str] = field(default_factory=set)  # the workers' warnings shown so far (each once a sweep)

    @property
    def dir(self) -> Path:
        return self.space.sweep_dir

    @property
    def state_path(self) -> Path:
        return self.space.sweep_dir / STATE_FILE

    @property
    def num_samples(self) -> int:
        return len(self.pre.train.items)

    def save_state(self) -> None:
        self.state.save(self.state_path)
