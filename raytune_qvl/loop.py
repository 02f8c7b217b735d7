"""The training loop: a plain function, runnable with or without Ray.

    loss = engine(**batch).loss; engine.backward(loss); engine.step()

then, on visible conditions at optimizer-step boundaries: log, evaluate, checkpoint, report.
Ray enters only through the `Reporter` it is given (see worker.py); `LocalReporter` runs it in
one process (`python -m raytune_qvl.train --no-ray`, profiling, a GPU box without Ray).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

import yaml

from raytune_qvl import batch_math
from raytune_qvl.checkpoint import (
    ADAPTER_DIR,
    TrainState,
    latest_local_checkpoint,
    load_checkpoint,
    prune_local_checkpoints,
    save_adapter,
    save_checkpoint,
)
from raytune_qvl.config import Config
from raytune_qvl.engine import (
    WorkerContext,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    build_engine,
    device_config,
    gathered_lora_state,
    init_distributed,
)

__all__ = ["Reporter", "LocalReporter", "TrainingDiverged", "train", "write_resolved_configs", "FINAL_DIR", "BEST_DIR", "COMPLETE_MARKER"]

log = logging.getLogger("raytune_qvl")

FINAL_DIR = "final"  # <output.dir>/final: the trained adapter, processor and resolved configs
BEST_DIR = "best"  # <output.dir>/best: the adapter at the best evaluation so far
COMPLETE_MARKER = "training_complete.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (raised by the driver from the final report)."""


class Reporter(Protocol):
    """Where metrics and checkpoints go: Ray Train (worker.py) or a local folder."""

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...

    def resume_checkpoint(self) -> Path | None: ...


class LocalReporter:
    """One process, no Ray: checkpoints under <output.dir>/checkpoints, the newest kept
    `save_total_limit`; metrics to a callback (the CLI's progress and MLflow)."""

    def __init__(self, cfg: Config, on_metrics: Any = None, resume_from: str | None = None):
        self.root = Path(cfg.output.dir) / "checkpoints"
        self.keep = cfg.training.save_total_limit
        self.on_metrics = on_metrics
        self.resume_from = resume_from

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        if checkpoint is not None:
            target = self.root / checkpoint.name
            if checkpoint.resolve() != target.resolve():
                shutil.rmtree(target, ignore_errors=True)
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.copytree(checkpoint, target)
            prune_local_checkpoints(self.root, self.keep)
        if self.on_metrics is not None:
            self.on_metrics(metrics)

    def resume_checkpoint(self) -> Path | None:
        if self.resume_from:
            return Path(self.resume_from)
        return latest_local_checkpoint(self.root)


# ----------------------------------------------------------------------------- set-up


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_resolved_configs(cfg: Config, deepspeed: dict[str, Any], folder: Path) -> None:
    """The exact configs this run used, ready for `python -m raytune_qvl.train`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_config.yaml").write_text(yaml.safe_dump(cfg.training_dict(), sort_keys=False))
    (folder / "lora_config.yaml").write_text(yaml.safe_dump(cfg.lora_dict(), sort_keys=False))
    (folder / "ds_config.json").write_text(json.dumps(deepspeed, indent=2))


@contextmanager
def _staging(name: str) -> Iterator[Path]:
    """A fresh local folder to write a checkpoint into before it is reported."""
    root = Path(tempfile.mkdtemp(prefix="raytune_qvl-ckpt-"))
    try:
        yield root / name
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}


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
    loss_sum, tokens = 0.0, 0.0
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_worker, batch_size):
            chunk = mine[start : start + batch_size]
            samples = [dataset[i if i >= 0 else 0] for i in chunk]
            for sample, i in zip(samples, chunk):
                if i < 0:
                    sample["labels"] = torch.full_like(sample["labels"], -100)
            batch = _to_device(collator(samples), engine.device)
            count = float((batch["labels"][:, 1:] != -100).sum())
            out = engine(**batch)
            if count > 0:
                loss_sum += float(out.loss.float()) * count
                tokens += count
    engine.train()
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], engine.device)
    return loss_sum / max(tokens, 1.0)


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, ctx: WorkerContext, reporter: Reporter) -> dict[str, Any]:
    """Train to the planned step count; returns the final metrics (with "diverged" set,
    and no final adapter, when the loss became NaN or infinite)."""
    import torch
    from torch.utils.data import DataLoader

    from raytune_qvl.data import Collator, EpochSampler, TrainDataset, check_audit, load_or_prepare
    from raytune_qvl.evaluate import GenerationEval, is_better
    from raytune_qvl.lora import apply_lora, format_parts, trainable_by_part
    from raytune_qvl.model import load_model, load_processor
    from raytune_qvl.plan import make_plan

    t = cfg.training
    init_distributed(ctx)
    seed_everything(cfg.environment.seed)  # the same LoRA initialisation on every worker

    # data: prepared once per node (cached), audited, then sharded by the sampler
    processor = load_processor(cfg)
    train_split = load_or_prepare(cfg, processor, "train")
    eval_split = load_or_prepare(cfg, processor, "eval")
    check_audit(train_split.audit, cfg.data)
    if eval_split is not None:
        check_audit(eval_split.audit, cfg.data)
    plan = make_plan(cfg, num_samples=len(train_split.items))
    total_steps, accum, micro = plan.total_steps, t.gradient_accumulation_steps, t.per_device_train_batch_size

    # model + LoRA + DeepSpeed
    model = apply_lora(load_model(cfg, on_gpu=ctx.on_gpu), cfg.lora)
    if ctx.is_main:
        log.info(format_parts(trainable_by_part(model)))
    ds_config, _ = device_config(plan.deepspeed, on_gpu=ctx.on_gpu)
    engine = build_engine(model, ds_config)
    seed_everything(cfg.environment.seed + ctx.rank)  # dropout differs across workers, reproducibly

    state = TrainState()
    resume = reporter.resume_checkpoint()
    if resume is not None:
        state = load_checkpoint(engine, resume, rank=ctx.rank)
        if ctx.is_main:
            log.info("resumed from %s at step %d (epoch %d)", resume, state.global_step, state.epoch)

    dataset = TrainDataset(train_split.items, processor)
    eval_dataset = TrainDataset(eval_split.items, processor) if eval_split is not None else None
    collator = Collator(processor.tokenizer.pad_token_id)
    sampler = EpochSampler(
        len(dataset), micro=micro, accum=accum, rank=ctx.rank, world=ctx.world_size,
        seed=cfg.data.preprocessing.seed, shuffle=cfg.data.preprocessing.shuffle,
    )
    generation = GenerationEval.create(cfg, eval_split, processor, ctx) if eval_split is not None else None
    metric_name, higher_better = t.metric_for_best_model, cfg.greater_is_better
    output_dir = Path(cfg.output.dir)

    # running sums for the next log line
    window = {"loss": 0.0, "micro": 0, "tokens": 0.0, "start": time.perf_counter(), "steps": 0}
    last_metrics: dict[str, Any] = {}

    def evaluate() -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if eval_dataset is None:
            return metrics
        metrics["eval_loss"] = evaluate_loss(engine, eval_dataset, collator, ctx, t.per_device_eval_batch_size)
        state.evals += 1
        if generation is not None and (state.evals - 1) % cfg.evaluation.generation_every == 0:
            metrics.update(generation.run(engine, step=state.global_step))
        return metrics

    def progress() -> dict[str, Any]:
        return {
            "step": state.global_step,
            "epoch": state.global_step / plan.steps_per_epoch,
            "samples_seen": state.samples_seen,
            "total_steps": total_steps,
        }

    if t.eval_on_start and state.global_step == 0 and resume is None:
        reporter.report({**progress(), **evaluate()}, None)

    engine.train()
    while state.global_step < total_steps:
        sampler.set_epoch(state.epoch, state.micro_batch)
        loader = DataLoader(
            dataset, batch_size=micro, sampler=sampler, collate_fn=collator,
            num_workers=cfg.data.num_workers, pin_memory=ctx.on_gpu and cfg.environment.dataloader_pin_memory,
            persistent_workers=False,
        )
        for batch in loader:
            boundary = (state.micro_batch + 1) % accum == 0
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves it after)
            window["tokens"] += float(batch["attention_mask"].sum())
            batch = _to_device(batch, engine.device)

            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # steps the optimizer and scheduler only at accumulation boundaries

            window["loss"] += float(loss.detach().float())
            window["micro"] += 1
            state.micro_batch += 1
            if not boundary:
                continue

            state.global_step += 1
            state.samples_seen += plan.effective_batch
            window["steps"] += 1
            step = state.global_step
            last = step == total_steps
            metrics: dict[str, Any] = {}

            # a NaN on any worker stops every worker at the same step
            (bad,) = all_reduce_max([0.0 if math.isfinite(window["loss"]) else 1.0], engine.device)
            if bad:
                # reported, not raised: Ray would retry a worker error from the last checkpoint
                # and diverge again; the driver turns this into a failed run
                message = f"loss is NaN or infinite at optimizer step {step} (learning rate {lr:.3g}); lower training.learning_rate"
                reporter.report({**progress(), "diverged": message, "finished": True}, None)
                return {"diverged": message}

            if step % t.logging_steps == 0 or last:
                loss_sum, micro_count, tokens = all_reduce_sum([window["loss"], window["micro"], window["tokens"]], engine.device)
                elapsed = max(time.perf_counter() - window["start"], 1e-9)
                grad_norm = engine.get_global_grad_norm()
                metrics.update(
                    loss=loss_sum / max(micro_count, 1),
                    learning_rate=lr,
                    grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                    samples_per_second=window["steps"] * plan.effective_batch / elapsed,
                    tokens_per_second=tokens / elapsed,
                )
                window.update(loss=0.0, micro=0, tokens=0.0, start=time.perf_counter(), steps=0)

            if step % t.eval_steps == 0 or last:
                metrics.update(evaluate())
                value = metrics.get(metric_name)
                if value is not None and is_better(value, state.best_metric, higher_better):
                    state.best_metric, state.best_step = value, step
                    with gathered_lora_state(engine) as lora_state:
                        if ctx.is_main:

                            def write_best(folder: Path) -> None:
                                save_adapter(engine, folder, lora_state)
                                (folder / "best.json").write_text(json.dumps({"step": step, metric_name: value}))
                                if generation is not None:
                                    generation.write_predictions(folder)

                            _replace_dir(output_dir / BEST_DIR, write_best)
                    barrier()
                window["start"] = time.perf_counter()  # evaluation time is not training throughput

            if state.micro_batch >= sampler.micro_batches_per_epoch():
                state.epoch, state.micro_batch = state.epoch + 1, 0  # the epoch is done
            if metrics or step % t.save_steps == 0:
                metrics.update(progress())
                if state.best_metric is not None:
                    metrics[f"best_{metric_name}"] = state.best_metric
                if step % t.save_steps == 0 or last:
                    with gathered_lora_state(engine) as lora_state, _staging(f"checkpoint-{step:06d}") as folder:
                        save_checkpoint(engine, folder, state, rank=ctx.rank, lora_state=lora_state)
                        reporter.report({**metrics, "finished": last}, folder)
                else:
                    reporter.report({**metrics, "finished": last}, None)
                last_metrics.update(metrics)
                window["start"] = time.perf_counter()
            if last:
                break

    # the final adapter, with the processor and the configs that produced it
    with gathered_lora_state(engine) as lora_state:
        if ctx.is_main:

            def write_final(folder: Path) -> None:
                save_adapter(engine, folder, lora_state)
                processor.save_pretrained(str(folder))
                write_resolved_configs(cfg, plan.deepspeed, folder)
                (folder / COMPLETE_MARKER).write_text(json.dumps({**last_metrics, "total_steps": total_steps}, default=str))

            _replace_dir(output_dir / FINAL_DIR, write_final)
    barrier()
    return last_metrics


def _replace_dir(target: Path, write: Any) -> None:
    """Write into a sibling folder, then swap it in: readers never see half a folder."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
