"""Writes BENCHMARKS.md from bench/results/latest.json (called by bench/run_bench.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

DEFINITIONS = """\
| key | meaning |
|---|---|
| `loop_ratio_vs_plain` | median samples/s of raytune_qvl's loop (DeepSpeed ZeRO-2 engine, one process, `--no-ray`) ÷ median samples/s of the plain PyTorch + peft loop (`bench/plain_loop.py`), same tiny model, data, micro batch 4, accumulation 2, AdamW, bf16, steady state (the first logging window, with warm-up, left out) |
| `ray_loop_ratio_vs_plain` | the same loop inside a Ray `TorchTrainer` with 1 worker ÷ the plain loop |
| `trial_setup_seconds` | median over a sweep's trials of the time from the trial's start (its `TorchTrainer` being built) to its first optimizer step: worker processes, process group, data read, model + LoRA, DeepSpeed engine |
| `data_prep_reuse_ratio` | median data-preparation time of trials 2..N ÷ the cold preparation (audit + tokenization of 2,000 records with an empty cache), which the sweep driver does once before the first trial; every trial, the first included, reads the prepared data from the cache |
| `sweep_seeds_matching_grid` | of the staged sweep's 3 runs (sweep seeds 42, 43, 44), how many chose a configuration whose test CER (the held-out split, read only by confirmation runs) is within one seed std (the winner's eval CER over its confirmation seeds) or 0.01 of the test CER of the exhaustive learning rate x rank grid's best (chosen on eval and confirmed the same way) |
| `sweep_test_gap_vs_grid` | the median over the sweep's seeds of (sweep's test CER − grid's test CER) |
| `sweep_samples_ratio_vs_grid` | the median over the sweep's seeds of training samples processed by the staged sweep (every trial, stopped ones up to where ASHA stopped them, confirmation runs included) ÷ those of the grid (its confirmation run included) |
| `zero3_vs_zero2_train_rss` | section 5, the deeper model: the median over runs of the training peak of host RSS per worker (the largest over the 2 workers, from the end of the engine's building to the run's end) under ZeRO-3 (`zero3_auto_buckets`) ÷ that under ZeRO-2 |
| `zero3_vs_zero2_rss` | the same over each worker's whole life, the model's loading included (under ZeRO-3 rank 0 maps the whole checkpoint while transformers loads it) |
"""


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("meets the target" if ok else "**below the target**")


def write_benchmarks_md(results: dict[str, Any], plots: list[str]) -> None:
    env = results["environment"]
    lines = [
        "# Benchmarks",
        "",
        "Measured by `make bench` (`python -m bench.run_bench`); machine-readable results in",
        "[`bench/results/latest.json`](bench/results/latest.json). Every ratio is measured side by side in",
        "one run; speeds are medians of repeated runs. These are benchmarks, not tests.",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB, no GPU. Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + f". Date: {env['date']}.",
        "",
        "## Summary",
        "",
        "| key | value | target | |",
        "|---|---|---|---|",
    ]
    loop, over, search = results.get("loop"), results.get("overhead"), results.get("search")
    if search and "sweep_seeds_matching_grid" not in search:
        search = None  # recorded on the earlier task (eval_loss, no test split): run `--only search` again
    rows = [
        (
            "loop_ratio_vs_plain",
            results.get("loop_ratio_vs_plain"),
            "≥ 0.95",
            None if not loop else results["loop_ratio_vs_plain"] >= 0.95,
        ),
        (
            "ray_loop_ratio_vs_plain",
            results.get("ray_loop_ratio_vs_plain"),
            "≥ 0.95",
            None if not loop else results["ray_loop_ratio_vs_plain"] >= 0.95,
        ),
        ("trial_setup_seconds", results.get("trial_setup_seconds"), "—", None),
        (
            "data_prep_reuse_ratio",
            results.get("data_prep_reuse_ratio"),
            "≤ 0.10",
            None if not over else results["data_prep_reuse_ratio"] <= 0.10,
        ),
        (
            "sweep_seeds_matching_grid",
            None if not search else f"{search['sweep_seeds_matching_grid']} of {len(search['staged_runs'])}",
            "all",
            None if not search else search["sweep_seeds_matching_grid"] == len(search["staged_runs"]),
        ),
        ("sweep_test_gap_vs_grid", (search or {}).get("sweep_test_gap_vs_grid"), "≤ seed std or 0.01", None),
        (
            "sweep_samples_ratio_vs_grid",
            (search or {}).get("sweep_samples_ratio_vs_grid"),
            "≤ 0.33",
            None if not search else results["sweep_samples_ratio_vs_grid"] <= 1 / 3,
        ),
        (
            "zero3_vs_zero2_train_rss",
            results.get("zero3_vs_zero2_train_rss"),
            "≤ 0.75",
            None if "memory" not in results else results["zero3_vs_zero2_train_rss"] <= 0.75,
        ),
        ("zero3_vs_zero2_rss", results.get("zero3_vs_zero2_rss"), "—", None),
        (
            "cache_pss_growth_mb",
            results.get("cache_pss_growth_mb"),
            "≤ 100",
            None if "cache" not in results else results["cache_pss_growth_mb"] <= 100,
        ),
        (
            "packed_vs_padded_tokens_per_second",
            results.get("packed_vs_padded_tokens_per_second"),
            "≥ 1.5 (CPU)",
            None if "packing" not in results else results["packed_vs_padded_tokens_per_second"] >= 1.5,
        ),
    ]
    for key, value, target, ok in rows:
        lines.append(f"| `{key}` | {_fmt(value)} | {target} | {_verdict(ok)} |")
    lines += ["", DEFINITIONS]

    if loop:
        med = loop["median_samples_per_second"]
        lines += [
            "## 1. Loop efficiency",
            "",
            "Samples per second, steady state, tiny Qwen2.5-VL (bf16, LoRA r=16 on the language model), micro batch 4,",
            "effective batch 8 in every row; repeats: "
            + ", ".join(f"{k} {[round(x, 1) for x in v]}" for k, v in loop["runs"].items())
            + ".",
            "",
            "| loop | samples/s | ÷ plain |",
            "|---|---|---|",
        ]
        for name, value in med.items():
            lines.append(f"| {name} | {value:.1f} | {value / med['plain']:.3f} |")
        lines += ["", "![loop throughput](bench/results/loop_throughput.png)", ""]
        lines += [LOOP_NOTES, ""]
        if loop.get("engine_vs_plain_by_width"):
            lines += [
                "The engine against a plain bf16 step, interleaved in one process on the same batches, as the model widens",
                "(`bench/engine_ab.py`: text width, 2 layers, the same 28 LoRA tensors):",
                "",
                "| width | engine samples/s | plain samples/s | engine ÷ plain |",
                "|---|---|---|---|",
                *[
                    f"| {r['width']} | {r['engine']} | {r['plain']} | {r['ratio']} |"
                    for r in loop["engine_vs_plain_by_width"]
                ],
                "",
                ENGINE_NOTES,
                "",
            ]
    if over:
        lines += [
            "## 2. Per-trial overhead",
            "",
            f"A sweep of {len(over['trials'])} trials (one at a time, 16 optimizer steps each) on 2,000 synthetic records with a cold cache.",
            "",
            f"- cold data preparation (the driver, once per sweep): {over['cold_data_prep_seconds']:.2f} s",
            f"- trial 1 data preparation (a cache read): {over['trial1_data_prep_seconds']:.3f} s; trials 2..N median: {over['trials_2_n_data_prep_seconds_median']:.3f} s",
            f"- time from a trial's start to its first optimizer step (median): {over['trial_setup_seconds']:.1f} s, "
            f"{100 * over['trial_setup_share']:.0f}% of the trial's wall time",
            "",
            "| trial | set-up (s) | data (s) | wall (s) |",
            "|---|---|---|---|",
            *[
                f"| {r['trial']} | {r['setup_seconds']:.1f} | {r['data_prep_seconds']:.3f} | {r['wall_seconds']:.1f} |"
                for r in over["trials"]
            ],
            "",
            OVERHEAD_NOTES,
            "",
        ]
    if search:
        lines += _search_section(search)
    if "scaling" in results:
        lines += [
            "## 4. Scaling on this machine",
            "",
            "Random-search sweeps of short trials (16 steps), 1 worker per trial.",
            "",
            "| trials | concurrency | wall (s) | per trial (s) |",
            "|---|---|---|---|",
        ]
        for r in results["scaling"]["rows"]:
            lines.append(
                f"| {r['trials']} | {r['concurrency']} | {r['wall_seconds']:.0f} | {r['per_trial_seconds']:.1f} |"
            )
        lines += ["", "![scaling](bench/results/scaling.png)", "", SCALING_NOTES, ""]
    if "memory" in results:
        lines += _memory_section(results["memory"])
    if "cache" in results:
        lines += _cache_section(results["cache"])
    if "packing" in results:
        lines += _packing_section(results["packing"])
    lines += [GPU_NOTES, ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))


def _packing_section(p: dict) -> list[str]:
    lines = [
        "## 7. Padded, length-grouped and packed batches",
        "",
        f"{p['samples']} synthetic documents with answers of 1 to ~400 characters (log-uniform), each image its own "
        f"size: {p['tokens_min']} to {p['tokens_max']} tokens per sample (median {p['tokens_p50']:.0f}). One epoch "
        f"({p['steps']} optimizer steps, micro batch {p['micro_batch']}, `data.max_length` {p['max_length']}) of "
        "`python -m raytune_qvl.train --no-ray` (ZeRO-2, fp32) per run, the modes alternating; rates over the epoch "
        "but its first logging window. Padding fraction: padding tokens ÷ all tokens of the epoch's micro-batches, "
        "from the real sampler and packer (`bench/packing.py`).",
        "",
        "| batches | padding | samples/s, each run | trained tokens/s, each run | median tokens/s | ÷ padded |",
        "|---|---|---|---|---|---|",
    ]
    med = p["median_tokens_per_second"]
    for mode, rows in p["runs"].items():
        sps = ", ".join(f"{r['samples_per_second']:.1f}" for r in rows)
        tps = ", ".join(f"{r['tokens_per_second']:.0f}" for r in rows)
        lines.append(
            f"| {mode} | {100 * p['padding_fraction'][mode]:.1f}% | {sps} | {tps} | {med[mode]:.0f} | "
            f"{med[mode] / med['padded']:.2f} |"
        )
    steps = p["model_ms_per_k_tokens"]
    lines += [
        "",
        "The model's forward + backward alone (no DeepSpeed, no data loading), ms per 1,000 trained tokens over the "
        "first 8 micro-batches each mode trains, every pass: "
        + "; ".join(f"{name} {', '.join(f'{v:.0f}' for v in values)}" for name, values in steps.items())
        + ".",
    ]
    return lines + ["", PACKING_NOTES, ""]


def _cache_section(cache: dict) -> list[str]:
    lines = [
        "## 6. The prepared-data cache at scale: Arrow (memory-mapped) against JSON",
        "",
        f"{cache['records']:,} synthetic form records (500 rendered forms, repeated; {cache['kept']:,} kept), encoded "
        f"once per format from a cold cache; then {cache['ranks']} processes load the warm cache at the same moment, "
        "as the ranks of one node do (`bench/data_cache.py`). PSS growth is measured in each rank right after its "
        "load, against the same rank just before it (pyarrow imported in both formats).",
        "",
        "| cache | preparation (s) | on disk (MB) | load (s), each rank | PSS growth (MB), each rank | row read (µs), each rank |",
        "|---|---|---|---|---|---|",
    ]
    for fmt in ("arrow", "json"):
        loads = cache["loads"][fmt]
        seconds = ", ".join(f"{r['load_seconds']:.2f}" for r in loads)
        growth = ", ".join(f"{r['pss_growth_mb']:.0f}" for r in loads)
        reads = ", ".join(f"{r['row_read_us']:.0f}" for r in loads)
        lines.append(
            f"| {fmt} | {cache['prep_seconds'][fmt]:.0f} | {cache['cache_mb'][fmt]:.0f} | {seconds} | {growth} | {reads} |"
        )
    return lines + ["", CACHE_NOTES, ""]


def _memory_section(memory: dict) -> list[str]:
    models = memory.get("models") or {}
    lines = [
        "## 5. Memory per worker: ZeRO-2 against ZeRO-3 (with CPU offload, and without it)",
        "",
        "Random Qwen2.5-VLs (fp32; text layers of width 1024, an 8-block vision tower; the tiny base's processor), "
        f"trained for 2 steps by {memory['workers']} Ray workers (`python -m raytune_qvl.train`), LoRA r=8, micro batch 2, "
        "gradient checkpointing on (as in every shipped GPU config), one evaluation over the 64-sample eval split. "
        "Peak host RSS of each worker (the kernel's high-water mark, reset before the model loads and again once the "
        "engine is built, so the loop reports loading's peak and training's apart: `peak_host_rss_load_gb_max`, "
        "`peak_host_rss_train_gb_max`; over the whole life `peak_host_rss_gb_max` / `_min`), the configurations "
        "alternating, every run shown. `zero3_auto_buckets`: the shipped ZeRO-3 file without its two offload blocks and "
        "`sub_group_size`, its buckets and persistence threshold `auto` (sized from the hidden size, as the Hugging Face "
        "integration does), its `stage3_max_reuse_distance` and `stage3_max_live_parameters` `auto` (about two layers).",
        "",
    ]
    for found in models.values():
        shape = found["model"]
        lines += [
            f"**{shape['parameters'] / 1e6:.0f}M parameters, {shape['text_layers']} text layers.**",
            "",
            "| config | runs: whole life max / min, loading max, training max (GiB) | median loading | "
            "median training | median whole life |",
            "|---|---|---|---|---|",
        ]
        for name, rows in found["runs"].items():
            runs = ", ".join(
                f"{r['peak_host_rss_gb_max']:.2f} / {r['peak_host_rss_gb_min']:.2f}, "
                f"{r['peak_host_rss_load_gb_max']:.2f}, {r['peak_host_rss_train_gb_max']:.2f}"
                for r in rows
            )
            lines.append(
                f"| {name} | {runs} | {found['median_load_rss_gb'][name]:.2f} | "
                f"{found['median_train_rss_gb'][name]:.2f} | {found['median_peak_rss_gb'][name]:.2f} |"
            )
        lines += [
            "",
            f"`zero3_auto_buckets` ÷ `zero2`: training {found['zero3_vs_zero2_train_rss']:.2f}, whole life "
            f"{found['zero3_vs_zero2_rss']:.2f}.",
            "",
            "Where the RSS goes (GiB, the largest over the workers; `added`: the peak less the RSS before the model "
            "loaded), and the plan's pre-flight estimate per worker (`config/memory.py`) against `added`:",
            "",
            "| config | runs: after loading / after the engine / after the first step / peak added | estimate | "
            "estimate ÷ median added |",
            "|---|---|---|---|",
        ]
        for name, rows in found["runs"].items():
            cells = ", ".join(" / ".join(f"{r.get(k, float('nan')):.2f}" for k in _PHASES) for r in rows)
            lines.append(
                f"| {name} | {cells} | {found['estimate_gb'][name]:.2f} | {found['estimate_vs_added'][name]:.2f} |"
            )
        lines.append("")
    lines += [MEMORY_NOTES, ""]
    return lines


_PHASES = (
    "host_rss_gb_after_loaded",
    "host_rss_gb_after_engine",
    "host_rss_gb_after_first_step",
    "peak_host_rss_added_gb_max",
)


LOOP_NOTES = """\
Both loops train the same module in the same dtype: every weight in bf16, adapters included, which is
what DeepSpeed's bf16 mode does (with fp32 master weights in the optimizer). peft's own default keeps
the adapters in fp32 over a bf16 base; on this CPU that alone is ~17% faster for a model this small
(`python -m bench.plain_loop --fp32-adapters`), because bf16 matmuls this tiny have no hardware
advantage here — on GPUs bf16 is the fast path. That was the first cause of the gap and is why the
reference now runs in the engine's dtype.

The rest of the gap is the DeepSpeed engine itself, not the loop around it: the table below times the
engine and a plain step interleaved in one process. Its cost is fixed per parameter tensor and per
step (gradient hooks, fp32 master copies, partition bookkeeping), so it is a visible share of a
~30 ms step of a 300k-parameter model and shrinks as the model grows. ZeRO-3 with CPU offload pays
parameter gathering and the offloaded optimizer on every step by design: it is the configuration that
saves memory, not the fast one. With 2 workers each worker has one of the 2 cores (Ray gives each
worker one thread), against the plain loop's two threads in one process."""

ENGINE_NOTES = """\
So the measured loop ratio (0.84) is the engine's share at width 64 (0.89 here, interleaved) times the
loop's own data loading and bookkeeping (~0.94, inside the ±8% spread between repeats on this shared
machine). From width 512 the engine alone is within 5% of the plain step and at 1024 within about 1%.
What would reach ≥ 0.95 on the tiny model: bypassing DeepSpeed for single-process CPU runs, which would
make the measured path differ from the one that runs on GPUs — not worth it. At a real width (3,584 for
the 7B model, 28 layers) the fixed cost is noise; `bench/gpu_step.py` measures that path directly.
Under Ray with one worker the loop is where it is without Ray (0.82 against 0.84: Ray adds the report
round-trips); two workers, one core each, together beat the plain two-thread loop (1.09)."""

OVERHEAD_NOTES = """\
Set-up is what a trial's new processes do before training: start the Ray Train worker group, import
torch/transformers/deepspeed, build the process group, model + LoRA and the DeepSpeed engine. These
benchmark trials are 16 optimizer steps long, so set-up is about half of each; a real trial trains for
minutes to hours and the same ~13 s is noise. The data is prepared once per sweep, by the driver before
the first trial (where a bad data set also stops the sweep); every trial — the first one included —
reads it from the cache in about 50 ms."""


def _search_section(search: dict) -> list[str]:
    metric = search["metric"]
    held_out = "test_" + metric.removeprefix("eval_")
    g = search["grid"]
    lines = [
        "## 3. Search efficiency",
        "",
        f"The demo's task: the pre-trained tiny base adapted to the forms domain, ranked by {metric} (min), every",
        f"search's winner confirmed with one more seed and scored once on the held-out test split ({held_out}).",
        f"Grid: every learning rate {search['grid_lrs']} x rank {search['grid_ranks']}, at the starting point's budget",
        "(the staged sweep's trials outside its epochs stage have the same), no early stopping. Random: the four",
        "parameters, as many trials as the sweep's searched compute buys, no early stopping.",
        "The staged sweep's samplers, as `--dry-run` prints them for search_spaces/tiny_cpu.yaml: the learning",
        "rate and the rank by every untried choice (a grid: 4 rates in 4 trials, 2 untried ranks in 2), the",
        "effective batch with its learning-rate factor by TPE (1 point at random, then 1 modelled), the epochs",
        "by every untried choice without early stopping; ASHA (grace 1 epoch, reduction 2) elsewhere.",
        "",
        f"| search | trials | stopped by ASHA | confirmation runs | best searched {metric} | confirmed {metric} (mean ± std) "
        f"| {held_out} of the chosen config | training samples | ÷ grid samples | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(f"staged, seed {i}", r) for i, r in enumerate(search["staged_runs"])]
    rows += [("grid", g), ("random", search["random"])]
    for name, r in rows:
        std = f" ± {r['eval_std']:.4f}" if r.get("eval_std") is not None else ""
        lines.append(
            f"| {name} | {r['trials']} | {r['stopped']} | {r['confirmation_runs']} | {r['best_search']:.4f} "
            f"| {r['eval_mean']:.4f}{std} | {r['test']:.4f} | {r['samples']} | {r['samples'] / g['samples']:.2f} "
            f"| {r['wall_seconds']:.0f} |"
        )
    lines += ["", "Each staged seed against the grid (the criterion: a test score within one seed std, or 0.01):", ""]
    lines += ["| seed | chosen | test gap vs grid | tolerance | within | ÷ grid samples |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(search["staged_runs"]):
        chosen = ", ".join(f"{k.split('.')[-1]} {v:g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                           for k, v in r["chosen"].items() if k.startswith(("training.learning_rate", "lora.r",
                           "training.gradient_accumulation_steps", "training.num_epochs")))  # fmt: skip
        lines.append(
            f"| {i} | {chosen} | {r['test_gap_vs_grid']:+.4f} | {r['tolerance']:.4f} "
            f"| {'yes' if r['matches_grid'] else 'no'} | {r['samples_ratio_vs_grid']:.2f} |"
        )
    lines += ["", "![search efficiency](bench/results/search_efficiency.png)", "", SEARCH_NOTES, ""]
    return lines


SEARCH_NOTES = """\
In the recorded run every staged seed chose a configuration that reads the test split better than the
grid's best (test CER 0.051-0.071 against 0.088): besides the learning rate and rank the sweep also
searches the effective batch and the epochs, and its winners all train 6 epochs where the grid's budget
is the starting point's 4. Random search with the same compute did worst (0.096). The sample ratio
(0.71-0.88) misses the one-third target: the exhaustive learning rate x rank grid of this space is only
4 x 3 = 12 trials, while the staged sweep runs 10 trials, two confirmation runs and, in its epochs stage,
a 6-epoch schedule that ASHA does not stop (fairly: see the README). One third of the grid's samples is
about 4 full trials, fewer than the learning-rate stage alone; the target fits a space whose grid is
large against the sweep (the GPU spaces: 5 x 4 = 20 lr x rank points at 3-5 epochs), not this demo's.
This part of the benchmark took 41 minutes on 2 cores (`python -m bench.run_bench --only search`)."""


SCALING_NOTES = """\
Each trial carries its own start-up (new worker processes, ~13 s on these cores), so wall time grows
linearly with the number of trials. Two trials at a time on 2 cores finish a sweep about 1.45x faster
than one at a time: one trial's start-up overlaps the other's training."""

PACKING_NOTES = """\
Packing leaves almost no padding, grouping little, and the model's cost per trained token follows:
the loop's ratios are close to the model's, so the data path and the optimizer step are not what
holds packing back. Two things are: the block mask that SDPA gets for packed rows (the difference
between `packed` and `packed_without_mask`, whose attention crosses samples: wrong, timed only for
that), and attention over a packed row's whole length (~450-900 tokens) where grouped rows pay it
per short row, since a dense mask does not skip the masked blocks. So on this CPU packing stays
below 1.5x the padded rate (the table), and length grouping does better. On GPUs FlashAttention-2's
varlen kernel needs no mask and costs each sample's own square, which is where packing should
pass grouping; that is not measured here (no GPU). `data.packing` stays off by default. Grouping
trains other optimizer steps than the plain order (mega-batches of 50 steps sorted by length, the
steps shuffled); packing trains exactly the same steps, to the same losses
(tests/integration/test_loss.py)."""

CACHE_NOTES = """\
The JSON cache parses every sample's token lists into Python objects in every rank (each token id
above 256 is a 28-byte object behind an 8-byte pointer), so its growth is proportional to the data
set and paid once per rank, and once more per forked DataLoader worker whose reference counts touch
those pages. The Arrow cache maps the file: right after the load a rank holds the footer and the
column views, and the pages a row read touches are the page cache's, shared by every rank and
DataLoader worker of the node. Preparation is the encoding (the same in both) plus the write.
These forms carry ~80 tokens per sample; a real document image expands to ~850 image tokens, so
the JSON cache's growth there is about ten times the figure above, while the Arrow cache's is not
a function of the data size. A row read builds one `Encoded` (Python lists of that row only)."""

MEMORY_NOTES = """\
Training under ZeRO-3 now peaks well below ZeRO-2: 0.83 of it on the 24-layer model and 0.71 on the
48-layer one (the target, ≤ 0.75, is met on the deeper model). With 2 ranks ZeRO-3 can save at most
half the weights, and the ~0.95 GiB each worker holds before the model loads (Python, torch,
DeepSpeed, Ray) is the same in both, so the ratio falls as the weights grow: a 7B's weights dwarf
both. What this round found and fixed: (1) DeepSpeed's prefetcher starts a bucket's worth of gathers
at every module the forward enters, and a peft LoRA layer is five modules (the wrapper, the base
layer, dropout, A, B) around one weight, so the prefetches ran ahead of the compute until
`stage3_max_live_parameters` stopped them: at DeepSpeed's 1e9 elements the 394M model was gathered
whole in every forward (its peak was 4.39 GiB without gradient checkpointing, 1.3x ZeRO-2's). `"auto"` now caps it at
about two layers (40·hidden²; `tests/integration/test_memory.py` checks the cap against the default
on the tiny base). (2) The gathers move each weight in pieces of about its size ÷ ranks; below the
1 MB mmap threshold those pieces came from the heap and left ~0.55 GiB of freed, fragmented memory
after one step (`malloc_trim` returned it): ZeRO-3 CPU workers use 256 KB. Earlier rounds fixed
glibc's moving threshold, the weights an evaluation left gathered, and the partitioning at load.
The whole-life peak is loading's on rank 0 (3.19 and 5.23 GiB, the same in every run): transformers'
ZeRO-3 loader maps the whole checkpoint on rank 0, copies each module's weights into the gathered
parameters and scatters them, and the mapped pages (page cache, shared and reclaimable) stay in its
RSS until loading ends; rank 1 never maps it (its whole-life peak is its training peak, 2.42 and
3.28 GiB). Loading each rank's slices of the checkpoint itself would remove that peak; it is not
done. The estimate's `added` for ZeRO-3 includes that mapping: against training's own (training peak
less the ~0.95 GiB before the model) the estimate is 0.80 and 0.84 of the measured. The shipped
offload file on a CPU-only host copies what it offloads into pinned host buffers of the same host:
the configuration that saves GPU memory, not host memory. On GPUs the gathered weights are the GPU
allocator's, not the host's: this host-RSS comparison does not say what a GPU run holds."""

GPU_NOTES = """\
## GPU

`bench/gpu_step.py` measures the loop's engine on one GPU with a randomly initialised Qwen2.5-VL of a
real shape (`--shape 3b` or `7b`), bf16, SDPA or FlashAttention-2 (`--attn flash_attention_2`),
ZeRO-2: tokens/s, model FLOPs utilization (its docstring writes the FLOPs formula down:
≈ 4·N + 8·L·s·d per trained token with LoRA) and peak memory:

    python -m bench.gpu_step --shape 7b --batch 4 --seq 1024 --steps 30

No GPU was lent to the sessions that wrote these benchmarks, so its figures are not recorded yet;
the script runs on CPU with `--shape tiny --device cpu` (the test suite does) and unchanged on a GPU."""
