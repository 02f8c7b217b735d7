"""Sizes the plan prints before anything runs: parameters of a Qwen2.5-VL from its config.json
(a local folder or the Hugging Face cache; nothing is downloaded), trainable parameters of the
LoRA the config asks for, what one checkpoint writes, and how long a generation evaluation under
ZeRO-3 parameter offload takes. Pure arithmetic on the architecture: no torch, no model load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raytune_qvl.config.schema import Config

__all__ = ["model_dims", "Sizes", "estimate_sizes", "human_bytes", "OFFLOAD_BYTES_PER_SECOND"]

OFFLOAD_BYTES_PER_SECOND = 16e9  # host-to-GPU copy of offloaded parameters (PCIe 4.0 x16, effective)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_dims(name: str) -> dict[str, Any] | None:
    """config.json of a local checkpoint, or of a hub id already in the Hugging Face cache."""
    path = Path(name) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a hub id (a local folder that is not there)
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _text_shapes(t: dict[str, Any]) -> dict[str, tuple[int, int]]:
    h, inter = t["hidden_size"], t["intermediate_size"]
    kv = t.get("num_key_value_heads", t["num_attention_heads"]) * (h // t["num_attention_heads"])
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def _vision_shapes(v: dict[str, Any]) -> dict[str, tuple[int, int]]:
    h, inter = v["hidden_size"], v["intermediate_size"]
    return {"qkv": (h, 3 * h), "proj": (h, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def _params(dims: dict[str, Any]) -> int:
    t, v = dims.get("text_config") or dims, dims.get("vision_config") or {}
    text = t["num_hidden_layers"] * sum(a * b for a, b in _text_shapes(t).values())
    tied = dims.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    text += t["vocab_size"] * t["hidden_size"] * (1 if tied else 2)
    vision = 0
    if v:
        vision = v["depth"] * sum(a * b for a, b in _vision_shapes(v).values())
        patch = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2
        vision += patch * v["hidden_size"]
        merged = 4 * v["hidden_size"]  # the merger's 2x2 patch merge, then an MLP to the text width
        vision += merged * merged + merged * v.get("out_hidden_size", t["hidden_size"])
    return text + vision


def _merger_params(v: dict[str, Any], text_width: int) -> int:
    """Qwen2.5-VL's merger: an RMSNorm over the vision width, then Linear(4h, 4h) and Linear(4h, out)
    with biases."""
    merged, out = 4 * v["hidden_size"], v.get("out_hidden_size", text_width)
    return v["hidden_size"] + merged * merged + merged + merged * out + out


def _lora_params(dims: dict[str, Any], cfg: Config) -> int:
    """A and B of every target (and DoRA's magnitude per output), plus what trains in full."""
    t, v = dims.get("text_config") or dims, dims.get("vision_config") or {}
    lora = cfg.lora
    dora = 1 if lora.use_dora else 0
    shapes = _text_shapes(t)
    n = t["num_hidden_layers"] * sum(
        lora.r * (a + b) + dora * b for name, (a, b) in shapes.items() if name in lora.target_modules
    )
    if lora.vision_lora.enabled and v:
        vshapes = _vision_shapes(v)
        targets = lora.vision_lora.vision_target_modules
        n += v["depth"] * sum(
            lora.vision_lora.vision_r * (a + b) + dora * b for name, (a, b) in vshapes.items() if name in targets
        )
    for module in lora.modules_to_save or []:
        if module in ("lm_head", "embed_tokens"):
            n += t["vocab_size"] * t["hidden_size"]
    if cfg.training.train_merger and v and "merger" not in (lora.modules_to_save or []):
        n += _merger_params(v, t["hidden_size"])
    return n


def _saved_params(dims: dict[str, Any], cfg: Config, trainable: int) -> int:
    """What an adapter folder holds: PiSSA/OLoRA adapters are saved as a LoRA of twice the rank."""
    if cfg.training.finetuning_type == "full" or not cfg.lora.mutates_base:
        return trainable
    lora = cfg.lora
    doubled = lora.model_copy(
        update={
            "r": 2 * lora.r,
            "vision_lora": lora.vision_lora.model_copy(update={"vision_r": 2 * lora.vision_lora.vision_r}),
        }
    )
    return _lora_params(dims, cfg.model_copy(update={"lora": doubled}))


class Sizes:
    """The plan's size figures (bytes and parameter counts)."""

    def __init__(self, params: int, trainable: int, dtype_bytes: int, saved: int | None = None):
        self.params, self.trainable, self.dtype_bytes = params, trainable, dtype_bytes
        self.saved = trainable if saved is None else saved  # parameters an adapter folder holds

    @property
    def adapter_bytes(self) -> int:
        """The trained weights alone (the adapter written to best/ and final/)."""
        return self.saved * self.dtype_bytes

    @property
    def checkpoint_bytes(self) -> int:
        """An engine checkpoint: the trained weights, plus their fp32 master copy and Adam's two
        moments (12 bytes a parameter), over all ranks together."""
        return self.trainable * (self.dtype_bytes + 12)

    def generation_seconds(self, samples: int, batch: int, world: int, new_tokens: int) -> float:
        """A generation evaluation under ZeRO-3 with parameters offloaded to the CPU: every decoded
        token streams the whole model to each GPU (per rank, its batches run one after another)."""
        batches = -(-samples // max(batch * world, 1))
        return batches * new_tokens * self.params * self.dtype_bytes / OFFLOAD_BYTES_PER_SECOND


def estimate_sizes(cfg: Config) -> Sizes | None:
    """None when the model's config.json is not at hand (a hub id not yet downloaded)."""
    dims = model_dims(cfg.model.name)
    if dims is None:
        return None
    try:
        params = _params(dims)
        trainable = (
            _full_params(dims, cfg, params) if cfg.training.finetuning_type == "full" else _lora_params(dims, cfg)
        )
        saved = _saved_params(dims, cfg, trainable)
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return Sizes(params, trainable, _DTYPE_BYTES.get(cfg.model.torch_dtype, 2), saved)


def _full_params(dims: dict[str, Any], cfg: Config, params: int) -> int:
    """Full fine-tuning: every weight, less the vision tower's blocks and patch embedding when frozen."""
    v = dims.get("vision_config") or {}
    if not (cfg.training.freeze_vision_tower and v):
        return params
    tower = v["depth"] * sum(a * b for a, b in _vision_shapes(v).values())
    tower += v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * v["hidden_size"]
    return params - tower if tower < params else params


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
