"""Qwen2.5-VL's own 3-D M-RoPE positions everywhere: a training forward sees the positions the model
computes from the processor's output for the same sample, the project's evaluation decodes what a
plain processor -> generate call decodes, and a training forward after a generate call does not
reuse the positions that call cached. Also on a random model of the real Qwen2.5-VL-7B shapes
(its widths, heads and rope sections; two layers)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import ROOT  # noqa: E402
from raytune_qvl.config.schema import DataConfig  # noqa: E402

DATA = DataConfig(min_image_size=28, max_image_size=336, max_length=512, train_path="x", eval_path=None)

# Qwen/Qwen2.5-VL-7B-Instruct's config.json, text and vision, with 2 layers of each.
QWEN25_VL_7B_TWO_LAYERS = {
    "text": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 2,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False,
    },
    "vision": {
        "depth": 2,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    },
}


@pytest.fixture(scope="module")
def processor(tiny_assets: Path):
    """The tiny model's processor with images kept at their own size (no upscaling to a minimum)."""
    from raytune_qvl.config.schema import Config, ModelConfig
    from raytune_qvl.data.processor import load_processor

    return load_processor(Config(model=ModelConfig(name=str(tiny_assets / "tiny-qwen25vl")), data=DATA))


@pytest.fixture(scope="module")
def samples(processor, tmp_path_factory: pytest.TempPathFactory):
    """Three encoded samples of different image sizes, with their records."""
    from raytune_qvl.assets.synth import write_dataset
    from raytune_qvl.data.audit import prepare_split
    from raytune_qvl.data.records import read_samples

    folder = write_dataset(tmp_path_factory.mktemp("positions") / "d", "ocr_doc", 3, 0, seed=5)["train"]
    data = DATA.model_copy(update={"train_path": str(folder)})
    records, _ = read_samples(folder, data)
    return prepare_split(folder, processor, data).items, records


def _random_model(processor, shapes: dict | None = None):
    """A random Qwen2.5-VL with the tiny model's shapes (or the given ones) and its token ids."""
    import json

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny = json.loads((ROOT / ".assets" / "tiny-qwen25vl" / "config.json").read_text())
    ids = {k: tiny[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    text = dict(tiny["text_config"])
    vision = dict(tiny["vision_config"])
    if shapes:
        text.update(shapes["text"])
        vision.update(shapes["vision"])
        text.pop("layer_types", None)  # the tiny base's per-layer list; derived again from num_hidden_layers
    text["vocab_size"] = len(processor.tokenizer)
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _positions(model, batch: dict) -> torch.Tensor:
    """The position ids the language model receives for one forward of `batch`."""
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


def _project_batch(processor, items) -> dict:
    from raytune_qvl.data.batches import Collator, TrainDataset

    batch = Collator(processor.tokenizer.pad_token_id)([TrainDataset(items, processor)[i] for i in range(len(items))])
    return {k: v for k, v in batch.items() if k != "labels"}


def _processor_batch(processor, record) -> dict:
    """What a user gets from the processor for the same conversation and image."""
    from PIL import Image

    text = processor.apply_chat_template(record.messages, tokenize=False)
    with Image.open(record.images[0]) as img:
        return dict(processor(text=[text], images=[img.convert("RGB")], return_tensors="pt"))


def _check_training_positions(model, processor, items, records) -> None:
    for item, record in zip(items, records):
        ours = _project_batch(processor, [item])
        reference = _processor_batch(processor, record)
        assert ours["input_ids"].tolist() == reference["input_ids"].tolist()
        assert ours["mm_token_type_ids"].tolist() == reference["mm_token_type_ids"].tolist()
        positions = _positions(model, ours)
        assert torch.equal(positions, _positions(model, reference))
        # 3-D: the image tokens' height and width rows differ from the temporal row
        image = ours["mm_token_type_ids"][0] == 1
        assert not torch.equal(positions[1, 0, image], positions[2, 0, image])


def test_a_training_forward_sees_the_positions_of_the_processors_output(processor, samples) -> None:
    items, records = samples
    _check_training_positions(_random_model(processor), processor, items, records)


def _generation_eval(processor, items, batch_size: int):
    from raytune_qvl.train.engine import WorkerContext
    from raytune_qvl.train.evaluate import GenerationEval

    return GenerationEval(
        items=list(items),
        indices=list(range(len(items))),
        processor=processor,
        task="ocr_doc",
        ctx=WorkerContext(),
        max_new_tokens=12,
        batch_size=batch_size,
        synced=False,
    )


def _plain_generate(model, processor, record, max_new_tokens: int) -> str:
    """processor(...) -> model.generate(...), greedy, one image at a time."""
    from PIL import Image

    prompt = processor.apply_chat_template(record.messages[:-1], tokenize=False, add_generation_prompt=True)
    with Image.open(record.images[0]) as img:
        inputs = processor(text=[prompt], images=[img.convert("RGB")], return_tensors="pt")
    eos = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _adapter(model):
    """A LoRA adapter with random (non-zero) weights, so its predictions differ from the base's."""
    from raytune_qvl.config.schema import LoraConfig
    from raytune_qvl.train.lora import apply_lora

    peft_model = apply_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return peft_model.eval()


def _check_predictions(model, processor, items, records) -> list[str]:
    plain = [_plain_generate(model, processor, record, 12) for record in records]
    one_at_a_time = [text for _, text, _ in _generation_eval(processor, items, 1).predict(model, "cpu")]
    assert one_at_a_time == plain
    return plain


def test_the_projects_predictions_are_those_of_a_plain_generate_call(processor, samples) -> None:
    items, records = samples
    model = _adapter(_random_model(processor))
    plain = _check_predictions(model, processor, items, records)
    assert any(plain), "the random adapter decoded nothing: the comparison would be empty"
    # batched (left-padded) decoding gives the same answers as one at a time
    batched = [text for _, text, _ in _generation_eval(processor, items, 3).predict(model, "cpu")]
    assert batched == plain


def test_a_training_forward_after_generate_does_not_reuse_its_positions(processor, samples) -> None:
    items, records = samples
    model = _random_model(processor)
    fresh = _positions(model, _project_batch(processor, items[:1]))
    _plain_generate(model, processor, records[1], 4)  # caches rope_deltas of another sample
    assert model.model.rope_deltas is not None
    assert torch.equal(_positions(model, _project_batch(processor, items[:1])), fresh)


@pytest.mark.slow
def test_positions_and_predictions_with_the_real_7b_shapes(processor, samples) -> None:
    items, records = samples
    model = _random_model(processor, QWEN25_VL_7B_TWO_LAYERS)
    assert model.config.text_config.hidden_size == 3584 and model.config.vision_config.out_hidden_size == 3584
    _check_training_positions(model, processor, items[:2], records[:2])
    _check_predictions(model, processor, items[:1], records[:1])
