"""Filling DeepSpeed's "auto" values from the training config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytune_qvl.config.schema import EnvironmentConfig, TrainingConfig
from raytune_qvl.config.deepspeed import find_autos, fill_deepspeed
from raytune_qvl.errors import ConfigError

from conftest import SEED_ZERO2, SEED_ZERO3, ZERO2, ZERO3

TRAINING = TrainingConfig(
    per_device_train_batch_size=2, gradient_accumulation_steps=8, learning_rate=2e-4, weight_decay=0.01
)
ENV = EnvironmentConfig()


@pytest.mark.parametrize("path", [ZERO2, ZERO3], ids=["zero2", "zero3_offload"])
def test_seed_jsons_fill_completely(path: Path) -> None:
    ds = json.loads(path.read_text())
    assert list(find_autos(ds))  # the seed files are full of them
    filled = fill_deepspeed(ds, TRAINING, ENV, world_size=4, total_steps=300)
    cfg = filled.config
    assert not list(find_autos(cfg))
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 8
    assert cfg["train_batch_size"] == 64  # 2 x 4 x 8
    assert cfg["optimizer"]["params"]["lr"] == pytest.approx(2e-4)
    assert cfg["optimizer"]["params"]["weight_decay"] == pytest.approx(0.01)
    # the seed's WarmupDecayLR (linear) contradicts lr_scheduler_type: cosine
    assert cfg["scheduler"]["type"] == "WarmupCosineLR"
    # 300 planned steps: DeepSpeed's cosine, started at the first step, reaches its floor at step
    # total_num_steps, so it is told one more and the last step still trains
    assert cfg["scheduler"]["params"]["total_num_steps"] == 301
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 15  # ceil(300 x 0.05)
    assert cfg["scheduler"]["params"]["warmup_min_ratio"] == pytest.approx(1 / 16)  # the first step trains
    assert cfg["scheduler"]["params"]["warmup_type"] == "linear"
    assert any("WarmupDecayLR replaced by WarmupCosineLR" in n for n in filled.notes)
    assert ds["scheduler"]["type"] == "WarmupDecayLR"  # the input is not modified
    # DeepSpeed's throughput timer, which synchronizes the device twice a micro-step, is off as
    # DeepSpeed reads it; a JSON that configures it keeps its own
    from deepspeed.utils.config import get_timers_config

    assert not get_timers_config(cfg).enabled
    own = {**ds, "timers": {"throughput": {"enabled": True, "synchronized": False}}}
    kept = fill_deepspeed(own, TRAINING, ENV, world_size=4, total_steps=300).config
    assert get_timers_config(kept).enabled and not get_timers_config(kept).synchronized


def test_nested_autos_from_model_width() -> None:
    ds = {
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": "auto",
            "stage3_max_reuse_distance": "auto",
            "stage3_max_live_parameters": "auto",
        },
        "bf16": {"enabled": "auto"},
        "gradient_clipping": "auto",
    }
    cfg = fill_deepspeed(ds, TRAINING, ENV, world_size=1, total_steps=10, hidden_size=64).config
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["stage3_max_reuse_distance"] == 40 * 64 * 64  # about two decoder layers, not 1e9
    assert zero["stage3_max_live_parameters"] == 40 * 64 * 64  # the prefetcher's cap, not 1e9
    assert cfg["bf16"]["enabled"] is True  # silently fp32 if DeepSpeed had seen "auto"
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["optimizer"]["type"] == "AdamW"  # none given: AdamW added


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [("linear", "WarmupDecayLR"), ("constant_with_warmup", "WarmupLR"), ("constant", None)],
)
def test_scheduler_follows_lr_scheduler_type(scheduler: str, expected: str | None) -> None:
    ds = json.loads(ZERO2.read_text())
    training = TRAINING.model_copy(update={"lr_scheduler_type": scheduler})
    cfg = fill_deepspeed(ds, training, ENV, world_size=1, total_steps=100).config
    assert (cfg.get("scheduler") or {}).get("type") == expected
    if expected:
        assert cfg["scheduler"]["params"]["warmup_max_lr"] == pytest.approx(2e-4)


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"gradient_clipping": 0.5}, "gradient_clipping"),
        ({"bf16": {"enabled": False}}, "bf16.enabled"),
        ({"train_batch_size": 128}, "train_batch_size"),
        ({"optimizer": {"type": "SGD", "params": {}}}, "optimizer.type"),
        (
            {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 5}}},
            "scheduler.params.total_num_steps",
        ),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3}}}, "scheduler.params.warmup_max_lr"),
        ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage"),
    ],
)
def test_contradictions_are_errors(patch: dict, fragment: str) -> None:
    ds = {**json.loads(ZERO2.read_text()), **patch}
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        fill_deepspeed(ds, TRAINING, ENV, world_size=4, total_steps=300)


@pytest.mark.slow
@pytest.mark.parametrize("path", [ZERO2, ZERO3], ids=["zero2", "zero3_offload"])
def test_filled_seed_jsons_initialize_on_cpu(path: Path) -> None:
    """deepspeed.initialize accepts both filled seed files (in a subprocess: it needs a process group)."""
    import subprocess
    import sys

    code = f"""
import json, os, socket, torch, deepspeed
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from raytune_qvl.config.schema import EnvironmentConfig, TrainingConfig
from raytune_qvl.config.deepspeed import fill_deepspeed
from raytune_qvl.train.engine import device_config
ds = json.load(open({str(path)!r}))
training = TrainingConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2)
cfg = fill_deepspeed(ds, training, EnvironmentConfig(), world_size=1, total_steps=20).config
cfg, _ = device_config(cfg, on_gpu=False)
deepspeed.init_distributed(dist_backend="gloo")
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
engine, opt, _, sched = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
x = torch.randn(2, 8, dtype=torch.bfloat16)
for _ in range(4):
    loss = engine(x).float().pow(2).mean(); engine.backward(loss); engine.step()
print("OK", type(sched).__name__, engine.zero_optimization_stage())
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    assert f"OK WarmupCosineLR {stage}" in result.stdout


def test_matching_scheduler_keeps_the_json_choices() -> None:
    """When the JSON's scheduler is already the right kind, its own choices (not the training
    config's) survive: here a floor for the cosine decay and a log warm-up."""
    ds = {
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "cos_min_ratio": 0.1,
                "warmup_type": "log",
                "total_num_steps": "auto",
                "warmup_num_steps": "auto",
            },
        },
    }
    params = fill_deepspeed(ds, TRAINING, ENV, world_size=1, total_steps=100).config["scheduler"]["params"]
    assert params["cos_min_ratio"] == 0.1 and params["warmup_type"] == "log"
    assert params["total_num_steps"] == 101 and params["warmup_num_steps"] == 5  # 100 planned, see above


def _filled(path: Path) -> dict:
    return fill_deepspeed(json.loads(path.read_text()), TRAINING, ENV, world_size=2, total_steps=100).config


def test_gpu_runs_the_json_adamw_as_torch_fused_adamw_with_nothing_to_compile() -> None:
    """On GPUs the JSON's AdamW block becomes torch's fused AdamW with the block's own numbers
    (no FusedAdam JIT build); offload keeps DeepSpeedCPUAdam, which is a compiled op."""
    from raytune_qvl.train.engine import device_config
    from raytune_qvl.train.ops import required_ops

    zero2 = _filled(SEED_ZERO2)
    gpu, notes = device_config(zero2, on_gpu=True)
    params = gpu["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    assert params["betas"] == zero2["optimizer"]["params"]["betas"] and params["lr"] == TRAINING.learning_rate
    assert params["weight_decay"] == TRAINING.weight_decay and "fused=True" in notes[0]
    assert required_ops(gpu, on_gpu=True) == []
    cpu, _ = device_config(zero2, on_gpu=False)
    assert "fused" not in cpu["optimizer"]["params"] and required_ops(cpu, on_gpu=False) == []
    # what the JSON sets itself is kept: torch_adam false asks for DeepSpeed's FusedAdam
    own = json.loads(json.dumps(zero2))
    own["optimizer"]["params"]["torch_adam"] = False
    assert required_ops(device_config(own, on_gpu=True)[0], on_gpu=True) == ["fused_adam"]
    # FusedAdam's own keys are dropped (torch's AdamW would refuse them), and what is kept builds it
    fused_only = json.loads(json.dumps(zero2))
    fused_only["optimizer"]["params"].update(bias_correction=True, set_grad_none=True)
    block, notes = device_config(fused_only, on_gpu=True)
    kept = block["optimizer"]["params"]
    assert "bias_correction" not in kept and "set_grad_none" not in kept and "set_grad_none" in " ".join(notes)
    import torch

    torch_kwargs = {k: v for k, v in kept.items() if k not in ("torch_adam", "fused")}
    torch.optim.AdamW([torch.zeros(2, requires_grad=True)], **torch_kwargs)
    # torch's AdamW always corrects the bias: a block that turns it off stays DeepSpeed's FusedAdam
    fused_only["optimizer"]["params"]["bias_correction"] = False
    assert required_ops(device_config(fused_only, on_gpu=True)[0], on_gpu=True) == ["fused_adam"]
    offload, notes = device_config(_filled(SEED_ZERO3), on_gpu=True)
    assert "torch_adam" not in offload["optimizer"]["params"] and not notes
    assert required_ops(offload, on_gpu=True) == ["cpu_adam"]


def test_an_op_that_cannot_be_built_is_named_with_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    """No ninja and no compiler on PATH: offload's cpu_adam is reported with both and the fix."""
    from raytune_qvl.train import ops

    if ops._installed_ops().get("cpu_adam"):
        pytest.skip("this DeepSpeed install has cpu_adam prebuilt")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(ops.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})  # no Python.h
    (line,) = ops.check_ops(_filled(SEED_ZERO3), on_gpu=False)
    assert "cpu_adam" in line and "ninja (pip install ninja)" in line and "C++ compiler" in line
    assert f"Python's C headers ({tmp_path / 'Python.h'}" in line
    assert "DS_BUILD_CPU_ADAM=1" in line
    monkeypatch.undo()
    assert ops.check_ops(_filled(SEED_ZERO3), on_gpu=False) == []  # this machine builds it


def test_the_plan_sizes_a_7b_checkpoint_and_warns_of_offloaded_generation(tmp_path: Path) -> None:
    """From the 7B release's config.json alone: LoRA r=64 on every language projection trains
    161M parameters, an engine checkpoint writes about 2.3 GB, and generation under ZeRO-3
    parameter offload on 8 GPUs gets a warning with its time."""
    from bench.gpu_step import SHAPES

    from raytune_qvl.config.plan import make_plan
    from raytune_qvl.config.schema import Config, DataConfig, LoraConfig, ModelConfig, RayConfig

    shape = SHAPES["7b"]
    (tmp_path / "config.json").write_text(
        json.dumps({"text_config": shape["text"], "vision_config": shape["vision"], "tie_word_embeddings": False})
    )
    cfg = Config(
        model=ModelConfig(name=str(tmp_path), torch_dtype="bfloat16"),
        data=DataConfig(eval_path=str(tmp_path / "eval.jsonl")),
        ray=RayConfig(num_workers=8, use_gpu=True),
        lora=LoraConfig(r=64, lora_alpha=128),
        deepspeed=json.loads(SEED_ZERO3.read_text()),
    )
    plan = make_plan(cfg, num_samples=10_000)
    assert plan.sizes.trainable == 161_480_704 and 8.2e9 < plan.sizes.params < 8.4e9
    assert "engine state 2.26 GB each" in plan.format() and "the adapter alone 323 MB" in plan.format()
    (note,) = [n for n in plan.notes if n.startswith("generation eval under ZeRO-3")]
    assert "min per generation eval" in note and "evaluation.generation_samples" in note
    zero2 = make_plan(cfg.model_copy(update={"deepspeed": json.loads(SEED_ZERO2.read_text())}), num_samples=10_000)
    assert not [n for n in zero2.notes if n.startswith("generation eval")]
