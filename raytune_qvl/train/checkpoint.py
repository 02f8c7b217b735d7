"""Checkpoint folders: the adapter (loadable by peft), the DeepSpeed engine state (optimizer,
scheduler; frozen base weights excluded), the data position and every rank's RNG state.

    checkpoint-000016/
      adapter/               adapter_config.json + adapter_model.safetensors (rank 0; LoRA runs)
      state/                 DeepSpeed engine + ZeRO optimizer shards (every rank its own)
      trainer_state.json     step, epoch, position in the epoch, samples seen, best metric
      rng_state_<rank>.pt    python, numpy, torch (and this rank's CUDA device) generators

A run's last checkpoint may hold the adapter and trainer_state.json only (training.final_checkpoint
adapter): a restart after the run's final report finds it finished and has nothing to load.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "TrainState",
    "ADAPTER_DIR",
    "STATE_FILE",
    "save_checkpoint",
    "load_checkpoint",
    "has_engine_state",
    "save_trained",
    "is_lora",
    "latest_local_checkpoint",
    "prune_local_checkpoints",
]

ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.json"
ENGINE_TAG = "state"


@dataclass
class TrainState:
    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    micro_batch: int = 0  # micro-batches of this epoch already trained (on every worker)
    micro_size: int = 0  # the samples in one of those micro-batches (0: a checkpoint from before it was kept)
    samples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals: int = 0  # evaluations run (generation eval runs every N-th)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def count_in_micro_batches_of(self, micro: int) -> None:
        """Count this epoch's trained micro-batches in micro-batches of `micro` samples. A resume may
        split the same effective batch differently (an out-of-memory retry halves the micro batch and
        doubles the accumulation): its epoch goes on at the same sample, which the count in the old
        size would misplace. A whole number of optimizer steps of the same size was trained, so the
        samples divide by the new micro batch."""
        if self.micro_size and self.micro_size != micro:
            self.micro_batch = self.micro_batch * self.micro_size // micro
        self.micro_size = micro

    @classmethod
    def from_file(cls, path: Path) -> "TrainState":
        return cls(**json.loads(path.read_text()))


def _rng_state() -> dict[str, Any]:
    """Generator states as tensors and plain values, so they load with weights_only=True."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # this rank's device only: a restart may place ranks on other devices
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if isinstance(state.get("cuda"), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_lora(engine: Any) -> bool:
    return hasattr(engine.module, "peft_config")


def save_trained(engine: Any, directory: Path, trained: dict[str, Any]) -> None:
    """Write what was trained from an already gathered state dict (rank 0 only): a peft adapter
    folder for LoRA, a whole checkpoint folder (config + weights, loadable by from_pretrained)
    for full fine-tuning. A PiSSA/OLoRA adapter is written converted for the unchanged base (see
    `lora.converted_adapter`)."""
    from raytune_qvl.train.lora import converted_adapter

    model = engine.module
    converted = converted_adapter(model, trained) if is_lora(engine) else None
    if converted is None:
        model.save_pretrained(str(directory), state_dict=trained, safe_serialization=True)
        return
    state, config = converted
    own = model.peft_config["default"]
    model.peft_config["default"] = config
    try:
        model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
    finally:
        model.peft_config["default"] = own


def save_checkpoint(
    engine: Any, directory: Path, state: TrainState, *, rank: int, trained: dict[str, Any], engine_state: bool = True
) -> None:
    """Every rank calls this together (DeepSpeed writes its own shard on each). A LoRA run's
    checkpoint also holds its adapter (the engine state of a full run already is the model);
    `engine_state` False (LoRA only): the adapter and the trainer state alone, for a finished run."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    if engine_state or not is_lora(engine):
        engine.save_checkpoint(str(directory), tag=ENGINE_TAG, exclude_frozen_parameters=True)
        torch.save(_rng_state(), directory / f"rng_state_{rank}.pt")
    if rank == 0:
        if is_lora(engine):
            save_trained(engine, directory / ADAPTER_DIR, trained)
        (directory / STATE_FILE).write_text(state.to_json())


def has_engine_state(directory: Path) -> bool:
    """Whether a checkpoint holds the engine's state (not a finished run's adapter-only one)."""
    return (directory / ENGINE_TAG).is_dir()


def load_checkpoint(engine: Any, directory: Path, *, rank: int) -> TrainState:
    """The engine, RNG and trainer state of a checkpoint; of an adapter-only one (a finished run:
    nothing is left to train), the trainer state alone."""
    import torch

    if not has_engine_state(directory):
        return TrainState.from_file(directory / STATE_FILE)

    engine.load_checkpoint(
        str(directory),
        tag=ENGINE_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    rng = directory / f"rng_state_{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=True))
    return TrainState.from_file(directory / STATE_FILE)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_local_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root (one whose trainer_state.json was written)."""
    done = [p for p in root.glob("checkpoint-*") if (p / STATE_FILE).exists()]
    return max(done, key=_step_of) if done else None


def prune_local_checkpoints(root: Path, keep: int) -> None:
    done = sorted((p for p in root.glob("checkpoint-*") if (p / STATE_FILE).exists()), key=_step_of)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
