"""Model loading, attention choice, LoRA targeting, and that the tiny model learns."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from raytune_qvl.config.schema import Config, DataConfig, EnvironmentConfig, LoraConfig, ModelConfig, VisionLoraConfig
from raytune_qvl.errors import ConfigError

torch = pytest.importorskip("torch")


def _cfg(assets: Path, **lora) -> Config:
    return Config(
        model=ModelConfig(name=str(assets / "tiny-qwen25vl"), torch_dtype="float32", attn_implementation="sdpa"),
        data=DataConfig(min_image_size=112, max_image_size=336),
        environment=EnvironmentConfig(bf16=False, gradient_checkpointing=False),
        lora=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **lora),
    )


def _lora_modules(model) -> dict[str, object]:
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {})
    }


def test_vision_tower_untouched_when_vision_lora_off(tiny_assets: Path) -> None:
    from raytune_qvl.train.lora import apply_lora, trainable_by_part
    from raytune_qvl.train.model import load_model

    cfg = _cfg(tiny_assets)
    model = apply_lora(load_model(cfg), cfg.lora)
    names = _lora_modules(model)
    assert names and all(".language_model." in n for n in names)
    # the seed's gate/up/down_proj exist in the vision MLP too, and must not be matched there
    assert any("visual" in n and n.endswith("gate_proj") for n, _ in model.named_modules())
    parts = trainable_by_part(model)
    assert parts["vision"][0] == 0 and parts["merger"][0] == 0 and parts["language_model"][0] > 0
    kinds = {n.rsplit(".", 1)[1] for n in names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_vision_lora_gets_its_own_rank_and_alpha(tiny_assets: Path) -> None:
    from raytune_qvl.train.lora import apply_lora, trainable_by_part
    from raytune_qvl.train.model import load_model

    cfg = _cfg(
        tiny_assets,
        vision_lora=VisionLoraConfig(enabled=True, vision_r=4, vision_alpha=12),
        modules_to_save=["lm_head"],
    )
    model = apply_lora(load_model(cfg), cfg.lora)
    modules = _lora_modules(model)
    vision = {n: m for n, m in modules.items() if ".visual." in n}
    assert vision and all(n.endswith(".qkv") for n in vision)
    for module in vision.values():
        assert module.r["default"] == 4 and module.scaling["default"] == pytest.approx(12 / 4)
    language = [m for n, m in modules.items() if ".language_model." in n]
    assert all(m.r["default"] == 8 and m.scaling["default"] == pytest.approx(2.0) for m in language)
    parts = trainable_by_part(model)
    assert parts["vision"][0] > 0
    assert parts["lm_head"][0] > 0  # modules_to_save trains it in full
    # the plan's checkpoint size counts exactly these parameters, from config.json alone
    from raytune_qvl.config.sizes import estimate_sizes

    assert estimate_sizes(cfg).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("lora", "training"),
    [
        ({"use_dora": True, "vision_lora": VisionLoraConfig(enabled=True, vision_r=4)}, {"train_merger": True}),
        ({"init_lora_weights": "pissa_niter_2", "use_rslora": True}, {}),
        ({}, {"finetuning_type": "full", "freeze_vision_tower": True}),
    ],
    ids=["dora-merger", "pissa-rslora", "full-frozen-vision"],
)
def test_variants_train_what_they_say_and_the_plan_counts_it(tiny_assets: Path, lora: dict, training: dict) -> None:
    from raytune_qvl.config.schema import TrainingConfig
    from raytune_qvl.config.sizes import estimate_sizes
    from raytune_qvl.train.lora import make_trainable, trainable_by_part
    from raytune_qvl.train.model import load_model

    cfg = _cfg(tiny_assets, **lora).model_copy(update={"training": TrainingConfig(**training)})
    model = make_trainable(load_model(cfg), cfg)
    parts = trainable_by_part(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if training.get("finetuning_type") == "full":
        assert parts["vision"][0] == 0 and parts["merger"][0] == parts["merger"][1] > 0
        assert parts["language_model"][0] == parts["language_model"][1]
        return  # the plan's full count is of weight matrices only
    if lora.get("use_dora"):
        assert any("lora_magnitude_vector" in n for n in trained)
        # the merger trains in full: a trained copy beside peft's frozen original
        assert 2 * parts["merger"][0] == parts["merger"][1] > 0
    else:
        module = next(m for m in _lora_modules(model).values())
        assert module.scaling["default"] == pytest.approx(16 / 8**0.5)  # rsLoRA: alpha / sqrt(r)
        assert parts["merger"][0] == 0
    assert estimate_sizes(cfg).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_model_class_comes_from_model_type(tiny_assets: Path, tmp_path: Path) -> None:
    from raytune_qvl.train.model import load_model

    model = load_model(_cfg(tiny_assets))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    # a folder with another architecture is refused by type, whatever its name says
    fake = tmp_path / "Qwen2.5-VL-looking-name"
    fake.mkdir()
    (fake / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "vocab_size": 10})
    )
    cfg = _cfg(tiny_assets).model_copy(update={"model": ModelConfig(name=str(fake), torch_dtype="float32")})
    with pytest.raises(ConfigError, match="model type 'gpt2' is not supported"):
        load_model(cfg)


def test_flash_attention_falls_back_to_sdpa_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from raytune_qvl.config import plan

    plan._warned.clear()
    with caplog.at_level(logging.WARNING, logger="raytune_qvl"):
        assert plan.resolve_attention("flash_attention_2", on_gpu=False, dtype_name="bfloat16") == "sdpa"
        assert plan.resolve_attention("flash_attention_2", on_gpu=False, dtype_name="bfloat16") == "sdpa"
    assert len([r for r in caplog.records if "using sdpa" in r.getMessage()]) == 1  # one line, not one per call
    assert plan.resolve_attention("eager", on_gpu=False, dtype_name="float32") == "eager"


def _a_flash_attn_package(folder: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    """A `flash_attn` package of `body` on sys.path (this machine has none)."""
    (folder / "flash_attn").mkdir()
    (folder / "flash_attn" / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)


def test_flash_attention_needs_compute_capability_8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """V100 (7.0) and T4 (7.5) import flash-attn and then fail at the first forward."""
    from raytune_qvl.config import plan

    _a_flash_attn_package(tmp_path, monkeypatch, "")
    fa2 = {"on_gpu": True, "dtype_name": "bfloat16"}
    assert plan.resolve_attention("flash_attention_2", **fa2, capability=(7, 5)) == "sdpa"
    assert plan.resolve_attention("flash_attention_2", **fa2, capability=(8, 0)) == "flash_attention_2"
    assert plan.resolve_attention("flash_attention_2", **fa2, capability=None) == "flash_attention_2"  # the driver
    assert plan.is_flash("flash_attention_2") and not plan.is_flash("sdpa")


def test_a_flash_attn_that_does_not_import_falls_back_to_sdpa(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A flash-attn built against another torch is found by name and fails to load its library."""
    from raytune_qvl.config import plan

    _a_flash_attn_package(tmp_path, monkeypatch, "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')")
    plan._warned.clear()
    with caplog.at_level(logging.WARNING, logger="raytune_qvl"):
        fa2 = {"on_gpu": True, "dtype_name": "bfloat16", "capability": (9, 0)}
        assert plan.resolve_attention("flash_attention_2", **fa2) == "sdpa"
    assert "flash-attn does not import (ImportError: flash_attn_2_cuda.so: undefined symbol" in caplog.text


def _fixed_batch(tiny_assets: Path, processor):
    from raytune_qvl.data.audit import prepare_split
    from raytune_qvl.data.batches import Collator, TrainDataset

    split = prepare_split(
        tiny_assets / "data" / "forms" / "eval.jsonl", processor, DataConfig(min_image_size=28, max_image_size=336)
    )
    ds = TrainDataset(split.items[:4], processor)
    return Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_forward_backward_and_a_fixed_batch_loss_falls(tiny_assets: Path, processor, checkpointing: bool) -> None:
    from raytune_qvl.train.lora import apply_lora
    from raytune_qvl.train.model import load_model

    torch.manual_seed(0)
    cfg = _cfg(tiny_assets)
    cfg = cfg.model_copy(update={"environment": EnvironmentConfig(bf16=False, gradient_checkpointing=checkpointing)})
    model = apply_lora(load_model(cfg), cfg.lora)
    model.train()
    batch = _fixed_batch(tiny_assets, processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert any(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert losses[-1] < 0.5 * losses[0], losses
