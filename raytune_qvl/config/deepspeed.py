"""Fill a DeepSpeed JSON's "auto" values from the training config, the one source of truth.

`"auto"` is a Hugging Face Trainer convention: raw `deepspeed.initialize` rejects it at the top
level and silently replaces nested ones with defaults. So every value the training config
decides is written here; an explicit value that disagrees is an error, and a scheduler whose
kind disagrees with `training.lr_scheduler_type` (the seed's WarmupDecayLR under `cosine`) is
replaced by the matching DeepSpeed scheduler, with a note.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from raytune_qvl.config.batch_math import effective_batch, warmup_steps
from raytune_qvl.config.schema import EnvironmentConfig, TrainingConfig
from raytune_qvl.errors import ConfigError, Problem

__all__ = [
    "FilledDeepSpeed",
    "check_deepspeed",
    "fill_deepspeed",
    "zero_stage",
    "find_autos",
    "zero3_elements",
    "warmup_num_steps",
    "first_step_ratio",
    "SCHEDULERS",
]

AUTO = "auto"

# training.lr_scheduler_type -> the DeepSpeed scheduler that implements it (None: no scheduler)
SCHEDULERS: dict[str, str | None] = {
    "cosine": "WarmupCosineLR",
    "linear": "WarmupDecayLR",
    "constant_with_warmup": "WarmupLR",
    "constant": None,
}
_ADAM_TYPES = {"adam", "adamw"}
# scheduler params the training config decides (the steps and peak: an explicit contradiction is an
# error; the warm-up's start: overridden with a note); the rest (warmup type, cos_min_ratio) are the
# JSON's to choose when its scheduler kind matches
_FIRST_STEP_PARAMS = ("warmup_min_ratio", "warmup_min_lr")  # set so the first step's rate is > 0
_DECIDED_SCHEDULER_PARAMS = {"total_num_steps", "warmup_num_steps", "warmup_max_lr", *_FIRST_STEP_PARAMS}

# nested "auto"s that depend on the model width (the Hugging Face integration's rules) and the
# DeepSpeed defaults used when the width is unknown
_WIDTH_RULES: dict[tuple[str, ...], tuple[Any, Any]] = {
    ("zero_optimization", "reduce_bucket_size"): (lambda h: h * h, 500_000_000),
    ("zero_optimization", "stage3_prefetch_bucket_size"): (lambda h: int(0.9 * h * h), 50_000_000),
    ("zero_optimization", "stage3_param_persistence_threshold"): (lambda h: 10 * h, 100_000),
    # ours: about two decoder layers, so the last layer stays gathered from its forward to its
    # backward and every other weight is partitioned again after use. DeepSpeed's 1e9 elements
    # keep a model of up to ~0.5B parameters gathered on every rank from forward to backward,
    # which is ZeRO-2's weight memory (with 7B it keeps about four layers)
    ("zero_optimization", "stage3_max_reuse_distance"): (lambda h: 40 * h * h, 1_000_000_000),
    # ours: what may be gathered at once, about two decoder layers. DeepSpeed's prefetcher starts a
    # bucket's worth of gathers at every module it enters, and a peft LoRA layer is five modules
    # (the wrapper, the base layer, dropout, A, B) around one weight: it runs ahead of the compute
    # until this cap stops it. With DeepSpeed's 1e9 elements a 394M model was gathered whole in
    # every forward (bench section 5); with 7B it holds 1e9 elements (2 GB in bf16)
    ("zero_optimization", "stage3_max_live_parameters"): (lambda h: 40 * h * h, 1_000_000_000),
}
_OTHER_AUTOS: dict[tuple[str, ...], Any] = {
    ("zero_optimization", "stage3_gather_16bit_weights_on_model_save"): True,
    ("zero_optimization", "allgather_bucket_size"): 500_000_000,
    ("zero_optimization", "sub_group_size"): 1_000_000_000,
    ("steps_per_print",): 100,
}
_ZERO3_DEFAULTS = {"stage3_max_reuse_distance": 1e9, "stage3_max_live_parameters": 1e9}  # DeepSpeed's


def zero3_elements(zero: Mapping[str, Any], key: str, hidden_size: int | None) -> float:
    """A ZeRO-3 element count (stage3_max_reuse_distance, stage3_max_live_parameters) as DeepSpeed
    runs it: the value written in the `zero` block, "auto" as it is filled, DeepSpeed's default
    when absent. reuse distance: a weight used again within this many elements of fetched weights
    stays gathered; live parameters: the prefetcher stops while this many are gathered."""
    value = zero.get(key)
    if value is None:
        return _ZERO3_DEFAULTS[key]
    if value == AUTO:
        rule, default = _WIDTH_RULES[("zero_optimization", key)]
        return float(rule(hidden_size) if hidden_size else default)
    return float(value)


@dataclass
class FilledDeepSpeed:
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # what was replaced and why, for the plan


def find_autos(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path whose value is "auto", top-level and nested."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from find_autos(value, path + (str(key),))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from find_autos(value, path + (str(i),))
    elif tree == AUTO:
        yield path


def zero_stage(ds: Mapping[str, Any]) -> int:
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    return int(stage) if isinstance(stage, int | float) and not isinstance(stage, bool) else 0


def _dictated(training: TrainingConfig, env: EnvironmentConfig, world_size: int) -> dict[tuple[str, ...], Any]:
    """The values the training config decides, by JSON path."""
    micro = training.per_device_train_batch_size
    accum = training.gradient_accumulation_steps
    return {
        ("train_micro_batch_size_per_gpu",): micro,
        ("gradient_accumulation_steps",): accum,
        ("train_batch_size",): effective_batch(micro, world_size, accum),
        ("gradient_clipping",): training.max_grad_norm,
        ("bf16", "enabled"): env.bf16,
        ("fp16", "enabled"): env.fp16,
        ("optimizer", "params", "lr"): training.learning_rate,
        ("optimizer", "params", "weight_decay"): training.weight_decay,
    }


def warmup_num_steps(total: int, ratio: float) -> int:
    """The warm-up DeepSpeed runs: ceil(total x ratio), and at least 2 (its warm-up schedulers take
    no fewer; with warmup_ratio 0 the two run at the peak rate, see first_step_ratio).

    >>> warmup_num_steps(45, 0.05), warmup_num_steps(100, 0.005), warmup_num_steps(100, 0.0)
    (3, 2, 2)
    """
    return max(2, warmup_steps(total, ratio))


def first_step_ratio(warmup: int, ratio: float) -> float:
    """The first optimizer step's share of the peak learning rate: 1 / (warmup + 1), so the warm-up
    runs 1/(W+1), 2/(W+1), ... W/(W+1), then the peak (DeepSpeed's schedulers would start at 0 and
    waste the first step); 1 without warm-up (warmup_ratio 0).

    >>> first_step_ratio(3, 0.05), first_step_ratio(2, 0.0)
    (0.25, 1.0)
    """
    return 1.0 if ratio == 0 else 1.0 / (warmup + 1)


def _scheduler_params(kind: str, training: TrainingConfig, total: int | None, warmup: int) -> dict[str, Any]:
    lr = training.learning_rate
    first = first_step_ratio(warmup, training.warmup_ratio)
    if kind == "WarmupCosineLR":
        return {
            # started at the first step (engine.build_engine), DeepSpeed's cosine reaches its floor at
            # step `total`: one more keeps the last step training
            "total_num_steps": None if total is None else total + 1,
            "warmup_num_steps": warmup,
            "warmup_min_ratio": first,
            "cos_min_ratio": 0.0,
            "warmup_type": "linear",
        }
    if kind == "WarmupDecayLR":
        return {
            "total_num_steps": total,
            "warmup_num_steps": warmup,
            "warmup_min_lr": lr * first,
            "warmup_max_lr": lr,
            "warmup_type": "linear",
        }
    return {"warmup_num_steps": warmup, "warmup_min_lr": lr * first, "warmup_max_lr": lr, "warmup_type": "linear"}


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


_SOURCE_KEY = {
    ("train_micro_batch_size_per_gpu",): "training.per_device_train_batch_size",
    ("gradient_accumulation_steps",): "training.gradient_accumulation_steps",
    ("train_batch_size",): "micro batch x workers x accumulation",
    ("gradient_clipping",): "training.max_grad_norm",
    ("bf16", "enabled"): "environment.bf16",
    ("fp16", "enabled"): "environment.fp16",
    ("optimizer", "params", "lr"): "training.learning_rate",
    ("optimizer", "params", "weight_decay"): "training.weight_decay",
    ("scheduler", "params", "warmup_max_lr"): "training.learning_rate",
    ("scheduler", "params", "total_num_steps"): "the planned optimizer steps",
    ("scheduler", "params", "warmup_num_steps"): "training.warmup_ratio x the planned steps",
}


def check_deepspeed(
    ds: Mapping[str, Any],
    training: TrainingConfig,
    env: EnvironmentConfig,
    world_size: int,
    total: int | None = None,
    warmup: int | None = None,
) -> list[tuple[str, str, Any]]:
    """Contradictions between the JSON and the training config, as (key, rule, value)."""
    problems: list[tuple[str, str, Any]] = []
    for section in ("bf16", "fp16", "optimizer", "scheduler", "zero_optimization"):
        if section in ds and not isinstance(ds[section], Mapping):
            problems.append(
                (
                    section,
                    'must be a JSON object (e.g. {"enabled": true})'
                    if section in ("bf16", "fp16")
                    else "must be a JSON object",
                    ds[section],
                )
            )
    for section in ("optimizer", "scheduler"):
        if (
            isinstance(ds.get(section), Mapping)
            and "params" in ds[section]
            and not isinstance(ds[section]["params"], Mapping)
        ):
            problems.append((f"{section}.params", "must be a JSON object", ds[section]["params"]))
    if problems:  # the checks below read inside these sections
        return problems
    dictated = _dictated(training, env, world_size)
    for path, want in dictated.items():
        have = _get(ds, path)
        if have is None or have == AUTO:
            continue
        if not _same(have, want):
            problems.append(
                (".".join(path), f'contradicts {_SOURCE_KEY[path]} = {want!r}; set it to "auto" or {want!r}', have)
            )

    optimizer = ds.get("optimizer")
    if optimizer is not None:
        kind = str((optimizer or {}).get("type", "")).lower()
        if kind not in _ADAM_TYPES:
            problems.append(
                (
                    "optimizer.type",
                    "must be AdamW (or Adam): the LoRA recipe and its settings assume it",
                    optimizer.get("type"),
                )
            )

    scheduler = ds.get("scheduler")
    if scheduler is not None:
        # whatever the scheduler's kind, these values are the training config's to decide
        expected = {"warmup_max_lr": training.learning_rate, "total_num_steps": total, "warmup_num_steps": warmup}
        for name, want in expected.items():
            have = (scheduler.get("params") or {}).get(name)
            if have is None or have == AUTO or want is None:
                continue
            if not _same(have, want):
                source = _SOURCE_KEY[("scheduler", "params", name)]
                problems.append(
                    (f"scheduler.params.{name}", f'contradicts {source} = {want!r}; set it to "auto"', have)
                )

    for path in find_autos(ds):
        if (
            path in dictated
            or path[:1] in (("scheduler",), ("optimizer",))
            or path in _WIDTH_RULES
            or path in _OTHER_AUTOS
        ):
            continue
        problems.append((".".join(path), 'no rule fills this "auto": give a value', AUTO))

    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(("zero_optimization.stage", "must be 0, 1, 2 or 3", stage))
    return problems


def fill_deepspeed(
    ds: Mapping[str, Any],
    training: TrainingConfig,
    env: EnvironmentConfig,
    *,
    world_size: int,
    total_steps: int,
    hidden_size: int | None = None,
    source: str = "DeepSpeed config",
) -> FilledDeepSpeed:
    """A copy of `ds` with every "auto" filled and the scheduler matching the training config.

    Raises ConfigError when an explicit value contradicts the training config.
    """
    warmup = warmup_num_steps(total_steps, training.warmup_ratio)
    problems = check_deepspeed(ds, training, env, world_size, total_steps, warmup)
    if problems:
        raise ConfigError([Problem(source, key, rule, value) for key, rule, value in problems])

    out = copy.deepcopy(dict(ds))
    notes: list[str] = []
    for path, value in _dictated(training, env, world_size).items():
        if path[0] in ("bf16", "fp16") and path[0] not in out and not value:
            continue  # leave an absent precision section absent when it is off
        if path[0] == "optimizer" and "optimizer" not in out:
            continue  # added below
        _set(out, path, value)

    if "optimizer" not in out:
        out["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": training.learning_rate, "weight_decay": training.weight_decay},
        }
        notes.append("optimizer: none in the JSON; using AdamW")
    params = out["optimizer"].setdefault("params", {})
    params.setdefault("betas", [0.9, 0.999])
    params.setdefault("eps", 1e-8)
    for key in [k for k, v in params.items() if v == AUTO]:
        params[key] = {"betas": [0.9, 0.999], "eps": 1e-8}.get(key)

    want_kind = SCHEDULERS[training.lr_scheduler_type]
    old = out.get("scheduler")
    if want_kind is None:
        if old is not None:
            notes.append(f"scheduler: {old.get('type')} removed, training.lr_scheduler_type is constant")
        out.pop("scheduler", None)
    else:
        params = _scheduler_params(want_kind, training, total_steps, warmup)
        if old is not None and old.get("type") != want_kind:
            notes.append(
                f"scheduler: {old.get('type')} replaced by {want_kind} "
                f"to match training.lr_scheduler_type={training.lr_scheduler_type}"
            )
        elif old is not None:  # the same kind: what the user wrote (and is not ours to decide) stays
            params.update(
                {
                    k: v
                    for k, v in (old.get("params") or {}).items()
                    if v != AUTO and k in params and k not in _DECIDED_SCHEDULER_PARAMS
                }
            )
        for key in _FIRST_STEP_PARAMS:  # the first step trains: a warm-up from 0 would waste it
            written = (old.get("params") or {}).get(key) if old is not None and old.get("type") == want_kind else None
            if key in params and isinstance(written, int | float) and not _same(written, params[key]):
                notes.append(f"scheduler: {key} {written:g} raised to {params[key]:.3g}: the first step trains")
        out["scheduler"] = {"type": want_kind, "params": params}

    for path, (rule, default) in _WIDTH_RULES.items():
        if _get(out, path) == AUTO:
            _set(out, path, rule(hidden_size) if hidden_size else default)
    for path, value in _OTHER_AUTOS.items():
        if _get(out, path) == AUTO:
            _set(out, path, value)

    # DeepSpeed's throughput timer (on unless the JSON says otherwise) synchronizes the device at
    # every micro-step's forward and step: two stalls of the CUDA stream per micro-batch, for a
    # speed the loop already logs without one. Off unless the JSON configures it
    out.setdefault("timers", {}).setdefault("throughput", {"enabled": False})

    left = [".".join(p) for p in find_autos(out)]
    if left:  # check_deepspeed rejects these; kept as a guard against a rule table out of step
        raise ConfigError([Problem(source, key, 'no rule fills this "auto": give a value', AUTO) for key in left])
    return FilledDeepSpeed(out, notes)
