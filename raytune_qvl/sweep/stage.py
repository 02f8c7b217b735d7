"""One stage of a sweep: a Ray Tune `Tuner` over the stage's parameters (the rest fixed at the best
so far), its searcher, scheduler and MLflow callback, a Ctrl-C watch, and the stage's trials as
records — points trained in an earlier stage count as candidates without being trained again."""

from __future__ import annotations

import math
import signal
from functools import partial
from pathlib import Path
from typing import Any

from raytune_qvl.config.schema import Config
from raytune_qvl.errors import trial_error
from raytune_qvl.sweep.context import Sweep
from raytune_qvl.sweep.cost import trial_cost
from raytune_qvl.sweep.points import PointResolver
from raytune_qvl.sweep.records import (
    INFEASIBLE,
    StageOutcome,
    TrialRecord,
    last_value,
    memory_fit,
    point_key,
    tune_results,
)
from raytune_qvl.sweep.search import make_scheduler, make_searcher, max_budget
from raytune_qvl.sweep.space import SAMPLER_KEY, Stage

MICRO_KEY = "training.per_device_train_batch_size"
from raytune_qvl.sweep.trial import FetchOutputs, run_trial, train_storage, trial_dir

__all__ = ["run_stage", "InterruptWatch", "unfinished"]


def run_stage(
    sweep: Sweep, stage: Stage, fixed: dict[str, Any], lr_batch: int, incumbent: TrialRecord | None, *, restore: bool
) -> StageOutcome:
    """Run the stage (or, with `restore`, continue its interrupted Tune experiment) and return its
    trials as records."""
    import ray
    from ray import tune

    from raytune_qvl.sweep.progress import SweepProgress
    from raytune_qvl.track.trials import SweepTracking

    space, base = sweep.space, sweep.base
    experiment = f"{space.tune_storage}/{stage.label}"
    held = {k: v for k, v in fixed.items() if k not in stage.params}
    resolver = PointResolver(space.model_dump(mode="json"), base.model_dump(mode="json"), held, lr_batch)
    # configurations trained in earlier stages: key -> (value, the trial that trained it, its status);
    # the searcher learns every value (a stopped trial's too), only full runs become candidates here;
    # a point that fits in memory at no micro batch is known too (no value): never tried again
    known = {
        point_key(t["overrides"]): (t["value"], t["trial_id"], t["status"])
        for t in sweep.state.trials
        if t["status"] not in ("failed", "reused", "confirmation") or str(t.get("reason", "")).startswith(INFEASIBLE)
    }
    members = in_slice(stage, resolver, sweep.state.records())
    context = {
        "space": resolver.space,
        "base": resolver.base,
        "fixed": resolver.fixed,
        "lr_batch": lr_batch,
        "num_samples": sweep.num_samples,
        "sweep_dir": str(sweep.dir.absolute()),
        "driver_node": ray.get_runtime_context().get_node_id(),  # where trial outputs are read
        "eval_on_start": stage.index == 1,  # the first stage also measures the model before fine-tuning
    }
    trainable = tune.with_parameters(run_trial, context=context)

    if restore and tune.Tuner.can_restore(experiment):
        # the searcher (with its Optuna study) and the MLflow callback come back from the experiment
        tuner = tune.Tuner.restore(
            experiment,
            trainable=tune.with_resources(trainable, {"CPU": 1}),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        predictions = str(Path(trial_dir(str(sweep.dir.absolute()), "{trial_id}")) / "best" / "predictions.json")
        tracking = SweepTracking(
            sweep.tracker.uri,
            space.experiment,
            sweep.parent,
            stage.label,
            resolver.describe,
            predictions,
            cost=partial(trial_cost, resources=space.resources),
        )
        searcher = make_searcher(
            space,
            stage,
            resolver,
            {key: value for key, (value, _, _) in known.items()},
            (sweep.dir / "optuna.db").absolute(),
            evaluated=[(sample, rec.value) for sample, rec in members],
        )
        scheduler = make_scheduler(space, stage, max_budget(space, base, stage, fixed, sweep.num_samples))
        micro = base.training.per_device_train_batch_size
        progress = SweepProgress(stage.label, space.metric, resolver.overrides, micro, warned=sweep.warned)
        fetch = FetchOutputs(train_storage(space), str(sweep.dir.absolute()))
        tuner = _tuner(trainable, stage, sweep, searcher, scheduler, [fetch, tracking, progress])

    watch = InterruptWatch()
    results = watch.run(tuner.fit)
    records = _records(stage, results, resolver, space)
    # full runs of this stage's slice trained before (in an earlier stage, or by a warm start's source)
    # count as its candidates without being trained again (the incumbent is already one)
    skip = {point_key(r.overrides) for r in records} | ({point_key(incumbent.overrides)} if incumbent else set())
    for sample, rec in members:
        key = point_key(rec.overrides)
        if rec.status == "completed" and key not in skip:
            skip.add(key)
            point = resolver.point(sample)
            reused = TrialRecord(rec.trial_id, stage.label, sample, rec.overrides, rec.value, "reused", point=point)
            reused.cost = dict(rec.cost)
            records.append(reused)
    return StageOutcome(stage.label, records, interrupted=watch.interrupted or unfinished(results))


def in_slice(stage: Stage, resolver: PointResolver, records: list[TrialRecord]) -> list[tuple[dict, TrialRecord]]:
    """(the stage's sampled values, record) of every config trained to a value before that lies in
    the stage's slice of the space: the values held fixed equal, the stage's values in its domains.
    One per config (a full run before a stopped one)."""
    out: dict[tuple, tuple[dict, TrialRecord]] = {}
    for rec in sorted(records, key=lambda r: r.status != "completed"):
        if rec.status not in ("completed", "stopped") or rec.value is None or not math.isfinite(rec.value):
            continue
        sample = resolver.sample_of(stage.params, rec.point, rec.overrides)
        if sample is not None:
            out.setdefault(point_key(rec.overrides), (sample, rec))
    return list(out.values())


def _tuner(trainable: Any, stage: Stage, sweep: Sweep, searcher: Any, scheduler: Any, callbacks: list[Any]) -> Any:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    space = sweep.space
    return tune.Tuner(
        tune.with_resources(trainable, {"CPU": 1}),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=sweep.concurrency),
            scheduler=scheduler,
            num_samples=stage.trials,
            metric=space.metric,
            mode=space.mode,
        ),
        run_config=tune.RunConfig(
            name=stage.label,
            storage_path=space.tune_storage,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=0,  # SweepProgress prints one line per trial event
        ),
    )


class InterruptWatch:
    """Tune catches Ctrl-C itself, saves the experiment and returns normally; its handler
    restores the one it replaced, which is how we learn the stage was interrupted."""

    def __init__(self) -> None:
        self.interrupted = False

    def _marker(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def run(self, fn: Any) -> Any:
        previous = signal.getsignal(signal.SIGINT)
        marker = self._marker  # one bound-method object, so the identity test below holds
        signal.signal(signal.SIGINT, marker)
        try:
            result = fn()
            self.interrupted = signal.getsignal(signal.SIGINT) is marker
            return result
        finally:
            signal.signal(signal.SIGINT, previous)


def unfinished(results: Any) -> bool:
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    return any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _records(stage: Stage, results: Any, resolver: PointResolver, space: Any) -> list[TrialRecord]:
    """The stage's Tune results as records: status, value (the last reported metric), budget
    reached, cost."""
    metric, out = space.metric, []
    micro = Config.model_validate(resolver.base).training.per_device_train_batch_size
    kept = ("step", "epoch", "samples_seen", "loss", "eval_loss")
    for result, trial_id, trial, history in tune_results(results, lambda c: c in kept or c.startswith("eval_")):
        metrics = result.metrics or {}
        sampled = dict(result.config or {})
        sampler = str(sampled.pop(SAMPLER_KEY, ""))
        if result.error is not None:
            status = "failed"
            reason = trial_error(trial) if trial is not None else str(result.error).splitlines()[-1][:500]
            value = None
        else:
            status = "completed" if metrics.get("finished") else "stopped"
            reason = "" if status == "completed" else f"stopped by ASHA at epoch {metrics.get('epoch', 0):.2f}"
            value = last_value(history, metric)
        try:
            overrides = resolver.overrides(sampled)
        except Exception:  # noqa: BLE001 - a point that could not even be built
            overrides = {}
        epoch, samples = float(metrics.get("epoch", 0) or 0), int(metrics.get("samples_seen", 0) or 0)
        out.append(
            TrialRecord(
                trial_id,
                stage.label,
                sampled,
                overrides,
                value,
                status,
                reason,
                epoch,
                samples,
                history,
                resolver.point(sampled),
                sampler,
                trial_cost(metrics, space.resources),
                memory_fit(metrics, int(overrides.get(MICRO_KEY, micro))),
            )
        )
    return out
