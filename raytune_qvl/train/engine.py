"""The DeepSpeed engine: process group (gloo on CPU, NCCL on GPU, the same code), the filled
config adapted to the device, engine state save/load and ZeRO-3-safe adapter gathering."""

from __future__ import annotations

import copy
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = [
    "WorkerContext",
    "count_nodes",
    "check_data_agrees",
    "init_distributed",
    "device_config",
    "build_engine",
    "gathered_trainable_state",
    "release_gathered",
    "barrier",
    "all_reduce_sum",
    "all_reduce_min",
    "device_sum",
]

log = logging.getLogger("raytune_qvl")


@dataclass(frozen=True)
class WorkerContext:
    """Who this process is in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    on_gpu: bool = False
    node: str = ""  # the Ray node (or host) this worker runs on

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(ctx: WorkerContext) -> None:
    """Join the process group. Under Ray Train it already exists (TorchConfig backend); a
    process run without Ray makes a group of one on a free local port."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", str(ctx.rank))
        os.environ.setdefault("WORLD_SIZE", str(ctx.world_size))
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
    if not ctx.on_gpu:
        # DeepSpeed's shared-memory op serves only its inference all-reduce; training all-reduces
        # go through torch.distributed. Skipping it saves a ~45 s JIT compile on a fresh machine.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if ctx.on_gpu else "gloo", verbose=False)


def device_config(ds: dict[str, Any], *, on_gpu: bool) -> tuple[dict[str, Any], list[str]]:
    """Adapt the filled config to the device. Without optimizer offload, DeepSpeed's FusedAdam
    would be JIT-compiled on first use (nvcc matching torch's CUDA on every node, a build lock
    that concurrent workers contend for; on CPU for nothing): the JSON's Adam/AdamW block runs as
    torch.optim.AdamW instead, with its lr, betas, eps and weight decay, fused on GPUs (the same
    update, no compilation). A block that sets `torch_adam` or `fused` itself is left as written.
    Offload's DeepSpeedCPUAdam is a compiled op too: `ops.check_ops` says before any trial
    whether this machine has it."""
    out = copy.deepcopy(ds)
    notes = []
    zero = out.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    optimizer = out.get("optimizer") or {}
    if offload or str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return out, notes
    params = optimizer.setdefault("params", {})
    if "torch_adam" in params or params.get("bias_correction") is False:  # torch's Adam always corrects
        return out, notes
    params["torch_adam"] = True
    # what FusedAdam takes and torch's AdamW does not (it would stop deepspeed.initialize on every rank)
    dropped = sorted(k for k in params if k not in _torch_adamw_params())
    for key in dropped:
        del params[key]
    if dropped:
        notes.append(f"optimizer: {', '.join(dropped)} dropped (DeepSpeed's FusedAdam only; torch's AdamW does that)")
    if on_gpu:
        params.setdefault("fused", True)
        notes.append("GPU: optimizer runs as torch.optim.AdamW(fused=True): no DeepSpeed op to compile")
    else:
        notes.append("CPU: optimizer runs as torch.optim.AdamW (torch_adam)")
    return out, notes


def _torch_adamw_params() -> set[str]:
    """The optimizer block's keys a torch_adam block may keep: torch.optim.AdamW's own, and those
    DeepSpeed takes out before it builds it."""
    import inspect

    import torch

    return (set(inspect.signature(torch.optim.AdamW).parameters) - {"params"}) | {
        "torch_adam",
        "adam_w_mode",
        "fp32_optimizer_states",
    }


def build_engine(model: Any, ds_config: dict[str, Any], groups: list[dict[str, Any]] | None = None) -> Any:
    """A DeepSpeed engine over the trainable parameters only (or over `groups`, each with its own
    `lr` and `lr_scale`: per-module rates, LoRA+); its optimizer and LR scheduler come from the
    (filled) config."""
    import deepspeed

    plain = groups is None or all(g.get("lr_scale", 1.0) == 1.0 for g in groups)
    if plain:
        params: Any = [p for p in model.parameters() if p.requires_grad]
    else:
        params = groups
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    if scheduler is not None:
        if hasattr(scheduler, "max_lrs") and not plain:
            # WarmupLR and WarmupDecayLR give every group the config's one warm-up range (WarmupCosineLR
            # scales each group's own rate): scale each group's range by its lr_scale
            scales = [g.get("lr_scale", 1.0) for g in scheduler.optimizer.param_groups]
            scheduler.min_lrs = [lr * k for lr, k in zip(scheduler.min_lrs, scales)]
            scheduler.max_lrs = [lr * k for lr, k in zip(scheduler.max_lrs, scales)]
            scheduler.delta_lrs = [hi - lo for hi, lo in zip(scheduler.max_lrs, scheduler.min_lrs)]
        # DeepSpeed's schedulers set the rate for "before the first step" (0 in a warm-up) at creation
        # and step after each optimizer step: start them at the first step, so that step trains at the
        # warm-up's first rate (a resume then restores the scheduler's own position)
        scheduler.step(0)
    return engine


def release_gathered(engine: Any) -> None:
    """Under ZeRO-3, partition again every weight still gathered (or in flight) from the last
    forward: after an evaluation, whose forward passes leave the prefetcher's weights behind, and
    before weights are gathered for a save. Nothing under ZeRO-1/2. Every rank calls it together."""
    if hasattr(getattr(engine, "optimizer", None), "empty_partition_cache"):
        engine.empty_partition_cache()


@contextmanager
def gathered_trainable_state(engine: Any) -> Iterator[dict[str, Any]]:
    """The trained weights by their parameter names, on every rank: the LoRA weights (and
    `modules_to_save`) of a LoRA run, every weight of a full fine-tuning run. Under ZeRO-3 they
    are partitioned (a plain save would write empty tensors), so they are gathered first; every
    rank must enter this together. The names are the model's own, unfiltered: peft's
    `save_pretrained` filters them once (a dict filtered by `get_peft_model_state_dict` before
    would be filtered twice, which loses `modules_to_save`)."""
    import deepspeed

    trainable = [(name, param) for name, param in engine.module.named_parameters() if param.requires_grad]
    params = [param for _, param in trainable]
    if any(hasattr(param, "ds_id") for param in params):
        release_gathered(engine)  # a weight still in flight from a prefetch cannot be gathered
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield {name: param.detach().cpu().clone() for name, param in trainable}
    else:
        yield {name: param.detach().cpu().clone() for name, param in trainable}


def count_nodes(ctx: WorkerContext) -> int:
    """Distinct nodes across the workers (every rank calls this together)."""
    import socket

    import torch.distributed as dist

    mine = ctx.node or socket.gethostname()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 1
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, mine)
    return len(set(nodes))


def check_data_agrees(ctx: WorkerContext, splits: dict[str, tuple[str, str, int]]) -> None:
    """Stop every rank, before the step plan, when the ranks' data differ: `splits` maps a split
    to (file, fingerprint, sample count) as this rank prepared it. Each rank computes its steps
    from its own count, so a node with another copy of the data would otherwise hang in a
    collective instead of failing. One gather, every rank raises the same error."""
    import torch.distributed as dist

    from raytune_qvl.errors import DataError, Problem

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = (ctx.rank, ctx.node or socket.gethostname(), {k: v[1:] for k, v in splits.items()})
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    _, first_node, first = everyone[0]
    for rank, node, theirs in everyone[1:]:
        for split in sorted(first.keys() | theirs.keys()):
            if first.get(split) == theirs.get(split):
                continue
            (fp_a, n_a), (fp_b, n_b) = first.get(split, ("none", 0)), theirs.get(split, ("none", 0))
            source = splits[split][0] if split in splits else f"data.{split}_path"
            raise DataError(
                [
                    Problem(
                        source,
                        f"data.{split}_path",
                        f"rank {rank} on node {node} has {n_b} samples (data fingerprint {fp_b}), "
                        f"rank 0 on node {first_node} has {n_a} ({fp_a}): every node needs the same data "
                        "file, images and processor files (or put data and cache on shared storage)",
                        show_value=False,
                    )
                ]
            )


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _stack(values: list[Any], device: Any) -> Any:
    """Python numbers and device tensors as one float64 tensor on `device`, without reading any
    tensor back to the host."""
    import torch

    return torch.stack([torch.as_tensor(v, device=device).to(torch.float64).reshape(()) for v in values])


def _reduce(values: list[Any], op: str, device: Any) -> list[float]:
    """One all-reduce of `values` (numbers or 0-d tensors), read back: a host sync."""
    import torch.distributed as dist

    tensor = _stack(values, device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor.tolist()


def all_reduce_sum(values: list[Any], device: Any) -> list[float]:
    return _reduce(values, "sum", device)


def all_reduce_min(values: list[Any], device: Any) -> list[float]:
    return _reduce(values, "min", device)


def device_sum(value: float, device: Any) -> Any:
    """The sum over ranks of one number, left on the device as a float32 0-d tensor: no host
    sync (the CUDA stream is not drained), for values only device code reads."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(float(value), dtype=torch.float32).to(device, non_blocking=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor
