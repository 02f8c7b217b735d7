"""Warm starts: a sweep seeded from an earlier sweep's finished trials (`--warm-start PATH`).

The source must have searched the same task (base config, data and trial resources: their digest
is kept in every sweep's state). Its trained trials are imported into the new sweep's state with
their origin, their configs written in the new space's terms:

* a config that lies in the new space (every key it set is a parameter of the new space, or at the
  base's value) is a known result: a stage whose slice holds it tells Optuna its value before the
  first suggestion and counts a full run of it as a candidate, so no point the source trained is
  trained again (the sweep's de-duplication already refuses known points);
* the source's best (its winner, else its best full run in the new space) is the new sweep's
  starting point: every parameter of the new space starts at the best's value where that value
  lies in the new range, so the new dimensions are searched around it (and the best itself, when
  it lies in the new space, is a candidate of the first stage, which keeps it unless it finds better);
* the source's confirmation runs of a config count as its confirmation here.

Pure but for reading the source's state file."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_qvl.config.schema import Config
from raytune_qvl.errors import ConfigError, Problem
from raytune_qvl.sweep.points import config_value, point_overrides, starting_batch, starting_point
from raytune_qvl.sweep.records import TrialRecord, rank
from raytune_qvl.sweep.space import EFFECTIVE_BATCH, LR_FACTOR, LR_KEY, SearchSpace
from raytune_qvl.sweep.state import STATE_FILE, SweepState

__all__ = [
    "WarmStart",
    "sweep_task",
    "task_digest",
    "sweep_digest",
    "load_warm_start",
    "canonical_overrides",
    "BEST_FILE",
]

BEST_FILE = "best/best.json"  # in a finished sweep's folder: which trial won (outputs.write_best)
_IMPORTED = ("completed", "stopped", "confirmation")  # trials that trained to a value


def sweep_task(space: SearchSpace, base: Config, data_fingerprints: list[str]) -> dict[str, Any]:
    """What makes two sweeps' trials comparable: the base config (all but where its outputs go),
    the prepared data's fingerprints, the metric and the resources a trial trains with; as it
    reads back from a state file."""
    tree = base.model_dump(mode="json", exclude={"output", "ray", "paths"})
    what = {
        "base": tree,
        "data": data_fingerprints,
        "metric": [space.metric, space.mode],
        "workers_per_trial": space.resources.workers_per_trial,
        "use_gpu": space.resources.use_gpu,
    }
    return json.loads(json.dumps(what, default=str))


def task_digest(task: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()[:16]


def sweep_digest(space: SearchSpace, base: Config, data_fingerprints: list[str]) -> str:
    return task_digest(sweep_task(space, base, data_fingerprints))


def canonical_overrides(overrides: dict[str, Any], keys: list[str], base: Config) -> dict[str, Any] | None:
    """A source trial's overrides over the new space's override `keys`: a key the source did not
    set is at the base's value; a key the new space does not set must be at the base's value, or
    the config is not in the new space (None)."""
    out = {key: config_value(base, key) for key in keys}
    for key, value in overrides.items():
        if key in out:
            out[key] = value
        elif value != config_value(base, key):
            return None
    return out


def _new_point(space: SearchSpace, base: Config, overrides: dict[str, Any]) -> dict[str, Any]:
    """The new space's parameter values of a config given as overrides."""
    point: dict[str, Any] = {}
    t = base.training
    for key in space.parameters:
        if key == EFFECTIVE_BATCH:
            accum = int(overrides.get("training.gradient_accumulation_steps", t.gradient_accumulation_steps))
            point[key] = t.per_device_train_batch_size * space.resources.workers_per_trial * accum
        elif key != LR_FACTOR:
            point[key] = overrides[key] if key in overrides else config_value(base, key)
    return point


@dataclass
class WarmStart:
    source: str  # the source sweep's folder
    records: list[TrialRecord] = field(default_factory=list)  # imported (origin set), in the new space
    outside: int = 0  # trained trials of the source whose config the new space cannot express
    best: TrialRecord | None = None  # the source's best, when it lies in the new space
    start: dict[str, Any] = field(default_factory=dict)  # the starting values it gives the new space

    def summary(self) -> dict[str, Any]:
        searched = [r for r in self.records if r.status != "confirmation"]
        return {
            "source": self.source,
            "trials": len(searched),
            "confirmation_runs": len(self.records) - len(searched),
            "outside_the_space": self.outside,
            "best": self.best.trial_id if self.best else None,
            "start": self.start,
        }


def _source_dir(path: str, source: str) -> Path:
    folder = Path(path)
    if folder.name == STATE_FILE:
        folder = folder.parent
    if not (folder / STATE_FILE).is_file():
        rule = f"{path} holds no {STATE_FILE}: give the folder of an earlier sweep (<output_dir>/<name>)"
        raise ConfigError([Problem(source, "--warm-start", rule, show_value=False)])
    return folder.absolute()


def load_warm_start(path: str, space: SearchSpace, base: Config, digest: str) -> WarmStart:
    """The source sweep's trials in the new space's terms (see the module doc); a source that
    searched another task is refused with one line naming what to do."""
    source = space.source or "search space"
    folder = _source_dir(path, source)
    try:
        state = SweepState.load(folder / STATE_FILE)
    except (OSError, ValueError, TypeError) as exc:
        rule = f"cannot read {folder / STATE_FILE} ({exc}); give the folder of a sweep made by raytune_qvl"
        raise ConfigError([Problem(source, "--warm-start", rule, show_value=False)]) from None
    if state.digest != digest:
        why = "was made before sweeps recorded their task" if not state.digest else "searched another task"
        rule = (
            f"sweep {state.name!r} in {folder} {why} (its base config, data, metric or workers per trial differ "
            "from this one's): warm-start only from a sweep of the same task"
        )
        raise ConfigError([Problem(source, "--warm-start", rule, show_value=False)])
    keys = list(point_overrides(space, base, starting_point(space, base), starting_batch(base, space)))
    warm = WarmStart(str(folder))
    for record in state.records():
        if record.status not in _IMPORTED or record.origin:  # a source's own warm start stays there
            continue
        if record.value is None or not math.isfinite(record.value):
            continue
        overrides = canonical_overrides(record.overrides, keys, base)
        if overrides is None:
            warm.outside += record.status != "confirmation"
            continue
        record.overrides, record.origin = overrides, str(folder)
        if record.status != "confirmation":
            record.point = _new_point(space, base, overrides)
        warm.records.append(record)
    warm.best = _source_best(folder, warm.records, space.mode)
    if warm.best is not None:
        warm.start = {k: v for k, v in warm.best.point.items() if space.parameters[k].contains(v)}
        if EFFECTIVE_BATCH in space.parameters and EFFECTIVE_BATCH not in warm.start:
            warm.start.pop(LR_KEY, None)  # its rate was found at a batch this space does not start from
    return warm


def _source_best(folder: Path, records: list[TrialRecord], mode: str) -> TrialRecord | None:
    """The source's winner (best/best.json of a finished sweep), else its best full run, among the
    imported records (the mode is the new space's: the digests agree, so the metric does)."""
    by_id = {r.trial_id: r for r in records if r.status != "confirmation"}
    best_file = folder / BEST_FILE
    if best_file.is_file():
        try:
            winner = json.loads(best_file.read_text()).get("trial")
        except ValueError:
            winner = None
        if winner in by_id and by_id[winner].status == "completed":
            return by_id[winner]
    ranked = rank(by_id.values(), mode)
    return ranked[0] if ranked else None
