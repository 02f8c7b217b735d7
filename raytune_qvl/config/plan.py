"""The run plan: every derived number (world size, effective batch, steps, warmup, the filled
DeepSpeed config) computed once from the config, printed at start-up and by --dry-run.
Pure: no torch, no Ray, no model load."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_qvl.config import batch_math
from raytune_qvl.config.deepspeed import fill_deepspeed, first_step_ratio, zero_stage
from raytune_qvl.config.schema import Config
from raytune_qvl.config.memory import MemoryEstimate, estimate_for
from raytune_qvl.config.sizes import OFFLOAD_BYTES_PER_SECOND, Sizes, estimate_sizes, human_bytes
from raytune_qvl.errors import ConfigError, Problem

__all__ = ["Plan", "make_plan", "count_records", "model_hidden_size", "resolve_attention"]

log = logging.getLogger("raytune_qvl")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _import_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - an ImportError, or an OSError of a compiled library
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return None


def resolve_attention(
    requested: str, *, on_gpu: bool, dtype_name: str, capability: tuple[int, int] | None = None
) -> str:
    """flash_attention_2 when asked and usable (flash-attn importable, a GPU of compute capability
    8.0 or newer — Ampere; V100 and T4 import flash-attn and then fail —, half precision);
    otherwise sdpa, with one warning line. `capability`: the GPU's, as a worker sees it (None: not
    known here, as on the driver, which may have no GPU)."""
    if requested != "flash_attention_2":
        return requested
    reason = None
    if importlib.util.find_spec("flash_attn") is None:
        reason = "flash-attn is not installed (pip install 'raytune_qvl[gpu]')"
    elif not on_gpu:
        reason = "FlashAttention-2 needs a GPU"
    elif (broken := _import_problem("flash_attn")) is not None:  # e.g. built against another torch
        reason = f"flash-attn does not import ({broken})"
    elif dtype_name == "float32":
        reason = "FlashAttention-2 needs bfloat16 or float16"
    elif capability is not None and capability < (8, 0):
        reason = f"FlashAttention-2 needs compute capability 8.0 or newer (this GPU: {capability[0]}.{capability[1]})"
    if reason:
        _warn_once(f"attn_implementation flash_attention_2 requested but {reason}; using sdpa")
        return "sdpa"
    return requested


def is_flash(attn: str) -> bool:
    """A FlashAttention kernel (flash_attention_2/3, a hub kernel): it keeps packed samples apart
    only in a batch of one row (transformers finds the samples from its position ids there)."""
    return "flash" in attn


def count_records(path: str | None) -> int:
    """Records in a data file before the audit: non-blank JSONL lines, or a JSON list's length."""
    if path is None or not Path(path).is_file():
        return 0
    raw = Path(path).read_bytes()
    if path.endswith(".json") or raw.lstrip()[:1] == b"[":
        try:
            items = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return 0
        return len(items) if isinstance(items, list) else 0
    return sum(1 for line in raw.split(b"\n") if line.strip())


def model_hidden_size(name: str) -> int | None:
    """The language model's width from a local checkpoint's config.json (None for hub ids)."""
    config = Path(name) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return (data.get("text_config") or {}).get("hidden_size") or data.get("hidden_size")


@dataclass
class Plan:
    cfg: Config
    world_size: int
    num_samples: int
    effective_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    attention: str
    deepspeed: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    sizes: Sizes | None = None  # parameter and checkpoint sizes (None: no config.json at hand)
    memory: MemoryEstimate | None = None  # memory per worker before anything loads (None: no config.json)

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.deepspeed)

    def schedule_text(self) -> str:
        """The warm-up DeepSpeed runs, with the first step's rate."""
        t = self.cfg.training
        if "scheduler" not in self.deepspeed:
            return "no warm-up"
        if t.warmup_ratio == 0:
            return "no warm-up (the peak rate from the first step)"
        first = first_step_ratio(self.warmup_steps, t.warmup_ratio) * t.learning_rate
        return f"warmup {self.warmup_steps} steps (the first at {first:.3g})"

    def batches_text(self) -> str:
        d = self.cfg.data
        if d.packing:
            how = f"packed: a micro-batch's samples in rows of up to {d.max_length} tokens, each attending to itself"
        else:
            how = "padded to each micro-batch's longest sample"
        return how + (", grouped by length (mega-batches of 50 steps)" if d.group_by_length else "")

    def checkpoint_text(self) -> str:
        """What each checkpoint writes, from the model's architecture (when its config.json is at
        hand), and how many are kept. With final_checkpoint adapter the last step's is the adapter
        alone (LoRA runs)."""
        t = self.cfg.training
        saves = -(-self.total_steps // t.save_steps)
        adapter_last = t.final_checkpoint == "adapter" and t.finetuning_type == "lora"
        engines = saves - 1 if adapter_last else saves  # engine checkpoints written
        last = ", the last step's the adapter only" if adapter_last else ""
        if t.save_steps < self.total_steps:
            cadence = f"every {t.save_steps} steps ({saves} in this run{last}), keep {t.save_total_limit}"
        else:
            cadence = "at the last step only" + (", the adapter alone" if adapter_last else "")
        if self.sizes is None:
            return f"{cadence}; sizes unknown until the model's config.json is downloaded"
        s = self.sizes
        if not engines:
            return f"{cadence}: {human_bytes(s.adapter_bytes)}"
        return (
            f"{cadence}: engine state {human_bytes(s.checkpoint_bytes)} each "
            f"({s.trainable / 1e6:.3g}M trained parameters with fp32 master and Adam moments; "
            f"the adapter alone {human_bytes(s.adapter_bytes)}), up to "
            f"{human_bytes(s.checkpoint_bytes * min(engines, t.save_total_limit))} on disk"
        )

    def memory_text(self) -> str:
        if self.memory is None:
            return "estimate unknown until the model's config.json is downloaded"
        ckpt = "with" if self.cfg.environment.gradient_checkpointing else "without"
        how = (
            "the data's token lengths"
            if self.memory.from_data
            else f"an upper bound at max_length {self.cfg.data.max_length}"
        )
        return f"~{self.memory.format()}; activations from {how}, {ckpt} checkpointing"

    @property
    def total_samples(self) -> int:
        """Training samples the whole run processes (the sweep's compute budget unit)."""
        return self.total_steps * self.effective_batch

    def format(self) -> str:
        c, t = self.cfg, self.cfg.training
        lora, v = c.lora, c.lora.vision_lora
        vision = (
            f"on (r={v.vision_r}, alpha={v.vision_alpha}, {', '.join(v.vision_target_modules)})" if v.enabled else "off"
        )
        device = "GPU" if c.ray.use_gpu else "CPU"
        if t.finetuning_type == "full":
            frozen = " but the vision tower (frozen)" if t.freeze_vision_tower else ""
            trained = [("fine-tuning", f"full: every weight{frozen} trains (no LoRA)")]
        else:
            scaling = lora.lora_alpha / (lora.r**0.5 if lora.use_rslora else lora.r)
            scale = f"scale={scaling:g}{' (rsLoRA)' if lora.use_rslora else ''}, dropout={lora.lora_dropout}"
            trained = [
                ("LoRA", f"r={lora.r}, alpha={lora.lora_alpha}, {scale}"),
                ("  targets", f"{', '.join(lora.target_modules)} (language model); vision LoRA {vision}"),
            ]
            variant = [
                *(["DoRA"] if lora.use_dora else []),
                *(
                    [
                        f"{lora.init_lora_weights} init "
                        f"(saved converted: a rank-{2 * lora.r} LoRA for the unchanged base)"
                    ]
                    if lora.mutates_base
                    else [f"{lora.init_lora_weights} init"]
                    if lora.init_lora_weights != "default"
                    else []
                ),
                *([f"LoRA+ (B at {lora.loraplus_lr_ratio:g}x)"] if lora.loraplus_lr_ratio else []),
                *(["merger trained in full"] if t.train_merger else []),
            ]
            if variant:
                trained.append(("  variant", ", ".join(variant)))
        ratios = {"vision": t.vision_lr_ratio, "merger": t.merger_lr_ratio, "language model": t.language_model_lr_ratio}
        if any(r != 1.0 for r in ratios.values()):
            text = ", ".join(f"{part} {t.learning_rate * r:.3g} (x{r:g})" for part, r in ratios.items())
            trained.append(("  rate by module", text))
        rows = [
            ("model", f"{c.model.name} ({c.model.torch_dtype}, attention {self.attention})"),
            *trained,
            (
                "learning rate",
                f"{c.training.learning_rate:g}, {c.training.lr_scheduler_type}, {self.schedule_text()}",
            ),
            ("world size", f"{self.world_size} Ray Train worker(s) on {device}"),
            ("per-worker batch", str(c.training.per_device_train_batch_size)),
            ("accumulation", str(c.training.gradient_accumulation_steps)),
            (
                "effective batch size",
                f"{self.effective_batch}  (= {t.per_device_train_batch_size} x {self.world_size} "
                f"x {t.gradient_accumulation_steps})",
            ),
            ("data", f"{self.num_samples} training records (before the audit): {c.data.train_path}"),
            ("batches", self.batches_text()),
            (
                "epochs",
                f"{c.training.num_epochs} x {self.steps_per_epoch} steps = {self.total_steps} optimizer steps"
                + (f" (max_steps {c.training.max_steps})" if c.training.max_steps else ""),
            ),
            (
                "evaluate / save",
                f"every {c.training.eval_steps} / "
                + (f"{c.training.save_steps} steps" if c.training.save_steps < self.total_steps else "the last step")
                + f", keep {c.training.save_total_limit}, "
                f"best by {c.training.metric_for_best_model} ({'max' if c.greater_is_better else 'min'})",
            ),
            ("checkpoints", self.checkpoint_text()),
            ("memory", self.memory_text()),
            (
                "DeepSpeed",
                f"ZeRO-{self.zero_stage}"
                + (" + CPU offload" if _offloads(self.deepspeed) else "")
                + f" ({c.paths.deepspeed})",
            ),
            ("output", c.output.dir),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["raytune_qvl run plan", *(f"  {k:<{width}}  {v}" for k, v in rows)]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  DeepSpeed config (filled):")
        lines += ["    " + line for line in json.dumps(self.deepspeed, indent=2).splitlines()]
        return "\n".join(lines)


def _offloads(ds: dict[str, Any]) -> bool:
    zero = ds.get("zero_optimization") or {}
    return any((zero.get(k) or {}).get("device") in ("cpu", "nvme") for k in ("offload_optimizer", "offload_param"))


def make_plan(cfg: Config, num_samples: int | None = None, lengths: tuple[int, int] | None = None) -> Plan:
    """Derive every number of the run. `num_samples` defaults to the records in the file;
    `lengths`: the data audit's 99th-percentile (text, image) tokens per sample, for the memory
    estimate (None: its upper bound at max_length)."""
    t = cfg.training
    world = cfg.ray.num_workers
    n = count_records(cfg.data.train_path) if num_samples is None else num_samples
    try:
        per_epoch = batch_math.steps_per_epoch(n, t.per_device_train_batch_size, world, t.gradient_accumulation_steps)
    except batch_math.BatchMathError as exc:
        raise ConfigError([Problem(cfg.data.train_path, "data.train_path", str(exc), show_value=False)]) from None
    total = batch_math.total_steps(
        n, t.per_device_train_batch_size, world, t.gradient_accumulation_steps, t.num_epochs, t.max_steps
    )
    filled = fill_deepspeed(
        cfg.deepspeed,
        t,
        cfg.environment,
        world_size=world,
        total_steps=total,
        hidden_size=model_hidden_size(cfg.model.name),
        source=cfg.paths.deepspeed or "DeepSpeed config",
    )
    sizes = estimate_sizes(cfg)
    memory = estimate_for(cfg, world, filled.config, lengths, sizes)
    return Plan(
        cfg=cfg,
        world_size=world,
        num_samples=n,
        effective_batch=batch_math.effective_batch(t.per_device_train_batch_size, world, t.gradient_accumulation_steps),
        steps_per_epoch=per_epoch,
        total_steps=total,
        warmup_steps=filled.config.get("scheduler", {}).get("params", {}).get("warmup_num_steps", 0),
        attention=resolve_attention(
            cfg.model.attn_implementation, on_gpu=cfg.ray.use_gpu, dtype_name=cfg.model.torch_dtype
        ),
        deepspeed=filled.config,
        notes=filled.notes + _offload_generation_notes(cfg, filled.config, sizes, world),
        sizes=sizes,
        memory=memory,
    )


def _offload_generation_notes(cfg: Config, ds: dict[str, Any], sizes: Sizes | None, world: int) -> list[str]:
    """Generation under ZeRO-3 with parameter offload streams the whole model to each GPU for every
    decoded token: a warning with the time it takes, before the run spends it."""
    e = cfg.evaluation
    zero = ds.get("zero_optimization") or {}
    offloaded = zero.get("stage") == 3 and (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    if not (offloaded and cfg.ray.use_gpu and e.generation_samples and cfg.data.eval_path and sizes):
        return []
    tokens = e.max_new_tokens or 128
    seconds = sizes.generation_seconds(e.generation_samples, cfg.training.per_device_eval_batch_size, world, tokens)
    message = (
        f"generation eval under ZeRO-3 parameter offload streams {human_bytes(sizes.params * sizes.dtype_bytes)} "
        f"to each GPU per decoded token: about {seconds / 60:.0f} min per generation eval "
        f"({e.generation_samples} samples, up to {tokens} new tokens, at ~{OFFLOAD_BYTES_PER_SECOND / 1e9:.0f} GB/s); "
        "lower evaluation.generation_samples or max_new_tokens, raise generation_every, or drop offload_param"
    )
    if seconds > 300:
        _warn_once(message)
    return [message]
