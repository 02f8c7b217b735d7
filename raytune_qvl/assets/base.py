"""The embedded default's pre-trained base: the tiny random Qwen2.5-VL of tiny.py, trained with all
of its weights on the `base` OCR domain (domains.py) by the project's own loop — a full
fine-tuning run of configs/tiny/base_training_config.yaml, one process, DeepSpeed ZeRO-2 — until
it reads; then measured on the base domain and on the `forms` domain the demo adapts it to.

Built once per machine and cached under the user's cache folder (beside the prepared-data cache),
keyed by everything it depends on: the recipe, the code that draws and builds it, the fonts, the
library versions, the machine's architecture and thread count. A fresh clone on the same machine
(and CI on it) copies the cached folder instead of training again. Deterministic: seeded, in a
fixed order, on a fixed number of threads.

Run as: python -m raytune_qvl.tiny OUT_DIR [--random] [--rebuild]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

__all__ = ["RECIPE", "CURRICULUM", "TRAIN_SAMPLES", "EVAL_SAMPLES", "recipe_key", "build_base", "read_cer", "main"]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "tiny" / "base_training_config.yaml"
# the training split, in order: single characters, one to three, two to six, then the domain's strings (3-10):
# a gradual ramp; a jump from short strings to long ones reads in some builds and not in others
CURRICULUM = [(5_000, (1, 1)), (5_000, (1, 3)), (6_000, (2, 6))]
TRAIN_SAMPLES = 34_000
EVAL_SAMPLES = 128
THREADS = 2  # the build trains on this many threads whatever the machine has: the same numbers everywhere
KEY_VERSION = 2  # bump when the recipe changes in a way the hashed inputs below do not show
_SOURCES = ("assets/base.py", "assets/tiny.py", "assets/synth.py", "assets/domains.py")
_LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "tokenizers", "pillow", "numpy", "matplotlib")


def cache_root() -> Path:
    return Path(os.environ.get("RAYTUNE_QVL_CACHE", Path.home() / ".cache" / "raytune_qvl")) / "models"


def recipe_key() -> str:
    """A hash of every input of the build."""
    from raytune_qvl.assets.domains import DOMAINS, fonts_digest

    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"v{KEY_VERSION}|{platform.machine()}|{THREADS}|{CURRICULUM}|{TRAIN_SAMPLES}".encode())
    h.update(RECIPE.read_bytes())
    for source in _SOURCES:
        h.update((package / source).read_bytes())
    h.update(fonts_digest(list(DOMAINS.values())).encode())
    for name in _LIBRARIES:
        try:
            h.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}=none".encode())
    return h.hexdigest()[:16]


def read_cer(model_dir: Path, data_file: Path, *, samples: int = 64) -> tuple[float, list[dict]]:
    """The project's evaluation of a model folder on a data file: CER of greedy decoding on the
    first `samples` records, and those records' reference and prediction."""
    import torch

    from raytune_qvl.config.schema import Config, DataConfig, ModelConfig
    from raytune_qvl.data.audit import prepare_split
    from raytune_qvl.data.processor import load_processor
    from raytune_qvl.train.engine import WorkerContext
    from raytune_qvl.train.evaluate import GenerationEval, max_new_tokens_for
    from raytune_qvl.train.metrics import corpus_scores
    from raytune_qvl.train.model import load_model

    data = DataConfig(train_path=str(data_file), eval_path=None, min_image_size=28, max_image_size=336, max_length=128)
    cfg = Config(model=ModelConfig(name=str(model_dir), torch_dtype="float32", attn_implementation="sdpa"), data=data)
    processor = load_processor(cfg)
    items = prepare_split(data_file, processor, data).items[:samples]
    model = load_model(cfg).eval()
    evaluation = GenerationEval(
        items, list(range(len(items))), processor, "ocr_doc", WorkerContext(), max_new_tokens_for(items), 32, False
    )
    with torch.no_grad():
        predicted = evaluation.predict(model, "cpu")
    rows = [{"reference": items[i].answer, "prediction": text} for i, text, _ in predicted]
    return corpus_scores("ocr_doc", ((r["reference"], r["prediction"]) for r in rows))["eval_cer"], rows


def _train(random_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    from raytune_qvl.config.load import load_config
    from raytune_qvl.train.run import run_training

    overrides = [
        f"model.name={random_dir}",
        f"data.train_path={data_dir / 'train.jsonl'}",
        f"data.eval_path={data_dir / 'eval.jsonl'}",
        f"data.cache_dir={data_dir / 'cache'}",
        f"output.dir={out_dir}",
        f"output.logging_dir={out_dir / 'logs'}",
        f"ray.storage_path={out_dir / 'ray'}",
        "deepspeed.bf16.enabled=false",  # the recipe trains in fp32 (see its model.torch_dtype)
    ]
    cfg = load_config(RECIPE, None, None, overrides)
    result = run_training(cfg, use_ray=False, overwrite=True)
    return result.metrics


_DATA = "clean upright DejaVu Sans Mono, regular and bold; one 28-px cell per character"
_PHASES = ", ".join(f"{n:,} of {lo}-{hi} characters" for n, (lo, hi) in CURRICULUM)


def _model_card(facts: dict) -> str:
    base, forms = facts["cer_base"], facts["cer_forms"]
    rows = "\n".join(f"| `{r['reference']}` | `{r['prediction']}` |" for r in facts["forms_examples"][:5])
    return f"""# tiny-qwen25vl base

A tiny `Qwen2_5_VLForConditionalGeneration` (hidden 128, 4 text and 4 vision layers, {facts["parameters"]:,}
parameters, a {facts["vocab"]}-token byte-level BPE tokenizer with Qwen's special tokens and chat template, the real
Qwen2.5-VL processor) pre-trained by raytune_qvl's own loop with all of its weights (full fine-tuning) on the synthetic
`base` OCR domain, so that the embedded default adapts a model that reads to a domain it reads badly, as the real job
does. Built by `python -m raytune_qvl.tiny` (`make assets`) from `configs/tiny/base_training_config.yaml`; recipe key
`{facts["key"]}`.

| | |
|---|---|
| data | {facts["train_samples"]:,} `base` samples ({_DATA}), in a curriculum: {_PHASES}, then strings of 3-10 |
| training | {facts["steps"]} optimizer steps, batch 16, AdamW 3e-4, warm-up + cosine decay, fp32, {THREADS} threads |
| minutes | {facts["minutes"]:.1f} (training {facts["train_minutes"]:.1f}) on {facts["machine"]} |
| CER, base domain ({EVAL_SAMPLES} held-out samples) | **{base:.3f}** |
| CER, forms domain (the demo's target, before fine-tuning) | **{forms:.3f}** |
| versions | {facts["versions"]} |

Five forms samples read by this base before any fine-tuning (reference | prediction):

| reference | prediction |
|---|---|
{rows}
"""


def build_base(out_dir: str | os.PathLike, *, rebuild: bool = False) -> Path:
    """The pre-trained base in `out_dir`: copied from the machine's cache, or built (and cached)."""
    import torch

    from raytune_qvl.assets.synth import write_dataset
    from raytune_qvl.assets.tiny import build_tiny

    out = Path(out_dir)
    key = recipe_key()
    cached = cache_root() / f"tiny-qwen25vl-base-{key}"
    if rebuild:
        shutil.rmtree(cached, ignore_errors=True)
    if not (cached / "MODEL_CARD.md").is_file():
        print(f"building the pre-trained tiny base (recipe {key}; once per machine, about 8 minutes)", file=sys.stderr)
        started = time.perf_counter()
        torch.set_num_threads(THREADS)
        with tempfile.TemporaryDirectory(prefix="raytune_qvl-base-") as tmp:
            work = Path(tmp)
            random_dir = build_tiny(work / "random")
            data = work / "data"
            write_dataset(data, "ocr_doc", TRAIN_SAMPLES, EVAL_SAMPLES, seed=0, domain="base", curriculum=CURRICULUM)
            forms = write_dataset(work / "forms", "ocr_doc", 0, EVAL_SAMPLES, seed=123, domain="forms")["eval"]
            trained = time.perf_counter()
            metrics = _train(random_dir, data, work / "run")
            train_minutes = (time.perf_counter() - trained) / 60
            model = work / "run" / "final"
            cer_base, _ = read_cer(model, data / "eval.jsonl")
            cer_forms, examples = read_cer(model, forms)
            config = json.loads((model / "config.json").read_text())
            facts = {
                "key": key,
                "parameters": _parameters(model),
                "vocab": config["text_config"]["vocab_size"],
                "train_samples": TRAIN_SAMPLES,
                "steps": metrics.get("step"),
                "minutes": (time.perf_counter() - started) / 60,
                "train_minutes": train_minutes,
                "machine": f"{platform.machine()}, {THREADS} threads",
                "cer_base": cer_base,
                "cer_forms": cer_forms,
                "forms_examples": examples,
                "versions": ", ".join(f"{n} {_version(n)}" for n in ("torch", "transformers", "deepspeed", "peft")),
            }
            staging = cached.with_name(cached.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for path in model.iterdir():  # the model and processor files (not the run's configs)
                if path.suffix in (".json", ".safetensors", ".jinja") and path.name != "training_complete.json":
                    shutil.copy2(path, staging / path.name)
            summary = {k: v for k, v in facts.items() if k != "forms_examples"}
            (staging / "build.json").write_text(json.dumps(summary, indent=1))
            (staging / "MODEL_CARD.md").write_text(_model_card(facts))
            shutil.rmtree(cached, ignore_errors=True)
            staging.rename(cached)
        print(f"tiny base built in {(time.perf_counter() - started) / 60:.1f} min: CER base {cer_base:.3f}, "
              f"forms {cer_forms:.3f}", file=sys.stderr)  # fmt: skip
    tmp_out = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    shutil.copytree(cached, tmp_out)
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)
    return out


def _parameters(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def main(argv: list[str] | None = None) -> None:
    from raytune_qvl import runtime

    parser = argparse.ArgumentParser(prog="python -m raytune_qvl.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--random", action="store_true", help="the untrained model only (seconds, no pre-training)")
    parser.add_argument("--rebuild", action="store_true", help="train the base again even if this machine has it")
    parser.add_argument("--seed", type=int, default=0, help="with --random: the initialisation seed")
    args = parser.parse_args(argv)
    runtime.quiet_libraries()
    runtime.setup_logging()
    if args.random:
        from raytune_qvl.assets.tiny import build_tiny

        out = build_tiny(args.out_dir, seed=args.seed)
    else:
        out = build_base(args.out_dir, rebuild=args.rebuild)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"tiny Qwen2.5-VL written to {out} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
