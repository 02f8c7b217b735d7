"""What the training loop works with, built once per worker by `setup`: the process group, the
prepared data, the model with LoRA inside a DeepSpeed engine, and the resume point. Ray enters
only through the `Reporter` it is given (see worker.py); `LocalReporter` runs it in one process
(`python -m raytune_qvl.train --no-ray`, profiling, a GPU box without Ray)."""

from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from raytune_qvl.config.plan import is_flash
from raytune_qvl.config.schema import Config
from raytune_qvl.errors import ConfigError, Problem
from raytune_qvl.train.checkpoint import (
    TrainState,
    has_engine_state,
    latest_local_checkpoint,
    load_checkpoint,
    prune_local_checkpoints,
)
from raytune_qvl.train.engine import (
    WorkerContext,
    build_engine,
    check_data_agrees,
    count_nodes,
    device_config,
    init_distributed,
    release_gathered,
)
from raytune_qvl.train.ops import check_ops
from raytune_qvl.train.outputs import ran_out_of_memory

__all__ = ["Reporter", "LocalReporter", "Session", "setup", "seed_everything", "mmap_threshold"]

log = logging.getLogger("raytune_qvl")


class Reporter(Protocol):
    """Where metrics and checkpoints go: Ray Train (worker.py) or a local folder."""

    # rank 0 runs on another node than the driver: the outputs it writes (final/, best/) travel
    # in the last checkpoint through storage_path, and the driver fetches them (outputs.py)
    ships_outputs: bool

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...

    def due(self) -> bool:
        """Whether a log-only report would go out now without the worker waiting for it
        (asked on rank 0; the loop holds the row back otherwise, see reports.py)."""
        ...

    def resume_checkpoint(self) -> Path | None: ...


class LocalReporter:
    """One process, no Ray: checkpoints under <output.dir>/checkpoints, the newest kept
    `save_total_limit`; metrics to a callback (the CLI's progress and MLflow)."""

    ships_outputs = False  # the driver is this process

    def __init__(self, cfg: Config, on_metrics: Any = None, resume_from: str | None = None):
        self.root = Path(cfg.output.dir) / "checkpoints"
        self.keep = cfg.training.save_total_limit
        self.on_metrics = on_metrics
        self.resume_from = resume_from

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        if checkpoint is not None:  # a divergence marker is kept too: a rerun must not resume
            target = self.root / checkpoint.name
            if checkpoint.resolve() != target.resolve():
                shutil.rmtree(target, ignore_errors=True)
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.copytree(checkpoint, target)
            prune_local_checkpoints(self.root, self.keep)
        if self.on_metrics is not None:
            self.on_metrics(metrics)

    def due(self) -> bool:
        return True  # a callback in this process: nothing to wait on

    def resume_checkpoint(self) -> Path | None:
        if self.resume_from:
            return Path(self.resume_from)
        return latest_local_checkpoint(self.root)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Session:
    """Everything the loop works with, built once by `setup`."""

    cfg: Config
    ctx: WorkerContext
    reporter: Reporter
    engine: Any
    processor: Any
    plan: Any
    dataset: Any
    eval_dataset: Any
    collator: Any
    sampler: Any
    generation: Any
    test: Any  # (dataset, GenerationEval) of the held-out test split, read at the last step only; or None
    state: TrainState
    resumed: bool
    start_step: int  # the step this process started from
    num_nodes: int  # nodes the workers span
    started_at: float  # wall-clock time the run (or trial) was launched, for setup_seconds
    data_seconds: float  # this worker's data preparation (a cache read when prepared before)
    rss_before_model: float = 0.0  # host RSS (bytes) before the model loaded: what training adds is measured from it
    peak_before_model: float = 0.0  # the process's peak RSS (bytes) then (data preparation in a --no-ray run)
    peak_reset: bool = False  # the kernel's peak-RSS mark was reset there: ru_maxrss is the peak since
    rss_phases: dict[str, float] = field(
        default_factory=dict
    )  # host RSS (bytes) after loading, the engine, its first step
    peak_loading: float = 0.0  # peak RSS (bytes) while the model loaded and the engine was built; reset after
    attention: str = "sdpa"  # the attention implementation this worker loaded the model with (resolved here)


def peak_rss() -> float:
    """This process's peak RSS in bytes: the kernel's high-water mark (VmHWM, Linux), which
    /proc/self/clear_refs resets; getrusage's ru_maxrss where there is none (it also counts the
    parent's RSS at the fork before this program started: a run launched by a large process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024.0  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux


def _reset_peak_rss() -> tuple[float, bool]:
    """The process's peak RSS so far (bytes), and whether the kernel's mark was reset to the current
    RSS (Linux: /proc/self/clear_refs), so that the peak at the run's end is the model's and
    training's own, not the data preparation's that ran before in this process."""
    peak = peak_rss()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak, True
    except OSError:
        return peak, False


MMAP_THRESHOLD = 1 << 20  # bytes: a freed block at least this large goes back to the OS at once
ZERO3_MMAP_THRESHOLD = 256 << 10  # under ZeRO-3: the gathers' per-rank pieces are smaller than 1 MB


def mmap_threshold(ds_config: dict[str, Any]) -> int:
    """The malloc mmap threshold of a CPU worker: 1 MB, or 256 KB under ZeRO-3, whose every step
    gathers and frees each weight in pieces of about its size / world size. At 1 MB the pieces below
    it left a 394M model's ZeRO-3 workers with ~0.55 GB of freed heap after one step (malloc_trim
    returned it); at 256 KB that is gone. Not lower everywhere: at 64 KB the tiny model's ZeRO-2 loop
    ran ~40% slower (activations mmap'd and faulted in again each step), at 256 KB ~5%."""
    stage = int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0) or 0)
    return ZERO3_MMAP_THRESHOLD if stage == 3 else MMAP_THRESHOLD


def fixed_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc's malloc raises its mmap threshold to the largest block freed so far (up to 32 MB);
    from then on the tensors a CPU worker frees go back to its heap, fragmented, and its RSS only
    grows. Under ZeRO-3 every gathered weight is such a block: a 2-worker run of the 394M bench
    model grew by ~2.7 GB over 3 steps that way, more than the weights it partitions. A fixed
    threshold (mallopt M_MMAP_THRESHOLD) keeps every block from `threshold` bytes mmap'd, unmapped
    when freed. CPU training only (a GPU's tensors are CUDA's allocator's); a MALLOC_MMAP_THRESHOLD_
    set in the environment wins. False where there is no glibc."""
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _import_training_code() -> None:
    """The model's and DeepSpeed's modules, imported before the host RSS the memory estimate is
    compared with is read (they are tens of MB of Python, not the training's tensors)."""
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401


def setup(cfg: Config, ctx: WorkerContext, reporter: Reporter, started_at: float | None = None) -> Session:
    """Process group, data, model + LoRA, DeepSpeed engine, and the resume point.
    `started_at`: when the run was launched (default now), to report the set-up time."""
    started_at = time.time() if started_at is None else started_at
    from raytune_qvl.config.plan import make_plan
    from raytune_qvl.data.audit import check_audit
    from raytune_qvl.data.batches import Collator, EpochSampler, PackingCollator, TrainDataset, sample_lengths
    from raytune_qvl.data.cache import load_or_prepare
    from raytune_qvl.data.processor import load_processor
    from raytune_qvl.train.evaluate import GenerationEval
    from raytune_qvl.train.lora import format_parts, make_trainable, param_groups, trainable_by_part
    from raytune_qvl.train.model import load_model, partitioned

    t = cfg.training
    if not ctx.on_gpu:
        fixed_mmap_threshold(
            mmap_threshold(cfg.deepspeed)
        )  # before the data and the model: freed tensors return to the OS
    init_distributed(ctx)
    seed_everything(cfg.environment.seed)  # the same LoRA initialisation on every worker

    # data: prepared once per node (cached), audited, then sharded by the sampler
    processor = load_processor(cfg)
    data_started = time.perf_counter()
    train_split = load_or_prepare(cfg, processor, "train")
    eval_split = load_or_prepare(cfg, processor, "eval")
    test_split = load_or_prepare(cfg, processor, "test")
    data_seconds = time.perf_counter() - data_started
    splits = {"train": train_split, "eval": eval_split, "test": test_split}
    check_data_agrees(ctx, {k: (v.audit.path, v.fingerprint, len(v.items)) for k, v in splits.items() if v is not None})
    check_audit(train_split.audit, cfg.data)
    for split in (eval_split, test_split):
        if split is not None:
            check_audit(split.audit, cfg.data)
    plan = make_plan(cfg, num_samples=len(train_split.items), lengths=train_split.audit.lengths())

    # model (partitioned as it loads under ZeRO-3) + LoRA (or every weight, for full fine-tuning) + DeepSpeed
    earlier = ran_out_of_memory(Path(cfg.output.dir), t.per_device_train_batch_size, started_at)
    if earlier:  # a worker group restarted after running out of memory would only do it again
        import torch

        raise torch.OutOfMemoryError(f"{earlier} (in an earlier attempt of this run; not loading the model again)")
    ds_config, notes = device_config(plan.deepspeed, on_gpu=ctx.on_gpu)
    import psutil

    _import_training_code()  # their modules are not what the memory estimate counts
    process = psutil.Process()
    peak_before_model, peak_reset = _reset_peak_rss()
    rss_before_model = float(process.memory_info().rss)
    missing = check_ops(ds_config, on_gpu=ctx.on_gpu)  # before minutes of model loading
    if missing:
        source = cfg.paths.deepspeed or "DeepSpeed config"
        raise ConfigError([Problem(source, "optimizer", line, show_value=False) for line in missing])
    with partitioned(ds_config):
        model = make_trainable(load_model(cfg, on_gpu=ctx.on_gpu), cfg)
    rss_phases = {"loaded": float(process.memory_info().rss)}
    attention = str(getattr(model.config, "_attn_implementation", None) or "eager")
    groups = param_groups(model, cfg)
    if ctx.is_main:
        log.info("attention: %s (as the workers resolved it)", attention)
        log.info(format_parts(trainable_by_part(model)))
        if len(groups) > 1:
            rates = ", ".join(f"{g['name']} {g['lr']:.3g}" for g in groups)
            log.info("learning rates by group: %s", rates)
        for note in notes:
            log.info("%s", note)
    engine = build_engine(model, ds_config, groups)
    rss_phases["engine"] = float(process.memory_info().rss)
    # loading's peak apart from training's: under ZeRO-3 rank 0 maps the whole checkpoint while it
    # loads (transformers reads it there and scatters it), a peak of file pages that training never has
    peak_loading, _ = _reset_peak_rss() if peak_reset else (peak_rss(), False)
    seed_everything(cfg.environment.seed + ctx.rank)  # dropout differs across workers, reproducibly

    state = TrainState(micro_size=t.per_device_train_batch_size)
    resume = reporter.resume_checkpoint()
    if resume is not None:
        state = load_checkpoint(engine, resume, rank=ctx.rank)
        # ZeRO-3 adds a weight a module reads from another (peft's LoRA layer reads lora_A's dtype)
        # to the reading module the first time it finds that weight partitioned. A new engine holds
        # its small persistent weights partitioned, so this happens in the step whose trace is
        # recorded; a loaded one holds them gathered, so it happened a step later, the prefetch
        # queue no longer matched the modules and training stopped ("tracing error at step N")
        release_gathered(engine)
        state.count_in_micro_batches_of(t.per_device_train_batch_size)
        if not has_engine_state(resume) and state.global_step < plan.total_steps:
            raise RuntimeError(
                f"{resume} holds the adapter only (training.final_checkpoint adapter), at step "
                f"{state.global_step} of {plan.total_steps}: it cannot be resumed; rerun with --overwrite"
            )
        if ctx.is_main:
            log.info("resumed from %s at step %d (epoch %d)", resume, state.global_step, state.epoch)

    dataset = TrainDataset(train_split.items, processor)
    return Session(
        cfg=cfg,
        ctx=ctx,
        reporter=reporter,
        engine=engine,
        processor=processor,
        plan=plan,
        dataset=dataset,
        eval_dataset=TrainDataset(eval_split.items, processor) if eval_split is not None else None,
        collator=(
            PackingCollator(processor.tokenizer.pad_token_id, cfg.data.max_length, one_row=is_flash(attention))
            if cfg.data.packing
            else Collator(processor.tokenizer.pad_token_id)
        ),
        sampler=EpochSampler(
            len(dataset),
            micro=t.per_device_train_batch_size,
            accum=t.gradient_accumulation_steps,
            rank=ctx.rank,
            world=ctx.world_size,
            seed=cfg.data.preprocessing.seed,
            shuffle=cfg.data.preprocessing.shuffle,
            lengths=sample_lengths(train_split.items) if cfg.data.group_by_length else None,
        ),
        generation=GenerationEval.create(cfg, eval_split, processor, ctx) if eval_split is not None else None,
        test=(
            (TrainDataset(test_split.items, processor), GenerationEval.create(cfg, test_split, processor, ctx))
            if test_split is not None
            else None
        ),
        state=state,
        resumed=resume is not None,
        start_step=state.global_step,
        num_nodes=count_nodes(ctx),
        started_at=started_at,
        data_seconds=data_seconds,
        attention=attention,
        rss_before_model=rss_before_model,
        peak_before_model=peak_before_model,
        peak_reset=peak_reset,
        rss_phases=rss_phases,
        peak_loading=peak_loading,
    )
