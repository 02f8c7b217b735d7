"""Padding against packing on a length-varied OCR set: answers from 1 to ~400 characters
(log-uniform: most are short, as OCR answers are), each rendered as a document image of its own
size. For padded batches (each micro-batch padded to its longest sample), length-grouped batches
(each optimizer step's samples sorted by length into its micro-batches) and packed batches
(data.packing): the padding fraction of one epoch's micro-batches, computed exactly from the real
sampler and packer, and samples/s and trained (non-padding) tokens/s of the real loop
(`python -m raytune_qvl.train --no-ray`, ZeRO-2), every run kept.

Run as: python -m bench.packing OUT_DIR [--repeats 2] (prints one JSON object)."""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MICRO, MAX_LENGTH, LOG_STEPS = 8, 1024, 4
MODES = {
    "padded": [],
    "grouped": ["data.group_by_length=true"],
    "packed": ["data.packing=true"],
}
SPEED = re.compile(r"^step\s+(\d+)/\d+.*?([\d.]+) samples/s", re.M)


def _text(rng: random.Random, chars: int) -> str:
    from raytune_qvl.assets.synth import _WORDS

    words = _WORDS.split() if isinstance(_WORDS, str) else list(_WORDS)
    out, line, lines = 0, [], []
    while out < chars:
        word = rng.choice(words)[: max(1, chars - out)]
        line.append(word)
        out += len(word) + 1
        if sum(len(w) + 1 for w in line) > 40:
            lines.append(" ".join(line))
            line = []
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines)


def write_data(out: Path, n_train: int, n_eval: int, seed: int = 0) -> dict[str, Path]:
    from raytune_qvl.assets.synth import _render_doc

    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        lines = []
        for i in range(n):
            chars = max(1, round(math.exp(rng.uniform(0, math.log(400)))))
            text = _text(rng, chars)
            rel = f"images/{split}_{i:05d}.png"
            _render_doc(text, rng).save(out / rel)
            lines.append(json.dumps({"id": f"{split}-{i}", "image": rel, "answer": text}))
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n")
    return paths


def _overrides(paths: dict[str, Path], cache: Path) -> list[str]:
    return [
        f"data.train_path={paths['train']}",
        f"data.eval_path={paths['eval']}",
        "data.test_path=null",
        f"data.max_length={MAX_LENGTH}",
        f"data.cache_dir={cache}",
        "data.num_workers=0",
        f"training.per_device_train_batch_size={MICRO}",
        "training.gradient_accumulation_steps=1",
    ]


def padding(paths: dict[str, Path], cache: Path) -> tuple[dict[str, Any], dict[str, list[int]], dict[str, list[int]]]:
    """Per mode: the padding fraction over one epoch, and the tokens of each sample in the order
    the mode trains them (grouping trains other steps than the plain order)."""
    from raytune_qvl.config.load import load_config
    from raytune_qvl.data.batches import EpochSampler, PackingCollator, sample_lengths
    from raytune_qvl.data.cache import load_or_prepare
    from raytune_qvl.data.processor import load_processor

    cfg = load_config(
        ROOT / "configs/tiny/training_config.yaml",
        ROOT / "configs/tiny/lora_config.yaml",
        ROOT / "configs/tiny/ds_config_zero2.json",
        _overrides(paths, cache),
    )
    items = load_or_prepare(cfg, load_processor(cfg), "train").items
    lengths = sample_lengths(items)
    pack = PackingCollator(0, MAX_LENGTH)
    out: dict[str, Any] = {"samples": len(lengths), "tokens_p50": statistics.median(lengths)}
    out["tokens_min"], out["tokens_max"] = min(lengths), max(lengths)
    fractions, trained, orders = {}, {}, {}
    for mode in MODES:
        sampler = EpochSampler(
            len(lengths),
            micro=MICRO,
            accum=1,
            rank=0,
            world=1,
            seed=cfg.data.preprocessing.seed,
            shuffle=cfg.data.preprocessing.shuffle,
            lengths=lengths if mode == "grouped" else None,
        )
        order = sampler.indices()
        real = total = 0
        for start in range(0, len(order), MICRO):
            batch = [lengths[i] for i in order[start : start + MICRO]]
            real += sum(batch)
            if mode == "packed":
                rows = pack.rows(batch)
                total += len(rows) * max(sum(batch[i] for i in row) for row in rows)
            else:
                total += len(batch) * max(batch)
        fractions[mode] = 1 - real / total
        trained[mode] = [lengths[i] for i in order]
        orders[mode] = order
    out["padding_fraction"] = fractions
    out["steps_per_epoch"] = len(order) // MICRO
    return out, trained, orders


def throughput(paths: dict[str, Path], cache: Path, out: Path, mode: str, steps: int) -> list[float]:
    """samples/s of every logging window (LOG_STEPS optimizer steps each) of one run."""
    args = [
        sys.executable, "-m", "raytune_qvl.train",
        "--config", "configs/tiny/training_config.yaml", "--lora_config", "configs/tiny/lora_config.yaml",
        "--deepspeed", "configs/tiny/ds_config_zero2.json", "--no-ray", "--overwrite",
        f"output.dir={out}", "output.report_to=none", f"training.max_steps={steps}",
        f"training.logging_steps={LOG_STEPS}", f"training.eval_steps={steps}", f"training.save_steps={steps}",
        "evaluation.generation_samples=0", *_overrides(paths, cache), *MODES[mode],
    ]  # fmt: skip
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{result.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return [float(m[1]) for m in SPEED.findall(result.stderr)]


def model_ms_per_k_tokens(
    paths: dict[str, Path], cache: Path, orders: dict[str, list[int]], repeats: int
) -> dict[str, Any]:
    """The model's forward + backward alone (no DeepSpeed, no data loading), ms per 1,000 trained
    tokens over the first 8 micro-batches each mode trains (grouping's are other samples); packed
    also without its block mask (wrong attention, for the mask's cost only). Every pass kept."""
    import time

    from raytune_qvl.config.load import load_config
    from raytune_qvl.data.batches import Collator, PackingCollator, TrainDataset, packed_inputs
    from raytune_qvl.data.cache import load_or_prepare
    from raytune_qvl.data.processor import load_processor
    from raytune_qvl.train.lora import apply_lora
    from raytune_qvl.train.model import load_model, rope_index_of

    cfg = load_config(
        ROOT / "configs/tiny/training_config.yaml",
        ROOT / "configs/tiny/lora_config.yaml",
        ROOT / "configs/tiny/ds_config_zero2.json",
        _overrides(paths, cache),
    )
    processor = load_processor(cfg)
    data = TrainDataset(load_or_prepare(cfg, processor, "train").items, processor)
    model = apply_lora(load_model(cfg), cfg.lora)
    rope = rope_index_of(model)
    pad, pack = (
        Collator(processor.tokenizer.pad_token_id),
        PackingCollator(processor.tokenizer.pad_token_id, MAX_LENGTH),
    )
    makers = {
        "padded": lambda b: pad(b),
        "grouped": lambda b: pad(b),
        "packed": lambda b: packed_inputs(pack(b), rope),
        "packed_without_mask": lambda b: {k: v for k, v in packed_inputs(pack(b), rope).items() if k != "position_ids"},
    }
    out: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(repeats):
        for name, make in makers.items():
            order = orders["grouped" if name == "grouped" else "padded"]
            batches = [make([data[i] for i in order[k : k + MICRO]]) for k in range(0, 8 * MICRO, MICRO)]
            tokens = sum(len(data.items[i].input_ids) for i in order[: 8 * MICRO])
            started = time.perf_counter()
            for batch in batches:
                model(**batch).loss.backward()
            out[name].append(1000 * (time.perf_counter() - started) / (tokens / 1000))
    return out


def _rates(speeds: list[float], tokens: list[int]) -> tuple[float, float]:
    """samples/s and trained tokens/s over the whole run but its first (warm-up) window: each
    window's time from its speed, its tokens from the samples the mode trained in it."""
    per_window = LOG_STEPS * MICRO
    seconds = samples = trained = 0.0
    for k, speed in enumerate(speeds[1:], start=1):
        seconds += per_window / speed
        samples += per_window
        trained += sum(tokens[k * per_window : (k + 1) * per_window])
    return samples / seconds, trained / seconds


def run(out: Path, repeats: int) -> dict[str, Any]:
    paths = write_data(out / "data", 480, 8)
    cache = out / "cache"
    result, trained, orders = padding(paths, cache)
    result["model_ms_per_k_tokens"] = model_ms_per_k_tokens(paths, cache, orders, repeats)
    steps = result["steps_per_epoch"]  # one whole epoch: every mode trains the same samples
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for i in range(repeats):
        for mode in MODES:  # alternating, so that drift in the machine's speed hits every mode
            sps, tps = _rates(throughput(paths, cache, out / f"{mode}-{i}", mode, steps), trained[mode])
            runs[mode].append({"samples_per_second": sps, "tokens_per_second": tps})
    result.update(micro_batch=MICRO, max_length=MAX_LENGTH, steps=steps, runs=runs)
    result["median_tokens_per_second"] = {
        m: statistics.median(r["tokens_per_second"] for r in rows) for m, rows in runs.items()
    }
    med = result["median_tokens_per_second"]
    result["packed_vs_padded"] = med["packed"] / med["padded"]
    result["grouped_vs_padded"] = med["grouped"] / med["padded"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        print(json.dumps(run(args.out, args.repeats)))
    finally:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
