"""Load Qwen2.5-VL and its processor from a hub id or a local folder: the class comes from
`config.model_type`, the attention implementation from what is installed, image sizes from the
data config."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from raytune_qvl.config import Config, DataConfig
from raytune_qvl.errors import ConfigError, Problem

__all__ = ["SUPPORTED_MODEL_TYPES", "resolve_attention", "torch_dtype", "load_processor", "configure_processor", "load_model"]

log = logging.getLogger("raytune_qvl")

# LoRA targeting and the data pipeline rely on these architectures' module names and tokens.
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def resolve_attention(requested: str, *, on_gpu: bool, dtype_name: str) -> str:
    """flash_attention_2 when asked and usable (flash-attn importable, a GPU, half precision);
    otherwise sdpa, with one warning line."""
    if requested != "flash_attention_2":
        return requested
    reason = None
    if importlib.util.find_spec("flash_attn") is None:
        reason = "flash-attn is not installed (pip install 'raytune_qvl[gpu]')"
    elif not on_gpu:
        reason = "FlashAttention-2 needs a GPU"
    elif dtype_name == "float32":
        reason = "FlashAttention-2 needs bfloat16 or float16"
    if reason:
        _warn_once(f"attn_implementation flash_attention_2 requested but {reason}; using sdpa")
        return "sdpa"
    return requested


def torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _model_kwargs(cfg: Config) -> dict[str, Any]:
    return {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}


def configure_processor(processor: Any, data: DataConfig) -> Any:
    """Bound the image area by the data config: min_pixels = min_image_size**2 and
    max_pixels = max_image_size**2 (the seed's sizes are the long side of a square image).

    The `size` dict is what the image processor reads (a `min_pixels` given to
    `from_pretrained` can be silently ignored); it is saved with the processor.
    """
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    if factor != data.image_factor:
        raise ConfigError(
            [Problem("data", "data.image_factor", f"the model's vision tower uses {factor} (patch x merge); set {factor}", data.image_factor)]
        )
    min_pixels, max_pixels = data.min_image_size**2, data.max_image_size**2
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if getattr(ip, "min_pixels", None) is not None:  # transformers < 5 also reads these
        ip.min_pixels, ip.max_pixels = min_pixels, max_pixels
    return processor


def load_processor(cfg: Config) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(cfg.model.name, **_model_kwargs(cfg))
    if not hasattr(processor, "image_processor"):
        raise ConfigError(
            [Problem(cfg.model.name, "model.name", "AutoProcessor returned no image processor: not a vision-language checkpoint", type(processor).__name__)]
        )
    return configure_processor(processor, cfg.data)


def load_model(cfg: Config, *, on_gpu: bool = False) -> Any:
    """The base model (no LoRA yet), chosen by `config.model_type`."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    hf_config = AutoConfig.from_pretrained(cfg.model.name, **_model_kwargs(cfg))
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            [
                Problem(
                    cfg.model.name,
                    "model.name",
                    f"model type {hf_config.model_type!r} is not supported; raytune_qvl fine-tunes {', '.join(SUPPORTED_MODEL_TYPES)}",
                    hf_config.model_type,
                )
            ]
        )
    attn = resolve_attention(cfg.model.attn_implementation, on_gpu=on_gpu, dtype_name=cfg.model.torch_dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.model.name,
        config=hf_config,
        dtype=torch_dtype(cfg.model.torch_dtype),
        attn_implementation=attn,
        **_model_kwargs(cfg),
    )
    model.config.use_cache = False  # no KV cache while training (generation turns it on)
    if cfg.environment.gradient_checkpointing:
        # non-reentrant checkpointing works with frozen inputs; with LoRA the embeddings are
        # frozen, so the input must require grad for the checkpointed blocks to backprop
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    return model
