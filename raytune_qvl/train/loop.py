"""The training loop: a plain function, runnable with or without Ray.

    loss = engine(**batch).loss; engine.backward(loss); engine.step()

then, on visible conditions at optimizer-step boundaries: log, evaluate, checkpoint, report.
What it works with is built by `session.setup`; where metrics and checkpoints go is the
session's `Reporter`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import psutil

from raytune_qvl.config.schema import Config, test_metric
from raytune_qvl.config.write import write_configs
from raytune_qvl.data.batches import input_tokens, packed_inputs
from raytune_qvl.data.encode import IGNORE_INDEX
from raytune_qvl.reports import HELD_KEY, pack
from raytune_qvl.train import faults
from raytune_qvl.train.checkpoint import is_lora, save_checkpoint, save_trained
from raytune_qvl.train.model import rope_index_of
from raytune_qvl.train.engine import (
    WorkerContext,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    device_sum,
    gathered_trainable_state,
    release_gathered,
)
from raytune_qvl.train.outputs import (
    BEST_DIR,
    COMPLETE_MARKER,
    DIVERGED_FILE,
    FINAL_DIR,
    remember_out_of_memory,
    replace_dir,
    ship_outputs,
)
from raytune_qvl.train.session import Reporter, Session, peak_rss, setup

__all__ = ["train", "run", "train_window", "token_count", "evaluate_loss"]

log = logging.getLogger("raytune_qvl")


@contextmanager
def _staging(name: str) -> Iterator[Path]:
    """A fresh local folder to write a checkpoint into before it is reported."""
    root = Path(tempfile.mkdtemp(prefix="raytune_qvl-ckpt-"))
    try:
        yield root / name
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _model_inputs(engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """A host batch on the engine's device; a packed one with its per-sample positions first."""
    if "packed_segments" in batch:
        batch = packed_inputs(batch, rope_index_of(engine))
    return _to_device(batch, engine.device)


# ----------------------------------------------------------------------------- evaluation


def evaluate_loss(engine: Any, dataset: Any, collator: Any, ctx: WorkerContext, batch_size: int) -> float:
    """Token-weighted mean loss over the whole eval set, combined over all workers.

    Every worker runs the same number of forward passes (padding its share with masked
    repeats): under ZeRO-3 a forward gathers parameters collectively and must not be skipped.
    """
    import torch

    n = len(dataset)
    mine = list(range(ctx.rank, n, ctx.world_size))
    per_worker = math.ceil(n / ctx.world_size)
    mine += [-1] * (per_worker - len(mine))  # -1: padding, its labels masked out
    loss_sum, tokens = torch.zeros((), dtype=torch.float64, device=engine.device), 0
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_worker, batch_size):
            chunk = mine[start : start + batch_size]
            samples = [dataset[i if i >= 0 else 0] for i in chunk]
            for sample, i in zip(samples, chunk):
                if i < 0:
                    sample["labels"] = torch.full_like(sample["labels"], -100)
            host = collator(samples)
            count = token_count(host)  # on the host batch: no device sync per forward
            out = engine(**_model_inputs(engine, host))
            if count > 0:
                loss_sum += out.loss.detach().double() * count
                tokens += count
    engine.train()
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], engine.device)  # the one read-back
    return loss_sum / max(tokens, 1.0)


def train(cfg: Config, ctx: WorkerContext, reporter: Reporter, started_at: float | None = None) -> dict[str, Any]:
    """Train to the planned step count; returns the final metrics (with "diverged" set,
    and no final adapter, when the loss became NaN or infinite)."""
    return run(setup(cfg, ctx, reporter, started_at))


def _evaluate(s: Session, last: bool = False) -> dict[str, Any]:
    """Eval loss over the whole eval set; generation metrics at every N-th evaluation and at the
    last one (a sweep ranks trials by their final report)."""
    metrics: dict[str, Any] = {}
    if s.eval_dataset is None:
        return metrics
    started = time.perf_counter()
    metrics["eval_loss"] = evaluate_loss(
        s.engine, s.eval_dataset, s.collator, s.ctx, s.cfg.training.per_device_eval_batch_size
    )
    s.state.evals += 1
    if s.generation is not None and (last or (s.state.evals - 1) % s.cfg.evaluation.generation_every == 0):
        metrics.update(s.generation.run(s.engine, step=s.state.global_step))
    release_gathered(s.engine)  # ZeRO-3: the evaluation's gathered weights are not training's
    metrics["eval_seconds"] = time.perf_counter() - started  # loss and generation together
    return metrics


def _test(s: Session) -> dict[str, Any]:
    """The held-out test split, scored once at the last step: test_loss and the task's test_*
    generation metrics. Nothing in the run chooses by it."""
    if s.test is None:
        return {}
    dataset, generation = s.test
    batch = s.cfg.training.per_device_eval_batch_size
    metrics = {"test_loss": evaluate_loss(s.engine, dataset, s.collator, s.ctx, batch)}
    if generation is not None:
        scores = generation.run(s.engine, step=s.state.global_step)
        metrics.update({test_metric(k): v for k, v in scores.items()})
    release_gathered(s.engine)
    return metrics


def _progress(s: Session) -> dict[str, Any]:
    return {
        "step": s.state.global_step,
        "epoch": s.state.global_step / s.plan.steps_per_epoch,
        "samples_seen": s.state.samples_seen,
        "total_steps": s.plan.total_steps,
        "start_step": s.start_step,  # > 0 after a resume or a worker restart
        "num_nodes": s.num_nodes,
    }


def _run_footprint(s: Session) -> dict[str, Any]:
    """The run's peak memory per worker, at its end: host RSS (the largest and smallest over the
    workers, GiB) and, on GPUs, the largest peak of allocated device memory; and what it trained
    (trainable parameters: with peak memory, the cost a sweep weighs against quality)."""
    import torch

    from raytune_qvl.train.lora import trainable_by_part

    gib = 2**30
    # since the reset after the engine was built (training), or before the model loaded
    since = peak_rss() / gib
    loading = s.peak_loading / gib  # the model's loading and the engine's building
    rss = max(since, loading, s.peak_before_model / gib)  # the whole life's peak
    # what the model and training added (without the resets, bounded by the life's peak)
    since_model = max(since, loading) if s.peak_reset else rss
    added = max(since_model - s.rss_before_model / gib, 0.0)
    training = since if s.peak_reset else rss
    phases = ("loaded", "engine", "first step")
    values = [-rss, rss, -added, -loading, -training, *(-s.rss_phases.get(p, 0.0) / gib for p in phases)]
    if s.ctx.on_gpu:
        values.append(-torch.cuda.max_memory_allocated() / gib)
    reduced = all_reduce_min(values, s.engine.device)
    trainable = sum(t for t, _ in trainable_by_part(s.engine.module).values())
    t = s.cfg.training
    peaks = {
        "peak_host_rss_gb_max": -reduced[0],
        "peak_host_rss_gb_min": reduced[1],
        # the peak less the RSS before the model loaded: what config/memory.py estimates on CPU
        "peak_host_rss_added_gb_max": -reduced[2],
        # the peak while the model loaded and the engine was built, and the peak of training after it
        "peak_host_rss_load_gb_max": -reduced[3],
        "peak_host_rss_train_gb_max": -reduced[4],
        "trainable_params": trainable,
        "attention": s.attention,  # as the workers resolved it (the driver may have no GPU, or another one)
        # what the run fitted in memory with (a sweep's trial may have halved its micro batch to fit)
        "micro_batch": t.per_device_train_batch_size,
        "accumulation_steps": t.gradient_accumulation_steps,
    }
    # host RSS (the largest over the workers) right after the model loaded, the engine was built and
    # the first step: where the peak comes from (a worker resumed mid-run has no first step)
    for i, phase in enumerate(phases):
        if phase in s.rss_phases:
            peaks[f"host_rss_gb_after_{phase.replace(' ', '_')}"] = -reduced[5 + i]
    if s.ctx.on_gpu:
        peaks["peak_gpu_memory_gb_max"] = -reduced[5 + len(phases)]
    return peaks


def token_count(batch: dict[str, Any]) -> int:
    """Tokens a micro-batch trains on: labels the loss scores (shifted by one, not ignored)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def train_window(engine: Any, window: list[dict[str, Any]], tokens: Any, world_size: int, nan: bool = False) -> Any:
    """One optimizer step over its micro-batches, with the loss token-weighted over the whole
    window on every rank: each micro-batch contributes its summed token loss divided by the
    window's token count (`tokens`, all ranks), so how an effective batch is split into micro
    batch x accumulation x workers does not change the step (transformers' num_items_in_batch).
    DeepSpeed divides each backward by the accumulation steps and averages gradients over ranks,
    hence the divisor tokens / (accumulation x world size). `tokens` is a number or a 0-d device
    tensor (engine.device_sum: no host sync). Returns this rank's share of the step's mean token
    loss, on the device."""
    if isinstance(tokens, (int, float)):
        per_micro = max(float(tokens), 1.0) / (len(window) * world_size)
    else:
        per_micro = tokens.clamp(min=1.0) / (len(window) * world_size)
    share = None
    for batch in window:
        loss = engine(**_model_inputs(engine, batch), num_items_in_batch=per_micro).loss
        if nan:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()  # steps the optimizer and scheduler only at the accumulation boundary
        share = loss.detach().float() if share is None else share + loss.detach().float()
    return share / (len(window) * world_size)


def run(s: Session) -> dict[str, Any]:
    """The loop: an optimizer step's micro-batches (token-weighted, see train_window), then log /
    evaluate / checkpoint / report on visible conditions. No host sync on an ordinary step: its one
    all-reduce (the window's token count) and the check that its loss is finite stay on the device.
    A row step (the first, a logging, evaluation or save step, the last) reads back once: the log
    sums, whether any step since the last row step had a non-finite loss on any worker (the run
    then stops, naming the first such step), and whether rank 0's reporter takes a log-only report
    now (every rank reports the same steps; a row that is not due is held and sent with the next
    report, see reports.py)."""
    import torch
    from torch.utils.data import DataLoader

    from raytune_qvl.train.evaluate import is_better

    cfg, ctx, engine, state, t = s.cfg, s.ctx, s.engine, s.state, s.cfg.training
    total_steps, accum = s.plan.total_steps, t.gradient_accumulation_steps
    metric_name, higher_better = t.metric_for_best_model, cfg.greater_is_better
    output_dir = Path(cfg.output.dir)
    zero = torch.zeros((), device=engine.device)
    inf = torch.full((), float("inf"), device=engine.device)
    log = {"loss": zero.clone(), "tokens": 0, "start": time.perf_counter(), "steps": 0}  # sums for the next log
    check = {"first": inf.clone(), "count": zero.clone(), "lrs": {}}  # loss checks since the last row step
    last_metrics: dict[str, Any] = {}
    inject_nan = faults.nan_fault(cfg)
    injected = faults.Faults(cfg, ctx.rank, ctx.world_size, total_steps)
    first_step = True
    held: list[dict[str, Any]] = []  # log-only rows not yet reported

    if t.eval_on_start and state.global_step == 0 and not s.resumed:
        s.reporter.report({**_progress(s), **_evaluate(s)}, None)

    engine.train()
    while state.global_step < total_steps:
        s.sampler.set_epoch(state.epoch, state.micro_batch)
        loader = DataLoader(
            s.dataset,
            batch_size=t.per_device_train_batch_size,
            sampler=s.sampler,
            collate_fn=s.collator,
            num_workers=cfg.data.num_workers,
            pin_memory=ctx.on_gpu and cfg.environment.dataloader_pin_memory,
            # its own generator: a new iterator would otherwise draw from the global RNG and
            # shift every dropout mask after a resume
            generator=torch.Generator().manual_seed(cfg.environment.seed * 1_000_003 + state.epoch),
        )
        window: list[dict[str, Any]] = []
        for batch in loader:
            window.append(batch)
            if len(window) < accum:
                continue
            lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it after)
            # the window's token count over every rank stays on the device: no host sync per step
            tokens = device_sum(sum(token_count(b) for b in window), engine.device)
            log["tokens"] += sum(input_tokens(b) for b in window)  # host batches
            try:
                injected.before_step()
                share = train_window(engine, window, tokens, ctx.world_size, nan=inject_nan and state.global_step >= 1)
            except torch.OutOfMemoryError as exc:
                reason = (str(exc).strip().splitlines() or ["out of memory"])[0]
                remember_out_of_memory(output_dir, t.per_device_train_batch_size, s.started_at, reason)
                raise
            state.micro_batch += len(window)
            window = []

            state.global_step += 1
            state.samples_seen += s.plan.effective_batch
            log["loss"] += share
            log["steps"] += 1
            step = state.global_step
            # the first step whose loss is not finite, kept on the device until the next row step
            nonfinite = ~torch.isfinite(share)
            check["first"] = torch.where(nonfinite & torch.isinf(check["first"]), float(step), check["first"])
            check["count"] += nonfinite.float()
            check["lrs"][step] = lr
            last = step == total_steps
            metrics: dict[str, Any] = {}
            row = (
                first_step or last or any(step % every == 0 for every in (t.logging_steps, t.eval_steps, t.save_steps))
            )
            if state.micro_batch >= s.sampler.micro_batches_per_epoch():
                state.epoch, state.micro_batch = state.epoch + 1, 0  # the epoch is done
            if not row:  # nothing to log, evaluate, save or report: no host sync at all
                injected.after_report(step)
                continue

            # a row step: one read-back for the log sums, whether any step since the last row step
            # was not finite on any worker, and whether rank 0's reporter takes a log-only report now
            due = float(ctx.is_main and s.reporter.due())
            loss_sum, tokens_seen, due, bad = all_reduce_sum(
                [log["loss"], log["tokens"], due, check["count"]], engine.device
            )
            if bad:  # a NaN on any worker stops every worker, naming the step it first happened at
                (first,) = all_reduce_min([check["first"]], engine.device)
                return _diverged(s, int(first), check["lrs"][int(first)], held)
            check.update(first=inf.clone(), count=zero.clone(), lrs={})
            if first_step:  # how long this process took to get here (launch, workers, data, model, engine)
                metrics.update(setup_seconds=time.time() - s.started_at, data_prep_seconds=s.data_seconds)
                s.rss_phases["first step"] = float(psutil.Process().memory_info().rss)
                first_step = False

            if step % t.logging_steps == 0 or last:
                elapsed = max(time.perf_counter() - log["start"], 1e-9)
                grad_norm = engine.get_global_grad_norm()
                metrics.update(
                    loss=loss_sum / max(log["steps"], 1),  # the mean token loss of the window's steps
                    learning_rate=lr,
                    grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                    samples_per_second=log["steps"] * s.plan.effective_batch / elapsed,
                    tokens_per_second=tokens_seen / elapsed,
                )
                log.update(loss=zero.clone(), tokens=0, start=time.perf_counter(), steps=0)

            if step % t.eval_steps == 0 or last:
                metrics.update(_evaluate(s, last=last))
                if last:
                    metrics.update(_test(s))
                value = metrics.get(metric_name)
                if value is not None and is_better(value, state.best_metric, higher_better):
                    state.best_metric, state.best_step = value, step
                    _save_best(s, output_dir / BEST_DIR, step, metric_name, value)
                log["start"] = time.perf_counter()  # evaluation time is not training throughput

            if metrics or step % t.save_steps == 0:
                metrics.update(_progress(s))
                if state.best_metric is not None:
                    metrics[f"best_{metric_name}"] = state.best_metric
                if last:  # the final adapter is on disk before the report that says the run finished
                    metrics.update(_run_footprint(s))
                    _save_final(s, output_dir / FINAL_DIR, {**last_metrics, **metrics})
                report = {**metrics, "finished": last}
                if step % t.save_steps == 0 or last:
                    report[HELD_KEY], held = pack(held), []
                    # a LoRA checkpoint holds its adapter; a full run's engine state already is its model
                    # (gathering every weight on every rank would hold a whole copy in each one's memory)
                    gathered = gathered_trainable_state(engine) if is_lora(engine) else nullcontext({})
                    with gathered as trained, _staging(f"checkpoint-{step:06d}") as folder:
                        whole = not last or t.final_checkpoint == "engine"  # a finished run is never resumed
                        save_checkpoint(engine, folder, state, rank=ctx.rank, trained=trained, engine_state=whole)
                        if last and ctx.is_main and s.reporter.ships_outputs:
                            ship_outputs(output_dir, folder)
                        s.reporter.report(report, folder)
                elif due or any(k.startswith("eval_") for k in metrics):
                    report[HELD_KEY], held = pack(held), []
                    s.reporter.report(report, None)
                else:
                    held.append(report)
                last_metrics.update(metrics)
                log["start"] = time.perf_counter()
            injected.after_report(step)
            if last:
                break
    return last_metrics


def _diverged(s: Session, step: int, lr: float, held: list[dict[str, Any]]) -> dict[str, Any]:
    """Reported, not raised: Ray would retry a worker error from the last checkpoint and diverge
    again; the driver turns this into a failed run. The report carries a marker checkpoint: Ray
    Train's result holds the metrics of the latest checkpoint, and a rerun must not resume into a NaN."""
    message = f"loss is NaN or infinite at optimizer step {step} (learning rate {lr:.3g}); lower training.learning_rate"
    with _staging(f"checkpoint-{step:06d}-diverged") as folder:
        folder.mkdir(parents=True)
        if s.ctx.is_main:
            (folder / DIVERGED_FILE).write_text(json.dumps({"step": step, "message": message}))
        s.reporter.report({**_progress(s), "diverged": message, "finished": True, HELD_KEY: pack(held)}, folder)
    return {"diverged": message}


def _save_best(s: Session, folder: Path, step: int, metric_name: str, value: float) -> None:
    """The adapter at the best evaluation so far, with the predictions behind it."""
    with gathered_trainable_state(s.engine) as trained:
        if s.ctx.is_main:

            def write(tmp: Path) -> None:
                save_trained(s.engine, tmp, trained)
                (tmp / "best.json").write_text(json.dumps({"step": step, metric_name: value}))
                if s.generation is not None:
                    s.generation.write_predictions(tmp)

            replace_dir(folder, write)
    barrier()


def _save_final(s: Session, folder: Path, last_metrics: dict[str, Any]) -> None:
    """The trained adapter, with the processor and the configs that produced it."""
    with gathered_trainable_state(s.engine) as trained:
        if s.ctx.is_main:

            def write(tmp: Path) -> None:
                save_trained(s.engine, tmp, trained)
                s.processor.save_pretrained(str(tmp))
                write_configs(s.cfg, s.plan.deepspeed, tmp)
                (tmp / COMPLETE_MARKER).write_text(
                    json.dumps({**last_metrics, "total_steps": s.plan.total_steps}, default=str)
                )

            replace_dir(folder, write)
    barrier()
