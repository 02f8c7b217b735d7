"""What trains: every weight (full fine-tuning), or LoRA adapters (the default) on the language
model's target modules, and on the vision tower only when `vision_lora.enabled` (with its own rank
and alpha through peft's rank_pattern/alpha_pattern).

The seed's target names also match the vision tower's MLP (gate_proj/up_proj/down_proj), so
names alone are not enough: targets are anchored to the part of the model they belong to.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from raytune_qvl.config.schema import LoraConfig

__all__ = [
    "target_regex",
    "peft_config",
    "apply_lora",
    "make_trainable",
    "parameter_parts",
    "trainable_by_part",
    "format_parts",
]

_LANGUAGE = r"language_model"  # Qwen2.5-VL: model.language_model.layers.N...
_VISION = r"visual\.blocks"  # Qwen2.5-VL: model.visual.blocks.N... (the merger is visual.merger)


def _alternatives(names: list[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def target_regex(lora: LoraConfig) -> str:
    """A full-match regex over module names for peft's `target_modules`."""
    parts = [rf".*\b{_LANGUAGE}\..*\.(?:{_alternatives(lora.target_modules)})"]
    if lora.vision_lora.enabled:
        parts.append(rf".*\b{_VISION}\..*\.(?:{_alternatives(lora.vision_lora.vision_target_modules)})")
    return "|".join(f"(?:{p})" for p in parts)


def peft_config(lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig, TaskType

    rank_pattern, alpha_pattern = {}, {}
    if lora.vision_lora.enabled:
        key = rf"{_VISION}\..*\.(?:{_alternatives(lora.vision_lora.vision_target_modules)})"
        rank_pattern[key] = lora.vision_lora.vision_r
        alpha_pattern[key] = lora.vision_lora.vision_alpha
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        target_modules=target_regex(lora),
        modules_to_save=lora.modules_to_save,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type=TaskType[lora.task_type],
    )


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """Wrap the model with LoRA adapters; only adapter (and modules_to_save) weights train."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(lora))


def make_trainable(model: Any, finetuning_type: str, lora: LoraConfig) -> Any:
    """What trains: LoRA adapters (`lora`, the default), or every weight (`full`)."""
    if finetuning_type == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    return apply_lora(model, lora)


def parameter_parts(name: str) -> str:
    """vision | merger | language_model | lm_head | other, from a parameter name."""
    if ".visual.merger." in f".{name}":
        return "merger"
    if ".visual." in f".{name}":
        return "vision"
    if ".language_model." in f".{name}" or ".embed_tokens." in f".{name}":
        return "language_model"
    if "lm_head" in name:
        return "lm_head"
    return "other"


def trainable_by_part(model: Any) -> dict[str, tuple[int, int]]:
    """{part: (trainable, total)} parameter counts."""
    trainable: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for name, param in model.named_parameters():
        part = parameter_parts(name)
        n = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        total[part] += n
        if param.requires_grad:
            trainable[part] += n
    return {part: (trainable[part], total[part]) for part in total}


def format_parts(parts: dict[str, tuple[int, int]]) -> str:
    lines = ["trainable parameters by part:"]
    for part in ("vision", "merger", "language_model", "lm_head", "other"):
        if part in parts:
            t, n = parts[part]
            lines.append(f"  {part:<15} {t:>12,} / {n:>14,}  ({100 * t / max(n, 1):.3f}%)")
    t = sum(v[0] for v in parts.values())
    n = sum(v[1] for v in parts.values())
    lines.append(f"  {'total':<15} {t:>12,} / {n:>14,}  ({100 * t / max(n, 1):.3f}%)")
    return "\n".join(lines)
