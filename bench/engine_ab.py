"""Where the loop's time goes against the plain loop: the DeepSpeed engine (ZeRO-2, bf16 with fp32
master weights) and a plain bf16 PyTorch + peft step, interleaved in one process on the same
batches, for Qwen2.5-VL text widths from the tiny model's 64 up. The engine's cost is per
parameter tensor (hooks, fp32 master copies, partition bookkeeping), not per FLOP, so its share
shrinks as the model grows.

Run as: python -m bench.engine_ab [--widths 64,256,512] [--reps 5]
Prints one JSON line per width: {"width", "engine", "plain", "ratio"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(width: int, reps: int, steps: int) -> dict:
    """Median samples/s of the engine and of a plain step at one text width."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from raytune_qvl.config.schema import EnvironmentConfig, LoraConfig, TrainingConfig
    from raytune_qvl.config.deepspeed import fill_deepspeed
    from raytune_qvl.train.engine import build_engine, device_config
    from raytune_qvl.train.lora import apply_lora

    micro, accum, seq = 4, 2, 96
    heads = max(4, width // 64)
    head_dim = width // heads
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "vocab_size": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
            },
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": width,
            "fullatt_block_indexes": [1],
        },
        image_token_id=1023,
        video_token_id=1022,
        vision_start_token_id=1021,
        vision_end_token_id=1020,
    )

    def build():
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, attn_implementation="sdpa", dtype=torch.bfloat16
        )
        model.config.use_cache = False
        return apply_lora(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05))

    filled = fill_deepspeed(
        {
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        },
        TrainingConfig(per_device_train_batch_size=micro, gradient_accumulation_steps=accum, learning_rate=1e-3),
        EnvironmentConfig(),
        world_size=1,
        total_steps=1000,
        hidden_size=width,
    ).config
    engine = build_engine(build(), device_config(filled, on_gpu=False)[0])
    plain = build().to(torch.bfloat16)
    params = [p for p in plain.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    engine.train()
    plain.train()
    ids = torch.randint(0, 1000, (micro, seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def engine_step() -> None:
        for _ in range(accum):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()

    def plain_step() -> None:
        for _ in range(accum):
            (plain(**batch).loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    speeds: dict[str, list[float]] = {"engine": [], "plain": []}
    for fn in (engine_step, plain_step):
        for _ in range(3):
            fn()
    for _ in range(reps):
        for name, fn in (("engine", engine_step), ("plain", plain_step)):
            started = time.perf_counter()
            for _ in range(steps):
                fn()
            speeds[name].append(steps * micro * accum / (time.perf_counter() - started))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    return {
        "width": width,
        "lora_tensors": len(params),
        "engine": round(med["engine"], 1),
        "plain": round(med["plain"], 1),
        "ratio": round(med["engine"] / med["plain"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", default="64,256,512")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed window")
    args = parser.parse_args()

    from raytune_qvl import runtime

    runtime.quiet_libraries()
    from raytune_qvl.train.engine import WorkerContext, init_distributed

    init_distributed(WorkerContext())
    for width in (int(w) for w in args.widths.split(",")):
        print(json.dumps(measure(width, args.reps, args.steps)), flush=True)


if __name__ == "__main__":
    main()
