"""Reading a search-space file: the schema, then the base config (files + starting point) loaded
for a trial's world size, then every parameter's values checked against the whole config; every
problem found is reported at once. `key=value` command-line overrides of the file are applied to
its YAML before validation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from raytune_qvl.config import batch_math
from raytune_qvl.config.files import load_yaml, parse_yaml_text
from raytune_qvl.config.load import load_config
from raytune_qvl.config.overrides import apply_overrides
from raytune_qvl.config.problems import closest, pydantic_problems
from raytune_qvl.config.schema import EVAL_METRICS, Config, config_keys, field_at, metric_reported
from raytune_qvl.errors import ConfigError, Problem
from raytune_qvl.sweep.points import apply_to_config, point_overrides, starting_batch, worker_resources
from raytune_qvl.sweep.space import EFFECTIVE_BATCH, LR_KEY, Domain, SearchSpace, param_type

__all__ = ["load_search_space", "load_with_overrides", "parse_space_override"]


def _resolve(path: str | None, folder: Path) -> str | None:
    """Base files relative to the working directory (like the configs), else to the file."""
    if path is None:
        return None
    if Path(path).expanduser().exists() or os.path.isabs(path):
        return str(Path(path).expanduser().absolute())
    beside = folder / path
    return str(beside.absolute()) if beside.exists() else str(Path(path).absolute())


def load_search_space(
    path: str | os.PathLike, *, check_files: bool = True, raw: dict[str, Any] | None = None
) -> tuple[SearchSpace, Config]:
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
                "pruner": "Ray's OptunaSearch ignores Optuna pruners (it forces NopPruner): "
                "early stopping is ASHA's; configure asha instead",
                "optuna": "Optuna is configured through strategy, trials_per_stage and seed; "
                "an optuna section would be ignored",
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
            "storage_path": space.storage_path
            if "://" in space.storage_path
            else str(Path(space.storage_path).expanduser().absolute()),
        }
    )
    # the starting point, then what every trial runs on (workers, devices): the base config's
    # plan and DeepSpeed checks then see a trial's world size, not the base file's
    r = space.resources
    trial_ray = {
        "ray.num_workers": r.workers_per_trial,
        "ray.use_gpu": r.use_gpu,
        "ray.resources_per_worker": worker_resources(space),
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**space.overrides, **trial_ray}.items()]
    base: Config | None = None
    try:
        base = load_config(
            files.config,
            files.lora_config,
            files.deepspeed,
            overrides,
            check_files=check_files,
            world_size=r.workers_per_trial,
        )
    except ConfigError as exc:
        problems += [_in_overrides(p, source) for p in exc.problems]
    if base is not None and space.lr_scaling.rule == "auto":  # the base optimizer's rule
        optimizer = str(((base.deepspeed or {}).get("optimizer") or {}).get("type", "AdamW"))
        rule = batch_math.scaling_rule_for(optimizer)
        space = space.model_copy(update={"lr_scaling": space.lr_scaling.model_copy(update={"rule": rule})})
    problems += _check_space(space, base, source)
    if problems:
        raise ConfigError(problems)
    assert base is not None
    return space, base


def _in_overrides(problem: Problem, source: str) -> Problem:
    if problem.source == "command line":
        return Problem(source, f"overrides.{problem.key}", problem.rule, problem.value, problem.show_value)
    return problem


def _check_space(space: SearchSpace, base: Config | None, source: str) -> list[Problem]:
    problems: list[Problem] = []

    def add(key: str, rule: str, value: Any = None, show: bool = True) -> None:
        problems.append(Problem(source, key, rule, value, show))

    valid_keys = config_keys() + [EFFECTIVE_BATCH]
    broken: set[str] = set()  # parameters whose domain is malformed: their values are not checked
    for key in space.overrides:
        if field_at(key) is None:
            guess = closest(key, valid_keys)
            add(
                f"overrides.{key}",
                "not a config key" + (f"; did you mean {guess!r}?" if guess else ""),
                space.overrides[key],
            )

    for key, domain in space.parameters.items():
        where = f"parameters.{key}"
        kind = param_type(key)
        before = len(problems)
        if kind is None:
            guess = closest(key, valid_keys)
            add(
                where,
                "not a parameter of the config schema" + (f"; did you mean {guess!r}?" if guess else ""),
                key,
                show=False,
            )
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
                add(
                    where,
                    "log and step apply to low/high ranges, not to choices",
                    domain.model_dump(exclude_defaults=True),
                )
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
            if kind is int and (
                domain.low != int(domain.low)
                or domain.high != int(domain.high)
                or (domain.step or 1) != int(domain.step or 1)
            ):
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
        add(
            "metric",
            f"not a metric the loop reports; one of {', '.join(EVAL_METRICS)}"
            + (f" (did you mean {guess!r}?)" if guess else ""),
            space.metric,
        )
    elif EVAL_METRICS[space.metric] != space.mode:
        add(
            "mode",
            f"{space.metric} is better when {'higher' if EVAL_METRICS[space.metric] == 'max' else 'lower'}: "
            f"mode must be {EVAL_METRICS[space.metric]}",
            space.mode,
        )
    if space.asha.max_t is not None and space.asha.max_t <= space.asha.grace_period:
        add("asha.max_t", f"must be > asha.grace_period ({space.asha.grace_period})", space.asha.max_t)
    res = space.resources
    if res.use_gpu and res.gpus_per_worker <= 0:
        add("resources.gpus_per_worker", "must be > 0 with use_gpu", res.gpus_per_worker)
    elif res.use_gpu and res.workers_per_trial > 1 and res.gpus_per_worker != int(res.gpus_per_worker):
        add(
            "resources.gpus_per_worker",
            f"must be a whole number with {res.workers_per_trial} workers per trial (a fraction would put two NCCL "
            "ranks of one trial on one GPU); use 1, or workers_per_trial: 1 to share GPUs between trials",
            res.gpus_per_worker,
        )
    if space.cost.measure == "gpu_seconds" and not res.use_gpu:
        add("cost.measure", "gpu_seconds needs resources.use_gpu: true; use auto or worker_seconds", "gpu_seconds")

    if base is None:
        return problems
    # the values each parameter takes must make a valid config, and batches must divide
    rule = metric_reported(space.metric, base.evaluation)
    if rule:
        add("metric", rule, space.metric)
    if base.training.finetuning_type == "full":
        for key in space.parameters:
            if key.startswith("lora."):
                rule = "training.finetuning_type is full: no LoRA to search; remove it"
                add(f"parameters.{key}", rule, key, show=False)
                broken.add(key)
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
                    add(
                        f"parameters.{key}",
                        f"{exc} (per_device_train_batch_size {micro}, workers_per_trial {workers}); "
                        f"choose multiples of {micro * workers}",
                        value,
                    )
                continue
            point = {key: int(value) if param_type(key) is int else value}
            try:
                apply_to_config(base, point_overrides(space, base, point, None), source)
            except ConfigError as exc:
                for p in exc.problems:
                    add(f"parameters.{key}", f"the value {value!r} is invalid: {p.rule}", value)
            except batch_math.BatchMathError as exc:
                add(f"parameters.{key}", str(exc), value)
    scalable = not ({EFFECTIVE_BATCH, LR_KEY} & broken)
    if (
        scalable
        and EFFECTIVE_BATCH in space.parameters
        and LR_KEY in space.parameters
        and space.strategy == "staged"
        and space.lr_scaling.rule != "none"
    ):
        problems += _check_lr_scaling(space, base, source)
    return problems


def _check_lr_scaling(space: SearchSpace, base: Config, source: str) -> list[Problem]:
    """The scaled learning rate stays in range, and the local search reaches the other rule's rate
    at every batch (the square-root and linear rules differ by a factor sqrt(B / B_start))."""
    problems = []
    rule, width = space.lr_scaling.rule, space.lr_scaling.local_search
    top_lr = max(v for v in space.parameters[LR_KEY].extremes() if v is not None)
    batches = [int(v) for v in space.parameters[EFFECTIVE_BATCH].extremes() if v is not None]
    ref = starting_batch(base, space)
    peak = batch_math.scale_lr(top_lr, max(batches), ref, rule) * (1 + width)
    if peak > 1e-2:
        rule_text = (
            f"the {rule} scaling rule can reach learning rate {peak:.3g} (> 0.01) from {top_lr:g} at batch {ref} "
            f"to {max(batches)}; narrow the learning rates or batches, or set lr_scaling.rule: none"
        )
        problems.append(Problem(source, "lr_scaling", rule_text, show_value=False))
    other = "linear" if rule == "sqrt" else "sqrt"
    gap = max(max(b / ref, ref / b) ** 0.5 for b in batches)  # how far apart the two rules' rates get
    if gap > 1 + width + 1e-9:
        rule_text = (
            f"local_search {width:g} cannot reach the {other} rule's learning rate (x{gap:.2f} of the {rule} "
            f"rule's at the batches searched): set it to at least {gap - 1:.2f}"
        )
        problems.append(Problem(source, "lr_scaling.local_search", rule_text, width))
    return problems


def load_with_overrides(path: str, overrides: Sequence[str], *, check_files: bool = True) -> tuple[SearchSpace, Config]:
    """The search-space file with `key=value` overrides applied to its YAML before validation."""
    if not overrides:
        return load_search_space(path, check_files=check_files)
    raw = load_yaml(path, "search-space file")
    apply_overrides(raw, [parse_space_override(o) for o in overrides])
    return load_search_space(path, check_files=check_files, raw=raw)


# Mappings of the search-space file keyed by dotted config keys ("training.learning_rate").
_DOTTED_MAPPINGS = ("overrides", "parameters", "trials_per_stage")
_DOMAIN_FIELDS = frozenset(Domain.model_fields)


def parse_space_override(text: str) -> tuple[list[str], Any]:
    """`resources.max_concurrent_trials=2`, a top-level `strategy=joint`, or an entry of a mapping
    keyed by config keys: `overrides.data.train_path=/shared/train.jsonl`,
    `parameters.training.learning_rate.high=1e-3`, `trials_per_stage.lora.r=4`."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not part for part in parts):
        raise ConfigError(
            [
                Problem(
                    "command line",
                    text,
                    "an override is key=value, e.g. resources.max_concurrent_trials=2",
                    show_value=False,
                )
            ]
        )
    parsed = parse_yaml_text(value, f"command line {text!r}") if value.strip() else None
    if parts[0] in _DOTTED_MAPPINGS and len(parts) > 1:
        if parts[0] == "parameters" and len(parts) > 2 and parts[-1] in _DOMAIN_FIELDS:
            return ["parameters", ".".join(parts[1:-1]), parts[-1]], parsed
        return [parts[0], ".".join(parts[1:])], parsed
    return parts, parsed
