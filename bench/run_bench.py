"""Benchmarks of raytune_qvl against plain baselines, each ratio measured side by side in one run:

1. loop efficiency: samples/s of the loop (DeepSpeed ZeRO-2 and ZeRO-3, one process; then under
   a Ray TorchTrainer with 1 and 2 workers) against a plain PyTorch + peft loop (bench/plain_loop.py);
2. per-trial overhead: time from a trial's start to its first optimizer step and its share of the
   trial; data preparation once per sweep against the trials' reads of it;
3. search efficiency on the demo's target (forms, eval CER): the staged sweep (3 sweep seeds) against
   the exhaustive learning rate x rank grid (the starting point's budget, no early stopping) and
   random search given the sweep's compute, each winner confirmed with a seed and scored on test;
4. scaling: sweep wall time for 4, 8 and 16 trials at concurrency 1 and 2;
5. memory: peak host RSS per worker of a 2-worker run of mid-size random Qwen2.5-VLs (394M and
   759M parameters, fp32) under ZeRO-2 against ZeRO-3 (+ CPU offload), which partitions at load;
6. the prepared-data cache at 100,000 records: the memory-mapped Arrow cache against the JSON
   cache it replaced (bench/data_cache.py): preparation, size, and 2 ranks' load time and PSS;
7. padded, length-grouped and packed batches on a length-varied set (bench/packing.py): padding
   fraction and trained tokens/s.

Run as: python -m bench.run_bench [--quick] [--only loop,overhead,search,scaling,memory,cache,packing]
Writes bench/results/latest.json and the plots, and rewrites BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TINY = ["--config", "configs/tiny/training_config.yaml", "--lora_config", "configs/tiny/lora_config.yaml"]
SPEED = re.compile(r"^step\s+(\d+)/\d+.*?([\d.]+) samples/s")


def _run(args: list[str], timeout: int = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def _progress_speeds(stderr: str, skip_first: bool = True) -> list[float]:
    """samples/s of every logging window (the first one, with warm-up, left out)."""
    speeds = [float(m.group(2)) for line in stderr.splitlines() if (m := SPEED.match(line))]
    return speeds[1:] if skip_first else speeds


# ----------------------------------------------------------------------------- 1. loop


def bench_loop(repeats: int, steps: int, tmp: Path) -> dict[str, Any]:
    common = [
        f"training.max_steps={steps}",
        "training.logging_steps=10",
        f"training.eval_steps={steps}",
        f"training.save_steps={steps}",
        "evaluation.generation_samples=0",
        "data.num_workers=0",
        f"output.tracking_uri=sqlite:///{tmp / 'loop.db'}",
        "--overwrite",
    ]
    runs: dict[str, list[float]] = {
        "plain": [],
        "zero2": [],
        "zero3_offload": [],
        "ray_1_worker": [],
        "ray_2_workers": [],
    }
    for i in range(repeats):
        plain = json.loads(
            _run(["-m", "bench.plain_loop", "--steps", str(steps - 10), "--warmup", "10"])
            .stdout.strip()
            .splitlines()[-1]
        )
        runs["plain"].append(plain["samples_per_second"])
        for name, ds, extra in (
            ("zero2", "configs/ds_config_zero2.json", ["--no-ray"]),
            ("zero3_offload", "configs/ds_config_zero3_offload.json", ["--no-ray"]),
            ("ray_1_worker", "configs/ds_config_zero2.json", ["ray.num_workers=1"]),
            (
                "ray_2_workers",
                "configs/ds_config_zero2.json",
                ["ray.num_workers=2", "training.gradient_accumulation_steps=1"],
            ),
        ):
            out = _run(
                [
                    "-m",
                    "raytune_qvl.train",
                    *TINY,
                    "--deepspeed",
                    ds,
                    *common,
                    *extra,
                    f"output.dir={tmp / f'{name}-{i}'}",
                    f"ray.storage_path={tmp / 'ray'}",
                ]
            )
            runs[name].append(statistics.median(_progress_speeds(out.stderr)))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    widths = "64,256" if repeats == 1 else "64,256,512,1024"
    engine_ab = [
        json.loads(line)
        for line in _run(
            ["-m", "bench.engine_ab", "--widths", widths, "--reps", str(max(3, repeats + 2))]
        ).stdout.splitlines()
        if line.startswith("{")
    ]
    return {
        "engine_vs_plain_by_width": engine_ab,
        "runs": runs,
        "median_samples_per_second": medians,
        "loop_ratio_vs_plain": medians["zero2"] / medians["plain"],
        "zero3_ratio_vs_plain": medians["zero3_offload"] / medians["plain"],
        "ray_loop_ratio_vs_plain": medians["ray_1_worker"] / medians["plain"],
        "ray_2_workers_ratio_vs_plain": medians["ray_2_workers"] / medians["plain"],
    }


# ----------------------------------------------------------------------------- sweeps


def _space_file(tmp: Path, name: str, **changes: Any) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "tiny_cpu.yaml").read_text())
    raw["base"] = {k: str(ROOT / v) for k, v in raw["base"].items()}
    raw.update(
        name=name,
        storage_path=str(tmp / "ray"),
        output_dir=str(tmp / "sweeps"),
        mlflow={"tracking_uri": f"sqlite:///{tmp / 'bench.db'}", "experiment": f"bench-{name}"},
    )
    overrides = changes.pop("overrides", {})
    raw.update(changes)
    raw["overrides"].update(overrides)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sweep(tmp: Path, name: str, env: dict | None = None, **changes: Any) -> dict[str, Any]:
    started = time.perf_counter()
    done = _run(
        ["-m", "raytune_qvl.sweep", str(_space_file(tmp, name, **changes)), "--overwrite"], timeout=5400, env=env
    )
    wall = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sweep-{name}.log").write_text(done.stdout + done.stderr)  # every run's console, kept (git-ignored)
    state = json.loads((tmp / "sweeps" / name / "sweep_state.json").read_text())
    trials = [t for t in state["trials"] if t["status"] != "reused"]
    return {"wall_seconds": wall, "trials": trials, "parent": state["parent_run_id"]}


def _curve(trials: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Best value so far (of full budgets: a stopped trial never wins) against cumulative training
    samples (every trial's), in launch order."""
    xs, ys, used, best = [], [], 0, None
    for t in trials:
        used += int(t.get("samples_seen") or 0)
        if t["value"] is not None and t["status"] == "completed":
            best = t["value"] if best is None else min(best, t["value"])
        if best is not None:
            xs.append(used)
            ys.append(best)
    return xs, ys


# ----------------------------------------------------------------------------- 2. overhead


def mid_size_model(out: Path, layers: int = 24) -> dict[str, Any]:
    """The tiny base's processor and vocabulary with a larger random network: `layers` text layers
    of width 1024 and an 8-block vision tower of width 512. Returns its shape and parameter count."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny = ROOT / ".assets" / "tiny-qwen25vl"
    raw = json.loads((tiny / "config.json").read_text())
    text = {**raw["text_config"], "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": layers}
    text.update(num_attention_heads=16, num_key_value_heads=4)
    text.pop("layer_types", None)  # one per layer: derived again
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [8, 12, 12]}  # head_dim 64
    vision = {**raw["vision_config"], "hidden_size": 512, "intermediate_size": 1024, "depth": 8, "num_heads": 8}
    vision.update(out_hidden_size=1024, fullatt_block_indexes=[3, 7])
    config = Qwen2_5_VLConfig(**{**raw, "text_config": text, "vision_config": vision})
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny).save_pretrained(out)
    return {"parameters": params, "text_layers": layers, "hidden_size": 1024, "vision_depth": 8}


MEMORY_KEPT = (
    "peak_host_rss_gb_max",
    "peak_host_rss_gb_min",
    "peak_host_rss_added_gb_max",
    "peak_host_rss_load_gb_max",
    "peak_host_rss_train_gb_max",
    "host_rss_gb_after_loaded",
    "host_rss_gb_after_engine",
    "host_rss_gb_after_first_step",
)


def bench_memory(tmp: Path, repeats: int, depths: tuple[int, ...] = (24, 48)) -> dict[str, Any]:
    """Peak host RSS of each of 2 Ray workers over a short run (the kernel's high-water mark,
    reported by the loop at its last step: loading's peak and training's apart), ZeRO-2 against
    ZeRO-3, for random models of width 1024 and `depths` text layers, alternating, every run kept.
    Gradient checkpointing on, as in every shipped GPU config."""
    # ZeRO-3 without offload, with buckets, the reuse distance and the live cap sized from the model
    # ("auto"), to tell the offload copies, the 7B-sized buckets and DeepSpeed's 1e9-element reuse
    # distance and live cap (which keep a model this size gathered on every rank) apart from the
    # partitioning itself
    plain3 = json.loads((ROOT / "configs/tiny/ds_config_zero3_offload.json").read_text())
    zero = plain3["zero_optimization"]
    for key in ("offload_optimizer", "offload_param", "sub_group_size"):
        zero.pop(key, None)
    for key in (
        "reduce_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
        "stage3_max_reuse_distance",
        "stage3_max_live_parameters",
    ):
        zero[key] = "auto"
    (tmp / "ds_config_zero3_auto.json").write_text(json.dumps(plain3))
    configs = {
        "zero2": "configs/tiny/ds_config_zero2.json",
        "zero3_offload": "configs/tiny/ds_config_zero3_offload.json",
        "zero3_auto_buckets": str(tmp / "ds_config_zero3_auto.json"),
    }
    models = {}
    for depth in depths:
        model = tmp / f"mid-qwen25vl-{depth}"
        shape = mid_size_model(model, layers=depth)
        # the shipped offload file once, on the first model: its buffers are the same at any depth
        names = list(configs) if depth == depths[0] else ["zero2", "zero3_auto_buckets"]
        settings = [
            f"model.name={model}",
            "output.report_to=none",
            "ray.num_workers=2",
            "training.max_steps=2",
            "training.eval_steps=2",
            "training.save_steps=2",
            "training.logging_steps=1",
            "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=1",
            "evaluation.generation_samples=0",
            "model.torch_dtype=float32",
            "environment.gradient_checkpointing=true",
            "data.test_path=null",  # the eval split is the evaluation's peak already
        ]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for i in range(repeats):
            for name in names:
                out = tmp / f"memory-{depth}-{name}-{i}"
                args = [*TINY, "--deepspeed", configs[name], *settings, f"output.dir={out}"]
                _run(["-m", "raytune_qvl.train", *args, f"ray.storage_path={tmp / 'ray'}"], timeout=1800)
                done = json.loads((out / "final" / "training_complete.json").read_text())
                runs[name].append({k: done[k] for k in MEMORY_KEPT if k in done})
                shutil.rmtree(out, ignore_errors=True)

        def median(key: str, name: str, runs: dict = runs) -> float:
            return statistics.median(r[key] for r in runs[name])

        estimates = {name: _memory_estimate_gib(configs[name], settings) for name in names}
        shutil.rmtree(model, ignore_errors=True)  # GBs: one model on disk at a time
        added = {name: median("peak_host_rss_added_gb_max", name) for name in names}
        models[str(depth)] = {
            "model": shape,
            "runs": runs,
            "median_peak_rss_gb": {name: median("peak_host_rss_gb_max", name) for name in names},
            "median_train_rss_gb": {name: median("peak_host_rss_train_gb_max", name) for name in names},
            "median_load_rss_gb": {name: median("peak_host_rss_load_gb_max", name) for name in names},
            "median_added_rss_gb": added,
            "estimate_gb": estimates,
            "estimate_vs_added": {name: estimates[name] / added[name] for name in names},
        }
    for found in models.values():
        train, life = found["median_train_rss_gb"], found["median_peak_rss_gb"]
        found["zero3_vs_zero2_train_rss"] = train["zero3_auto_buckets"] / train["zero2"]
        found["zero3_vs_zero2_rss"] = life["zero3_auto_buckets"] / life["zero2"]
    deepest = models[str(depths[-1])]
    return {
        "workers": 2,
        "models": models,
        "zero3_vs_zero2_train_rss": deepest["zero3_vs_zero2_train_rss"],
        "zero3_vs_zero2_rss": deepest["zero3_vs_zero2_rss"],
    }


def _memory_estimate_gib(ds: str, settings: list[str]) -> float:
    """The plan's pre-flight memory estimate per worker (config/memory.py) of a bench_memory run, GiB."""
    from raytune_qvl.config.load import load_config
    from raytune_qvl.train.preflight import preflight

    cwd = os.getcwd()
    os.chdir(ROOT)  # the tiny configs' paths are relative to the repository root
    try:
        cfg = load_config(TINY[1], TINY[3], ds, settings)
        return preflight(cfg, progress=False).plan.memory.total / 2**30
    finally:
        os.chdir(cwd)


def bench_cache(tmp: Path, records: int) -> dict[str, Any]:
    """bench/data_cache.py in its own process (its ranks measure PSS from a clean start)."""
    out = _run(["-m", "bench.data_cache", str(tmp / "cache-bench"), "--records", str(records)], timeout=3600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["arrow_pss_growth_mb_max"] = max(r["pss_growth_mb"] for r in result["loads"]["arrow"])
    return result


def bench_overhead(tmp: Path, trials: int) -> dict[str, Any]:
    """A sweep on a larger data set with a cold cache: the driver prepares the data once, every
    trial reads it; set-up time of each trial from its first report."""
    from mlflow.tracking import MlflowClient

    from raytune_qvl.assets.synth import write_dataset

    data = write_dataset(tmp / "data2k", "ocr_doc", 2000, 64, seed=11)
    cache = tmp / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    result = _sweep(
        tmp,
        "overhead",
        env={"RAYTUNE_QVL_CACHE": str(cache)},
        strategy="random",
        joint_trials=trials,
        asha={"enabled": False},
        parameters={"training.learning_rate": {"choices": [6.0e-4, 1.5e-3, 3.0e-3]}, "lora.r": {"choices": [4, 8, 16]}},
        trials_per_stage=trials,
        resources={"workers_per_trial": 1, "max_concurrent_trials": 1},
        overrides={
            "data.train_path": str(data["train"]),
            "data.eval_path": str(data["eval"]),
            "training.max_steps": 16,
            "evaluation.generation_samples": 0,
        },
    )
    client = MlflowClient(f"sqlite:///{tmp / 'bench.db'}")
    parent = client.get_run(result["parent"])
    cold = parent.data.metrics["data_prep_seconds"]
    rows = []
    for t in result["trials"]:
        run = client.search_runs([parent.info.experiment_id], f"tags.`raytune_qvl.trial_id` = '{t['trial_id']}'")[0]
        wall = (run.info.end_time - run.info.start_time) / 1000
        rows.append(
            {
                "trial": t["trial_id"],
                "setup_seconds": run.data.metrics["setup_seconds"],
                "data_prep_seconds": run.data.metrics["data_prep_seconds"],
                "wall_seconds": wall,
            }
        )
    rows.sort(
        key=lambda r: (
            client.search_runs([parent.info.experiment_id], f"tags.`raytune_qvl.trial_id` = '{r['trial']}'")[
                0
            ].info.start_time
        )
    )
    later = [r["data_prep_seconds"] for r in rows[1:]]
    return {
        "trials": rows,
        "cold_data_prep_seconds": cold,
        "trial1_data_prep_seconds": rows[0]["data_prep_seconds"],
        "trials_2_n_data_prep_seconds_median": statistics.median(later),
        "data_prep_reuse_ratio": statistics.median(later) / cold,
        "trial_setup_seconds": statistics.median(r["setup_seconds"] for r in rows),
        "trial_setup_share": statistics.median(r["setup_seconds"] / r["wall_seconds"] for r in rows),
    }


# ----------------------------------------------------------------------------- 3. search


def _search_summary(tmp: Path, name: str, res: dict[str, Any], metric: str) -> dict[str, Any]:
    """One search, as its result is reported: the searched trials, the confirmed winner (eval mean
    ± std over its seeds) and its score on the held-out test split, and every training sample spent
    (confirmation runs included)."""
    from mlflow.tracking import MlflowClient

    held_out = "test_" + metric.removeprefix("eval_")
    searched = [t for t in res["trials"] if t["stage"] != "confirm"]
    confirm = [t for t in res["trials"] if t["stage"] == "confirm"]
    parent = MlflowClient(f"sqlite:///{tmp / 'bench.db'}").get_run(res["parent"]).data.metrics
    best = json.loads((tmp / "sweeps" / name / "best" / "best.json").read_text())
    return {
        "trials": len(searched),
        "confirmation_runs": len(confirm),
        "stopped": sum(1 for t in searched if t["status"] == "stopped"),
        "best_search": min(t["value"] for t in searched if t["status"] == "completed" and t["value"] is not None),
        "chosen": best.get("overrides", {}),
        "eval_mean": parent.get(f"best_{metric}_mean"),
        "eval_std": parent.get(f"best_{metric}_std"),
        "test": parent.get(f"{held_out}_mean"),
        "samples": sum(int(t.get("samples_seen") or 0) for t in res["trials"]),
        "wall_seconds": res["wall_seconds"],
        "curve": _curve(searched),
    }


def bench_search(tmp: Path, seeds: int = 3) -> dict[str, Any]:
    """On the demo's target (forms, eval CER), at equal per-trial budgets (the starting point's
    epochs, no early stopping outside the sweep): the staged sweep with `seeds` sweep seeds, the
    exhaustive learning rate x rank grid over the same choices, and random search over the four
    parameters given the sweep's median compute. Each one's best is confirmed with another seed and
    scored on the held-out test split the same way."""
    space = yaml.safe_load((ROOT / "search_spaces" / "tiny_cpu.yaml").read_text())
    metric, params = space["metric"], space["parameters"]
    lrs, ranks = params["training.learning_rate"]["choices"], params["lora.r"]["choices"]
    train_size = sum(1 for _ in (ROOT / ".assets" / "data" / "forms" / "train.jsonl").open())
    out: dict[str, Any] = {"metric": metric, "grid_lrs": lrs, "grid_ranks": ranks}

    staged = []
    for i in range(seeds):
        name = f"staged{i}"
        staged.append(_search_summary(tmp, name, _sweep(tmp, name, seed=space["seed"] + i), metric))
    out["staged_runs"] = staged
    grid = _sweep(
        tmp,
        "grid",
        strategy="joint",
        joint_trials=len(lrs) * len(ranks),
        asha={"enabled": False},
        parameters={"training.learning_rate": {"choices": lrs}, "lora.r": {"choices": ranks}},
        trials_per_stage=1,
        confirm={"top_k": 1, "seeds": 1},
    )
    out["grid"] = _search_summary(tmp, "grid", grid, metric)
    search_samples = statistics.median(
        r["samples"] * r["trials"] / (r["trials"] + r["confirmation_runs"]) for r in staged
    )  # the sweep's searched trials' share, roughly: random gets as much, and the same confirmation
    epochs = statistics.fmean(params["training.num_epochs"]["choices"])
    n = max(2, round(search_samples / (epochs * train_size)))
    random = _sweep(tmp, "random", strategy="random", joint_trials=n, asha={"enabled": False}, trials_per_stage=1)
    out["random"] = _search_summary(tmp, "random", random, metric)

    g = out["grid"]
    for r in staged:
        r["test_gap_vs_grid"] = r["test"] - g["test"]
        r["tolerance"] = max(r["eval_std"] or 0.0, 0.01)
        r["samples_ratio_vs_grid"] = r["samples"] / g["samples"]
        r["matches_grid"] = r["test_gap_vs_grid"] <= r["tolerance"]
    out["sweep_test_gap_vs_grid"] = statistics.median(r["test_gap_vs_grid"] for r in staged)
    out["sweep_samples_ratio_vs_grid"] = statistics.median(r["samples_ratio_vs_grid"] for r in staged)
    out["sweep_seeds_matching_grid"] = sum(r["matches_grid"] for r in staged)
    out["random_test_gap_vs_grid"] = out["random"]["test"] - g["test"]
    return out


# ----------------------------------------------------------------------------- 4. scaling


def bench_scaling(tmp: Path, sizes: list[int]) -> dict[str, Any]:
    rows = []
    for concurrency in (1, 2):
        for n in sizes:
            res = _sweep(
                tmp,
                f"scale{n}c{concurrency}",
                strategy="random",
                joint_trials=n,
                asha={"enabled": False},
                trials_per_stage=1,
                parameters={
                    "training.learning_rate": {"low": 2e-4, "high": 3e-3, "log": True},
                    "lora.r": {"choices": [4, 8, 16, 32]},
                },
                resources={"workers_per_trial": 1, "max_concurrent_trials": concurrency},
                overrides={"training.max_steps": 16, "evaluation.generation_samples": 0},
            )
            rows.append(
                {
                    "trials": n,
                    "concurrency": concurrency,
                    "wall_seconds": res["wall_seconds"],
                    "per_trial_seconds": res["wall_seconds"] / n,
                }
            )
    return {"rows": rows}


# ----------------------------------------------------------------------------- report


def _plots(results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if "loop" in results:
        med = results["loop"]["median_samples_per_second"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(med)
        ax.bar(names, [med[n] for n in names], color=["grey"] + ["tab:blue"] * (len(names) - 1))
        ax.set_ylabel("samples / s (median)")
        ax.set_title("Training loop throughput on the tiny model (2 CPU cores)")
        fig.tight_layout()
        fig.savefig(RESULTS / "loop_throughput.png", dpi=110)
        made.append("loop_throughput.png")
    search = results.get("search") or {}
    if "sweep_seeds_matching_grid" in search:  # (a search recorded on the earlier task has no test scores)
        fig, ax = plt.subplots(figsize=(7.5, 4))
        lines = [(f"staged, seed {i}", r, "tab:blue") for i, r in enumerate(search["staged_runs"])]
        lines += [("grid", search["grid"], "grey"), ("random", search["random"], "tab:orange")]
        for i, (name, r, color) in enumerate(lines):
            xs, ys = r["curve"]
            style = ["-", "--", ":"][i % 3] if name.startswith("staged") else "-"
            label = f"{name}: {r['trials']} trials, test {r['test']:.3f}"
            ax.step(xs, ys, where="post", label=label, color=color, linestyle=style)
        ax.set_xlabel("training samples of the searched trials (cumulative)")
        ax.set_ylabel(f"best {search['metric']} so far (full budgets)")
        ax.set_title("Search efficiency on the forms target: best-so-far against compute")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "search_efficiency.png", dpi=110)
        made.append("search_efficiency.png")
    if "scaling" in results:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for c in (1, 2):
            rows = [r for r in results["scaling"]["rows"] if r["concurrency"] == c]
            ax.plot(
                [r["trials"] for r in rows], [r["wall_seconds"] for r in rows], marker="o", label=f"concurrency {c}"
            )
        ax.set_xlabel("trials")
        ax.set_ylabel("sweep wall time (s)")
        ax.set_title("Sweep scaling on 2 CPU cores")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "scaling.png", dpi=110)
        made.append("scaling.png")
    plt.close("all")
    return made


def _environment() -> dict[str, Any]:
    import importlib.metadata as md

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (
            int(line.split()[1]) // 1024 // 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    versions = {p: md.version(p) for p in ("torch", "transformers", "peft", "deepspeed", "ray", "optuna", "mlflow")}
    return {
        "date": date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "versions": versions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and trials (a smoke run)")
    parser.add_argument("--only", default="loop,overhead,search,scaling,memory,cache,packing")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite BENCHMARKS.md and the plots from latest.json"
    )
    args = parser.parse_args()
    if args.report_only:
        from bench.report import write_benchmarks_md

        results = json.loads((RESULTS / "latest.json").read_text())
        write_benchmarks_md(results, _plots(results))
        return
    parts = args.only.split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    latest = RESULTS / "latest.json"
    results: dict[str, Any] = json.loads(latest.read_text()) if latest.exists() else {}
    results["environment"] = _environment()
    tmp = Path(tempfile.mkdtemp(prefix="raytune_qvl-bench-"))
    try:
        if "loop" in parts:
            print("loop efficiency ...", flush=True)
            results["loop"] = bench_loop(repeats=1 if args.quick else 3, steps=40 if args.quick else 70, tmp=tmp)
        if "overhead" in parts:
            print("per-trial overhead ...", flush=True)
            results["overhead"] = bench_overhead(tmp, trials=3 if args.quick else 5)
        if "search" in parts:
            print("search efficiency ...", flush=True)
            results["search"] = bench_search(tmp, seeds=1 if args.quick else 3)
        if "scaling" in parts:
            print("scaling ...", flush=True)
            results["scaling"] = bench_scaling(tmp, [2, 4] if args.quick else [4, 8, 16])
        if "memory" in parts:
            print("memory per worker, ZeRO-2 against ZeRO-3 ...", flush=True)
            results["memory"] = bench_memory(
                tmp, repeats=1 if args.quick else 2, depths=(24,) if args.quick else (24, 48)
            )
        if "cache" in parts:
            print("prepared-data cache, Arrow against JSON ...", flush=True)
            results["cache"] = bench_cache(tmp, records=10_000 if args.quick else 100_000)
        if "packing" in parts:
            print("padded, length-grouped and packed batches ...", flush=True)
            out = _run(["-m", "bench.packing", str(tmp / "packing"), "--repeats", "1" if args.quick else "3"])
            results["packing"] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {
        k: v
        for k, v in {
            "loop_ratio_vs_plain": results.get("loop", {}).get("loop_ratio_vs_plain"),
            "ray_loop_ratio_vs_plain": results.get("loop", {}).get("ray_loop_ratio_vs_plain"),
            "trial_setup_seconds": results.get("overhead", {}).get("trial_setup_seconds"),
            "data_prep_reuse_ratio": results.get("overhead", {}).get("data_prep_reuse_ratio"),
            "sweep_test_gap_vs_grid": results.get("search", {}).get("sweep_test_gap_vs_grid"),
            "sweep_seeds_matching_grid": results.get("search", {}).get("sweep_seeds_matching_grid"),
            "sweep_samples_ratio_vs_grid": results.get("search", {}).get("sweep_samples_ratio_vs_grid"),
            "zero3_vs_zero2_train_rss": results.get("memory", {}).get("zero3_vs_zero2_train_rss"),
            "zero3_vs_zero2_rss": results.get("memory", {}).get("zero3_vs_zero2_rss"),
            "cache_pss_growth_mb": results.get("cache", {}).get("arrow_pss_growth_mb_max"),
            "packed_vs_padded_tokens_per_second": results.get("packing", {}).get("packed_vs_padded"),
        }.items()
    }
    results.update(summary)
    latest.write_text(json.dumps(results, indent=1, default=str))
    plots = _plots(results)
    from bench.report import write_benchmarks_md

    write_benchmarks_md(results, plots)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
