"""The sweep state file: what a resumed sweep needs (the MLflow parent run, finished stages and
their bests, every trial record so far), written atomically after every change."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raytune_qvl.sweep.records import TrialRecord, last_value

__all__ = ["STATE_FILE", "SweepState"]

STATE_FILE = "sweep_state.json"  # in <output_dir>/<name>/


@dataclass
class SweepState:
    name: str
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {status, best, value, trial}
    trials: list[dict[str, Any]] = field(default_factory=list)  # every trial record so far
    baseline: dict[str, Any] | None = None  # the metric before fine-tuning: {value, trial}
    finished: bool = False
    digest: str = ""  # what makes trials of two sweeps comparable (warm.sweep_digest)
    task: dict[str, Any] | None = None  # what the digest is of (warm.sweep_task): a resume names what changed
    warm_start: dict[str, Any] | None = None  # WarmStart.summary() of a warm-started sweep

    @classmethod
    def load(cls, path: Path) -> "SweepState":
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, default=str))
        tmp.replace(path)

    def records(self) -> list[TrialRecord]:
        return [TrialRecord(**t) for t in self.trials]

    def trained(self) -> list[TrialRecord]:
        """The records of trials that ran (a reused record points at a trial of an earlier stage)."""
        return [r for r in self.records() if r.status != "reused"]

    def set_stage_records(self, stage: str, records: list[TrialRecord]) -> None:
        """The stage's own records (records imported by a warm start keep their stage labels)."""
        self.trials = [t for t in self.trials if t["stage"] != stage or t.get("origin")] + [asdict(r) for r in records]

    def add_records(self, records: list[TrialRecord]) -> None:
        self.trials += [asdict(r) for r in records]

    def measure_baseline(self, metric: str) -> None:
        """The metric of the model before any fine-tuning, from a trial's step-0 evaluation."""
        for record in (r for r in self.trained() if not r.origin):
            start = [h for h in record.history if h.get("step") == 0]
            value = last_value(start, metric)
            if value is not None:
                self.baseline = {"value": value, "trial": record.trial_id}
                return

    def counts(self) -> dict[str, int]:
        """This sweep's own trials by status (records a warm start imported are not counted)."""
        own = [t for t in self.trials if not t.get("origin")]
        return {s: sum(1 for t in own if t["status"] == s) for s in ("completed", "stopped", "failed")}
