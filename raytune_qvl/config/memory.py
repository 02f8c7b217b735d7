"""A pre-flight estimate of the memory one worker needs to train a config: pure arithmetic on the
architecture (config.json), the batch, `max_length` and the ZeRO stage, before anything loads.

Per worker, in the model's dtype (b bytes) and fp32:

* weights: every parameter (b each), divided over the workers under ZeRO-3, where the weights
  gathered while in use are added: up to `stage3_max_live_parameters` elements (the prefetcher
  gathers ahead until that many are), or, when more, those used again within
  `stage3_max_reuse_distance` elements, which stay gathered (about half that distance from the
  forward's last layers to their backward, and two layers more in flight); capped at the model;
* what trains (T parameters): its gradient (b), DeepSpeed's fp32 gradient partition (4), fp32 master
  copy (4) and Adam's two moments (8) — ZeRO-1 divides the master and moments over the workers,
  ZeRO-2 also the gradient partition, ZeRO-3 everything; optimizer offload moves master and moments
  to the host;
* activations for every sample of the micro batch: the tensors each decoder layer keeps for the
  backward pass (or, with gradient checkpointing, each layer's input plus one layer's tensors while
  it is recomputed) — the vision tower's too when it trains, over 4 patches per image token. A
  sample is `max_length` tokens with packing (rows are filled), else its 99th-percentile length
  from the data audit; its image tokens are the audit's share of them. Without an audit (a dry run
  before the data was prepared) every sample is `max_length` tokens, as many of them image tokens
  as `max_image_size` allows: an upper bound;
* the logits and the loss: the logits, their fp32 copy, the saved log-softmax and their gradient,
  over the vocabulary for every token of the micro batch.

On the host (CPU training), add what the CPU kernels' workspaces and the allocator's arenas hold
once training runs: HOST_RUNTIME_BYTES, measured on a 2-core machine (bench/run_bench.py, memory).
Not counted: the CUDA context and allocator slack (about 0.5-1 GB on a GPU), the process itself
(Python, torch, DeepSpeed: about 1.5-2 GB of host memory per worker) and the data. What a run
measures to compare (loop.py): on GPUs, torch's peak of allocated device memory; on the host,
the peak RSS less the RSS before the model was loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raytune_qvl.config.schema import Config

__all__ = ["MemoryEstimate", "estimate_memory", "estimate_for", "worker_memory"]

HOST_RUNTIME_BYTES = 0.11e9  # CPU training: kernel workspaces and allocator arenas, measured (module doc)


@dataclass
class MemoryEstimate:
    """Bytes per worker by part; `device` is where training runs (GPU, or the host on CPU)."""

    parts: dict[str, float] = field(default_factory=dict)
    device: str = "GPU"
    offloaded: float = 0.0  # bytes per worker the optimizer offload keeps on the host instead
    from_data: bool = False  # activations from the data audit's lengths (else the max_length bound)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def format(self) -> str:
        from raytune_qvl.config.sizes import human_bytes

        shown = ", ".join(f"{name} {human_bytes(n)}" for name, n in self.parts.items())
        extra = f"; {human_bytes(self.offloaded)} offloaded to the host" if self.offloaded else ""
        return f"{human_bytes(self.total)} per worker on the {self.device} ({shown}{extra})"


def _layer_tensors(h: int, inter: int, kv: int, lora_inputs: float) -> float:
    """Values a decoder layer keeps per token for its backward pass: the two RMSNorms' inputs and
    fp32 copies, the attention's q/k/v inputs and outputs and o's input, the MLP's input, gate and
    up outputs, the activation and the product down reads, and LoRA's dropped-out inputs."""
    return 2 * h + (h + 2 * kv) + h + h + 2 * inter + 2 * inter + lora_inputs


def _layer_params(h: int, inter: int, kv: int) -> float:
    """A decoder layer's weights: q and o (h x h), k and v (h x kv), gate, up and down (h x inter)."""
    return 2 * h * h + 2 * h * kv + 3 * h * inter


def sample_tokens(cfg: Config, lengths: tuple[int, int] | None) -> tuple[float, float]:
    """(tokens, image tokens) of one sample (a packed row) for the estimate; `lengths` is the data
    audit's 99th-percentile (text, image) tokens per sample, or None for the upper bound."""
    d = cfg.data
    side = max(d.max_image_size // max(d.image_factor, 1), 1)
    if not lengths or sum(lengths) <= 0:
        return float(d.max_length), float(min(d.max_length, side * side))
    text, image = lengths
    tokens = d.max_length if d.packing else min(d.max_length, text + image)
    return float(tokens), tokens * image / (text + image)


def estimate_memory(
    cfg: Config,
    world_size: int,
    zero_stage: int,
    offload_optimizer: bool,
    lengths: tuple[int, int] | None = None,
    sizes: Any = None,
    zero: dict[str, Any] | None = None,
) -> MemoryEstimate | None:
    """The estimate for `cfg` (see the module doc), or None without the model's config.json.
    `lengths`: the data audit's 99th-percentile (text, image) tokens per sample; `sizes`: the
    config's sizes.Sizes when the caller has them; `zero`: the DeepSpeed config's zero_optimization
    block as written, for ZeRO-3's reuse distance and live parameters (absent: DeepSpeed's defaults)."""
    from raytune_qvl.config.deepspeed import zero3_elements
    from raytune_qvl.config.sizes import estimate_sizes, model_dims

    dims, sizes = model_dims(cfg.model.name), sizes or estimate_sizes(cfg)
    if dims is None or sizes is None:
        return None
    try:
        t = dims.get("text_config") or dims
        h, inter, layers, vocab = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
        kv = t.get("num_key_value_heads", t["num_attention_heads"]) * (h // t["num_attention_heads"])
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    b = sizes.dtype_bytes
    tr = cfg.training
    n, trainable = max(world_size, 1), sizes.trainable
    est = MemoryEstimate(device="GPU" if cfg.ray.use_gpu else "host", from_data=bool(lengths and sum(lengths) > 0))

    est.parts["weights"] = (sizes.params + (trainable if tr.finetuning_type == "lora" else 0)) * b
    if zero_stage == 3:
        est.parts["weights"] /= n
        # gathered while in use: the prefetcher gathers ahead up to the live cap; a weight used again
        # within the reuse distance stays gathered, so from the forward's last layers to their
        # backward about half the distance is held whole
        live = zero3_elements(zero or {}, "stage3_max_live_parameters", h)
        reused = zero3_elements(zero or {}, "stage3_max_reuse_distance", h) / 2 + 2 * _layer_params(h, inter, kv)
        est.parts["gathered weights"] = min(sizes.params, max(live, reused)) * b
    grads = trainable * (b + 4) / (n if zero_stage >= 2 else 1)
    states = trainable * 12 / (n if zero_stage >= 1 else 1)
    est.parts["gradients"] = grads
    if offload_optimizer and cfg.ray.use_gpu:
        est.offloaded = states
    else:
        est.parts["optimizer"] = states

    per_sample, image_per_sample = sample_tokens(cfg, lengths)
    tokens = tr.per_device_train_batch_size * per_sample
    checkpointing = cfg.environment.gradient_checkpointing
    lora_inputs = 0.0
    if tr.finetuning_type == "lora":
        targets = set(cfg.lora.target_modules)
        widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": h, "gate_proj": h, "up_proj": h, "down_proj": inter}
        # dropout keeps its output (and a mask) per target; q/k/v share one input when dropout is 0
        lora_inputs = sum(w for name, w in widths.items() if name in targets) if cfg.lora.lora_dropout else 0.0
    per_layer = _layer_tensors(h, inter, kv, lora_inputs) * b
    est.parts["activations"] = tokens * ((layers * h * b + per_layer) if checkpointing else layers * per_layer)
    v = dims.get("vision_config") or {}
    vision_trains = tr.finetuning_type == "full" and not tr.freeze_vision_tower
    vision_trains |= tr.finetuning_type == "lora" and cfg.lora.vision_lora.enabled
    if v and vision_trains:  # the tower keeps its tensors too: 4 patches per merged image token
        patches = tr.per_device_train_batch_size * 4 * image_per_sample
        hv, iv = v["hidden_size"], v["intermediate_size"]
        layer = _layer_tensors(hv, iv, hv, 0.0) * b
        est.parts["vision activations"] = patches * (
            (v["depth"] * hv * b + layer) if checkpointing else v["depth"] * layer
        )
    # logits (model dtype), the loss's fp32 copy and saved log-softmax, the gradient of the logits
    est.parts["logits"] = tokens * vocab * (b + 4 + 4 + 4)
    if not cfg.ray.use_gpu:
        est.parts["CPU runtime"] = HOST_RUNTIME_BYTES
    return est


def estimate_for(
    cfg: Config,
    world_size: int,
    ds_config: dict[str, Any],
    lengths: tuple[int, int] | None = None,
    sizes: Any = None,
) -> MemoryEstimate | None:
    """estimate_memory with the ZeRO stage and optimizer offload read from a DeepSpeed config."""
    zero = ds_config.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    return estimate_memory(cfg, world_size, int(zero.get("stage", 0) or 0), offload, lengths, sizes, zero)


def worker_memory(use_gpu: bool, workers_at_once: int, given_gb: float | None = None) -> float | None:
    """Bytes one worker may use: `given_gb` when set; else this machine's first GPU with GPUs
    (None without one: the workers' GPUs are elsewhere), or its host memory shared by the workers
    that run at once."""
    if given_gb:
        return given_gb * 1e9
    if use_gpu:
        try:
            import torch

            return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
        except ImportError:
            return None
    import psutil

    return psutil.virtual_memory().total / max(workers_at_once, 1)
