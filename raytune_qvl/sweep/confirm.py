"""Confirmation: a search's best value is one draw, picked because it was low. The top configs are
trained again with other seeds (LoRA initialisation, dropout, data order), the winner is the best
mean, and its score on the held-out test split — which no choice used, and which only these runs
read — is the sweep's reported result, with its spread."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from raytune_qvl.config.schema import test_metric
from raytune_qvl.errors import trial_error
from raytune_qvl.sweep.context import Sweep
from raytune_qvl.sweep.cost import trial_cost
from raytune_qvl.sweep.records import TrialRecord, last_value, rank, tune_results
from raytune_qvl.sweep.space import CONFIRM_KEY
from raytune_qvl.sweep.trial import FetchOutputs, run_trial, train_storage, trial_dir

__all__ = ["CONFIRM_STAGE", "Confirmed", "run_confirmation", "confirmed"]

CONFIRM_STAGE = "confirm"  # its stage label, in the state file, MLflow and the Tune storage


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Confirmed:
    """One confirmed config: the search trial's value and its confirmation runs'."""

    trial_id: str  # the search trial that found it
    overrides: dict[str, Any]
    values: list[float] = field(default_factory=list)  # the search trial's, then each run's
    tests: list[float] = field(default_factory=list)  # each confirmation run's test score
    failed: int = 0  # confirmation runs that failed or diverged: the config did not hold with another seed

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return _spread(self.values)

    @property
    def test_mean(self) -> float | None:
        return statistics.fmean(self.tests) if self.tests else None

    @property
    def test_std(self) -> float:
        return _spread(self.tests)


def confirmation_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """What a confirmation run trains (for the progress lines)."""
    return dict(config[CONFIRM_KEY]["overrides"])


def confirmation_params(config: dict[str, Any]) -> dict[str, Any]:
    """A confirmation run's MLflow params: the config it confirms and its seed offset."""
    spec = config[CONFIRM_KEY]
    return {"confirmation.of": spec["of"], "confirmation.seed": spec["seed"], **spec["overrides"]}


def candidates(sweep: Sweep) -> list[TrialRecord]:
    """The top_k configs that ran their full budget, best first."""
    return rank(sweep.state.trained(), sweep.space.mode)[: sweep.space.confirm.top_k]


def run_confirmation(sweep: Sweep, *, restore: bool) -> list[TrialRecord]:
    """Train every candidate `confirm.seeds` more times (FIFO: full budgets), as one Tune experiment."""
    import ray
    from ray import tune

    from raytune_qvl.sweep.progress import SweepProgress
    from raytune_qvl.sweep.stage import InterruptWatch, unfinished
    from raytune_qvl.track.trials import SweepTracking

    space, base = sweep.space, sweep.base
    experiment = f"{space.tune_storage}/{CONFIRM_STAGE}"
    context = {
        "space": space.model_dump(mode="json"),
        "base": base.model_dump(mode="json"),
        "fixed": {},
        "lr_batch": None,
        "num_samples": sweep.num_samples,
        "sweep_dir": str(sweep.dir.absolute()),
        "driver_node": ray.get_runtime_context().get_node_id(),  # where trial outputs are read
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"CPU": 1})
    if restore and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        # a warm start's source may have confirmed a candidate already: its runs count here
        done = {(r.sampled.get("of"), r.sampled.get("seed")) for r in sweep.state.records() if r.origin}
        specs = [
            {"of": rec.trial_id, "overrides": {**rec.overrides, **rec.fit}, "seed": seed}
            for rec in candidates(sweep)
            for seed in range(1, space.confirm.seeds + 1)
            if (rec.trial_id, seed) not in done
        ]
        if not specs:
            return []
        predictions = str(Path(trial_dir(str(sweep.dir.absolute()), "{trial_id}")) / "best" / "predictions.json")
        tracking = SweepTracking(
            sweep.tracker.uri,
            space.experiment,
            sweep.parent,
            CONFIRM_STAGE,
            confirmation_params,
            predictions,
            cost=partial(trial_cost, resources=space.resources),
        )
        progress = SweepProgress(
            CONFIRM_STAGE,
            space.metric,
            confirmation_overrides,
            base.training.per_device_train_batch_size,
            warned=sweep.warned,
        )
        tuner = tune.Tuner(
            trainable,
            param_space={CONFIRM_KEY: tune.grid_search(specs)},
            tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode, max_concurrent_trials=sweep.concurrency, num_samples=1
            ),
            run_config=tune.RunConfig(
                name=CONFIRM_STAGE,
                storage_path=space.tune_storage,
                callbacks=[FetchOutputs(train_storage(space), str(sweep.dir.absolute())), tracking, progress],
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                verbose=0,
            ),
        )
    watch = InterruptWatch()
    results = watch.run(tuner.fit)
    if watch.interrupted or unfinished(results):
        raise KeyboardInterrupt
    return _records(results, space)


def _records(results: Any, space: Any) -> list[TrialRecord]:
    metric, out = space.metric, []
    kept = ("step", "epoch", "samples_seen")
    for result, trial_id, trial, history in tune_results(
        results, lambda c: c in kept or c.startswith(("eval_", "test_"))
    ):
        metrics = result.metrics or {}
        spec = dict((result.config or {}).get(CONFIRM_KEY) or {})
        failed = result.error is not None
        reason = (trial_error(trial) if trial is not None else str(result.error)) if failed else ""
        value = None if failed else last_value(history, metric)
        record = TrialRecord(
            trial_id, CONFIRM_STAGE, spec, dict(spec.get("overrides", {})), value,
            "failed" if failed else "confirmation", reason,
            float(metrics.get("epoch", 0) or 0), int(metrics.get("samples_seen", 0) or 0), history,
            cost=trial_cost(metrics, space.resources),
        )  # fmt: skip
        out.append(record)
    return out


def confirmed(sweep: Sweep) -> list[Confirmed]:
    """Each candidate with its values (search + confirmation runs) and test scores, best mean first;
    a config with a confirmation run that failed or diverged after every config without one (its
    mean would be of the seeds that happened to work)."""
    test_key = test_metric(sweep.space.metric)
    table = {rec.trial_id: Confirmed(rec.trial_id, rec.overrides, [rec.value]) for rec in candidates(sweep)}
    for rec in sweep.state.records():
        if rec.stage != CONFIRM_STAGE or rec.sampled.get("of") not in table:
            continue
        entry = table[rec.sampled["of"]]
        if rec.status != "confirmation" or rec.value is None or not math.isfinite(rec.value):
            entry.failed += 1
            continue
        entry.values.append(rec.value)
        test = last_value(rec.history, test_key)
        if test is not None:
            entry.tests.append(test)
    sign = 1 if sweep.space.mode == "min" else -1
    return sorted(table.values(), key=lambda c: (c.failed > 0, sign * c.mean))
