"""Load Qwen2.5-VL from a hub id or a local folder: the class comes from `config.model_type`, the
attention implementation from what is installed (see config/plan.py)."""

from __future__ import annotations

import logging
from typing import Any

from raytune_qvl.config.plan import resolve_attention
from raytune_qvl.config.schema import Config
from raytune_qvl.data.processor import hub_kwargs
from raytune_qvl.errors import ConfigError, Problem

__all__ = ["SUPPORTED_MODEL_TYPES", "torch_dtype", "load_model"]

log = logging.getLogger("raytune_qvl")

# LoRA targeting and the data pipeline rely on these architectures' module names and tokens.
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")


def torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_model(cfg: Config, *, on_gpu: bool = False) -> Any:
    """The base model (no LoRA yet), chosen by `config.model_type`."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    hf_config = AutoConfig.from_pretrained(cfg.model.name, **hub_kwargs(cfg))
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            [
                Problem(
                    cfg.model.name,
                    "model.name",
                    f"model type {hf_config.model_type!r} is not supported; "
                    f"raytune_qvl fine-tunes {', '.join(SUPPORTED_MODEL_TYPES)}",
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
        **hub_kwargs(cfg),
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
