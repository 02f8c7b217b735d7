"""A sweep's plan before anything starts: how many trials run at once on these resources, and the
`--dry-run` text (stages, trial counts, concurrency, and for every effective batch its
accumulation and scaled learning rate). Pure: no Ray, torch or Optuna."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from raytune_qvl.config import batch_math
from raytune_qvl.config.plan import count_records
from raytune_qvl.config.schema import Config
from raytune_qvl.errors import ConfigError, Problem
from raytune_qvl.sweep.points import starting_batch, starting_point
from raytune_qvl.sweep.points import PointResolver
from raytune_qvl.sweep.records import point_key
from raytune_qvl.sweep.space import EFFECTIVE_BATCH, EPOCHS_KEY, LR_KEY, SearchSpace, Stage, grid, stages

__all__ = [
    "concurrency_for",
    "dry_run",
    "local_gpus",
    "sampler_for",
    "early_stopping",
    "memory_check",
    "workers_at_once",
]


def concurrency_for(space: SearchSpace, cpus: float, gpus: float, *, trial_cpu: float = 0.0) -> int:
    """Trials at once: how many trials' workers the cluster's CPUs (and GPUs) hold. On a
    cluster we join, each trial's own process also takes `trial_cpu` (1); on a local cluster
    the logical pool is sized for them instead, so only the workers count against the cores."""
    r = space.resources
    per_trial_cpu = r.workers_per_trial * r.cpus_per_worker + trial_cpu
    n = max(1, math.floor(cpus / per_trial_cpu))
    if r.use_gpu:
        n = min(n, max(0, math.floor(gpus / (r.workers_per_trial * r.gpus_per_worker))))
        if n == 0:
            need = r.workers_per_trial * r.gpus_per_worker
            raise ConfigError(
                [
                    Problem(
                        space.source,
                        "resources",
                        f"a trial needs {need:g} GPUs; the cluster has {gpus:g}",
                        show_value=False,
                    )
                ]
            )
    if r.max_concurrent_trials:
        n = min(n, r.max_concurrent_trials)
    return n


def dry_run(space: SearchSpace, base: Config) -> str:
    lines = [f"raytune_qvl sweep plan: {space.name} ({space.strategy}, {space.metric} {space.mode})"]
    lines.append(f"  base: {space.base.config}  lora: {space.base.lora_config}  deepspeed: {base.paths.deepspeed}")
    lines.append(f"  model: {base.model.name}; data: {count_records(base.data.train_path)} training records")
    start = starting_point(space, base)
    lines.append("  starting point: " + ", ".join(f"{k}={v}" for k, v in start.items()))
    r = space.resources
    if base.ray.address or os.environ.get("RAY_ADDRESS"):
        conc = "from the cluster's resources at start"
    else:
        conc = str(concurrency_for(space, os.cpu_count() or 1, 0 if not r.use_gpu else local_gpus()))
    lines.append(
        f"  per trial: {r.workers_per_trial} worker(s) x {r.cpus_per_worker:g} CPU"
        + (f" x {r.gpus_per_worker:g} GPU" if r.use_gpu else "")
        + f"; concurrent trials: {conc}"
    )
    total = 0
    for stage in stages(space):
        domains = ", ".join(f"{k} in {domain_text(d)}" for k, d in stage.params.items())
        finite = grid(stage.params)
        cap = f" (at most {len(finite)} distinct)" if finite is not None else ""
        lines.append(f"  {stage.label}: {stage.trials} trials{cap}: {domains}")
        lines.append(f"    searched by {_sampler_text(space, base, stage, start)}" + (
            "" if early_stopping(space, stage) else "; no early stopping (whole schedules compared)"
        ))  # fmt: skip
        total += stage.trials if finite is None else min(stage.trials, len(finite))
    memory, warnings = memory_check(space, base, None, workers_at_once(space, base))
    lines += memory + [f"  warning: {w}" for w in warnings]
    if space.confirm.top_k and space.confirm.seeds:
        c = space.confirm
        lines.append(
            f"  confirm: the top {c.top_k} configs {'once more' if c.seeds == 1 else f'{c.seeds} more times'} "
            "each with other seeds "
            f"({c.top_k * c.seeds} runs): the winner by the mean, its test-split score the result"
        )
    lines.append(
        f"  trials in all: up to {total}; ASHA on {space.asha.time_attr}, "
        f"grace {space.asha.grace_period:g}, reduction {space.asha.reduction_factor:g}"
    )
    if EFFECTIVE_BATCH in space.parameters:
        micro, workers = base.training.per_device_train_batch_size, r.workers_per_trial
        ref = starting_batch(base, space)
        lrs = space.parameters.get(LR_KEY)
        lr_values = lrs.extremes() if lrs else [base.training.learning_rate]
        lines.append(
            f"  effective batch -> accumulation (micro {micro} x {workers} workers) "
            f"and scaled learning rate (from batch {ref}):"
        )
        for b in space.parameters[EFFECTIVE_BATCH].extremes():
            accum = batch_math.accumulation_for(int(b), micro, workers)
            scaled = ", ".join(f"{batch_math.scale_lr(lr, int(b), ref, space.lr_scaling.rule):.3g}" for lr in lr_values)
            note = (
                f" x [{1 / (1 + space.lr_scaling.local_search):.2f}, {1 + space.lr_scaling.local_search:.2f}]"
                if space.lr_scaling.local_search
                else ""
            )
            rule = (
                ""
                if space.strategy == "staged" and space.lr_scaling.rule != "none"
                else " (not scaled: joint search or rule none)"
            )
            lines.append(f"    batch {int(b):>5}: accumulation {accum:>3}, lr {scaled}{note}{rule}")
    lines.append("  " + _checkpoints_text(space, base))
    lines.append(f"  output: {space.sweep_dir.absolute()}  storage: {space.storage_path}")
    return "\n".join(lines)


def workers_at_once(space: SearchSpace, base: Config) -> int:
    """Workers this machine runs at once (a joined cluster: one trial's, on its own nodes)."""
    r = space.resources
    if base.ray.address or os.environ.get("RAY_ADDRESS"):
        return r.workers_per_trial
    trials = concurrency_for(space, os.cpu_count() or 1, 0 if not r.use_gpu else max(local_gpus(), 1))
    return trials * r.workers_per_trial


def memory_check(
    space: SearchSpace, base: Config, lengths: tuple[int, int] | None, workers_at_once: int
) -> tuple[list[str], list[str]]:
    """Per stage, the pre-flight memory estimate (config/memory.py) of its most demanding point
    (every combination of its parameters' extremes, the rest at the starting point), and a warning
    for each stage whose estimate is above what a worker has (resources.memory_per_worker_gb, else
    this machine's). `lengths`: the data audit's (text, image) tokens per sample (None: the
    max_length bound). Returns (lines, warnings)."""
    import itertools

    from raytune_qvl.config.memory import estimate_for, worker_memory
    from raytune_qvl.config.sizes import human_bytes
    from raytune_qvl.sweep.points import apply_to_config, point_overrides

    r = space.resources
    start = starting_point(space, base)
    have = worker_memory(r.use_gpu, workers_at_once, r.memory_per_worker_gb)
    how = "from the data's token lengths" if lengths else f"an upper bound at max_length {base.data.max_length}"
    lines = [
        f"  memory per worker (pre-flight estimate, {how}" + (f"; a worker has {human_bytes(have)}):" if have else "):")
    ]
    warnings = []
    for stage in stages(space):
        worst, least = None, None
        extremes = [[(k, v) for v in d.extremes() if v is not None] for k, d in stage.params.items()]
        for combo in itertools.product(*extremes):
            point = {**start, **dict(combo)}
            try:
                cfg = apply_to_config(
                    base, point_overrides(space, base, point, start.get(EFFECTIVE_BATCH)), space.source
                )
            except ConfigError:
                continue
            est = estimate_for(cfg, r.workers_per_trial, base.deepspeed, lengths)
            if est is not None and (worst is None or est.total > worst[0].total):
                worst = (est, dict(combo))
            if est is not None and (least is None or est.total < least):
                least = est.total
        if worst is None:
            lines.append(f"    {stage.label}: unknown (no config.json for {base.model.name} at hand)")
            continue
        est, at = worst
        where = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in at.items())
        if least is not None and abs(est.total - least) < 1e-6 * est.total:
            where = "every point (its parameters do not change it)"
        lines.append(f"    {stage.label}: up to {est.format()} at {where}")
        if have and est.total > have:
            warnings.append(
                f"{stage.label}: up to {human_bytes(est.total)} per worker at {where}, above the {human_bytes(have)} "
                "a worker has: such trials will run out of memory and retry at smaller micro batches (or lower "
                "data.max_length, turn on environment.gradient_checkpointing, or use ZeRO-3)"
            )
    return lines, warnings


def _sampler_text(space: SearchSpace, base: Config, stage: Stage, start: dict[str, Any]) -> str:
    """What will search the stage, assuming a later stage's incumbent is still the starting point."""
    held = {k: v for k, v in start.items() if k not in stage.params}
    resolver = PointResolver(
        space.model_dump(mode="json"), base.model_dump(mode="json"), held, start.get(EFFECTIVE_BATCH)
    )
    known = {}
    if stage.index > 1 and all(k in start for k in stage.params):
        known = {point_key(resolver.overrides({k: start[k] for k in stage.params})): None}
    name, startup = sampler_for(space, stage, resolver, known)
    return {"grid": "every untried choice (grid)", "random": "random search"}.get(
        name, f"TPE ({startup} at random first, then modelled)"
    )


def domain_text(d: Any) -> str:
    if d.choices is not None:
        return "{" + ", ".join(f"{c:g}" if isinstance(c, float) else str(c) for c in d.choices) + "}"
    return f"[{d.low:g}, {d.high:g}]" + (" log" if d.log else "") + (f" step {d.step:g}" if d.step else "")


def local_gpus() -> int:
    """CUDA devices on this machine (torch is imported only when GPUs are asked for)."""
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def sampler_for(
    space: SearchSpace, stage: Stage, resolver: PointResolver, known: Mapping[tuple, float | None]
) -> tuple[str, int]:
    """What really searches a stage: `random` for the random baseline; `grid` (every untried
    choice) when the stage's domain is finite and its untried points fit the trial budget; else TPE
    with a start-up of a third of the trials (at 2-5 trials, 1 random point before it models).
    Returns (name, TPE start-up trials)."""
    if space.strategy == "random":
        return "random", 0
    points = grid(stage.params)
    if points is not None:
        untried = [p for p in points if point_key(resolver.overrides(p)) not in known]
        if len(untried) <= stage.trials:
            return "grid", 0
    return "tpe", max(1, stage.trials // 3)


def early_stopping(space: SearchSpace, stage: Stage) -> bool:
    """Whether ASHA stops a stage's poor trials early. Not where the epochs are searched (the epochs
    stage of a staged sweep, a joint or random search over them): at any rung a longer cosine
    schedule is still at a high learning rate while a shorter one has decayed, so ASHA would stop
    the long schedules for being mid-way, not for being worse."""
    return space.asha.enabled and EPOCHS_KEY not in stage.params


def _checkpoints_text(space: SearchSpace, base: Config) -> str:
    """What each trial writes: engine checkpoints at the space's cadence (with their size, from the
    model's config.json when it is at hand) and the adapters kept after the sweep."""
    from raytune_qvl.config.sizes import estimate_sizes, human_bytes

    every = space.checkpoint_every
    cadence = (
        f"engine checkpoints every {every} evaluation{'s' if every > 1 else ''}"
        if every
        else "no engine checkpoint (checkpoint_every 0: a restarted trial starts over)"
    )
    cadence += ", the last step's the adapter only (a finished trial is never resumed)"
    sizes = estimate_sizes(base)  # the base config holds the starting point
    size = ""
    if sizes is not None:
        size = f", {human_bytes(sizes.checkpoint_bytes)} each at the starting point"
        size += f" (the adapter alone {human_bytes(sizes.adapter_bytes)})"
    keep = f"keep {base.training.save_total_limit} per trial, deleted when its stage ends"
    return f"per trial: {cadence}{size}; {keep}; adapters kept for the best {space.keep_best_adapters}"
