"""`make gpu-check`: the GPU path, run once on a CUDA machine in about 8 minutes, as one script.

1. versions (torch, CUDA, NCCL, cuDNN, flash-attn, DeepSpeed, transformers, peft) and the GPUs;
2. `bench/gpu_step.py` on the real 3B and 7B shapes (random weights): SDPA, and FlashAttention-2
   when it is installed, under ZeRO-2, and the 7B under ZeRO-3: tokens/s, MFU, peak memory;
3. a 2-trial tiny sweep with `use_gpu: true`, bf16 and gradient checkpointing (two trials sharing
   the GPU, a Ray cluster of this machine, MLflow in a temporary store);
4. the tiny model trained under ZeRO-3 on the GPU in bf16, its adapter saved through the gather
   and reloaded on a fresh base: the logits match the engine's.

Writes bench/results/gpu.json and prints a summary table (Markdown, for BENCHMARKS.md). Each part
runs in its own process with a time limit; a part that fails is recorded with the end of its
output and the others still run. Without a GPU it says so and exits 0.

Run as: python -m bench.gpu_check [--plan] [--out bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


def steps(flash: bool) -> list[dict[str, Any]]:
    """What the check runs, in order: (name, command, time limit)."""
    attns = ["sdpa", "flash_attention_2"] if flash else ["sdpa"]
    out = []
    for shape in ("3b", "7b"):
        for attn in attns:
            out.append(_step_run(shape, attn, zero=2))
    out.append(_step_run("7b", attns[-1], zero=3))
    out.append(
        {"name": "tiny sweep on the GPU (bf16, gradient checkpointing, 2 trials)", "kind": "sweep", "limit": 240}
    )
    out.append({"name": "ZeRO-3 adapter save and reload on the GPU (bf16)", "kind": "reload", "limit": 180})
    return out


def _step_run(shape: str, attn: str, zero: int) -> dict[str, Any]:
    args = ["-m", "bench.gpu_step", "--shape", shape, "--attn", attn, "--zero", str(zero)]
    args += ["--steps", "10", "--warmup", "3", "--batch", "4", "--seq", "1024"]
    return {"name": f"gpu_step {shape} {attn} ZeRO-{zero}", "kind": "gpu_step", "args": args, "limit": 150}


def versions() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001 - a torch build without NCCL
        out["nccl"] = None
    for name in ("deepspeed", "transformers", "peft", "ray", "flash_attn"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed, or broken: both are what the check reports
            out[name] = None
    if torch.cuda.is_available():
        out["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            }
            for i in range(torch.cuda.device_count())
        ]
    return out


def _python(args: list[str], limit: int, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=limit, env=env)
        return done.returncode, done.stdout, done.stderr, time.perf_counter() - started
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return 124, out, err + f"\n(stopped after {limit} s)", time.perf_counter() - started


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def sweep_space(tmp: Path) -> Path:
    """The tiny sweep on the GPU: tiny_cpu.yaml in bf16 with gradient checkpointing, 2 trials
    sharing the GPU, 1 epoch each."""
    import yaml

    space = yaml.safe_load((ROOT / "search_spaces" / "tiny_cpu.yaml").read_text())
    space["base"] = {k: str(ROOT / v) for k, v in space["base"].items()}
    space["overrides"].update(
        {
            "training.num_epochs": 1,
            "environment.bf16": True,
            "model.torch_dtype": "bfloat16",
            "environment.gradient_checkpointing": True,
            "evaluation.generation_samples": 16,
        }
    )
    space.update(
        name="gpu_check",
        strategy="random",
        joint_trials=2,
        trials_per_stage=2,
        parameters={"training.learning_rate": {"choices": [3.0e-4, 1.0e-3]}, "lora.r": {"choices": [8, 16]}},
        asha={"enabled": False},
        confirm={"top_k": 0, "seeds": 0},
        resources={"workers_per_trial": 1, "use_gpu": True, "gpus_per_worker": 0.5, "cpus_per_worker": 2},
        mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "gpu_check"},
        storage_path=str(tmp / "ray"),
        output_dir=str(tmp / "sweeps"),
    )
    path = tmp / "gpu_check.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def run_sweep(tmp: Path, limit: int) -> dict[str, Any]:
    code, out, err, seconds = _python(["-m", "raytune_qvl.sweep", str(sweep_space(tmp)), "--overwrite"], limit)
    result: dict[str, Any] = {"returncode": code, "seconds": round(seconds, 1)}
    state_file = tmp / "sweeps" / "gpu_check" / "sweep_state.json"
    if state_file.exists():
        trials = json.loads(state_file.read_text())["trials"]
        result["trials"] = [
            {k: t.get(k) for k in ("trial_id", "status", "value", "reason", "overrides")} for t in trials
        ]
    if code != 0:
        result["output_tail"] = (out + err)[-3000:]
    return result


RELOAD = r"""
import sys, torch
sys.path.insert(0, {root!r})
from raytune_qvl import runtime; runtime.quiet_libraries()
from peft import PeftModel
from raytune_qvl.config.load import load_config
from raytune_qvl.data.batches import Collator, TrainDataset
from raytune_qvl.data.cache import load_or_prepare
from raytune_qvl.data.processor import load_processor
from raytune_qvl.train.engine import WorkerContext
from raytune_qvl.train.loop import run
from raytune_qvl.train.model import load_model
from raytune_qvl.train.session import LocalReporter, setup
cfg = load_config({train!r}, {lora!r}, {ds!r}, [
    "ray.num_workers=1", "ray.use_gpu=true", "training.max_steps=6", "training.eval_steps=3",
    "training.logging_steps=3", "evaluation.generation_samples=0", "output.dir={out}", "output.report_to=none",
    "model.torch_dtype=bfloat16", "environment.bf16=true", "environment.gradient_checkpointing=true",
    "lora.lora_dropout=0.0"])
processor = load_processor(cfg)
items = load_or_prepare(cfg, processor, "eval").items[:2]
batch = Collator(processor.tokenizer.pad_token_id)([TrainDataset(items, processor)[i] for i in range(2)])
batch = {{k: v.cuda() for k, v in batch.items() if k != "labels"}}
session = setup(cfg, WorkerContext(on_gpu=True), LocalReporter(cfg))
run(session)
session.engine.eval()
with torch.no_grad():
    trained = session.engine(**batch).logits.float()
reloaded = PeftModel.from_pretrained(load_model(cfg, on_gpu=True).cuda(), {final!r}).eval()
with torch.no_grad():
    again = reloaded(**batch).logits.float()
print('{{"max_abs_diff": %g, "logit_scale": %g}}' % ((trained - again).abs().max().item(), trained.abs().max().item()))
"""


def run_reload(tmp: Path, limit: int) -> dict[str, Any]:
    """ZeRO-3 on the GPU without offload (the tiny file's CPU offload would build DeepSpeed's CPU
    Adam here first: minutes of this check for a path the CPU suite already runs)."""
    out = tmp / "z3"
    zero3 = json.loads((TINY / "ds_config_zero3_offload.json").read_text())
    for key in ("offload_optimizer", "offload_param"):
        zero3["zero_optimization"].pop(key, None)
    ds = tmp / "ds_config_zero3.json"
    ds.write_text(json.dumps(zero3))
    code = RELOAD.format(
        root=str(ROOT),
        train=str(TINY / "training_config.yaml"),
        lora=str(TINY / "lora_config.yaml"),
        ds=str(ds),
        out=str(out),
        final=str(out / "final"),
    )
    rc, stdout, stderr, seconds = _python(["-c", code], limit)
    result: dict[str, Any] = {"returncode": rc, "seconds": round(seconds, 1), **(_last_json(stdout) or {})}
    if "max_abs_diff" in result:  # bf16 logits: equal to within bf16's resolution of their scale
        result["equal"] = result["max_abs_diff"] <= 2e-2 * max(1.0, result["logit_scale"])
    if rc != 0:
        result["output_tail"] = (stdout + stderr)[-3000:]
    return result


def summary(results: dict[str, Any]) -> str:
    v = results["versions"]
    gpus = ", ".join(f"{g['name']} (sm {g['capability']})" for g in v.get("gpus", []))
    lines = [
        f"GPU check, {results['date']}: {gpus}; torch {v['torch']}, CUDA {v['cuda']}, NCCL {v['nccl']}, "
        f"DeepSpeed {v['deepspeed']}, flash-attn {v['flash_attn'] or 'not installed'}; {results['minutes']} minutes.",
        "",
        "| run | tokens/s | MFU | peak memory (GiB) | loss first → last | |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if r["kind"] != "gpu_step":
            continue
        m = r.get("result") or {}
        ok = "ok" if r["returncode"] == 0 and m.get("finite") else f"failed ({r['returncode']})"
        mfu = f"{m['mfu']:.1%}" if m.get("mfu") is not None else "—"
        lines.append(
            f"| {r['name']} | {m.get('tokens_per_second', '—')} | {mfu} | {m.get('peak_memory_gib', '—')} "
            f"| {m.get('loss_first', '—')} → {m.get('loss_last', '—')} | {ok} |"
        )
    for r in results["runs"]:
        if r["kind"] == "sweep":
            trials = r["result"].get("trials", [])
            done = sum(1 for t in trials if t["status"] == "completed")
            lines.append(f"\n{r['name']}: {done} of {len(trials)} trials completed, exit {r['result']['returncode']}.")
        if r["kind"] == "reload":
            res = r["result"]
            lines.append(
                f"{r['name']}: max |logit difference| {res.get('max_abs_diff', '—')} of scale "
                f"{res.get('logit_scale', '—')}: {'equal' if res.get('equal') else 'NOT equal or failed'}."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", action="store_true", help="print what would run, and exit")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = parser.parse_args()
    flash = importlib.util.find_spec("flash_attn") is not None
    plan = steps(flash)
    if args.plan:
        for step in plan:
            print(f"{step['name']} (at most {step['limit']} s)")
        print(f"at most {sum(s['limit'] for s in plan) / 60:.0f} minutes; results to {args.out}")
        return

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine; nothing run (it needs one: see the README's GPUs section)")
        return
    started = time.perf_counter()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "runs": []}
    print(json.dumps(results["versions"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="raytune_qvl-gpu-check-") as tmp:
        for step in plan:
            print(f"{step['name']} ...", flush=True)
            if step["kind"] == "gpu_step":
                rc, out, err, seconds = _python(
                    step["args"], step["limit"], env={**os.environ, "PYTHONUNBUFFERED": "1"}
                )
                entry = {"returncode": rc, "seconds": round(seconds, 1), "result": _last_json(out)}
                if rc != 0:
                    entry["output_tail"] = (out + err)[-3000:]
            elif step["kind"] == "sweep":
                res = run_sweep(Path(tmp), step["limit"])
                entry = {"returncode": res["returncode"], "result": res}
            else:
                res = run_reload(Path(tmp), step["limit"])
                entry = {"returncode": res["returncode"], "result": res}
            results["runs"].append({"name": step["name"], "kind": step["kind"], **entry})
            print(f"  exit {entry['returncode']}", flush=True)
    results["minutes"] = round((time.perf_counter() - started) / 60, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(summary(results))


if __name__ == "__main__":
    main()
