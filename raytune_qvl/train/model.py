"""Load Qwen2.5-VL from a hub id or a local folder: the class comes from `config.model_type`, the
attention implementation from what is installed (see config/plan.py)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

from raytune_qvl.config.plan import resolve_attention
from raytune_qvl.config.schema import Config
from raytune_qvl.data.processor import hub_kwargs
from raytune_qvl.errors import ConfigError, Problem

__all__ = ["SUPPORTED_MODEL_TYPES", "torch_dtype", "partitioned", "load_model", "rope_index_of"]

log = logging.getLogger("raytune_qvl")

# LoRA targeting and the data pipeline rely on these architectures' module names and tokens.
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")


def torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


@contextmanager
def partitioned(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """transformers partitions at load while an HfDeepSpeedConfig of a ZeRO-3 config is alive (it
    keeps a weak reference), and peft gathers the base weights its initialisations read (DoRA's
    norms, PiSSA's SVD) while it is: load and wrap the model inside it. Dropped afterwards, so that
    a later plain load is a plain load. Not nested: the reference is to the newest config."""
    stage = ((ds_config or {}).get("zero_optimization") or {}).get("stage", 0)
    if stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep


def load_model(cfg: Config, *, on_gpu: bool = False) -> Any:
    """The base model (no LoRA yet), chosen by `config.model_type`. Inside `partitioned` of a ZeRO-3
    config (the filled one the engine is built from), every weight is partitioned across the ranks
    as it is loaded (DeepSpeed's zero.Init through transformers' HfDeepSpeedConfig), so no rank
    holds the whole model in memory on its way to the engine."""
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
    capability = torch.cuda.get_device_capability() if on_gpu and torch.cuda.is_available() else None
    attn = resolve_attention(
        cfg.model.attn_implementation, on_gpu=on_gpu, dtype_name=cfg.model.torch_dtype, capability=capability
    )
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.model.name,
        config=hf_config,
        dtype=torch_dtype(cfg.model.torch_dtype),
        attn_implementation=attn,
        **hub_kwargs(cfg),
    )
    # no KV cache while training (generation turns it on); transformers 5 reads it from the text config
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False
    if cfg.environment.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    return model


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing, which works with frozen inputs: with LoRA the
    embeddings are frozen, so the input must require grad for the checkpointed blocks to backprop."""
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def rope_index_of(model: Any) -> Any:
    """The model's own `get_rope_index` (Qwen2.5-VL's 3-D M-RoPE positions), found once inside
    any wrapper (DeepSpeed engine, peft) and kept on the outermost object. It computes from token
    ids and image grids only, so it needs no gathered parameters under ZeRO-3."""
    found = getattr(model, "_raytune_qvl_rope_index", None)
    if found is None:
        root = getattr(model, "module", model)  # a DeepSpeed engine wraps the module
        for module in root.modules():
            if type(module).__name__.endswith("VLModel") and hasattr(module, "get_rope_index"):
                found = module.get_rope_index
                break
        else:
            raise TypeError(f"{type(root).__name__} has no get_rope_index: packing needs a Qwen2.5-VL model")
        model._raytune_qvl_rope_index = found
    return found
