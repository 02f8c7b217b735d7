"""Synthetic data and the tiny model: deterministic, loadable the way real checkpoints load."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytune_qvl.assets.synth import generate, to_latex, write_dataset


@pytest.mark.parametrize("task", ["ocr_doc", "ocr_formula", "general_vqa"])
def test_synthetic_examples_are_deterministic(task: str) -> None:
    a, b = list(generate(task, 5, seed=7)), list(generate(task, 5, seed=7))
    assert [e.answer for e in a] == [e.answer for e in b]
    assert [e.image.tobytes() for e in a] == [e.image.tobytes() for e in b]
    assert [e.answer for e in generate(task, 5, seed=8)] != [e.answer for e in a]
    assert all(e.answer.strip() and e.image.size[0] >= 28 for e in a)


def test_formulas_are_latex() -> None:
    tree = ("seq", [("frac", ("atom", "a"), ("atom", "b")), ("atom", "="), ("sup", ("atom", "x"), ("atom", "2"))])
    assert to_latex(tree) == r"\frac{a}{b} = x^{2}"


def test_dataset_files(tmp_path: Path) -> None:
    paths = write_dataset(tmp_path / "d", "general_vqa", 4, 2, seed=0)
    assert len(paths["train"].read_text().splitlines()) == 4
    assert len(list((tmp_path / "d" / "images").glob("*.png"))) == 6
    assert not (tmp_path / "d.partial").exists()


def test_tiny_model_loads_like_a_real_checkpoint(tiny_assets: Path) -> None:
    from transformers import AutoConfig, AutoProcessor

    folder = tiny_assets / "tiny-qwen25vl"
    assert AutoConfig.from_pretrained(folder).model_type == "qwen2_5_vl"
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"  # the real processor, not a tokenizer
    assert processor.tokenizer.eos_token == "<|im_end|>"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.endswith("<|im_start|>assistant\n") and "<|vision_start|><|image_pad|><|vision_end|>" in text
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10_000_000  # 1.8M fp32 weights: a few MB
