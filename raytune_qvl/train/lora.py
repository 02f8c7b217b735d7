"""What trains: every weight (full fine-tuning), or LoRA adapters (the default) on the language
model's target modules, and on the vision tower only when `vision_lora.enabled` (with its own rank
and alpha through peft's rank_pattern/alpha_pattern).

The seed's target names also match the vision tower's MLP (gate_proj/up_proj/down_proj), so
names alone are not enough: targets are anchored to the part of the model they belong to.

Variants are peft's (rsLoRA, DoRA, PiSSA/OLoRA initialisation); the optimizer's parameter groups
carry the per-module learning rates and LoRA+'s rate for B (peft's `create_loraplus_optimizer`
groups). PiSSA and OLoRA change the base weights they start from, so their adapters are saved
converted into a plain LoRA of twice the rank (dW = BA - B0A0) that fits the unchanged base.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from raytune_qvl.config.schema import Config, LoraConfig

__all__ = [
    "MERGER",
    "target_regex",
    "peft_config",
    "apply_lora",
    "make_trainable",
    "mutates_base",
    "keep_initial_adapter",
    "converted_adapter",
    "param_groups",
    "parameter_parts",
    "trainable_by_part",
    "format_parts",
]

_LANGUAGE = r"language_model"  # Qwen2.5-VL: model.language_model.layers.N...
_VISION = r"visual\.blocks"  # Qwen2.5-VL: model.visual.blocks.N... (the merger is visual.merger)
MERGER = "merger"  # peft's modules_to_save matches the name's end: model.visual.merger
_INITIAL = "_raytune_qvl_initial_adapter"  # on the peft model: the adapter weights a base-changing init began with


def _alternatives(names: list[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def target_regex(lora: LoraConfig) -> str:
    """A full-match regex over module names for peft's `target_modules`."""
    parts = [rf".*\b{_LANGUAGE}\..*\.(?:{_alternatives(lora.target_modules)})"]
    if lora.vision_lora.enabled:
        parts.append(rf".*\b{_VISION}\..*\.(?:{_alternatives(lora.vision_lora.vision_target_modules)})")
    return "|".join(f"(?:{p})" for p in parts)


def mutates_base(lora: LoraConfig) -> bool:
    """PiSSA and OLoRA move part of each target weight into the adapter at initialisation."""
    return lora.mutates_base


def peft_config(lora: LoraConfig, *, train_merger: bool = False) -> Any:
    from peft import LoraConfig as PeftLoraConfig, TaskType

    rank_pattern, alpha_pattern = {}, {}
    if lora.vision_lora.enabled:
        key = rf"{_VISION}\..*\.(?:{_alternatives(lora.vision_lora.vision_target_modules)})"
        rank_pattern[key] = lora.vision_lora.vision_r
        alpha_pattern[key] = lora.vision_lora.vision_alpha
    modules_to_save = list(lora.modules_to_save or [])
    if train_merger and MERGER not in modules_to_save:
        modules_to_save.append(MERGER)
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        target_modules=target_regex(lora),
        modules_to_save=modules_to_save or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type=TaskType[lora.task_type],
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=True if lora.init_lora_weights == "default" else lora.init_lora_weights,
    )


def apply_lora(model: Any, lora: LoraConfig, *, train_merger: bool = False) -> Any:
    """Wrap the model with LoRA adapters; only adapter (and modules_to_save) weights train. Under
    ZeRO-3 call it while the partitioned load's context is alive: DoRA's norms and PiSSA's SVD then
    gather each base weight they read (peft's gather_params_ctx)."""
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(lora, train_merger=train_merger))
    if mutates_base(lora):
        keep_initial_adapter(model)
    return model


def make_trainable(model: Any, cfg: Config) -> Any:
    """What trains: LoRA adapters (`lora`, the default), or every weight (`full`; the vision tower
    only unless `training.freeze_vision_tower`)."""
    t = cfg.training
    if t.finetuning_type == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(not (t.freeze_vision_tower and parameter_parts(name) == "vision"))
        return model
    return apply_lora(model, cfg.lora, train_merger=t.train_merger)


def _lora_pairs(names: Any) -> list[str]:
    return [name for name in names if ".lora_A." in name or ".lora_B." in name]


def keep_initial_adapter(model: Any) -> None:
    """Remember the LoRA weights a base-changing initialisation began with (CPU copies, the
    adapter's size), for the conversion at save. Before the engine: nothing is partitioned yet."""
    initial = {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    setattr(model, _INITIAL, {name: initial[name] for name in _lora_pairs(initial)})


def converted_adapter(model: Any, trained: dict[str, Any]) -> tuple[dict[str, Any], Any] | None:
    """For a PiSSA/OLoRA model: its gathered trained weights as a plain LoRA for the unchanged base,
    and the peft config to save it with (None for any other model). W = W_res + B0A0 and the trained
    model is W_res + BA, so the base W takes dW = BA - B0A0 = [B | -B0][A ; A0]: rank 2r, with alpha
    doubled (x sqrt 2 under rsLoRA) to keep each scale. Computed from state dicts, so it works on the
    ZeRO-3 gathered weights (peft's own conversion reloads the initial adapter into the model)."""
    import copy

    initial = getattr(model, _INITIAL, None)
    if initial is None:
        return None
    import torch

    out = dict(trained)
    for name in _lora_pairs(trained):
        start = initial[name].to(trained[name].dtype)
        if ".lora_A." in name:
            out[name] = torch.cat([trained[name], start], dim=0)
        else:
            out[name] = torch.cat([trained[name], -start], dim=1)
    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= 2**0.5 if config.use_rslora else 2
    config.rank_pattern = {key: 2 * r for key, r in (config.rank_pattern or {}).items()}
    scale = 2**0.5 if config.use_rslora else 2
    config.alpha_pattern = {key: scale * a for key, a in (config.alpha_pattern or {}).items()}
    return out, config


def _part_of(name: str) -> str:
    part = parameter_parts(name)
    return part if part in ("vision", "merger") else "language_model"


def param_groups(model: Any, cfg: Config) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the trainable parameters split by module part (each at
    learning_rate x its training.*_lr_ratio) and, with LoRA+, by peft's LoRA+ groups (B matrices
    and 1-d weights at loraplus_lr_ratio x). Each group carries `lr_scale` (its rate / the base
    rate) for the schedulers that set one rate for every group, and a `name`."""
    import torch

    t, lora = cfg.training, cfg.lora
    ratio = {"vision": t.vision_lr_ratio, "merger": t.merger_lr_ratio, "language_model": t.language_model_lr_ratio}
    roles: list[tuple[str, float, float, list[Any]]] = []  # (role, lr scale, weight decay, params)
    if lora.loraplus_lr_ratio is not None and t.finetuning_type == "lora":
        from peft.optimizers import create_loraplus_optimizer

        # peft's grouping (A | embedding | B | B without decay); the optimizer it builds is only read
        grouped = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=1.0,
            loraplus_lr_ratio=lora.loraplus_lr_ratio,
            loraplus_lr_embedding=1.0,
            loraplus_weight_decay=t.weight_decay,
        )
        names = ("A", "embedding", "B", "B_no_decay")
        roles = [(n, g["lr"], g["weight_decay"], g["params"]) for n, g in zip(names, grouped.param_groups)]
    else:
        roles = [("all", 1.0, t.weight_decay, [p for p in model.parameters() if p.requires_grad])]
    part_of = {id(p): _part_of(name) for name, p in model.named_parameters() if p.requires_grad}
    groups = []
    for role, role_scale, decay, params in roles:
        for part in ("language_model", "vision", "merger"):
            mine = [p for p in params if part_of[id(p)] == part]
            if mine:
                scale = role_scale * ratio[part]
                groups.append(
                    {
                        "params": mine,
                        "lr": t.learning_rate * scale,
                        "weight_decay": decay,
                        "lr_scale": scale,
                        "name": part if role == "all" else f"{part}/{role}",
                    }
                )
    return groups


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
