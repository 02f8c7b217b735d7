"""The reference the loop is measured against: a plain PyTorch + peft training loop, no
DeepSpeed, no Ray — the same tiny model, data, batch, optimizer (AdamW) and dtype as the tiny
config (fp32 on CPU; with environment.bf16, bf16 weights, adapters included, as DeepSpeed's bf16
mode trains them).
Prints one JSON line: {"samples_per_second": ..., "steps": ...}.

Run as: python -m bench.plain_loop [--steps 60] [--warmup 10]
"""

from __future__ import annotations

import argparse
import json
import time

from raytune_qvl import runtime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps before measuring")
    parser.add_argument("--config", default="configs/tiny/training_config.yaml")
    parser.add_argument("--lora_config", default="configs/tiny/lora_config.yaml")
    parser.add_argument(
        "--fp32-adapters",
        action="store_true",
        help="with environment.bf16: peft's default (fp32 adapters over a bf16 base), not the engine's all-bf16 module",
    )
    args = parser.parse_args()
    runtime.quiet_libraries()

    import torch
    from torch.utils.data import DataLoader

    from raytune_qvl.config.load import load_config
    from raytune_qvl.data.batches import Collator, EpochSampler, TrainDataset
    from raytune_qvl.data.cache import load_or_prepare
    from raytune_qvl.train.lora import apply_lora
    from raytune_qvl.data.processor import load_processor
    from raytune_qvl.train.model import load_model

    cfg = load_config(args.config, args.lora_config, None, ["ray.num_workers=1", "lora.lora_dropout=0.05"])
    torch.manual_seed(cfg.environment.seed)
    processor = load_processor(cfg)
    items = load_or_prepare(cfg, processor, "train").items
    model = apply_lora(load_model(cfg), cfg.lora)
    if cfg.environment.bf16 and not args.fp32_adapters:
        model = model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode trains: every weight in bf16
    model.train()
    t = cfg.training
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=t.learning_rate, weight_decay=t.weight_decay
    )
    dataset = TrainDataset(items, processor)
    micro, accum = t.per_device_train_batch_size, t.gradient_accumulation_steps
    sampler = EpochSampler(len(dataset), micro=micro, accum=accum, rank=0, world=1, seed=0, shuffle=True)
    collator = Collator(processor.tokenizer.pad_token_id)

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from DataLoader(dataset, batch_size=micro, sampler=sampler, collate_fn=collator)
            epoch += 1

    stream = batches()
    started = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            started = time.perf_counter()
        for _ in range(accum):
            batch = next(stream)
            loss = model(**batch).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    print(json.dumps({"samples_per_second": args.steps * micro * accum / elapsed, "steps": args.steps}))


if __name__ == "__main__":
    main()
