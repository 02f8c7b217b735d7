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
from raytune_qvl.sweep.points import PointResolver
from raytune_qvl.sweep.records import point_key
from raytune_qvl.sweep.space import EPOCHS_KEY, Domain, SearchSpace, Stage, grid, param_type

__all__ = ["optuna_space", "UniqueSearch", "make_searcher", "make_scheduler", "max_budget"]


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
    result instead of being trained, and a finite space that is used up ends the stage."""

    def __init__(
        self,
        inner: Any,
        resolver: PointResolver,
        params: Mapping[str, Domain],
        known: dict[tuple, float | None],
        seed: int,
    ):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner = inner
        self.resolver = resolver
        self.known = dict(known)  # point key -> value (None: trained, no result yet)
        self.grid = grid(params)
        self.ids: dict[str, str] = {}  # Tune trial id -> Optuna-side id
        self.keys: dict[str, tuple] = {}
        self.rng = random.Random(seed)

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
            if self.grid is not None and attempt >= 3:
                unused = self._unused()
                if not unused:
                    return Searcher.FINISHED
                self.inner._ot_study.enqueue_trial(self.rng.choice(unused))  # steer TPE off repeats
            internal = trial_id if attempt == 0 else f"{trial_id}~{attempt}"
            params = self.inner.suggest(internal)
            if params is None or params == Searcher.FINISHED:
                return params
            key = point_key(self.resolver.overrides(params))
            if key in self.known:  # trained already: Optuna learns its result, nothing is trained
                value = self.known[key]
                self.inner.on_trial_complete(internal, result={self.metric: value} if value is not None else None)
                continue
            self.known[key] = None
            self.ids[trial_id], self.keys[trial_id] = internal, key
            return params
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
    space: SearchSpace, stage: Stage, resolver: PointResolver, known: Mapping[tuple, float | None], study_db: Path
) -> UniqueSearch:
    """The stage's searcher: TPE (random for the `random` strategy) over the stage's parameters,
    its Optuna study kept in `study_db`, told the results of points trained before."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    seed = space.seed + stage.index
    sampler = (
        optuna.samplers.RandomSampler(seed=seed)
        if space.strategy == "random"
        else optuna.samplers.TPESampler(seed=seed)
    )
    inner = OptunaSearch(
        space=optuna_space(stage.params, {k: param_type(k) for k in stage.params}),
        metric=space.metric,
        mode=space.mode,
        sampler=sampler,
        study_name=f"{space.name}-{stage.label}",
        storage=optuna.storages.RDBStorage(f"sqlite:///{study_db}"),
    )
    return UniqueSearch(inner, resolver, stage.params, dict(known), seed=seed)


def max_budget(space: SearchSpace, base: Config, stage: Stage, fixed: dict[str, Any], num_samples: int) -> float:
    """The longest trial of the stage in ASHA's time unit (epochs, or samples)."""
    epochs = [fixed.get(EPOCHS_KEY, base.training.num_epochs)]
    if EPOCHS_KEY in stage.params:
        epochs = [v for v in stage.params[EPOCHS_KEY].extremes() if v is not None]
    top = float(max(epochs))
    return top if space.asha.time_attr == "epoch" else top * num_samples


def make_scheduler(space: SearchSpace, max_t: float) -> Any:
    """ASHA with the file's settings; FIFO (every trial to its end) when ASHA is off or the stage's
    longest trial is not longer than the grace period."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    a = space.asha
    if not a.enabled or max_t <= a.grace_period:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=a.time_attr,
        max_t=max_t,
        grace_period=a.grace_period,
        reduction_factor=a.reduction_factor,
        brackets=a.brackets,
    )
