"""The sweep: the documented priority order (learning rate, LoRA rank, effective batch, epochs)
searched stage by stage with Optuna TPE and ASHA, every trial a Ray Train run, one MLflow
parent run with a child per trial, the best configuration written out, resumable.

Run as:
    python -m raytune_qvl.sweep search_spaces/ocr_doc.yaml [key=value ...] [--dry-run] [--resume]

`key=value` overrides the search-space file (e.g. resources.max_concurrent_trials=2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from raytune_qvl import batch_math, runtime
from raytune_qvl.config import Config, apply_overrides
from raytune_qvl.errors import ConfigError, Problem, UserError, run_cli
from raytune_qvl.search_space import (
    EFFECTIVE_BATCH,
    EPOCHS_KEY,
    LR_FACTOR,
    LR_KEY,
    Domain,
    RANK_KEY,
    SearchSpace,
    Stage,
    grid,
    load_search_space,
    stages,
    starting_batch,
)

__all__ = ["main", "run_sweep", "dry_run", "SweepResult", "concurrency_for", "STATE_FILE"]

log = logging.getLogger("raytune_qvl")
STATE_FILE = "sweep_state.json"


class SweepInterrupted(UserError):
    exit_code = 130


# ----------------------------------------------------------------------------- state


@dataclass
class SweepState:
    """What a resumed sweep needs: the parent run, finished stages, points already trained."""

    name: str
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {status, best, value}
    trials: list[dict[str, Any]] = field(default_factory=list)  # every trial record so far
    finished: bool = False

    @classmethod
    def load(cls, path: Path) -> "SweepState":
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, default=str))
        tmp.replace(path)


@dataclass
class SweepResult:
    sweep_dir: Path
    best: dict[str, Any] | None
    trials: list[dict[str, Any]]
    parent_run_id: str | None
    tracking_uri: str | None


# ----------------------------------------------------------------------------- planning


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
            raise ConfigError([Problem(space.source, "resources", f"a trial needs {need:g} GPUs; the cluster has {gpus:g}", show_value=False)])
    if r.max_concurrent_trials:
        n = min(n, r.max_concurrent_trials)
    return n


def _starting_point(space: SearchSpace, base: Config) -> dict[str, Any]:
    """Every searched parameter at the task's starting point (base + overrides)."""
    point: dict[str, Any] = {}
    for key in space.parameters:
        if key == EFFECTIVE_BATCH:
            point[key] = starting_batch(base, space)
        else:
            node: Any = base
            for part in key.split("."):
                node = getattr(node, part)
            point[key] = node
    return point


def dry_run(space: SearchSpace, base: Config) -> str:
    from raytune_qvl.plan import count_records

    lines = [f"raytune_qvl sweep plan: {space.name} ({space.strategy}, {space.metric} {space.mode})"]
    lines.append(f"  base: {space.base.config}  lora: {space.base.lora_config}  deepspeed: {base.paths.deepspeed}")
    lines.append(f"  model: {base.model.name}; data: {count_records(base.data.train_path)} training records")
    start = _starting_point(space, base)
    lines.append("  starting point: " + ", ".join(f"{k}={v}" for k, v in start.items()))
    r = space.resources
    if base.ray.address or os.environ.get("RAY_ADDRESS"):
        conc = "from the cluster's resources at start"
    else:
        conc = str(concurrency_for(space, os.cpu_count() or 1, 0 if not r.use_gpu else _local_gpus()))
    lines.append(
        f"  per trial: {r.workers_per_trial} worker(s) x {r.cpus_per_worker:g} CPU"
        + (f" x {r.gpus_per_worker:g} GPU" if r.use_gpu else "")
        + f"; concurrent trials: {conc}"
    )
    total = 0
    for stage in stages(space):
        domains = ", ".join(f"{k} in {_domain_text(d)}" for k, d in stage.params.items())
        finite = grid(stage.params)
        cap = f" (at most {len(finite)} distinct)" if finite is not None else ""
        lines.append(f"  {stage.label}: {stage.trials} trials{cap}: {domains}")
        total += stage.trials if finite is None else min(stage.trials, len(finite))
    lines.append(f"  trials in all: up to {total}; ASHA on {space.asha.time_attr}, grace {space.asha.grace_period:g}, reduction {space.asha.reduction_factor:g}")
    if EFFECTIVE_BATCH in space.parameters:
        micro, workers = base.training.per_device_train_batch_size, r.workers_per_trial
        ref = starting_batch(base, space)
        lrs = space.parameters.get(LR_KEY)
        lr_values = lrs.extremes() if lrs else [base.training.learning_rate]
        lines.append(f"  effective batch -> accumulation (micro {micro} x {workers} workers) and scaled learning rate (from batch {ref}):")
        for b in space.parameters[EFFECTIVE_BATCH].extremes():
            accum = batch_math.accumulation_for(int(b), micro, workers)
            scaled = ", ".join(f"{batch_math.scale_lr(lr, int(b), ref):.3g}" for lr in lr_values)
            note = f" x [{1 / (1 + space.lr_scaling.local_search):.2f}, {1 + space.lr_scaling.local_search:.2f}]" if space.lr_scaling.local_search else ""
            rule = "" if space.strategy == "staged" and space.lr_scaling.rule == "linear" else " (not scaled: joint search or rule none)"
            lines.append(f"    batch {int(b):>5}: accumulation {accum:>3}, lr {scaled}{note}{rule}")
    lines.append(f"  output: {space.sweep_dir.absolute()}  storage: {space.storage_path}")
    return "\n".join(lines)


def _domain_text(d: Any) -> str:
    if d.choices is not None:
        return "{" + ", ".join(f"{c:g}" if isinstance(c, float) else str(c) for c in d.choices) + "}"
    return f"[{d.low:g}, {d.high:g}]" + (" log" if d.log else "") + (f" step {d.step:g}" if d.step else "")


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


# ----------------------------------------------------------------------------- running


def _state_path(space: SearchSpace) -> Path:
    return space.sweep_dir / STATE_FILE


def _prepare_dir(space: SearchSpace, *, resume: bool, overwrite: bool) -> SweepState:
    path = _state_path(space)
    if overwrite:
        shutil.rmtree(space.sweep_dir, ignore_errors=True)
        if "://" not in space.storage_path:
            shutil.rmtree(space.tune_storage, ignore_errors=True)
    if path.exists() and not overwrite:
        state = SweepState.load(path)
        if not resume:
            done = "finished" if state.finished else "interrupted"
            raise ConfigError(
                [Problem(str(space.sweep_dir), "name", f"a sweep named {space.name!r} already exists here ({done}); pass --resume to continue it or --overwrite to start over", show_value=False)]
            )
        return state
    if resume:
        raise ConfigError([Problem(str(space.sweep_dir), "--resume", "no sweep to resume here; run without --resume to start it", show_value=False)])
    stale = Path(space.tune_storage)
    if "://" not in space.storage_path and stale.exists() and any(stale.iterdir()):
        raise ConfigError(
            [Problem(space.source, "storage_path", f"{stale} already holds a sweep named {space.name!r} (another output_dir?): rename this one or pass --overwrite", show_value=False)]
        )
    from raytune_qvl.launch import writable_dir_problem

    problem = writable_dir_problem(space.sweep_dir)
    if problem:
        raise ConfigError([Problem(space.source, "output_dir", f"cannot write {space.sweep_dir}: {problem}; choose another output_dir", show_value=False)])
    return SweepState(name=space.name)


def run_sweep(space: SearchSpace, base: Config, *, resume: bool = False, overwrite: bool = False) -> SweepResult:
    from raytune_qvl.launch import _connect_tracker, log_audit, preflight
    from raytune_qvl.tracking import default_tracking_uri

    from raytune_qvl.launch import check_tracking_server, make_dir

    from raytune_qvl.cluster import check_outputs_outside_job_dir

    uri = default_tracking_uri(space.mlflow.tracking_uri)
    check_outputs_outside_job_dir([
        (space.source, "output_dir", str(space.sweep_dir)),
        (space.source, "storage_path", space.storage_path),
        (space.source, "mlflow.tracking_uri", uri),
    ])
    state = _prepare_dir(space, resume=resume, overwrite=overwrite)
    state_path = _state_path(space)
    check_tracking_server(uri)  # before any data work or trial
    prep_started = time.perf_counter()
    pre = preflight(base)  # once per sweep: the trials read the prepared data from the cache
    prep_seconds = time.perf_counter() - prep_started
    _check_feasible(space, base, len(pre.train.items))
    make_dir(space.sweep_dir, space.source, "output_dir")
    tracker = _connect_tracker(uri, space.experiment)
    if state.parent_run_id and state.tracking_uri == uri and tracker.reopen(state.parent_run_id):
        parent = state.parent_run_id
        log.info("resuming sweep %s (MLflow parent run %s)", space.name, parent)
    else:
        parent = tracker.start_run(space.name, {"raytune_qvl.kind": "sweep", "raytune_qvl.strategy": space.strategy})
        tracker.log_params(parent, {
            "strategy": space.strategy, "metric": space.metric, "mode": space.mode,
            "parameters": ", ".join(space.parameters), "asha.time_attr": space.asha.time_attr,
            "asha.grace_period": space.asha.grace_period, "asha.reduction_factor": space.asha.reduction_factor,
            "workers_per_trial": space.resources.workers_per_trial, "model": base.model.name, "seed": space.seed,
        })
        tracker.log_artifact(parent, space.source, "search_space")
        log_audit(tracker, parent, pre)
        tracker.log_metrics(parent, {"data_prep_seconds": prep_seconds}, step=0)
        state.parent_run_id, state.tracking_uri = parent, uri
        state.save(state_path)

    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # log-step reports carry no eval metric
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    from raytune_qvl.cluster import check_storage, ray_session

    r = space.resources
    joining = bool(base.ray.address or os.environ.get("RAY_ADDRESS"))
    # a local cluster is sized for the trials its cores hold; a joined one is what it is
    planned = 1 if joining else concurrency_for(space, os.cpu_count() or 1, _local_gpus() if r.use_gpu else 0)
    per_trial = 1 + r.workers_per_trial * r.cpus_per_worker  # the trial's own process + its workers
    try:
        with ray_session(base.ray.address, min_cpus=int(math.ceil(planned * per_trial))):
            import ray

            check_storage(space.storage_path, shared=space.shared_storage, source=space.source, key="storage_path")
            if joining:
                resources = ray.cluster_resources()
                concurrency = concurrency_for(space, resources.get("CPU", 1), resources.get("GPU", 0), trial_cpu=1)
            else:
                concurrency = planned
            log.info("sweep %s: %d trial(s) at a time", space.name, concurrency)
            _run_stages(space, base, pre, state, state_path, tracker, parent, concurrency, resume)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SweepInterrupted)):
            tracker.set_tags(parent, {"raytune_qvl.status": "interrupted"})
            tracker.end(parent, "KILLED")
            if isinstance(exc, KeyboardInterrupt):
                raise SweepInterrupted([f"sweep interrupted; continue it with: python -m raytune_qvl.sweep {space.source} --resume"]) from None
        elif not isinstance(exc, SystemExit):
            reason = "; ".join(exc.lines()) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            tracker.set_tags(parent, {"raytune_qvl.status": "failed", "raytune_qvl.reason": reason[:4000]})
            tracker.end(parent, "FAILED")
        raise

    best = _finish(space, base, state, tracker, parent)
    state.finished = True
    state.save(state_path)
    return SweepResult(space.sweep_dir, best, state.trials, parent, uri)


def _check_feasible(space: SearchSpace, base: Config, num_samples: int) -> None:
    """The largest effective batch must fit the data at least once per epoch."""
    batches = [int(b) for b in space.parameters[EFFECTIVE_BATCH].extremes()] if EFFECTIVE_BATCH in space.parameters else [starting_batch(base, space)]
    if max(batches) > num_samples:
        raise ConfigError(
            [Problem(space.source, f"parameters.{EFFECTIVE_BATCH}", f"effective batch {max(batches)} is larger than the {num_samples} usable training samples", max(batches))]
        )


def _run_stages(
    space: SearchSpace, base: Config, pre: Any, state: SweepState, state_path: Path, tracker: Any, parent: str, concurrency: int, resume: bool
) -> None:
    """Each stage searches its parameters with the rest fixed at the best so far; the best of a
    stage (the incumbent included: a stage that finds nothing better keeps it) carries forward."""
    from raytune_qvl.tuner import TrialRecord

    fixed = _starting_point(space, base)
    lr_batch = starting_batch(base, space)
    incumbent: TrialRecord | None = None
    for stage in stages(space):
        done = state.stages.get(stage.label, {})
        if done.get("status") == "done":
            fixed.update(done["best"])
            lr_batch = int(fixed.get(EFFECTIVE_BATCH, lr_batch))
            incumbent = next((TrialRecord(**t) for t in state.trials if t["trial_id"] == done["trial"] and t["status"] != "reused"), incumbent)
            log.info("%s: already done (best %s = %s)", stage.label, space.metric, done.get("value"))
            continue
        held = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fixed.items() if k not in stage.params)
        print(f"\n=== {stage.label}: {stage.trials} trials over {', '.join(stage.params)} (fixed: {held})", flush=True)
        restore = resume and done.get("status") == "running"  # continue its Tune experiment
        state.stages[stage.label] = {"status": "running"}
        state.save(state_path)
        outcome = _run_stage(space, base, pre, stage, fixed, lr_batch, state, concurrency, tracker, parent, restore, incumbent)
        state.trials = [t for t in state.trials if t["stage"] != stage.label] + [asdict(rec) for rec in outcome.records]
        state.save(state_path)
        if outcome.interrupted:
            raise KeyboardInterrupt
        best = _best_record(outcome.records + ([incumbent] if incumbent else []), space.mode)
        if best is None:
            raise UserError([f"{stage.label}: every trial failed; see the failed runs' raytune_qvl.reason in MLflow"])
        if best is not incumbent:
            fixed.update(_resolved_point(space, fixed, best))
            lr_batch = int(fixed.get(EFFECTIVE_BATCH, lr_batch))
            incumbent = best
        best_point = {k: fixed[k] for k in space.parameters if k in fixed}
        state.stages[stage.label] = {"status": "done", "best": best_point, "value": best.value, "trial": best.trial_id}
        state.save(state_path)
        tracker.log_metrics(parent, {f"best_{space.metric}": best.value}, step=stage.index)
        tracker.log_params(parent, {f"{stage.label}.best.{k}": v for k, v in best_point.items()} | {f"{stage.label}.best_trial": best.trial_id})
        _prune_checkpoints(space, state)
        kept = " (the incumbent: nothing better found)" if best.stage != stage.label else ""
        print(f"=== {stage.label}: best {space.metric} {best.value:.4f} from {best.trial_id}{kept} ({_fmt_point(best_point)})", flush=True)


def _fmt_point(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def _resolved_point(space: SearchSpace, fixed: dict[str, Any], record: Any) -> dict[str, Any]:
    """The best trial as parameter values, with the learning rate it actually trained with."""
    point = {k: v for k, v in {**fixed, **record.sampled}.items() if k != LR_FACTOR}
    if LR_KEY in record.overrides:
        point[LR_KEY] = record.overrides[LR_KEY]
    return {k: point[k] for k in space.parameters if k in point}


def _rank(records: list[Any], mode: str) -> list[Any]:
    """Scored records, best first; a trial trained to the end beats one ASHA stopped at the
    same value."""
    scored = [r for r in records if r.value is not None and math.isfinite(r.value) and r.status != "failed"]
    return sorted(scored, key=lambda r: ((r.value if mode == "min" else -r.value), r.status != "completed"))


def _best_record(records: list[Any], mode: str) -> Any:
    ranked = _rank(records, mode)
    return ranked[0] if ranked else None


def _run_stage(
    space: SearchSpace,
    base: Config,
    pre: Any,
    stage: Stage,
    fixed: dict[str, Any],
    lr_batch: int,
    state: SweepState,
    concurrency: int,
    tracker: Any,
    parent: str,
    restore: bool,
    incumbent: Any,
) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    from raytune_qvl.search_space import _param_type
    from raytune_qvl.trial import run_trial
    from raytune_qvl.tuner import PointResolver, SweepTracking, UniqueSearch, optuna_space, point_key

    storage = space.tune_storage
    experiment = f"{storage}/{stage.label}"
    resolver = PointResolver(space.model_dump(mode="json"), base.model_dump(mode="json"), {k: v for k, v in fixed.items() if k not in stage.params}, lr_batch)
    # configurations trained in earlier stages: key -> (value, the trial that trained it)
    known = {point_key(t["overrides"]): (t["value"], t["trial_id"]) for t in state.trials if t["status"] not in ("failed", "reused")}
    context = {
        "space": resolver.space, "base": resolver.base, "fixed": resolver.fixed, "lr_batch": lr_batch,
        "num_samples": len(pre.train.items), "sweep_dir": str(space.sweep_dir.absolute()),
    }
    trainable = tune.with_parameters(run_trial, context=context)

    if restore and tune.Tuner.can_restore(experiment):
        # the searcher (with its Optuna study) and the MLflow callback come back from the experiment
        tuner = tune.Tuner.restore(experiment, trainable=tune.with_resources(trainable, {"CPU": 1}), resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        callbacks = [SweepTracking(tracker.uri, space.experiment, parent, stage.label, resolver, space.metric, str(space.sweep_dir))]
        from raytune_qvl.tuner import build_tuner

        study_db = (space.sweep_dir / "optuna.db").absolute()
        searcher = UniqueSearch(
            OptunaSearch(
                space=optuna_space(stage.params, {k: _param_type(k) for k in stage.params}),
                metric=space.metric,
                mode=space.mode,
                sampler=(
                    optuna.samplers.RandomSampler(seed=space.seed + stage.index)
                    if space.strategy == "random"
                    else optuna.samplers.TPESampler(seed=space.seed + stage.index)
                ),
                study_name=f"{space.name}-{stage.label}",
                storage=optuna.storages.RDBStorage(f"sqlite:///{study_db}"),
            ),
            resolver,
            stage.params,
            {key: value for key, (value, _) in known.items()},
            seed=space.seed + stage.index,
        )
        max_t = _max_budget(space, base, stage, fixed, len(pre.train.items))
        grace = space.asha.grace_period
        scheduler = (
            ASHAScheduler(time_attr=space.asha.time_attr, max_t=max_t, grace_period=grace, reduction_factor=space.asha.reduction_factor, brackets=space.asha.brackets)
            if space.asha.enabled and max_t > grace
            else FIFOScheduler()
        )
        tuner = build_tuner(trainable, stage, space, searcher, scheduler, concurrency, storage, callbacks)

    handler = _InterruptWatch()
    results = handler.run(tuner.fit)
    records = _records(stage, results, resolver)
    # points of this stage's space trained in an earlier stage count as its candidates without
    # being trained again (the incumbent is already a candidate of every stage)
    from raytune_qvl.tuner import StageOutcome, TrialRecord

    skip = {point_key(r.overrides) for r in records} | ({point_key(incumbent.overrides)} if incumbent else set())
    for sampled in grid(stage.params) or []:
        key = point_key(resolver.overrides(sampled))
        value, trial_id = known.get(key, (None, None))
        if value is not None and key not in skip:
            skip.add(key)
            records.append(TrialRecord(trial_id, stage.label, dict(sampled), resolver.overrides(sampled), value, "reused", point=resolver.point(sampled)))
    return StageOutcome(stage.label, records, interrupted=handler.interrupted or _unfinished(results))


class _InterruptWatch:
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


def _unfinished(results: Any) -> bool:
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    return any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _records(stage: Stage, results: Any, resolver: Any) -> list[Any]:
    from raytune_qvl.tuner import TrialRecord, trial_error

    analysis = getattr(results, "_experiment_analysis", None)
    trials = {t.trial_id: t for t in (getattr(analysis, "trials", None) or [])}
    out = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "?")
        trial = trials.get(trial_id)
        sampled = {k: v for k, v in (result.config or {}).items()}
        history = []
        df = result.metrics_dataframe
        if df is not None and len(df):
            cols = [c for c in df.columns if c in ("step", "epoch", "samples_seen", "loss", "eval_loss") or c.startswith("eval_")]
            history = df[cols].to_dict("records")
        if result.error is not None:
            status, reason = "failed", trial_error(trial) if trial is not None else str(result.error).splitlines()[-1][:500]
            value = None
        else:
            status = "completed" if metrics.get("finished") else "stopped"
            reason = "" if status == "completed" else f"stopped by ASHA at epoch {metrics.get('epoch', 0):.2f}"
            value = _last_value(history, resolver.space["metric"])
        try:
            overrides = resolver.overrides(sampled)
        except Exception:  # noqa: BLE001 - a point that could not even be built
            overrides = {}
        out.append(
            TrialRecord(
                trial_id, stage.label, sampled, overrides, value, status, reason,
                float(metrics.get("epoch", 0) or 0), int(metrics.get("samples_seen", 0) or 0), history, resolver.point(sampled),
            )
        )
    return out


def _last_value(history: list[dict[str, Any]], metric: str) -> float | None:
    for row in reversed(history):
        value = row.get(metric)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None


def _max_budget(space: SearchSpace, base: Config, stage: Stage, fixed: dict[str, Any], num_samples: int) -> float:
    epochs = [fixed.get(EPOCHS_KEY, base.training.num_epochs)]
    if EPOCHS_KEY in stage.params:
        epochs = [v for v in stage.params[EPOCHS_KEY].extremes() if v is not None]
    top = float(max(epochs))
    return top if space.asha.time_attr == "epoch" else top * num_samples


# ----------------------------------------------------------------------------- the end


def _trial_records(state: SweepState) -> list[Any]:
    from raytune_qvl.tuner import TrialRecord

    return [TrialRecord(**t) for t in state.trials]


def _ranked(space: SearchSpace, state: SweepState) -> list[Any]:
    return _rank([r for r in _trial_records(state) if r.status != "reused"], space.mode)


def _prune_checkpoints(space: SearchSpace, state: SweepState) -> None:
    """Sweeps must not fill the disk: engine checkpoints of finished trials go (they only
    serve restarts), and adapters stay for the best `keep_best_adapters` trials only."""
    from raytune_qvl.trial import train_storage

    ranked = _ranked(space, state)
    keep = {r.trial_id for r in ranked[: max(1, space.keep_best_adapters)]}  # best/ copies the best one's
    storage = train_storage(space)
    for rec in _trial_records(state):
        if rec.status == "reused":
            continue
        if "://" not in storage:
            for ckpt in (Path(storage) / rec.trial_id).glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
        if rec.trial_id not in keep:
            trial = space.sweep_dir / "trials" / rec.trial_id
            for name in ("final", "best"):
                shutil.rmtree(trial / name, ignore_errors=True)


def _finish(space: SearchSpace, base: Config, state: SweepState, tracker: Any, parent: str) -> dict[str, Any] | None:
    from raytune_qvl.plots import log_sweep_plots

    ranked = _ranked(space, state)
    if not ranked:
        tracker.set_tags(parent, {"raytune_qvl.status": "failed", "raytune_qvl.reason": "no trial produced a metric"})
        tracker.end(parent, "FAILED")
        raise UserError(["every trial failed; see the child runs' raytune_qvl.reason in MLflow"])
    best = ranked[0]
    best_dir = _write_best(space, base, state, best)
    _prune_checkpoints(space, state)
    counts = {s: sum(1 for t in state.trials if t["status"] == s) for s in ("completed", "stopped", "failed")}
    tracker.log_metrics(parent, {f"best_{space.metric}": best.value, "trials_completed": counts["completed"], "trials_stopped": counts["stopped"], "trials_failed": counts["failed"]}, step=len(state.stages) + 1)
    tracker.log_params(parent, {f"best.{k}": v for k, v in best.overrides.items()} | {"best.trial": best.trial_id})
    tracker.log_artifact(parent, best_dir, "best")
    best_trial = space.sweep_dir / "trials" / best.trial_id / "best"
    if best_trial.is_dir():
        from raytune_qvl.launch import log_predictions

        log_predictions(tracker, parent, best_trial)
    tracker.log_dict(parent, {"stages": state.stages, "trials": state.trials}, "sweep_summary.json")
    try:
        log_sweep_plots(tracker, parent, space, state)
    except Exception as exc:  # noqa: BLE001 - a plot must not fail a finished sweep
        log.warning("sweep plots failed: %s", exc)
    tracker.set_tags(parent, {"raytune_qvl.status": "completed", "raytune_qvl.best_trial": best.trial_id})
    tracker.end(parent, "FINISHED")
    print(_top_table(space, ranked, counts))
    print(f"\nbest {space.metric} {best.value:.4f}: trial {best.trial_id} ({best.stage})")
    print(f"  configs: {best_dir}")
    print(f"  reproduce: {(best_dir / 'command.txt').read_text().strip()}")
    print(f"  MLflow parent run {parent} in {tracker.uri}")
    print(f"  open the UI: python -m raytune_qvl.ui --tracking_uri {tracker.uri}")
    return {"trial": best.trial_id, "value": best.value, "overrides": best.overrides, "dir": str(best_dir)}


def _top_table(space: SearchSpace, ranked: list[Any], counts: dict[str, int]) -> str:
    keys = [k for k in (LR_KEY, RANK_KEY, "lora.lora_alpha", "training.gradient_accumulation_steps", EPOCHS_KEY) if any(k in r.overrides for r in ranked)]
    short = {LR_KEY: "lr", RANK_KEY: "r", "lora.lora_alpha": "alpha", "training.gradient_accumulation_steps": "accum", EPOCHS_KEY: "epochs"}
    header = f"{'#':>2}  {'trial':<22} {'stage':<28} {'status':<9} {space.metric:>10}  " + "  ".join(f"{short[k]:>8}" for k in keys)
    lines = [f"\ntop trials ({counts['completed']} completed, {counts['stopped']} stopped by ASHA, {counts['failed']} failed):", header]
    for i, r in enumerate(ranked[:10], start=1):
        values = "  ".join(f"{r.overrides.get(k, ''):>8.3g}" if isinstance(r.overrides.get(k), float) else f"{r.overrides.get(k, ''):>8}" for k in keys)
        lines.append(f"{i:>2}  {r.trial_id:<22} {r.stage:<28} {r.status:<9} {r.value:>10.4f}  {values}")
    return "\n".join(lines)


def _write_best(space: SearchSpace, base: Config, state: SweepState, best: Any) -> Path:
    """Ready-to-run configs of the best trial, the command that reproduces it, its adapter."""
    from raytune_qvl.search_space import apply_to_config

    best_dir = space.sweep_dir / "best"
    tmp = best_dir.with_name("best.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = apply_to_config(base, best.overrides, space.source)
    cfg = apply_to_config(cfg, {
        "output.dir": str((space.sweep_dir / "best" / "run").absolute()),
        "ray.num_workers": space.resources.workers_per_trial,
        "ray.use_gpu": space.resources.use_gpu,
        "training.metric_for_best_model": space.metric,
        "training.greater_is_better": space.mode == "max",
        "output.tracking_uri": state.tracking_uri,
        "output.experiment_name": space.experiment,
        "environment.deepspeed": str((best_dir / "ds_config.json").absolute()),
    }, space.source)
    (tmp / "training_config.yaml").write_text(f"# Best trial {best.trial_id} of sweep {space.name} ({space.metric} {best.value:.6g}).\n" + yaml.safe_dump(cfg.training_dict(), sort_keys=False))
    (tmp / "lora_config.yaml").write_text(yaml.safe_dump(cfg.lora_dict(), sort_keys=False))
    (tmp / "ds_config.json").write_text(json.dumps(base.deepspeed, indent=2))
    command = (
        f"python -m raytune_qvl.train --config {best_dir.absolute() / 'training_config.yaml'} "
        f"--lora_config {best_dir.absolute() / 'lora_config.yaml'} --deepspeed {best_dir.absolute() / 'ds_config.json'}"
    )
    (tmp / "command.txt").write_text(command + "\n")
    (tmp / "best.json").write_text(json.dumps({"trial": best.trial_id, "stage": best.stage, "metric": space.metric, "value": best.value, "overrides": best.overrides}, indent=2))
    trial = space.sweep_dir / "trials" / best.trial_id
    # the trained adapter; for a trial ASHA stopped, the one at its best evaluation
    adapter = next((d for d in (trial / "final", trial / "best") if (d / "adapter_config.json").is_file()), None)
    if adapter is not None:
        shutil.copytree(adapter, tmp / "adapter")
    else:
        log.warning("trial %s left no adapter (its output folder is on another node?); best/ holds its configs only", best.trial_id)
    shutil.rmtree(best_dir, ignore_errors=True)
    tmp.rename(best_dir)
    return best_dir


# ----------------------------------------------------------------------------- CLI


def _load(path: str, overrides: Sequence[str], *, check_files: bool = True) -> tuple[SearchSpace, Config]:
    """The search-space file with `key=value` overrides applied to its YAML before validation."""
    if not overrides:
        return load_search_space(path, check_files=check_files)
    from raytune_qvl.config import load_yaml

    raw = load_yaml(path, "search-space file")
    apply_overrides(raw, [_parse_space_override(o) for o in overrides])
    return load_search_space(path, check_files=check_files, raw=raw)


# Mappings of the search-space file keyed by dotted config keys ("training.learning_rate").
_DOTTED_MAPPINGS = ("overrides", "parameters", "trials_per_stage")
_DOMAIN_FIELDS = frozenset(Domain.model_fields)


def _parse_space_override(text: str) -> tuple[list[str], Any]:
    """`resources.max_concurrent_trials=2`, a top-level `strategy=joint`, or an entry of a mapping
    keyed by config keys: `overrides.data.train_path=/shared/train.jsonl`,
    `parameters.training.learning_rate.high=1e-3`, `trials_per_stage.lora.r=4`."""
    from raytune_qvl.config import parse_yaml_text

    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not part for part in parts):
        raise ConfigError([Problem("command line", text, "an override is key=value, e.g. resources.max_concurrent_trials=2", show_value=False)])
    parsed = parse_yaml_text(value, f"command line {text!r}") if value.strip() else None
    if parts[0] in _DOTTED_MAPPINGS and len(parts) > 1:
        if parts[0] == "parameters" and len(parts) > 2 and parts[-1] in _DOMAIN_FIELDS:
            return ["parameters", ".".join(parts[1:-1]), parts[-1]], parsed
        return [parts[0], ".".join(parts[1:])], parsed
    return parts, parsed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raytune_qvl.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("search_space", help="a search-space file (search_spaces/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the search-space file")
    parser.add_argument("--dry-run", action="store_true", help="print the stages, trial counts and batch arithmetic; start nothing")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous sweep of this name and start over")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    args = parser.parse_intermixed_args(argv)
    runtime.setup_logging()

    def run() -> None:
        overrides = list(args.overrides)
        space, base = _load(args.search_space, overrides, check_files=True)
        if args.address:
            base = base.model_copy(update={"ray": base.ray.model_copy(update={"address": args.address})})
        if args.dry_run:
            print(dry_run(space, base))
            return
        started = time.perf_counter()
        run_sweep(space, base, resume=args.resume, overwrite=args.overwrite)
        print(f"sweep finished in {time.perf_counter() - started:.0f}s")

    run_cli(run)


if __name__ == "__main__":
    main()
