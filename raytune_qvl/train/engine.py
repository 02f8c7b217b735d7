"""The DeepSpeed engine: process group (gloo on CPU, NCCL on GPU, the same code), the filled
config adapted to the device, engine state save/load and ZeRO-3-safe adapter gathering."""

from __future__ import annotations

import copy
import logging
import os
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = [
    "WorkerContext",
    "count_nodes",
    "init_distributed",
    "device_config",
    "build_engine",
    "gathered_lora_state",
    "barrier",
    "all_reduce_sum",
    "all_reduce_max",
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

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
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
    """Adapt the filled config to the device. On CPU without optimizer offload, DeepSpeed's
    fused Adam would be JIT-compiled for nothing: torch's AdamW (same update) is used."""
    out = copy.deepcopy(ds)
    notes = []
    zero = out.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    if not on_gpu and not offload and str(out.get("optimizer", {}).get("type", "")).lower() in ("adam", "adamw"):
        out["optimizer"].setdefault("params", {})["torch_adam"] = True
        notes.append("CPU: optimizer runs as torch.optim.AdamW (torch_adam)")
    return out, notes


def build_engine(model: Any, ds_config: dict[str, Any]) -> Any:
    """A DeepSpeed engine over the trainable parameters only; its optimizer and LR scheduler
    come from the (filled) config."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, _optimizer, _loader, _scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config
    )
    return engine


@contextmanager
def gathered_lora_state(engine: Any) -> Iterator[dict[str, Any] | None]:
    """The adapter's full state dict, on every rank. Under ZeRO-3 the LoRA weights are
    partitioned (a plain save would write empty tensors), so they are gathered first; every
    rank must enter this together."""
    import deepspeed
    from peft import get_peft_model_state_dict

    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    partitioned = any(hasattr(p, "ds_id") for p in trainable)
    if partitioned:
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            yield {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    else:
        yield {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


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


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _reduce(values: list[float], op: str, device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def all_reduce_sum(values: list[float], device: Any) -> list[float]:
    return _reduce(values, "sum", device)


def all_reduce_max(values: list[float], device: Any) -> list[float]:
    return _reduce(values, "max", device)
