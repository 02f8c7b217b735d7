"""The typed config: shipped and seed files load; every problem is reported, each naming the
file, key, value and rule."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from raytune_qvl.config.load import load_config
from raytune_qvl.config.overrides import flatten, parse_override
from raytune_qvl.config.schema import Config
from raytune_qvl.errors import ConfigError

from conftest import ROOT, TINY_LORA, TINY_TRAIN, ZERO2, ZERO3

SEED = ROOT / "tests" / "fixtures" / "seed"


def test_every_shipped_config_loads(tiny_assets: Path, in_root: Path) -> None:
    cfg = load_config(TINY_TRAIN, TINY_LORA, ZERO2)
    assert cfg.lora.r == 16 and cfg.ray.num_workers == 2
    assert load_config(TINY_TRAIN, TINY_LORA, ZERO3).deepspeed["zero_optimization"]["stage"] == 3
    # the full-size configs point at data the user brings: their schema must hold
    full = load_config(
        ROOT / "configs/training_config.yaml", ROOT / "configs/lora_config.yaml", None, check_files=False
    )
    assert full.model.name == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert full.model.trust_remote_code is False and full.output.report_to == "mlflow"
    assert full.deepspeed["zero_optimization"]["stage"] == 2  # from environment.deepspeed
    assert full.ray.num_workers == 4 and full.ray.use_gpu


def test_shipped_configs_keep_the_seed_values() -> None:
    """configs/ holds the seed's files with exactly two corrections."""
    seed = yaml.safe_load((SEED / "training_config.yaml").read_text())
    ours = yaml.safe_load((ROOT / "configs/training_config.yaml").read_text())
    seed_flat, ours_flat = flatten(seed), flatten(ours)
    changed = {k for k in seed_flat if seed_flat[k] != ours_flat.get(k)}
    assert changed == {"model.trust_remote_code", "output.report_to"}
    assert yaml.safe_load((SEED / "lora_config.yaml").read_text()) == yaml.safe_load(
        (ROOT / "configs/lora_config.yaml").read_text()
    )
    for name in ("ds_config_zero2.json", "ds_config_zero3_offload.json"):
        assert json.loads((SEED / name).read_text()) == json.loads((ROOT / "configs" / name).read_text())


def test_seed_files_load_unchanged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="raytune_qvl"):
        cfg = load_config(
            SEED / "training_config.yaml", SEED / "lora_config.yaml", SEED / "ds_config_zero2.json", check_files=False
        )
    assert cfg.training.learning_rate == pytest.approx(2e-4)
    assert cfg.lora.r == 32 and cfg.lora.lora_alpha == 64
    assert cfg.deepspeed["scheduler"]["type"] == "WarmupDecayLR"  # as written; filling replaces it
    # the seed's trust_remote_code: true and report_to: wandb are accepted, loudly
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "trust_remote_code is true" in messages and "report_to is wandb" in messages


def test_yaml_scientific_notation_is_a_number(tmp_path: Path) -> None:
    """YAML 1.1 reads 2e-4 as a string; we read it as the number the user meant."""
    path = tmp_path / "t.yaml"
    path.write_text("training:\n  learning_rate: 2e-4\n  weight_decay: 1e-2\n")
    cfg = load_config(path, check_files=False)
    assert cfg.training.learning_rate == pytest.approx(2e-4)
    assert isinstance(cfg.training.weight_decay, float)


def test_override_and_deepspeed_precedence(tiny_assets: Path, in_root: Path) -> None:
    cfg = load_config(
        TINY_TRAIN, TINY_LORA, ZERO3, ["training.learning_rate=1e-4", "lora.r=8", "deepspeed.gradient_clipping=1.0"]
    )
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.lora.r == 8
    assert cfg.environment.deepspeed == str(ZERO3)  # --deepspeed wins over environment.deepspeed
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3
    assert parse_override("ray.resources_per_worker={CPU: 2}") == (["ray", "resources_per_worker"], {"CPU": 2})


def _write(tmp_path: Path, text: str, name: str = "training.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# (training YAML text or None for the tiny config, overrides, fragments every one of which must appear)
BAD_CONFIGS = [
    (
        None,
        ["training.learning_rat=1e-4"],
        ["command line: training.learning_rat", "did you mean 'training.learning_rate'"],
    ),
    (None, ["training.learning_rate=0.5"], ["training.learning_rate", "must be <= 0.01", "0.5"]),
    (None, ["training.learning_rate=1e-9"], ["must be >= 1e-07"]),
    (None, ["lora.r=0"], ["lora.r", "must be >= 1"]),
    (None, ["lora.r=512"], ["lora.r", "must be <= 256"]),
    (None, ["training.per_device_train_batch_size=0"], ["per_device_train_batch_size", "must be >= 1"]),
    (None, ["training.gradient_accumulation_steps=0"], ["gradient_accumulation_steps", "must be >= 1"]),
    (None, ["training.warmup_ratio=0.7"], ["warmup_ratio", "must be <= 0.5"]),
    (None, ["training.num_epochs=2.5"], ["num_epochs", "must be an integer"]),
    (None, ["training.learning_rate='2e-4'"], ["learning_rate", "not a quoted string"]),
    (None, ["environment.bf16=yes please"], ["environment.bf16", "must be true or false"]),
    (None, ["model.torch_dtype=fp8"], ["model.torch_dtype", "'bfloat16', 'float16' or 'float32'"]),
    (None, ["model.attn_implementation=flash3"], ["attn_implementation", "flash_attention_2"]),
    (None, ["data.min_image_size=2000"], ["data.min_image_size", "must be <= data.max_image_size"]),
    (
        None,
        ["training.metric_for_best_model=eval_accuracy"],
        ["metric_for_best_model", "not a metric the loop reports"],
    ),
    (None, ["training.greater_is_better=true"], ["greater_is_better", "contradicts eval_loss"]),
    (None, ["environment.bf16=true", "environment.fp16=true"], ["bf16 and fp16 cannot both be true"]),
    (None, ["environment.bf16=true"], ["model.torch_dtype", "must be bfloat16"]),
    (None, ["data.train_path=./nope.jsonl"], ["data.train_path", "training data file not found"]),
    (None, ["output.report_to=comet"], ["output.report_to", "must be one of"]),
    (None, ["ray.use_gpu=true", "ray.resources_per_worker.GPU=0.5"], ["resources_per_worker.GPU", "whole number"]),
    (None, ["training.logging_steps=50"], ["logging_steps", "must be <= training.eval_steps"]),
    (None, ["trainig.num_epochs=3"], ["trainig.num_epochs", "unknown section", "did you mean 'training'"]),
    (
        None,
        ["lora.vision_lora.vision_rr=4"],
        ["lora.vision_lora.vision_rr", "did you mean 'lora.vision_lora.vision_r'"],
    ),
    (
        None,
        ["evaluation.task=ocr_doc", "training.metric_for_best_model=eval_anls", "training.greater_is_better=true"],
        ["task ocr_doc reports"],
    ),
    (None, ["deepspeed.gradient_clipping=0.5"], ["gradient_clipping", "contradicts training.max_grad_norm"]),
    (None, ["deepspeed.optimizer.params.lr=0.1"], ["optimizer.params.lr", "contradicts training.learning_rate"]),
    (None, ["deepspeed.train_micro_batch_size_per_gpu=7"], ["contradicts training.per_device_train_batch_size"]),
    (None, ["deepspeed.zero_optimization.mystery=auto"], ["zero_optimization.mystery", "no rule fills"]),
    (None, ["deepspeed.bf16=true"], ["bf16", "must be a JSON object"]),
    (None, ["deepspeed.optimizer=AdamW"], ["optimizer", "must be a JSON object"]),
    (None, ["lora.init_lora_weights=svd"], ["lora.init_lora_weights", "should match pattern"]),
    (None, ["training.freeze_vision_tower=true"], ["lora.vision_lora.enabled", "contradicts training.freeze"]),
    (None, ["lora.loraplus_lr_ratio=0.5"], ["lora.loraplus_lr_ratio", "must be >= 1"]),
    (None, ["training.vision_lr_ratio=0"], ["training.vision_lr_ratio", "must be > 0"]),
    ("environment: 3\n", [], ["environment", "must be a mapping"]),
    ("training:\n  learning_rate: 2e-4\n  learning_rate: 1e-4\n", [], ["duplicate key 'learning_rate'"]),
    ("training:\n  learning_rate: [\n", [], ["invalid YAML"]),
    ("", [], ["training config is empty"]),
    ("- a\n- b\n", [], ["must be a mapping of sections"]),
    ("lora:\n  r: 8\n", [], ["the lora section belongs in the LoRA file"]),
    ("training: 3\n", [], ["training", "must be a mapping"]),
]


@pytest.mark.parametrize(("text", "overrides", "fragments"), BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_bad_configs(
    text: str | None, overrides: list[str], fragments: list[str], tiny_assets: Path, in_root: Path, tmp_path: Path
) -> None:
    train = _write(tmp_path, text) if text is not None else TINY_TRAIN
    with pytest.raises(ConfigError) as info:
        load_config(train, TINY_LORA, ZERO2, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    # every problem is one line that names where it came from
    for line in info.value.lines():
        assert "\n" not in line and line.startswith("error: ")


def test_sub_group_size_auto_is_filled(tiny_assets: Path, in_root: Path) -> None:
    """A known nested auto is not a problem (the table above checks the message for unknown ones)."""
    cfg = load_config(TINY_TRAIN, TINY_LORA, ZERO3, ["deepspeed.zero_optimization.sub_group_size=auto"])
    assert cfg.deepspeed["zero_optimization"]["sub_group_size"] == "auto"


def test_every_error_is_reported_at_once(tiny_assets: Path, in_root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            TINY_TRAIN,
            TINY_LORA,
            ZERO2,
            ["training.learning_rat=1e-4", "lora.r=0", "model.torch_dtype=fp8", "data.min_image_size=9999"],
        )
    keys = [p.key for p in info.value.problems]
    assert {"training.learning_rat", "lora.r", "model.torch_dtype", "data.min_image_size"} <= set(keys)


def test_problem_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "training:\n  learning_rate: 5.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)
    assert str(info.value).startswith(f"{path}: training.learning_rate: must be <= 0.01 (got 5.0)")


def test_trust_remote_code_warns_and_defaults_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert Config().model.trust_remote_code is False
    path = _write(tmp_path, "model:\n  trust_remote_code: true\n")
    with caplog.at_level(logging.WARNING, logger="raytune_qvl"):
        cfg = load_config(path, check_files=False)
    assert cfg.model.trust_remote_code is True
    assert any("trust_remote_code is true" in r.getMessage() for r in caplog.records)


def test_paths_become_absolute(tiny_assets: Path, in_root: Path) -> None:
    cfg = load_config(TINY_TRAIN, TINY_LORA, ZERO2)
    for path in (cfg.data.train_path, cfg.model.name, cfg.output.dir, cfg.ray.storage_path, cfg.environment.deepspeed):
        assert Path(path).is_absolute(), path
    assert cfg.paths.training == str(TINY_TRAIN)


def test_greater_is_better_follows_the_metric() -> None:
    from raytune_qvl.config.schema import TrainingConfig

    assert Config(training=TrainingConfig(metric_for_best_model="eval_anls")).greater_is_better is True
    assert Config(training=TrainingConfig(metric_for_best_model="eval_cer")).greater_is_better is False


def test_the_memory_estimate_follows_the_zero_stage_checkpointing_offload_and_data(tiny_assets) -> None:
    from raytune_qvl.config.memory import estimate_memory
    from raytune_qvl.config.sizes import estimate_sizes

    cfg = load_config(TINY_TRAIN, TINY_LORA, ZERO2, check_files=False)
    z2 = estimate_memory(cfg, 2, 2, False)
    z3 = estimate_memory(cfg, 2, 3, False)
    assert z3.parts["weights"] == pytest.approx(z2.parts["weights"] / 2)  # ZeRO-3 partitions the weights
    # and gathers them while in use: with DeepSpeed's 1e9-element live cap and reuse distance a model
    # this small is gathered whole (the prefetcher runs ahead); short ones hold a few layers only
    assert "gathered weights" not in z2.parts
    sizes = estimate_sizes(cfg)
    assert z3.parts["gathered weights"] == pytest.approx(sizes.params * sizes.dtype_bytes)
    keys = ("stage3_max_reuse_distance", "stage3_max_live_parameters")
    short = estimate_memory(cfg, 2, 3, False, zero=dict.fromkeys(keys, 0))
    assert 0 < short.parts["gathered weights"] < z3.parts["gathered weights"]
    reuse_only = estimate_memory(cfg, 2, 3, False, zero={keys[0]: 0})  # the live cap alone still gathers it all
    assert reuse_only.parts["gathered weights"] == pytest.approx(z3.parts["gathered weights"])
    auto = estimate_memory(cfg, 2, 3, False, zero=dict.fromkeys(keys, "auto"))  # about two layers, from the width
    assert short.parts["gathered weights"] < auto.parts["gathered weights"] <= z3.parts["gathered weights"]
    assert estimate_memory(cfg, 2, 1, False).parts["gradients"] == pytest.approx(2 * z2.parts["gradients"])
    offloaded = estimate_memory(
        cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"use_gpu": True})}), 2, 2, True
    )
    assert "optimizer" not in offloaded.parts and offloaded.offloaded == pytest.approx(z2.parts["optimizer"])
    on = cfg.model_copy(update={"environment": cfg.environment.model_copy(update={"gradient_checkpointing": True})})
    assert estimate_memory(on, 2, 2, False).parts["activations"] < z2.parts["activations"] / 2
    # from the data: shorter samples than max_length (unpacked), fewer image tokens, less memory
    measured = estimate_memory(cfg, 2, 2, False, lengths=(20, 30))
    assert measured.from_data and not z2.from_data
    assert measured.parts["activations"] < z2.parts["activations"]
    double = cfg.model_copy(
        update={
            "training": cfg.training.model_copy(
                update={"per_device_train_batch_size": 2 * cfg.training.per_device_train_batch_size}
            )
        }
    )
    assert estimate_memory(double, 2, 2, False).parts["logits"] == pytest.approx(2 * z2.parts["logits"])


def test_the_sweep_plan_warns_of_points_above_a_workers_memory(tiny_assets) -> None:
    import os

    from raytune_qvl.sweep.load import load_search_space
    from raytune_qvl.sweep.plan import memory_check

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        space, base = load_search_space(ROOT / "search_spaces" / "tiny_cpu.yaml", check_files=False)
    finally:
        os.chdir(cwd)
    lines, warnings = memory_check(space, base, None, 2)
    assert len(lines) == 1 + len(space.parameters) and not warnings
    assert "lora.r=32" in next(line for line in lines if "stage2-lora_r" in line)  # the largest rank
    small = space.model_copy(update={"resources": space.resources.model_copy(update={"memory_per_worker_gb": 0.01})})
    _, warnings = memory_check(small, base, None, 2)
    assert len(warnings) == len(space.parameters) and "retry at smaller micro batches" in warnings[0]
