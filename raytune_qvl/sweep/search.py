"""How a stage searches: Optuna's TPE (or random search, the baseline) inside Ray's OptunaSearch,
seeded and persisted in SQLite, wrapped so a stage never trains the same configuration twice;
and ASHA on a budget-fair time attribute (epochs or samples), or FIFO when it is off."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Mapping

from ray.tune.search import Searcher

from raytune_qvl.config.schema import Config
from raytune_qvl.sweep.plan import early_stopping, sampler_for
from raytune_qvl.sweep.points import PointResolver, starting_batch
from raytune_qvl.sweep.records import point_key
from raytune_qvl.sweep.space import (
    EFFECTIVE_BATCH,
    EPOCHS_KEY,
    SAMPLER_KEY,
    Domain,
    SearchSpace,
    Stage,
    grid,
    param_type,
)

__all__ = [
    "optuna_space",
    "UniqueSearch",
    "make_searcher",
    "sampler_for",
    "make_scheduler",
    "max_budget",
    "max_t_problem",
]


def optuna_space(params: Mapping[str, Domain], types: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna distributions: choices -> categorical, integer ranges -> IntDistribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, d in params.items():
        if d.choices is not None:
            out[key] = CategoricalDistribution(list(d.choices))
        elif types.get(key) is int:
            out[key] = IntDistribution(int(d.low), int(d.high), log=d.log, step=int(d.step or 1))
        else:
            out[key] = FloatDistribution(d.low, d.high, log=d.log, step=d.step)
    return out


class UniqueSearch(Searcher):
    """Wraps OptunaSearch so a stage never trains a configuration twice: a suggestion equal to
    one already trained (in this stage or an earlier one) is told to Optuna with the known
    result once (a repeat after that is dropped, not counted again) instead of being trained, and a
    finite space that is used up ends the stage. `evaluated`: (sampled values, value) of configs
    trained before that lie in this stage's slice (an earlier stage's, a warm start's source's):
    Optuna is told them before its first suggestion. Every suggestion carries the name of what
    made it (SAMPLER_KEY): `grid`, `random`, `tpe start-up (random)` or `tpe`."""

    def __init__(
        self,
        inner: Any,
        resolver: PointResolver,
        params: Mapping[str, Domain],
        known: dict[tuple, float | None],
        seed: int,
        sampler: str = "tpe",
        startup: int = 0,
        evaluated: list[tuple[dict[str, Any], float]] = (),
    ):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner = inner
        self.resolver = resolver
        self.known = dict(known)  # point key -> value (None: trained, no result yet)
        self.told: set[tuple] = set()  # known results this study has been told
        self.grid = grid(params)
        self.ids: dict[str, str] = {}  # Tune trial id -> Optuna-side id
        self.keys: dict[str, tuple] = {}
        self.rng = random.Random(seed)
        self.sampler, self.startup = sampler, startup  # TPE models after `startup` completed trials
        study = self.inner._ot_study
        stored = [t.params for t in study.trials if t.state.name == "COMPLETE"]  # a stage run again
        for params, value in evaluated:
            key = point_key(resolver.overrides(params))
            if key in self.told:
                continue
            self.told.add(key)
            self.known[key] = value
            if any(point_key(resolver.overrides(p)) == key for p in stored):
                continue
            try:
                self.inner.add_evaluated_point(params, value)
            except ValueError:  # a value a hair outside Optuna's exact range: known, not told
                pass

    def _label(self, enqueued: bool) -> str:
        if enqueued:
            return "enqueued (an untried grid point)"
        if self.sampler != "tpe":
            return self.sampler
        complete = sum(1 for t in self.inner._ot_study.trials if t.state.name == "COMPLETE")
        return "tpe start-up (random)" if complete < self.startup else "tpe"

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        ok = self.inner.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.inner.metric, self.inner.mode
        return ok

    def _unused(self) -> list[dict[str, Any]]:
        if self.grid is None:
            return []
        return [g for g in self.grid if point_key(self.resolver.overrides(g)) not in self.known]

    def suggest(self, trial_id: str) -> dict | None:
        for attempt in range(60):
            enqueued = False
            if self.grid is not None and attempt >= 3:
                unused = self._unused()
                if not unused:
                    return Searcher.FINISHED
                self.inner._ot_study.enqueue_trial(self.rng.choice(unused))  # steer TPE off repeats
                enqueued = True
            label = self._label(enqueued)
            internal = trial_id if attempt == 0 else f"{trial_id}~{attempt}"
            params = self.inner.suggest(internal)
            if params is None or params == Searcher.FINISHED:
                return params
            key = point_key(self.resolver.overrides(params))
            if key in self.known:  # trained already: nothing is trained
                value = self.known[key]
                if value is not None and key not in self.told:  # Optuna learns its result, once
                    self.told.add(key)
                    self.inner.on_trial_complete(internal, result={self.metric: value})
                else:  # told before (or its trial still runs): this repeat is dropped, not counted
                    self.inner.on_trial_complete(internal, result=None, error=True)
                continue
            self.known[key] = None
            self.ids[trial_id], self.keys[trial_id] = internal, key
            return {**params, SAMPLER_KEY: label}
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result and trial_id in self.ids:  # log-step reports carry no eval metric
            self.inner.on_trial_result(self.ids[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.ids:
            return
        value = (result or {}).get(self.metric)
        if error or value is None or (isinstance(value, float) and not math.isfinite(value)):
            self.inner.on_trial_complete(self.ids[trial_id], result=None, error=True)
        else:
            self.inner.on_trial_complete(self.ids[trial_id], result=result)
            self.known[self.keys[trial_id]] = value
            self.told.add(self.keys[trial_id])

    def get_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "inner"} | {"inner": self.inner.__dict__.copy()}

    def set_state(self, state: dict) -> None:
        inner_state = state.pop("inner")
        self.__dict__.update(state)
        self.inner.__dict__.update(inner_state)

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


def make_searcher(
    space: SearchSpace,
    stage: Stage,
    resolver: PointResolver,
    known: Mapping[tuple, float | None],
    study_db: Path,
    evaluated: list[tuple[dict[str, Any], float]] = (),
) -> UniqueSearch:
    """The stage's searcher (see sampler_for) over the stage's parameters, its Optuna study kept in
    `study_db`, told the results of points trained before (`evaluated`: those in its slice, up
    front; any other known point when it is suggested)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    seed = space.seed + stage.index
    name, startup = sampler_for(space, stage, resolver, known)
    if name == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    elif name == "grid":
        sampler = optuna.samplers.BruteForceSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=len(stage.params) > 1)
    inner = OptunaSearch(
        space=optuna_space(stage.params, {k: param_type(k) for k in stage.params}),
        metric=space.metric,
        mode=space.mode,
        sampler=sampler,
        study_name=f"{space.name}-{stage.label}",
        storage=optuna.storages.RDBStorage(f"sqlite:///{study_db}"),
    )
    return UniqueSearch(
        inner, resolver, stage.params, dict(known), seed=seed, sampler=name, startup=startup, evaluated=evaluated
    )


def max_budget(space: SearchSpace, base: Config, stage: Stage, fixed: dict[str, Any], num_samples: int) -> float:
    """ASHA's max_t for the stage: asha.max_t when set (its rungs go up to it), else the longest
    trial. Never below the longest trial (`max_t_problem` refuses that before the sweep starts): ASHA
    stops a trial that reaches max_t, and a stopped trial never wins."""
    longest = longest_trial(space, base, stage, fixed, num_samples)
    return longest if space.asha.max_t is None else max(space.asha.max_t, longest)


def max_t_problem(space: SearchSpace, base: Config, num_samples: int) -> str | None:
    """What is wrong with asha.max_t for this space (None: nothing): below the longest trial of a
    stage that ASHA stops early, it would stop every trial before its end."""
    from raytune_qvl.sweep.points import starting_point
    from raytune_qvl.sweep.space import stages

    if space.asha.max_t is None:
        return None
    fixed = starting_point(space, base)
    budgets = [longest_trial(space, base, s, fixed, num_samples) for s in stages(space) if early_stopping(space, s)]
    if not budgets or space.asha.max_t >= max(budgets):
        return None
    unit = "epochs" if space.asha.time_attr == "epoch" else "samples"
    return (
        f"is below the longest trial ({max(budgets):g} {unit}): ASHA would stop every trial there, before "
        "its end, and a stopped trial never wins; leave it out (the longest trial) or raise it"
    )


def longest_trial(space: SearchSpace, base: Config, stage: Stage, fixed: dict[str, Any], num_samples: int) -> float:
    """The longest trial of the stage in ASHA's time unit: epochs, or the samples it really trains
    (an epoch trains whole effective batches: floor(N / B) x B)."""
    epochs = [fixed.get(EPOCHS_KEY, base.training.num_epochs)]
    if EPOCHS_KEY in stage.params:
        epochs = [v for v in stage.params[EPOCHS_KEY].extremes() if v is not None]
    top = float(max(epochs))
    if space.asha.time_attr == "epoch":
        return top
    batches = [fixed.get(EFFECTIVE_BATCH) or starting_batch(base, space)]
    if EFFECTIVE_BATCH in stage.params:
        batches = [int(b) for b in stage.params[EFFECTIVE_BATCH].extremes()]
    return top * max((num_samples // int(b)) * int(b) for b in batches)


def make_scheduler(space: SearchSpace, stage: Stage, max_t: float) -> Any:
    """ASHA with the file's settings where the plan stops early (plan.early_stopping), else FIFO
    (every trial to its end), also when the stage's longest trial is not past the grace period."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    a = space.asha
    if not early_stopping(space, stage) or max_t <= a.grace_period:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=a.time_attr,
        max_t=max_t,
        grace_period=a.grace_period,
        reduction_factor=a.reduction_factor,
        brackets=a.brackets,
    )
