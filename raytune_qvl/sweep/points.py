"""A sampled point -> config overrides -> a trial's config: alpha from the rank, accumulation
from the effective batch, the learning rate moved by the scaling rule. Pure: no Ray or Optuna."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

from pydantic import ValidationError

from raytune_qvl.config import batch_math
from raytune_qvl.config.overrides import apply_overrides
from raytune_qvl.config.problems import pydantic_problems
from raytune_qvl.config.schema import Config
from raytune_qvl.errors import ConfigError
from raytune_qvl.sweep.records import point_key
from raytune_qvl.sweep.space import EFFECTIVE_BATCH, LR_FACTOR, LR_KEY, RANK_KEY, SAMPLER_KEY, SearchSpace

__all__ = [
    "point_overrides",
    "trial_config",
    "worker_resources",
    "apply_to_config",
    "starting_batch",
    "starting_point",
    "config_value",
    "eval_steps_for",
    "PointResolver",
]

# training.save_steps of a trial without engine checkpoints before its last step (which always has one)
NO_CHECKPOINTS = 2**31 - 1


def point_overrides(space: SearchSpace, base: Config, point: Mapping[str, Any], lr_batch: int | None) -> dict[str, Any]:
    """Config overrides (section.key: value) for a full point of the search.

    * lora.r also sets lora.lora_alpha = lora_alpha_ratio x r
    * effective_batch sets training.gradient_accumulation_steps = B / (micro x workers)
    * with a scaling rule (sqrt, linear), the learning rate found at batch `lr_batch` is moved to
      lr x (B / lr_batch) ** p, times lr_factor (the local search) when sampled
    """
    out: dict[str, Any] = {}
    for key, value in point.items():
        if key in (EFFECTIVE_BATCH, LR_FACTOR):
            continue
        out[key] = value
    if RANK_KEY in point:
        out["lora.lora_alpha"] = max(1, int(round(space.lora_alpha_ratio * int(point[RANK_KEY]))))
    micro = base.training.per_device_train_batch_size
    workers = space.resources.workers_per_trial
    if EFFECTIVE_BATCH in point:
        batch = int(point[EFFECTIVE_BATCH])
        out["training.gradient_accumulation_steps"] = batch_math.accumulation_for(batch, micro, workers)
        lr = float(point.get(LR_KEY, base.training.learning_rate))
        if space.lr_scaling.rule != "none" and lr_batch and space.strategy == "staged":
            lr = batch_math.scale_lr(lr, batch, lr_batch, space.lr_scaling.rule) * float(point.get(LR_FACTOR, 1.0))
        out[LR_KEY] = lr
    return out


def trial_config(
    space: SearchSpace,
    base: Config,
    point: Mapping[str, Any],
    lr_batch: int | None,
    trial_dir: str,
    eval_steps: int,
    *,
    eval_on_start: bool = False,
    confirm: Mapping[str, Any] | None = None,
) -> Config:
    """The full config of one trial, re-validated by the schema (the values a parameter can
    take were checked against the whole config when the search space was loaded).
    `eval_on_start`: evaluate the model before any training (the sweep's starting point).
    `confirm`: a confirmation run instead, {"overrides": the trial's config overrides, "seed": k}:
    the same config with its seeds moved by k, scored on the held-out test split at its end (a
    search trial never reads the test split)."""
    if confirm is None:
        overrides = point_overrides(space, base, point, lr_batch)
        overrides["data.test_path"] = None
    else:
        overrides = dict(confirm["overrides"])
        overrides["environment.seed"] = base.environment.seed + int(confirm["seed"])
        overrides["data.preprocessing.seed"] = base.data.preprocessing.seed + int(confirm["seed"])
    overrides.update(
        {
            "output.dir": trial_dir,
            "output.report_to": "none",  # the sweep driver logs every trial (one writer)
            "ray.num_workers": space.resources.workers_per_trial,
            "ray.use_gpu": space.resources.use_gpu,
            "ray.resources_per_worker": worker_resources(space),
            "ray.placement_strategy": space.resources.placement_strategy,
            "ray.shared_storage": space.shared_storage,
            "ray.storage_path": space.storage_path,
            "training.metric_for_best_model": space.metric,
            "training.greater_is_better": space.mode == "max",
            "training.eval_steps": eval_steps,
            "training.save_steps": eval_steps * space.checkpoint_every if space.checkpoint_every else NO_CHECKPOINTS,
            "training.final_checkpoint": "adapter",  # nothing resumes a finished trial
            "training.logging_steps": min(base.training.logging_steps, eval_steps),
            "training.eval_on_start": eval_on_start or base.training.eval_on_start,
        }
    )
    return apply_to_config(base, overrides, source=space.source or "search space")


def worker_resources(space: SearchSpace) -> dict[str, float]:
    res = {"CPU": space.resources.cpus_per_worker}
    if space.resources.use_gpu:
        res["GPU"] = space.resources.gpus_per_worker
    return res


def apply_to_config(base: Config, overrides: Mapping[str, Any], source: str) -> Config:
    """A copy of `base` with dotted overrides applied and every section re-validated."""
    tree = {
        name: getattr(base, name).model_dump() for name in Config.model_fields if name not in ("deepspeed", "paths")
    }
    apply_overrides(tree, [(key.split("."), value) for key, value in overrides.items()])
    try:
        return Config(**tree, deepspeed=base.deepspeed, paths=base.paths)
    except ValidationError as exc:
        raise ConfigError(pydantic_problems(exc.errors(), lambda loc: source)) from None


def starting_batch(base: Config, space: SearchSpace) -> int:
    """The effective batch of the starting point, where stage 1 searches the learning rate."""
    t = base.training
    return batch_math.effective_batch(
        t.per_device_train_batch_size, space.resources.workers_per_trial, t.gradient_accumulation_steps
    )


def eval_steps_for(space: SearchSpace, num_samples: int, effective_batch: int) -> int:
    """Optimizer steps between evaluations: evals_per_epoch evaluations per epoch."""
    per_epoch = max(1, num_samples // effective_batch)
    return max(1, math.floor(per_epoch / space.evals_per_epoch))


def starting_point(space: SearchSpace, base: Config) -> dict[str, Any]:
    """Every searched parameter at the task's starting point (base + overrides)."""
    return {
        key: starting_batch(base, space) if key == EFFECTIVE_BATCH else config_value(base, key)
        for key in space.parameters
    }


def config_value(cfg: Config, key: str) -> Any:
    """The value of a dotted config key (`lora.r`) in `cfg`."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@dataclass
class PointResolver:
    """Sampled values -> the full point and the config overrides it means (picklable)."""

    space: dict[str, Any]
    base: dict[str, Any]
    fixed: dict[str, Any]
    lr_batch: int

    def point(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.fixed, **{k: v for k, v in sampled.items() if k != SAMPLER_KEY}}

    @cached_property
    def _space(self) -> SearchSpace:
        return SearchSpace.model_validate(self.space)

    @cached_property
    def _base(self) -> Config:
        return Config.model_validate(self.base)

    def overrides(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        return point_overrides(self._space, self._base, self.point(sampled), self.lr_batch)

    def __getstate__(self) -> dict[str, Any]:  # the cached objects are rebuilt where it lands
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def sample_of(
        self, params: Mapping[str, Any], point: Mapping[str, Any], overrides: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The values of `params` (a stage's domains) at which this resolver builds a config trained
        before (its point and overrides): the config lies in the stage's slice of the space. None
        when it does not (another value held fixed, or a value outside a domain)."""
        sample = {k: point[k] for k in params if k != LR_FACTOR and k in point}
        if len(sample) + (LR_FACTOR in params) != len(params):
            return None
        try:
            if LR_FACTOR in params:  # the factor that moves the scaled rate to the one it trained with
                at_one = self.overrides({**sample, LR_FACTOR: 1.0}).get(LR_KEY)
                if not at_one or LR_KEY not in overrides:
                    return None
                sample[LR_FACTOR] = float(overrides[LR_KEY]) / float(at_one)
            if not all(params[k].contains(v) for k, v in sample.items()):
                return None
            built = self.overrides(sample)
        except (ConfigError, ValueError, TypeError, KeyError):
            return None
        return sample if point_key(built) == point_key(overrides) else None

    def describe(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """What MLflow shows for a trial: the sampled values and the derived ones."""
        out = {f"sampled.{k}": v for k, v in sampled.items() if k != SAMPLER_KEY}
        if SAMPLER_KEY in sampled:
            out[SAMPLER_KEY] = sampled[SAMPLER_KEY]
        point = self.point(sampled)
        if EFFECTIVE_BATCH in point:
            out["derived.effective_batch_size"] = point[EFFECTIVE_BATCH]
        out.update({k: v for k, v in self.overrides(sampled).items()})
        if LR_FACTOR in sampled or EFFECTIVE_BATCH in sampled:
            out["derived.lr_scaled_from_batch"] = self.lr_batch
        return out
