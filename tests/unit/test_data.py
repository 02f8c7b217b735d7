"""The data pipeline: three record schemas, label masks, drops with reasons, the audit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raytune_qvl.config.schema import DataConfig
from raytune_qvl.data.audit import check_audit, prepare_split
from raytune_qvl.data.batches import Collator, EpochSampler, TrainDataset
from raytune_qvl.data.encode import IGNORE_INDEX, encode_sample
from raytune_qvl.data.records import read_samples
from raytune_qvl.errors import DataError
from raytune_qvl.assets.synth import write_dataset

DATA = DataConfig(min_image_size=112, max_image_size=336, max_length=256, train_path="x", eval_path=None)


@pytest.fixture(scope="module")
def synth_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return {
        fmt: write_dataset(root / fmt, "ocr_doc", 6, 2, seed=3, fmt=fmt)["train"]
        for fmt in ("raytune", "llamafactory", "qwen")
    }


def _trained_text(item, processor) -> str:
    return processor.tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label != IGNORE_INDEX])


def test_three_schemas_encode_identically(synth_dirs: dict[str, Path], processor) -> None:
    encoded = {fmt: prepare_split(path, processor, DATA) for fmt, path in synth_dirs.items()}
    reference = encoded["raytune"]
    assert reference.audit.kept == 6 and reference.audit.dropped == {}
    for fmt in ("llamafactory", "qwen"):
        assert [e.input_ids for e in encoded[fmt].items] == [e.input_ids for e in reference.items], fmt
        assert [e.labels for e in encoded[fmt].items] == [e.labels for e in reference.items], fmt


def test_json_list_file(synth_dirs: dict[str, Path], processor, tmp_path: Path) -> None:
    src = synth_dirs["llamafactory"]
    records = [json.loads(line) for line in src.read_text().splitlines()]
    shutil.copytree(src.parent / "images", tmp_path / "images")
    (tmp_path / "data.json").write_text(json.dumps(records))
    split = prepare_split(tmp_path / "data.json", processor, DATA)
    assert split.audit.kept == len(records)


def test_unmasked_tokens_are_the_answer_and_end_token(synth_dirs: dict[str, Path], processor) -> None:
    split = prepare_split(synth_dirs["raytune"], processor, DATA)
    for item in split.items:
        assert _trained_text(item, processor) == item.answer + "<|im_end|>"
        # the prompt ends where the answer starts
        assert all(label == IGNORE_INDEX for label in item.labels[: item.prompt_len])
        assert item.labels[item.prompt_len] != IGNORE_INDEX


def test_encoding_matches_the_processor(synth_dirs: dict[str, Path], processor) -> None:
    """Our image-token expansion and tokenization agree with Qwen2_5_VLProcessor itself."""
    from PIL import Image

    samples, _ = read_samples(synth_dirs["raytune"], DATA)
    for sample in samples[:3]:
        ours = encode_sample(sample, processor, 512)
        text = processor.apply_chat_template(sample.messages, tokenize=False)
        images = [Image.open(p).convert("RGB") for p in sample.images]
        theirs = processor(text=[text], images=images, return_tensors="pt")
        assert ours.input_ids == theirs["input_ids"][0].tolist()
        assert ours.image_grid_thw == theirs["image_grid_thw"].tolist()
        n_image = theirs["input_ids"][0].eq(processor.image_token_id).sum().item()
        assert ours.image_tokens == n_image > 0


def test_multi_turn_trains_every_assistant_turn(tmp_path: Path, synth_dirs: dict[str, Path], processor) -> None:
    shutil.copytree(synth_dirs["raytune"].parent / "images", tmp_path / "images")
    record = {
        "messages": [
            {"role": "system", "content": "You read documents."},
            {"role": "user", "content": "<image>What does it say?"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "Again, louder."},
            {"role": "assistant", "content": "SECOND ANSWER"},
        ],
        "images": ["images/train_00000.png"],
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    (item,) = prepare_split(tmp_path / "d.jsonl", processor, DATA).items
    assert _trained_text(item, processor) == "first answer<|im_end|>SECOND ANSWER<|im_end|>"
    assert item.answer == "SECOND ANSWER"


def _bad_dataset(root: Path, image_src: Path) -> Path:
    shutil.copy(image_src, root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    from PIL import Image

    Image.new("RGB", (1000, 4)).save(root / "thin.png")
    lines = [
        json.dumps({"image": "ok.png", "answer": "fine"}),
        "{not json",
        json.dumps({"image": "missing.png", "answer": "x"}),
        json.dumps({"image": "corrupt.png", "answer": "x"}),
        json.dumps({"messages": [{"role": "user", "content": "<image>hi"}], "images": ["ok.png"]}),
        json.dumps(
            {
                "messages": [{"role": "user", "content": "<image><image>hi"}, {"role": "assistant", "content": "a"}],
                "images": ["ok.png"],
            }
        ),
        json.dumps({"image": "ok.png", "answer": "word " * 400}),
        json.dumps({"image": "../outside.png", "answer": "x"}),
        json.dumps({"image": "thin.png", "answer": "x"}),
        json.dumps({"what": "ever"}),
        json.dumps({"image": "ok.png", "answer": "   "}),
        json.dumps(["a", "list"]),
    ]
    path = root / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe broken bytes\n")
    (root.parent / "outside.png").write_bytes((root / "ok.png").read_bytes())
    return path


def test_bad_records_are_skipped_counted_and_located(tmp_path: Path, synth_dirs: dict[str, Path], processor) -> None:
    root = tmp_path / "d"
    root.mkdir()
    path = _bad_dataset(root, synth_dirs["raytune"].parent / "images" / "train_00000.png")
    split = prepare_split(path, processor, DATA)
    audit = split.audit
    assert audit.kept == 1 and audit.total == 13
    assert audit.dropped == {
        "invalid_json": 1,
        "missing_image": 1,
        "corrupt_image": 1,
        "no_assistant_turn": 1,
        "image_count_mismatch": 1,
        "too_long": 1,
        "path_outside_data_dir": 1,
        "bad_aspect_ratio": 1,
        "unknown_schema": 1,
        "empty_answer": 1,
        "not_an_object": 1,
        "not_utf8": 1,
    }
    assert audit.examples["invalid_json"] == [2] and audit.examples["not_utf8"] == [13]
    text = audit.format()
    assert "too_long" in text and "lines 7" in text
    with pytest.raises(DataError, match="above data.max_bad_fraction"):
        check_audit(audit, DATA)
    check_audit(audit, DATA.model_copy(update={"max_bad_fraction": 0.95}))  # allowed when raised


def test_outside_paths_allowed_when_asked(tmp_path: Path, synth_dirs: dict[str, Path], processor) -> None:
    root = tmp_path / "d"
    root.mkdir()
    shutil.copy(synth_dirs["raytune"].parent / "images" / "train_00000.png", tmp_path / "outside.png")
    (root / "d.jsonl").write_text(json.dumps({"image": "../outside.png", "answer": "x"}) + "\n")
    assert prepare_split(root / "d.jsonl", processor, DATA).audit.dropped == {"path_outside_data_dir": 1}
    assert (
        prepare_split(root / "d.jsonl", processor, DATA.model_copy(update={"allow_outside_paths": True})).audit.kept
        == 1
    )


def test_image_bounds_reach_the_processor(processor) -> None:
    """min/max_image_size become the processor's pixel bounds, in the dict it actually reads."""
    assert processor.image_processor.size == {"shortest_edge": 112 * 112, "longest_edge": 336 * 336}
    from PIL import Image

    out = processor.image_processor(images=[Image.new("RGB", (2000, 2000))], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert h * w * 14 * 14 <= 336 * 336 and (h * 14) % 28 == 0


def test_empty_file_is_an_error(tmp_path: Path, processor) -> None:
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        prepare_split(tmp_path / "e.jsonl", processor, DATA)


def test_batches_and_sampler(synth_dirs: dict[str, Path], processor) -> None:
    split = prepare_split(synth_dirs["raytune"], processor, DATA)
    ds = TrainDataset(split.items, processor)
    batch = Collator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all()

    # two workers see disjoint halves of the same seeded order; resume skips consumed batches
    a = EpochSampler(16, micro=2, accum=2, rank=0, world=2, seed=1, shuffle=True)
    b = EpochSampler(16, micro=2, accum=2, rank=1, world=2, seed=1, shuffle=True)
    assert not set(a.indices()) & set(b.indices()) and len(a.indices()) == len(b.indices()) == 8
    first = a.indices()
    a.set_epoch(0, start_micro_batch=2)
    assert a.indices() == first[4:]
    a.set_epoch(1)
    assert a.indices() != first  # reshuffled per epoch
