"""Search-space files: the schema, validation, the priority stages, and the arithmetic that turns
a sampled point into config overrides (alpha from the rank, accumulation from the effective
batch, the learning rate moved by the linear scaling rule). Pure: no torch, Ray or Optuna.

A file names the base config files, the task's starting point (overrides), the parameters in
priority order with Optuna-style domains, the strategy, trials per stage, metric and mode,
ASHA, resources per trial, MLflow and storage. See search_spaces/ocr_doc.yaml.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raytune_qvl import batch_math
from raytune_qvl.config import (
    EVAL_METRICS,
    Config,
    apply_overrides,
    closest,
    config_keys,
    field_at,
    load_config,
    load_yaml,
    metric_reported,
    pydantic_problems,
)
from raytune_qvl.errors import ConfigError, Problem

__all__ = [
    "EFFECTIVE_BATCH",
    "LR_FACTOR",
    "Domain",
    "SearchSpace",
    "Stage",
    "load_search_space",
    "stages",
    "point_overrides",
    "trial_config",
    "grid",
]

EFFECTIVE_BATCH = "effective_batch"  # a derived parameter: it becomes gradient accumulation
LR_FACTOR = "lr_factor"  # the local search around the linearly scaled learning rate
LR_KEY = "training.learning_rate"
RANK_KEY = "lora.r"
EPOCHS_KEY = "training.num_epochs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Domain(_Strict):
    """Optuna's words: `choices`, or `low`/`high` with `log` or `step`."""

    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def values(self) -> list[Any] | None:
        """Every value of a finite domain (choices, or an integer range with a step)."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is not None and self.low is not None and self.high is not None:
            n = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(n + 1)]
        return None

    def extremes(self) -> list[Any]:
        return self.values() or [self.low, self.high]


class BaseFiles(_Strict):
    config: str  # training YAML
    lora_config: str | None = None
    deepspeed: str | None = None


class LrScaling(_Strict):
    rule: Literal["linear", "none"] = "linear"  # lr_new = lr_base x B_new / B_base
    local_search: float = Field(0.5, ge=0.0, le=4.0)  # then a factor in [1/(1+w), 1+w], log-uniform; 0: none


class Asha(_Strict):
    enabled: bool = True  # false: every trial runs its full budget (a baseline)
    time_attr: Literal["epoch", "samples_seen"] = "epoch"  # budget-fair across batch sizes
    grace_period: float = Field(1.0, gt=0)  # in time_attr units
    max_t: float | None = Field(None, gt=0)  # None: the longest trial of the stage
    reduction_factor: float = Field(3.0, ge=2)
    brackets: int = Field(1, ge=1)


class Resources(_Strict):
    workers_per_trial: int = Field(1, ge=1)  # Ray Train workers (DeepSpeed world size) per trial
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)  # with use_gpu
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # a trial's workers over nodes
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: from the cluster's resources


class Mlflow(_Strict):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str | None = None  # None: raytune_qvl-<name>


class SearchSpace(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    base: BaseFiles
    overrides: dict[str, Any] = Field(default_factory=dict)  # the task's starting point: section.key: value
    parameters: dict[str, Domain] = Field(min_length=1)  # in priority order (the file's order)
    strategy: Literal["staged", "joint", "random"] = "staged"  # random: a baseline without TPE
    trials_per_stage: int | dict[str, int] = 4
    joint_trials: int = Field(16, ge=1)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    lora_alpha_ratio: float = Field(2.0, gt=0)  # lora_alpha = ratio x r
    lr_scaling: LrScaling = LrScaling()
    evals_per_epoch: float = Field(4.0, gt=0)  # evaluations (ASHA decision points) per epoch
    asha: Asha = Asha()
    resources: Resources = Resources()
    mlflow: Mlflow = Mlflow()
    storage_path: str = "./ray_results"  # shared storage or a cloud URI on a multi-node cluster
    shared_storage: bool = False  # storage_path is a filesystem every node mounts (checked at start)
    output_dir: str = "./outputs/sweeps"  # <output_dir>/<name>: trials, best/, sweep state
    keep_best_adapters: int = Field(3, ge=0)
    seed: int = 42
    source: str = Field("", exclude=True)  # the file it came from (set by the loader)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def tune_storage(self) -> str:
        """Where this sweep's Tune experiments (one per stage) and trial runs live."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or f"raytune_qvl-{self.name}"

    def trials_for(self, stage: str) -> int:
        if isinstance(self.trials_per_stage, int):
            return self.trials_per_stage
        return self.trials_per_stage.get(stage, 4)


@dataclass(frozen=True)
class Stage:
    """One Tuner run: the parameters it searches (the rest fixed at the best so far)."""

    index: int
    name: str
    params: dict[str, Domain]
    trials: int

    @property
    def label(self) -> str:
        return f"stage{self.index}-{self.name.replace('.', '_')}"


def stages(space: SearchSpace) -> list[Stage]:
    """`staged`: one stage per parameter in the file's (priority) order; the effective-batch
    stage also searches a factor around the linearly scaled learning rate. `joint` (TPE) and
    `random`: one stage over every parameter."""
    if space.strategy in ("joint", "random"):
        return [Stage(1, space.strategy, dict(space.parameters), space.joint_trials)]
    out = []
    for i, (key, domain) in enumerate(space.parameters.items(), start=1):
        params = {key: domain}
        if key == EFFECTIVE_BATCH and LR_KEY in space.parameters and space.lr_scaling.rule == "linear" and space.lr_scaling.local_search > 0:
            w = space.lr_scaling.local_search
            params[LR_FACTOR] = Domain(low=1 / (1 + w), high=1 + w, log=True)
        out.append(Stage(i, key, params, space.trials_for(key)))
    return out


def grid(domains: Mapping[str, Domain]) -> list[dict[str, Any]] | None:
    """Every combination of finite domains (None if any domain is continuous)."""
    values = {k: d.values() for k, d in domains.items()}
    if any(v is None for v in values.values()):
        return None
    keys = list(values)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values[k] for k in keys))]


# ----------------------------------------------------------------------------- points -> configs


def point_overrides(space: SearchSpace, base: Config, point: Mapping[str, Any], lr_batch: int | None) -> dict[str, Any]:
    """Config overrides (section.key: value) for a full point of the search.

    * lora.r also sets lora.lora_alpha = lora_alpha_ratio x r
    * effective_batch sets training.gradient_accumulation_steps = B / (micro x workers)
    * with the linear scaling rule, the learning rate found at batch `lr_batch` is moved to
      lr x B / lr_batch, times lr_factor (the local search) when sampled
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
        if space.lr_scaling.rule == "linear" and lr_batch and space.strategy == "staged":
            lr = batch_math.scale_lr(lr, batch, lr_batch) * float(point.get(LR_FACTOR, 1.0))
        out[LR_KEY] = lr
    return out


def trial_config(space: SearchSpace, base: Config, point: Mapping[str, Any], lr_batch: int | None, trial_dir: str, eval_steps: int) -> Config:
    """The full config of one trial, re-validated by the schema (the values a parameter can
    take were checked against the whole config when the search space was loaded)."""
    overrides = point_overrides(space, base, point, lr_batch)
    overrides.update(
        {
            "output.dir": trial_dir,
            "output.report_to": "none",  # the sweep driver logs every trial (one writer)
            "ray.num_workers": space.resources.workers_per_trial,
            "ray.use_gpu": space.resources.use_gpu,
            "ray.resources_per_worker": _worker_resources(space),
            "ray.placement_strategy": space.resources.placement_strategy,
            "ray.shared_storage": space.shared_storage,
            "ray.storage_path": space.storage_path,
            "training.metric_for_best_model": space.metric,
            "training.greater_is_better": space.mode == "max",
            "training.eval_steps": eval_steps,
            "training.save_steps": eval_steps,
            "training.logging_steps": min(base.training.logging_steps, eval_steps),
        }
    )
    return apply_to_config(base, overrides, source=space.source or "search space")


def _worker_resources(space: SearchSpace) -> dict[str, float]:
    res = {"CPU": space.resources.cpus_per_worker}
    if space.resources.use_gpu:
        res["GPU"] = space.resources.gpus_per_worker
    return res


def apply_to_config(base: Config, overrides: Mapping[str, Any], source: str) -> Config:
    """A copy of `base` with dotted overrides applied and every section re-validated."""
    tree = {name: getattr(base, name).model_dump() for name in Config.model_fields if name not in ("deepspeed", "paths")}
    apply_overrides(tree, [(key.split("."), value) for key, value in overrides.items()])
    try:
        return Config(**tree, deepspeed=base.deepspeed, paths=base.paths)
    except ValidationError as exc:
        raise ConfigError(pydantic_problems(exc.errors(), lambda loc: source)) from None


# ----------------------------------------------------------------------------- loading


def _resolve(path: str | None, folder: Path) -> str | None:
    """Base files relative to the working directory (like the configs), else to the file."""
    if path is None:
        return None
    if Path(path).expanduser().exists() or os.path.isabs(path):
        return str(Path(path).expanduser().absolute())
    beside = folder / path
    return str(beside.absolute()) if beside.exists() else str(Path(path).absolute())


def load_search_space(path: str | os.PathLike, *, check_files: bool = True, raw: dict[str, Any] | None = None) -> tuple[SearchSpace, Config]:
    """The search space and its base config (files + starting-point overrides), validated
    together: every problem found is reported at once. `raw`: the file's content, already
    read (with command-line overrides applied)."""
    path = Path(path)
    raw = dict(raw) if raw is not None else load_yaml(path, "search-space file")
    source = str(path)
    problems: list[Problem] = []
    for key in ("pruner", "optuna", "sampler"):
        if key in raw:
            rule = {
                "pruner": "Ray's OptunaSearch ignores Optuna pruners (it forces NopPruner): early stopping is ASHA's; configure asha instead",
                "optuna": "Optuna is configured through strategy, trials_per_stage and seed; an optuna section would be ignored",
                "sampler": "the sampler is Optuna's TPE, seeded by seed; choose strategy staged or joint",
            }[key]
            problems.append(Problem(source, key, rule, raw.pop(key), show_value=False))
    try:
        space = SearchSpace.model_validate({**raw, "source": source})
    except ValidationError as exc:
        problems += pydantic_problems(exc.errors(), lambda loc: source, root=SearchSpace)
        raise ConfigError(problems) from None

    folder = path.parent
    files = space.base.model_copy(
        update={k: _resolve(getattr(space.base, k), folder) for k in ("config", "lora_config", "deepspeed")}
    )
    space = space.model_copy(
        update={
            "base": files,
            "output_dir": str(Path(space.output_dir).expanduser().absolute()),
            "storage_path": space.storage_path if "://" in space.storage_path else str(Path(space.storage_path).expanduser().absolute()),
        }
    )
    # the starting point, then what every trial runs on (workers, devices): the base config's
    # plan and DeepSpeed checks then see a trial's world size, not the base file's
    r = space.resources
    trial_ray = {"ray.num_workers": r.workers_per_trial, "ray.use_gpu": r.use_gpu, "ray.resources_per_worker": _worker_resources(space)}
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**space.overrides, **trial_ray}.items()]
    base: Config | None = None
    try:
        base = load_config(files.config, files.lora_config, files.deepspeed, overrides, check_files=check_files, world_size=r.workers_per_trial)
    except ConfigError as exc:
        problems += [_in_overrides(p, source) for p in exc.problems]
    problems += _check_space(space, base, source)
    if problems:
        raise ConfigError(problems)
    assert base is not None
    return space, base


def _in_overrides(problem: Problem, source: str) -> Problem:
    if problem.source == "command line":
        return Problem(source, f"overrides.{problem.key}", problem.rule, problem.value, problem.show_value)
    return problem


def _param_type(key: str) -> Any:
    if key == EFFECTIVE_BATCH:
        return int
    info = field_at(key)
    return None if info is None else info.annotation


def _check_space(space: SearchSpace, base: Config | None, source: str) -> list[Problem]:
    problems: list[Problem] = []

    def add(key: str, rule: str, value: Any = None, show: bool = True) -> None:
        problems.append(Problem(source, key, rule, value, show))

    valid_keys = config_keys() + [EFFECTIVE_BATCH]
    broken: set[str] = set()  # parameters whose domain is malformed: their values are not checked
    for key in space.overrides:
        if field_at(key) is None:
            guess = closest(key, valid_keys)
            add(f"overrides.{key}", "not a config key" + (f"; did you mean {guess!r}?" if guess else ""), space.overrides[key])

    for key, domain in space.parameters.items():
        where = f"parameters.{key}"
        kind = _param_type(key)
        before = len(problems)
        if kind is None:
            guess = closest(key, valid_keys)
            add(where, "not a parameter of the config schema" + (f"; did you mean {guess!r}?" if guess else ""), key, show=False)
            broken.add(key)
            continue
        has_range = domain.low is not None or domain.high is not None
        if (domain.choices is None) == (not has_range):
            add(where, "give either choices or low/high", domain.model_dump(exclude_defaults=True))
            broken.add(key)
            continue
        if domain.choices is not None:
            if not domain.choices:
                add(where, "choices must not be empty", domain.choices)
            if len(set(map(repr, domain.choices))) != len(domain.choices):
                add(where, "choices repeat a value", domain.choices)
            if domain.log or domain.step is not None:
                add(where, "log and step apply to low/high ranges, not to choices", domain.model_dump(exclude_defaults=True))
        else:
            if domain.low is None or domain.high is None:
                add(where, "a range needs both low and high", domain.model_dump(exclude_defaults=True))
                broken.add(key)
                continue
            if domain.low >= domain.high:
                add(where, "low must be < high", [domain.low, domain.high])
            if domain.log and domain.low <= 0:
                add(where, "a log range needs low > 0", domain.low)
            if domain.log and domain.step is not None:
                add(where, "log and step cannot both be set (Optuna's rule)", domain.model_dump(exclude_defaults=True))
            if kind is int and (domain.low != int(domain.low) or domain.high != int(domain.high) or (domain.step or 1) != int(domain.step or 1)):
                add(where, f"{key} is an integer: low, high and step must be whole numbers", [domain.low, domain.high])
            if kind not in (int, float):
                add(where, f"{key} is not numeric: use choices", domain.model_dump(exclude_defaults=True))
        for value in domain.extremes():
            if value is None:
                continue
            if kind is int and (isinstance(value, bool) or not float(value).is_integer()):
                add(where, f"{key} is an integer; {value!r} is not", value)
            elif kind in (int, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
                add(where, f"{key} is a number; {value!r} is not", value)
        if len(problems) > before:
            broken.add(key)

    if isinstance(space.trials_per_stage, dict):
        for key in space.trials_per_stage:
            if key not in space.parameters:
                add(f"trials_per_stage.{key}", "not one of the parameters", key, show=False)
            elif space.trials_per_stage[key] < 1:
                add(f"trials_per_stage.{key}", "must be >= 1", space.trials_per_stage[key])
    elif space.trials_per_stage < 1:
        add("trials_per_stage", "must be >= 1", space.trials_per_stage)

    if space.metric not in EVAL_METRICS:
        guess = closest(space.metric, list(EVAL_METRICS))
        add("metric", f"not a metric the loop reports; one of {', '.join(EVAL_METRICS)}" + (f" (did you mean {guess!r}?)" if guess else ""), space.metric)
    elif EVAL_METRICS[space.metric] != space.mode:
        add("mode", f"{space.metric} is better when {'higher' if EVAL_METRICS[space.metric] == 'max' else 'lower'}: mode must be {EVAL_METRICS[space.metric]}", space.mode)
    if space.asha.max_t is not None and space.asha.max_t <= space.asha.grace_period:
        add("asha.max_t", f"must be > asha.grace_period ({space.asha.grace_period})", space.asha.max_t)
    if space.resources.use_gpu and space.resources.gpus_per_worker <= 0:
        add("resources.gpus_per_worker", "must be > 0 with use_gpu", space.resources.gpus_per_worker)

    if base is None:
        return problems
    # the values each parameter takes must make a valid config, and batches must divide
    rule = metric_reported(space.metric, base.evaluation)
    if rule:
        add("metric", rule, space.metric)
    micro = base.training.per_device_train_batch_size
    workers = space.resources.workers_per_trial
    for key, domain in space.parameters.items():
        if key in broken:
            continue
        for value in domain.extremes():
            if key == EFFECTIVE_BATCH:
                try:
                    batch_math.accumulation_for(int(value), micro, workers)
                except batch_math.BatchMathError as exc:
                    add(f"parameters.{key}", f"{exc} (per_device_train_batch_size {micro}, workers_per_trial {workers}); choose multiples of {micro * workers}", value)
                continue
            point = {key: int(value) if _param_type(key) is int else value}
            try:
                apply_to_config(base, point_overrides(space, base, point, None), source)
            except ConfigError as exc:
                for p in exc.problems:
                    add(f"parameters.{key}", f"the value {value!r} is invalid: {p.rule}", value)
            except batch_math.BatchMathError as exc:
                add(f"parameters.{key}", str(exc), value)
    scalable = not ({EFFECTIVE_BATCH, LR_KEY} & broken)
    if scalable and EFFECTIVE_BATCH in space.parameters and LR_KEY in space.parameters and space.strategy == "staged" and space.lr_scaling.rule == "linear":
        top_lr = max(v for v in space.parameters[LR_KEY].extremes() if v is not None)
        top_batch = max(int(v) for v in space.parameters[EFFECTIVE_BATCH].extremes() if v is not None)
        ref = starting_batch(base, space)
        peak = top_lr * top_batch / ref * (1 + space.lr_scaling.local_search)
        if peak > 1e-2:
            add(
                "lr_scaling",
                f"the linear scaling rule can reach learning rate {peak:.3g} (> 0.01) from {top_lr:g} at batch {ref} to {top_batch}; "
                "narrow the learning rates or batches, or set lr_scaling.rule: none",
                show=False,
            )
    return problems


def starting_batch(base: Config, space: SearchSpace) -> int:
    """The effective batch of the starting point, where stage 1 searches the learning rate."""
    t = base.training
    return batch_math.effective_batch(t.per_device_train_batch_size, space.resources.workers_per_trial, t.gradient_accumulation_steps)


def eval_steps_for(space: SearchSpace, num_samples: int, effective_batch: int) -> int:
    """Optimizer steps between evaluations: evals_per_epoch evaluations per epoch."""
    per_epoch = max(1, num_samples // effective_batch)
    return max(1, math.floor(per_epoch / space.evals_per_epoch))
