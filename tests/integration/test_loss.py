"""The objective an optimizer step minimises: the token-weighted loss over the whole accumulation
window, the same however an effective batch is split into micro batch x accumulation, and equal to
a plain reference computation; and a warm-up whose first step trains."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_LORA, TINY_TRAIN, ZERO2, run_cli

pytestmark = pytest.mark.slow

GRADIENTS = r"""
import sys, torch
sys.path.insert(0, {root!r})
from raytune_qvl import runtime; runtime.quiet_libraries()
import deepspeed
from raytune_qvl.config.load import load_config
from raytune_qvl.data.batches import Collator, TrainDataset
from raytune_qvl.data.cache import load_or_prepare
from raytune_qvl.data.processor import load_processor
from raytune_qvl.train.engine import WorkerContext, init_distributed
from raytune_qvl.train.lora import apply_lora
from raytune_qvl.train.loop import token_count, train_window
from raytune_qvl.train.model import load_model

cfg = load_config({train!r}, {lora!r}, {ds!r}, ["lora.lora_dropout=0.0", "lora.vision_lora.enabled=false"])
processor = load_processor(cfg)
items = load_or_prepare(cfg, processor, "eval").items
# four samples with answers of different lengths: a mean of micro-batch means would weigh them wrongly
items = sorted(items, key=lambda i: sum(1 for label in i.labels if label != -100))
samples = [items[0], items[1], items[-2], items[-1]]
data, collate = TrainDataset(samples, processor), Collator(processor.tokenizer.pad_token_id)
init_distributed(WorkerContext())

def fresh():
    torch.manual_seed(0)
    model = apply_lora(load_model(cfg), cfg.lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so that every LoRA weight has a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model

def step_gradient(micro, accum):
    model = fresh()
    params = {{n: p for n, p in model.named_parameters() if p.requires_grad}}
    before = {{n: p.detach().clone() for n, p in params.items()}}
    config = {{"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
               "train_batch_size": micro * accum, "gradient_clipping": 0.0, "zero_optimization": {{"stage": 0}}}}
    sgd = torch.optim.SGD(list(params.values()), lr=1.0)  # one step moves each weight by -gradient
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=sgd, config=config)
    window = [collate([data[i] for i in range(k, k + micro)]) for k in range(0, 4, micro)]
    loss = train_window(engine, window, float(sum(token_count(b) for b in window)), world_size=1)
    return {{n: before[n] - p.detach() for n, p in params.items()}}, float(loss)

def reference():
    model = fresh()
    batch = collate([data[i] for i in range(4)])
    logits = model(**{{k: v for k, v in batch.items() if k != "labels"}}).logits.float()
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    loss = per_token / (labels != -100).sum()  # the mean over every answer token of the four samples
    loss.backward()
    return {{n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}, float(loss)

one_by_four, loss_a = step_gradient(1, 4)
four_by_one, loss_b = step_gradient(4, 1)
plain, loss_ref = reference()
def gap(x, y):
    return max(float((x[n] - y[n]).abs().max()) for n in x) / max(float(y[n].abs().max()) for n in y)
print("LOSSES", loss_a, loss_b, loss_ref)
print("GAPS", gap(one_by_four, plain), gap(four_by_one, plain), gap(one_by_four, four_by_one))
"""


def test_one_step_has_the_same_gradient_however_the_batch_is_split(tiny_assets: Path, tmp_path: Path) -> None:
    code = GRADIENTS.format(root=str(ROOT), train=str(TINY_TRAIN), lora=str(TINY_LORA), ds=str(ZERO2))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [float(x) for x in next(ln for ln in result.stdout.splitlines() if ln.startswith("LOSSES")).split()[1:]]
    gaps = [float(x) for x in next(ln for ln in result.stdout.splitlines() if ln.startswith("GAPS")).split()[1:]]
    # micro 1 x accumulation 4 == micro 4 x accumulation 1 == the plain token-mean reference (fp32)
    assert losses[0] == pytest.approx(losses[2], rel=1e-4) and losses[1] == pytest.approx(losses[2], rel=1e-4)
    assert max(gaps) < 1e-4, gaps


def test_the_first_optimizer_step_trains(tiny_assets: Path, tmp_path: Path) -> None:
    """DeepSpeed's warm-up would run the first step at learning rate 0; the plan says what runs."""
    args = [
        "raytune_qvl.train", "--config", str(TINY_TRAIN), "--lora_config", str(TINY_LORA), "--deepspeed", str(ZERO2),
        "--no-ray", f"output.dir={tmp_path / 'out'}", "output.report_to=none",
        "training.max_steps=4", "training.logging_steps=1", "training.eval_steps=4", "training.warmup_ratio=0.5",
        "training.learning_rate=1e-3", "evaluation.generation_samples=0",
    ]  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    rates = {int(m[0]): float(m[1]) for m in re.findall(r"^step +(\d+)/4 .* lr ([0-9.e+-]+)", result.stderr, re.M)}
    assert "warmup 2 steps (the first at 0.000333)" in result.stderr  # ceil(4 x 0.5) = 2: 1/3, 2/3, then the peak
    assert rates[1] == pytest.approx(1e-3 / 3, rel=1e-3) and rates[2] == pytest.approx(2e-3 / 3, rel=1e-3)
    assert rates[3] > rates[4] > 0  # then the cosine decay


def test_packed_training_ends_where_padded_training_does(tiny_assets: Path, tmp_path: Path) -> None:
    """The same steps through the real loop and DeepSpeed: packing only removes padding, so with
    the token-weighted loss the runs' losses, gradient norms and eval losses agree (fp32). A
    length-grouped run trains the same number of samples to its last step."""
    runs = {}
    for name, extra in {
        "padded": [],
        "packed": ["data.packing=true"],
        "grouped": ["data.group_by_length=true"],
    }.items():
        args = [
            "raytune_qvl.train", "--config", str(TINY_TRAIN), "--lora_config", str(TINY_LORA),
            "--deepspeed", str(ZERO2), "--no-ray", f"output.dir={tmp_path / name}", "output.report_to=none",
            "training.max_steps=4", "training.eval_steps=2", "training.logging_steps=1",
            "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=2",
            "training.learning_rate=1e-3", "evaluation.generation_samples=0", "lora.lora_dropout=0.0", *extra,
        ]  # fmt: skip
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "final" / "training_complete.json").read_text())
    padded, packed = runs["padded"], runs["packed"]
    assert packed["samples_seen"] == padded["samples_seen"] == runs["grouped"]["samples_seen"] == 32
    assert runs["grouped"]["eval_loss"] < 10  # grouping trains other steps (see test_packing.py), to the end
    for key in ("loss", "grad_norm", "eval_loss", "test_loss"):  # the last step's train loss, and after it
        assert packed[key] == pytest.approx(padded[key], rel=1e-5), key


GROUP_RATES = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from raytune_qvl import runtime; runtime.quiet_libraries()
from raytune_qvl.config.load import load_config
from raytune_qvl.config.plan import make_plan
from raytune_qvl.train.engine import WorkerContext, build_engine, device_config, init_distributed
from raytune_qvl.train.lora import make_trainable, param_groups
from raytune_qvl.train.model import load_model

init_distributed(WorkerContext())
out = {{}}
for kind in ("cosine", "linear", "constant_with_warmup"):
    cfg = load_config({train!r}, {lora!r}, {ds!r}, [
        f"training.lr_scheduler_type={{kind}}", "training.learning_rate=1e-3", "training.warmup_ratio=0.25",
        "lora.loraplus_lr_ratio=16", "training.vision_lr_ratio=0.5", "training.merger_lr_ratio=2.0",
        "training.train_merger=true", "ray.num_workers=1"])
    model = make_trainable(load_model(cfg), cfg)
    groups = param_groups(model, cfg)
    names = {{id(p): n for n, p in model.named_parameters()}}
    members = {{g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}}
    engine = build_engine(model, device_config(make_plan(cfg, num_samples=256).deepspeed, on_gpu=False)[0], groups)
    rates = []
    for _ in range(6):
        rates.append({{g["name"]: g["lr"] for g in engine.optimizer.param_groups}})
        engine.lr_scheduler.step()
    out[kind] = {{"rates": rates, "members": members, "scales": {{g["name"]: g["lr_scale"] for g in groups}}}}
print("RESULT", json.dumps(out))
"""


def test_per_module_rates_and_loraplus_hold_through_every_schedule(tiny_assets: Path) -> None:
    """LoRA+ (peft's groups: B at 16x A) and per-module rates (vision 0.5x, the fully trained merger
    2x): every group keeps its ratio to the language model's A at each step of the warm-up and the
    decay, under each of DeepSpeed's schedulers (two of which give every group one range)."""
    code = GROUP_RATES.format(root=str(ROOT), train=str(TINY_TRAIN), lora=str(TINY_LORA), ds=str(ZERO2))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT ") :])
    for kind, seen in out.items():
        scales, members = seen["scales"], seen["members"]
        assert scales["language_model/A"] == 1.0 and scales["language_model/B"] == 16.0, (kind, scales)
        assert scales["vision/B"] == 8.0 and scales["merger/B_no_decay"] == 32.0, (kind, scales)
        assert all(".lora_A." in n for n in members["language_model/A"] + members["vision/A"])
        assert all(".lora_B." in n for n in members["language_model/B"]) and members["merger/A"]
        assert all(".visual.merger." in n for g, names in members.items() if g.startswith("merger") for n in names)
        first = seen["rates"]
        assert 0 < first[0]["language_model/A"] < 1e-3 and first[-1]["language_model/A"] != first[0]["language_model/A"]
        for step in first:  # each group keeps its ratio to the language model's A, whatever the schedule's step
            base = step["language_model/A"]
            for name, rate in step.items():
                assert rate == pytest.approx(base * scales[name], rel=1e-6), (kind, name, step)
