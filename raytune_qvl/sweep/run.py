"""The sweep, top to bottom: the documented priority order (learning rate, LoRA rank, effective
batch, epochs) searched stage by stage, every trial a Ray Train run, one MLflow parent run with a
child per trial, the best configuration written out, resumable.

    run_sweep: folder and state -> tracking server -> pre-flight (once) -> MLflow parent run
               -> Ray -> each stage: run_stage, its best carried forward -> best/, table, plots
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytune_qvl.config.schema import Config
from raytune_qvl.config.uris import default_tracking_uri, redact
from raytune_qvl.errors import ConfigError, Problem, UserError
from raytune_qvl.sweep.context import Sweep
from raytune_qvl.sweep.outputs import (
    boundary_advice,
    confirmation_table,
    count,
    cost_table,
    mean_std,
    prune_checkpoints,
    ranked,
    reading_sample,
    sweep_front,
    top_table,
    trial_folder,
    write_best,
)
from raytune_qvl.sweep.plan import concurrency_for, local_gpus, memory_check, workers_at_once
from raytune_qvl.sweep.points import starting_batch, starting_point
from raytune_qvl.sweep.records import TrialRecord, best_record, resolved_point
from raytune_qvl.sweep.space import EFFECTIVE_BATCH, LR_KEY, SearchSpace, stages
from raytune_qvl.sweep.state import STATE_FILE, SweepState
from raytune_qvl.sweep.warm import load_warm_start, sweep_task, task_digest
from raytune_qvl.train.outputs import PREDICTIONS_FILE, config_changes, make_dir, writable_dir_problem

__all__ = ["run_sweep", "SweepResult", "SweepInterrupted"]

log = logging.getLogger("raytune_qvl")


class SweepInterrupted(UserError):
    exit_code = 130


@dataclass
class SweepResult:
    sweep_dir: Path
    best: dict[str, Any] | None
    trials: list[dict[str, Any]]
    parent_run_id: str | None
    tracking_uri: str | None


def run_sweep(
    space: SearchSpace, base: Config, *, resume: bool = False, overwrite: bool = False, warm_start: str | None = None
) -> SweepResult:
    """`warm_start`: the folder of an earlier sweep of the same task to seed this one from (warm.py)."""
    from raytune_qvl.cluster import check_outputs_outside_job_dir, check_storage, ray_session
    from raytune_qvl.train.ops import check_ops_on_workers
    from raytune_qvl.sweep.progress import quiet_trial_errors
    from raytune_qvl.track.runs import log_sweep_start
    from raytune_qvl.track.tracker import check_server, connect
    from raytune_qvl.train.engine import device_config
    from raytune_qvl.train.preflight import preflight

    uri = default_tracking_uri(space.mlflow.tracking_uri)
    check_outputs_outside_job_dir(
        [
            (space.source, "output_dir", str(space.sweep_dir)),
            (space.source, "storage_path", space.storage_path),
            (space.source, "mlflow.tracking_uri", uri),
        ]
    )
    _check_warm_start_path(space, warm_start, resume)
    state = _prepare_dir(space, resume=resume, overwrite=overwrite)
    check_server(uri)  # before any data work or trial
    prep_started = time.perf_counter()
    pre = preflight(base)  # once per sweep: the trials read the prepared data from the cache
    prep_seconds = time.perf_counter() - prep_started
    task = sweep_task(space, base, [s.fingerprint for s in (pre.train, pre.eval) if s is not None])
    digest = task_digest(task)
    _check_same_task(space, state, task, digest)
    if warm_start and not state.warm_start:
        warm = load_warm_start(warm_start, space, base, digest)
        state.add_records(warm.records)
        state.warm_start = warm.summary()
        best = (
            f"its best run in this space, {warm.best.trial_id}, is the starting point"
            if warm.best
            else "none of its full runs fits"
        )
        print(
            f"warm start from {warm.source}: {count(len(warm.records), 'trained run')} in this space "
            f"({warm.outside} outside it); {best}",
            flush=True,
        )
    state.digest, state.task = digest, task
    _check_feasible(space, base, len(pre.train.items))
    for warning in memory_check(space, base, pre.train.audit.lengths(), workers_at_once(space, base))[1]:
        log.warning("memory: %s", warning)
    # DeepSpeed's compiled ops are there or buildable (here; on a cluster's nodes once joined)
    ops_config, ops_source = (
        device_config(pre.plan.deepspeed, on_gpu=space.resources.use_gpu)[0],
        base.paths.deepspeed or space.source,
    )
    check_ops_on_workers(ops_config, on_gpu=space.resources.use_gpu, source=ops_source)
    make_dir(space.sweep_dir, space.source, "output_dir")
    tracker = connect(uri, space.experiment)
    if state.parent_run_id:
        cannot = f"cannot reopen this sweep's MLflow parent run {state.parent_run_id}"
        if state.tracking_uri != uri:
            rule = (
                f"{cannot} in {redact(uri)} (it was logged to {redact(state.tracking_uri)}): resume with "
                "that mlflow.tracking_uri, or pass --overwrite to start over"
            )
            raise ConfigError([Problem(space.source, "mlflow.tracking_uri", rule, show_value=False)])
        if not tracker.reopen(state.parent_run_id):
            rule = (
                f"{cannot}: it is not in experiment {space.experiment!r} of {redact(uri)} (the experiment "
                "was renamed here, or the run deleted): resume with the experiment it was logged to, "
                "or pass --overwrite to start over"
            )
            raise ConfigError([Problem(space.source, "mlflow.experiment", rule, show_value=False)])
        parent = state.parent_run_id
        log.info("resuming sweep %s (MLflow parent run %s)", space.name, parent)
    else:
        parent = log_sweep_start(tracker, space, base, pre, prep_seconds, state.warm_start)
        state.parent_run_id, state.tracking_uri = parent, uri
        state.save(space.sweep_dir / STATE_FILE)
    sweep = Sweep(space, base, pre, state, tracker, parent, resume=resume)

    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # log-step reports carry no eval metric
    # Tune's own progress output (tables, experiment boxes) off: SweepProgress prints the sweep's
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    r = space.resources
    joining = bool(base.ray.address or os.environ.get("RAY_ADDRESS"))
    # a local cluster is sized for the trials its cores hold; a joined one is what it is
    planned = 1 if joining else concurrency_for(space, os.cpu_count() or 1, local_gpus() if r.use_gpu else 0)
    per_trial = 1 + r.workers_per_trial * r.cpus_per_worker  # the trial's own process + its workers
    try:
        with tracker.outcome(parent) as finished_tags:
            quiet_trial_errors()
            # worker output (and the stack dump of a worker ASHA stops mid-step) stays in Ray's logs
            with ray_session(base.ray.address, min_cpus=int(math.ceil(planned * per_trial)), log_to_driver=False):
                import ray

                check_storage(space.storage_path, shared=space.shared_storage, source=space.source, key="storage_path")
                if joining:  # the workers' nodes (this machine's were checked before the sweep began)
                    check_ops_on_workers(ops_config, on_gpu=r.use_gpu, source=ops_source)
                if joining:
                    resources = ray.cluster_resources()
                    sweep.concurrency = concurrency_for(
                        space, resources.get("CPU", 1), resources.get("GPU", 0), trial_cpu=1
                    )
                else:
                    sweep.concurrency = planned
                log.info("sweep %s: %d trial(s) at a time", space.name, sweep.concurrency)
                _run_stages(sweep)
                _confirm(sweep)
            best = _finish(sweep, finished_tags)
    except KeyboardInterrupt:
        hint = f"sweep interrupted; continue it with: python -m raytune_qvl.sweep {space.source} --resume"
        raise SweepInterrupted([hint]) from None
    state.finished = True
    sweep.save_state()
    return SweepResult(space.sweep_dir, best, state.trials, parent, uri)


def _check_same_task(space: SearchSpace, state: SweepState, task: dict[str, Any], digest: str) -> None:
    """A resumed sweep goes on only with the task its trials ran: a changed base config, data,
    metric or trial resources would rank new trials against old ones; refused, naming what changed."""
    if not state.digest or state.digest == digest:
        return
    from raytune_qvl.config.overrides import flatten

    changes = config_changes(flatten(state.task), flatten(task)) if state.task else []
    shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    rule = (
        f"this sweep's task changed since it began ({shown or 'its base config, data, metric or trial resources'}): "
        "its trials would not compare with new ones; undo the change, or pass --overwrite to start over"
    )
    raise ConfigError([Problem(space.source, "base", rule, show_value=False)])


def _check_warm_start_path(space: SearchSpace, warm_start: str | None, resume: bool) -> None:
    if not warm_start:
        return
    if resume:
        rule = "a resumed sweep keeps the warm start it began with; drop --warm-start, or start a new sweep"
        raise ConfigError([Problem(space.source, "--warm-start", rule, show_value=False)])
    folder = Path(warm_start)
    folder = folder.parent if folder.name == STATE_FILE else folder
    if folder.absolute().resolve() == space.sweep_dir.absolute().resolve():
        rule = f"{warm_start} is this sweep's own folder: give this sweep another name (name=...)"
        raise ConfigError([Problem(space.source, "--warm-start", rule, show_value=False)])


def _prepare_dir(space: SearchSpace, *, resume: bool, overwrite: bool) -> SweepState:
    """The sweep's state: new, or the one to resume; refuses to silently start over."""
    path = space.sweep_dir / STATE_FILE
    local_storage = "://" not in space.storage_path
    if overwrite:
        shutil.rmtree(space.sweep_dir, ignore_errors=True)
        if local_storage:
            shutil.rmtree(space.tune_storage, ignore_errors=True)
    if path.exists() and not overwrite:
        state = SweepState.load(path)
        if not resume:
            done = "finished" if state.finished else "interrupted"
            rule = (
                f"a sweep named {space.name!r} already exists here ({done}); "
                "pass --resume to continue it or --overwrite to start over"
            )
            raise ConfigError([Problem(str(space.sweep_dir), "name", rule, show_value=False)])
        return state
    if resume:
        rule = "no sweep to resume here; run without --resume to start it"
        raise ConfigError([Problem(str(space.sweep_dir), "--resume", rule, show_value=False)])
    stale = Path(space.tune_storage)
    if local_storage and stale.exists() and any(stale.iterdir()):
        rule = (
            f"{stale} already holds a sweep named {space.name!r} (another output_dir?): "
            "rename this one or pass --overwrite"
        )
        raise ConfigError([Problem(space.source, "storage_path", rule, show_value=False)])
    problem = writable_dir_problem(space.sweep_dir)
    if problem:
        rule = f"cannot write {space.sweep_dir}: {problem}; choose another output_dir"
        raise ConfigError([Problem(space.source, "output_dir", rule, show_value=False)])
    return SweepState(name=space.name)


def _check_feasible(space: SearchSpace, base: Config, num_samples: int) -> None:
    """The largest effective batch must fit the data at least once per epoch; ASHA's max_t must
    not cut the trials short."""
    from raytune_qvl.sweep.search import max_t_problem

    problem = max_t_problem(space, base, num_samples)
    if problem:
        raise ConfigError([Problem(space.source, "asha.max_t", problem, space.asha.max_t)])
    if EFFECTIVE_BATCH in space.parameters:
        batches = [int(b) for b in space.parameters[EFFECTIVE_BATCH].extremes()]
    else:
        batches = [starting_batch(base, space)]
    if max(batches) > num_samples:
        rule = f"effective batch {max(batches)} is larger than the {num_samples} usable training samples"
        raise ConfigError([Problem(space.source, f"parameters.{EFFECTIVE_BATCH}", rule, max(batches))])


def _run_stages(sweep: Sweep) -> None:
    """Each stage searches its parameters with the rest fixed at the best so far; the best of a
    stage (the incumbent included: a stage that finds nothing better keeps it) carries forward."""
    from raytune_qvl.sweep.stage import run_stage

    space, state = sweep.space, sweep.state
    fixed = starting_point(space, sweep.base)
    if state.warm_start:  # the source's best, where its values lie in this space
        fixed.update(state.warm_start["start"])
    lr_batch = int(fixed.get(EFFECTIVE_BATCH, starting_batch(sweep.base, space)))
    incumbent: TrialRecord | None = None
    for stage in stages(space):
        done = state.stages.get(stage.label, {})
        if done.get("status") == "done":
            fixed.update(done["best"])
            lr_batch = int(fixed.get(EFFECTIVE_BATCH, lr_batch))
            trained = {r.trial_id: r for r in state.trained()}
            incumbent = trained.get(done["trial"], incumbent)
            log.info("%s: already done (best %s = %s)", stage.label, space.metric, done.get("value"))
            continue
        held = _fmt_point({k: v for k, v in fixed.items() if k not in stage.params}, "g")
        print(f"\n=== {stage.label}: {stage.trials} trials over {', '.join(stage.params)} (fixed: {held})", flush=True)
        restore = sweep.resume and done.get("status") == "running"  # continue its Tune experiment
        state.stages[stage.label] = {"status": "running"}
        sweep.save_state()
        stage_batch = lr_batch  # the effective batch its learning rates are at
        outcome = run_stage(sweep, stage, fixed, lr_batch, incumbent, restore=restore)
        state.set_stage_records(stage.label, outcome.records)
        sweep.save_state()
        if outcome.interrupted:
            raise KeyboardInterrupt
        best = best_record(([incumbent] if incumbent else []) + outcome.records, space.mode)  # a tie keeps it
        if best is None:
            rule = "no trial ran its full budget (failed, or stopped by ASHA); see the runs' raytune_qvl.reason"
            raise UserError([f"{stage.label}: {rule} in MLflow"])
        if best is not incumbent:
            fixed.update(resolved_point(space, fixed, best))
            lr_batch = int(fixed.get(EFFECTIVE_BATCH, lr_batch))
            incumbent = best
        best_point = {k: fixed[k] for k in space.parameters if k in fixed}
        state.stages[stage.label] = {
            "status": "done",
            "best": best_point,
            "value": best.value,
            "trial": best.trial_id,
            "lr_batch": stage_batch,
        }
        if state.baseline is None:
            state.measure_baseline(space.metric)
        sweep.save_state()
        from raytune_qvl.track.runs import log_stage_best

        log_stage_best(
            sweep.tracker, sweep.parent, stage.label, stage.index, space.metric, best.value, best_point, best.trial_id
        )
        prune_checkpoints(sweep)
        kept = " (the incumbent: nothing better found)" if best.stage != stage.label else ""
        found = f"best {space.metric} {best.value:.4f} from {best.trial_id}{kept}"
        print(f"=== {stage.label}: {found} ({_fmt_point(best_point)})", flush=True)


def _confirm(sweep: Sweep) -> None:
    """The top configs again with other seeds (confirm.py), unless done or switched off."""
    from raytune_qvl.sweep.confirm import CONFIRM_STAGE, run_confirmation

    space, state = sweep.space, sweep.state
    done = state.stages.get(CONFIRM_STAGE, {})
    if not (space.confirm.top_k and space.confirm.seeds) or done.get("status") == "done":
        return
    runs = min(space.confirm.top_k, len(ranked(sweep))) * space.confirm.seeds
    top, seeds = space.confirm.top_k, space.confirm.seeds
    print(f"\n=== {CONFIRM_STAGE}: the top {top} configs, {count(seeds, 'more seed')} each ({runs} runs)", flush=True)
    restore = sweep.resume and done.get("status") == "running"
    state.stages[CONFIRM_STAGE] = {"status": "running"}
    sweep.save_state()
    records = run_confirmation(sweep, restore=restore)
    state.set_stage_records(CONFIRM_STAGE, records)
    state.stages[CONFIRM_STAGE] = {"status": "done"}
    sweep.save_state()


def _fmt_point(point: dict[str, Any], float_format: str = ".3g") -> str:
    return ", ".join(f"{k}={v:{float_format}}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def _lr_stage_batch(sweep: Sweep) -> int | None:
    """The effective batch the learning-rate stage's rates were at (its range is in those units)."""
    for stage in stages(sweep.space):
        if LR_KEY in stage.params:
            return sweep.state.stages.get(stage.label, {}).get("lr_batch")
    return None


def _finish(sweep: Sweep, finished_tags: dict[str, Any]) -> dict[str, Any]:
    """best/, pruning, the parent run's results and plots, the table and the way to the UI."""
    from raytune_qvl.track.runs import log_sweep_result
    from raytune_qvl.track.tracker import TAG_BEST_TRIAL
    from raytune_qvl.track.ui import UI_ADDRESS, compare_url, sweep_trials

    from raytune_qvl.config.schema import test_metric
    from raytune_qvl.sweep.confirm import confirmed

    space = sweep.space
    records = ranked(sweep)
    if not records:
        raise UserError(["no trial ran its full budget; see the child runs' raytune_qvl.reason in MLflow"])
    confirmations = confirmed(sweep) if sweep.state.stages.get("confirm", {}).get("status") == "done" else []
    # the winner: the best mean of the confirmed configs, else the best single run
    best = next(r for r in records if r.trial_id == confirmations[0].trial_id) if confirmations else records[0]
    best_dir = write_best(sweep, best)
    prune_checkpoints(sweep, keep=[c.trial_id for c in confirmations])
    counts = sweep.state.counts()
    predictions = trial_folder(sweep, best) / "best" / PREDICTIONS_FILE
    advice = boundary_advice(space, best, _lr_stage_batch(sweep))
    front = sweep_front(sweep, records, confirmations, best)
    log_sweep_result(
        sweep.tracker,
        sweep.parent,
        space,
        sweep.state,
        best,
        best_dir,
        predictions,
        counts,
        confirmations,
        advice,
        front.to_dict() if front is not None else None,
    )
    finished_tags[TAG_BEST_TRIAL] = best.trial_id
    print(top_table(sweep, records, counts))
    if confirmations:
        print(confirmation_table(space, confirmations))
    if front is not None:
        print(cost_table(front))
    print(f"\nbest {space.metric} {best.value:.4f}: trial {best.trial_id} ({best.stage})")
    if sweep.state.baseline is not None:
        print(f"  before fine-tuning (the base model, step 0): {space.metric} {sweep.state.baseline['value']:.4f}")
    if confirmations and confirmations[0].test_mean is not None:
        c = confirmations[0]
        print(
            f"  the sweep's result, on the held-out test split: {test_metric(space.metric)} "
            f"{mean_std(c.test_mean, c.test_std, len(c.tests))} ({count(len(c.tests), 'run')} with other seeds)"
        )
    for line in advice:
        print(f"  advice: {line}")
    print(reading_sample(predictions))
    print(f"  configs: {best_dir}")
    print(f"  reproduce: {(best_dir / 'command.txt').read_text().strip()}")
    print(f"  MLflow parent run {sweep.parent} in {sweep.tracker.uri}")
    print(f"  open the UI: python -m raytune_qvl.ui --tracking_uri {sweep.tracker.uri}")
    trials = sweep_trials(sweep.tracker.client, sweep.parent)
    side_by_side = compare_url(UI_ADDRESS, sweep.tracker.experiment_id, trials)
    print(f"  then the {len(trials)} trials side by side: {side_by_side}")
    return {"trial": best.trial_id, "value": best.value, "overrides": best.overrides, "dir": str(best_dir)}
