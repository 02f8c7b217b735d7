"""One-GPU throughput of the training loop's engine on a real Qwen2.5-VL shape: a randomly
initialised 3B or 7B model (no hub needed), bf16, SDPA or FlashAttention-2, LoRA r=32 on the
language model, DeepSpeed ZeRO-2 (or 3), a fixed synthetic batch of one image + text per sample.

Run as: python -m bench.gpu_step --shape 7b [--steps 30] [--batch 4] [--seq 1024] [--attn flash_attention_2] [--zero 3]
        python -m bench.gpu_step --shape tiny --device cpu --steps 3     (a smoke test of this script)

Reports tokens/s, model FLOPs utilization and peak memory as one JSON line.

FLOPs per trained token (the formula behind MFU; model FLOPs, so a recomputed forward under
gradient checkpointing is not counted). The language model's matmuls cost 2·N FLOPs per token
forward for its N matmul weights (the decoder layers and the LM head; the embedding is a lookup),
and with LoRA the frozen weights still pass activation gradients back (another 2·N) while weight
gradients exist only for the adapters (6·N_lora in all). Attention is 4·L·s·d forward (QKᵀ and
AV over L layers, sequence s, width d) and twice that backward: 12·L·s·d (PaLM's convention: no
discount for the causal mask). The vision tower is frozen and its input needs no gradient, so
it runs forward only: 2·N_v per image patch, plus its attention (full in `fullatt_block_indexes`,
in 64-patch windows elsewhere), spread over the sample's tokens. So per token:

    flops ≈ 4·N + 12·L·s·d + 6·N_lora + (2·N_v·P + 4·d_v·P·(F·P + (D − F)·min(P, 64))) / s

with P patches per sample, D vision blocks of which F attend fully, width d_v. MFU = tokens/s ×
flops / peak, with peak the GPU's dense bf16 FLOP/s (H100 SXM and H200: 989e12; H100 PCIe: 756e12).
"""

from __future__ import annotations

import argparse
import json
import math
import time

SHAPES = {
    # Qwen2.5-VL-3B-Instruct and -7B-Instruct architectures (config.json of the releases)
    "3b": {
        "tie_word_embeddings": True,  # as the release
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        "vision": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "window_size": 112,
        },
    },
    "7b": {
        "text": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        "vision": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "window_size": 112,
        },
    },
    "tiny": {
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        },
        "vision": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 112,
        },
    },
}
# dense bf16 FLOP/s by a name the device reports; the first match wins (PCIe before the SXM default)
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}
WINDOW_PATCHES = 64  # the vision tower's 112-pixel windows: (112 / 14)^2 patches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), default="7b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="samples per step")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sample (image tokens included)")
    parser.add_argument("--image", type=int, default=448, help="image side in pixels (448 -> 256 image tokens)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--zero", type=int, default=2, choices=[2, 3], help="DeepSpeed ZeRO stage")
    parser.add_argument(
        "--no-checkpointing",
        dest="checkpointing",
        action="store_false",
        help="gradient checkpointing off (the shipped GPU configs turn it on)",
    )
    args = parser.parse_args()

    from raytune_qvl import runtime

    runtime.quiet_libraries()
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from raytune_qvl.config.schema import EnvironmentConfig, LoraConfig, TrainingConfig
    from raytune_qvl.config.deepspeed import fill_deepspeed
    from raytune_qvl.train.engine import WorkerContext, build_engine, device_config, init_distributed
    from raytune_qvl.train.lora import apply_lora
    from raytune_qvl.train.model import enable_gradient_checkpointing
    from raytune_qvl.config.plan import resolve_attention

    on_gpu = args.device == "cuda"
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=shape["text"],
        vision_config={**shape["vision"], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=shape["text"]["vocab_size"] - 1,
        video_token_id=shape["text"]["vocab_size"] - 2,
        vision_start_token_id=shape["text"]["vocab_size"] - 3,
        vision_end_token_id=shape["text"]["vocab_size"] - 4,
        tie_word_embeddings=shape.get("tie_word_embeddings", False),
    )
    capability = torch.cuda.get_device_capability() if on_gpu else None
    attn = resolve_attention(args.attn, on_gpu=on_gpu, dtype_name="bfloat16", capability=capability)
    with torch.device(args.device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.bfloat16)
    for part in (model.config, model.config.text_config):  # transformers 5 reads it from the text config
        part.use_cache = False
    if args.checkpointing:
        enable_gradient_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    t, v = shape["text"], shape["vision"]
    n_vision = sum(p.numel() for name, p in model.named_parameters() if ".visual." in f".{name}")
    n_embedding = t["vocab_size"] * t["hidden_size"]
    # the language model's matmul weights: all but the vision tower and the embedding, and the LM
    # head's matmul (its own weight, or the embedding's when tied)
    untied_head = 0 if shape.get("tie_word_embeddings") else n_embedding
    n_text = n_params - n_vision - n_embedding - untied_head + n_embedding
    model = apply_lora(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0))
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)

    ctx = WorkerContext(on_gpu=on_gpu)
    init_distributed(ctx)
    training = TrainingConfig(
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=1e-4, warmup_ratio=0.0
    )
    filled = fill_deepspeed(
        {
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": args.zero, "overlap_comm": True, "contiguous_gradients": True},
        },
        training,
        EnvironmentConfig(bf16=True),
        world_size=1,
        total_steps=args.steps + args.warmup,
        hidden_size=shape["text"]["hidden_size"],
    ).config
    ds_config, _ = device_config(filled, on_gpu=on_gpu)
    engine = build_engine(model, ds_config)

    # one image of args.image^2 pixels -> (side/14)^2 patches -> /4 merged image tokens
    grid = args.image // 14
    n_image = grid * grid // 4
    seq = max(args.seq, n_image + 16)
    vocab = shape["text"]["vocab_size"] - 8
    ids = torch.randint(0, vocab, (args.batch, seq))
    ids[:, 4 : 4 + n_image] = config.image_token_id
    ids[:, 3], ids[:, 4 + n_image] = config.vision_start_token_id, config.vision_end_token_id
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.masked_fill(ids == config.image_token_id, -100),
        "pixel_values": torch.randn(args.batch * grid * grid, 3 * 2 * 14 * 14),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * args.batch),
    }
    batch = {k: v.to(engine.device) for k, v in batch.items()}

    def step() -> float:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        return loss.detach().float().item()

    for _ in range(args.warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if on_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started

    tokens_per_s = args.steps * args.batch * seq / elapsed
    patches = grid * grid
    full = len(v["fullatt_block_indexes"])
    vision_attention = (
        4 * v["hidden_size"] * patches * (full * patches + (v["depth"] - full) * min(patches, WINDOW_PATCHES))
    )
    flops_per_token = (
        4 * n_text
        + 12 * t["num_hidden_layers"] * seq * t["hidden_size"]
        + 6 * n_lora
        + (2 * n_vision * patches + vision_attention) / seq
    )
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(
        json.dumps(
            {
                "shape": args.shape,
                "device": name,
                "attention": attn,
                "zero_stage": args.zero,
                "batch": args.batch,
                "seq": seq,
                "image_tokens": n_image,
                "params": n_params,
                "text_matmul_params": n_text,
                "vision_params": n_vision,
                "lora_params": n_lora,
                "gradient_checkpointing": args.checkpointing,
                "flops_per_token": round(flops_per_token),
                "tokens_per_second": round(tokens_per_s, 1),
                "model_tflops_per_second": round(tokens_per_s * flops_per_token / 1e12, 2),
                "mfu": round(tokens_per_s * flops_per_token / peak, 4) if peak else None,
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
                "loss_first": round(losses[0], 4),
                "loss_last": round(losses[-1], 4),
                "finite": all(math.isfinite(x) for x in losses),
            }
        )
    )


if __name__ == "__main__":
    main()
