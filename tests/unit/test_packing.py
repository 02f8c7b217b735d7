"""Multimodal sequence packing: a packed micro-batch trains exactly what the padded one does (the
same loss and LoRA gradients: each sample keeps its own M-RoPE positions and attends only to
itself), no sample is split across rows, and length grouping deals the same samples per step."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytune_qvl.assets.synth import write_dataset
from raytune_qvl.data.audit import prepare_split
from raytune_qvl.data.batches import Collator, EpochSampler, PackingCollator, TrainDataset, packed_inputs
from raytune_qvl.data.encode import IGNORE_INDEX


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Forms of several sizes, so that the samples' lengths and image grids differ."""
    return write_dataset(tmp_path_factory.mktemp("pack"), "ocr_doc", 12, 2, seed=7, domain="forms")["train"]


def _samples(cfg, processor, n: int) -> tuple[list, TrainDataset]:
    items = prepare_split(cfg.data.train_path, processor, cfg.data).items
    items = sorted(items, key=lambda e: len(e.input_ids))  # short and long together
    chosen = [items[0], items[-1], items[1], items[-2], items[len(items) // 2], items[2]][:n]
    return chosen, TrainDataset(chosen, processor)


def test_no_sample_is_split_and_rows_fit(varied: Path, tiny_config, processor) -> None:
    cfg = tiny_config(f"data.train_path={varied}", "data.eval_path=null")
    items, data = _samples(cfg, processor, 6)
    lengths = [len(e.input_ids) for e in items]
    limit = max(lengths) + min(lengths)  # rows of two or more samples, never all six in one
    collate = PackingCollator(processor.tokenizer.pad_token_id, limit)
    batch = collate([data[i] for i in range(6)])
    rows = collate.rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(6)) and 1 < len(rows) < 6
    assert all(sum(lengths[i] for i in row) <= limit for row in rows)
    segments = batch["packed_segments"].tolist()
    real = [s for s in segments if s[4] == 1]  # samples; the rest is padding
    assert len(real) == 6 and all(s[3] == 1 for s in real)  # one image each
    for (r, start, length, _, _), i in zip(real, [i for row in rows for i in row]):
        assert length == lengths[i]  # whole, in one row
        assert batch["input_ids"][r, start : start + length].tolist() == items[i].input_ids
        trained = batch["labels"][r, start + 1 : start + length].tolist()
        assert trained == items[i].labels[1:] and batch["labels"][r, start] == IGNORE_INDEX
    assert batch["image_grid_thw"].tolist() == [items[i].image_grid_thw[0] for row in rows for i in row]


def test_a_packed_batch_trains_what_the_padded_batch_trains(varied: Path, tiny_config, processor) -> None:
    import torch

    from raytune_qvl.train.lora import apply_lora
    from raytune_qvl.train.model import load_model, rope_index_of

    cfg = tiny_config(f"data.train_path={varied}", "data.eval_path=null", "lora.lora_dropout=0.0")
    items, data = _samples(cfg, processor, 6)
    samples = [data[i] for i in range(6)]
    lengths = [len(e.input_ids) for e in items]
    padded = Collator(processor.tokenizer.pad_token_id)(samples)
    packed_host = PackingCollator(processor.tokenizer.pad_token_id, max(lengths) + min(lengths))(samples)

    torch.manual_seed(0)
    model = apply_lora(load_model(cfg), cfg.lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so that every LoRA weight has a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.eval()  # no dropout: the two passes must see the same network
    packed = packed_inputs(packed_host, rope_index_of(model))
    assert packed["position_ids"].shape == (4, *packed_host["input_ids"].shape) and "attention_mask" not in packed
    tokens = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert tokens == int((packed["labels"][:, 1:] != IGNORE_INDEX).sum())

    def step(batch: dict) -> tuple[float, dict]:
        model.zero_grad()
        loss = model(**batch, num_items_in_batch=tokens).loss
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_padded, grad_padded = step(padded)
    scale = max(float(g.abs().max()) for g in grad_padded.values())
    # in rows of at most max_length (SDPA), and in one row of every sample without padding (the
    # layout FlashAttention gets: its varlen kernel keeps samples apart only in a batch of one row)
    one_row_host = PackingCollator(processor.tokenizer.pad_token_id, 1, one_row=True)(samples)
    one_row = packed_inputs(one_row_host, rope_index_of(model))
    assert one_row["input_ids"].shape == (1, sum(lengths)) and (one_row_host["packed_segments"][:, 4] == 1).all()
    for batch in (packed, one_row):
        loss_packed, grad_packed = step(batch)
        assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
        gap = max(float((grad_packed[n] - grad_padded[n]).abs().max()) for n in grad_padded) / scale
        assert gap < 1e-4, gap

    # and without the per-sample positions (one running sequence) the loss is not the same:
    # the equality above is the positions' and the block mask's doing
    plain = {k: v for k, v in packed.items() if k != "position_ids"}
    with torch.no_grad():
        assert float(model(**plain, num_items_in_batch=tokens).loss) != pytest.approx(loss_padded, rel=1e-3)


def test_length_grouping_trains_the_epochs_samples_in_micro_batches_of_neighbouring_lengths() -> None:
    from raytune_qvl.data.batches import GROUP_STEPS

    lengths = [(i * 37) % 101 for i in range(2 * 2 * 3 * GROUP_STEPS + 24)]  # a mega-batch and a part
    n = len(lengths)
    kwargs = dict(micro=2, accum=3, world=2, seed=4, shuffle=True)
    plain = [EpochSampler(n, rank=r, **kwargs).indices() for r in (0, 1)]
    grouped = [EpochSampler(n, rank=r, lengths=lengths, **kwargs).indices() for r in (0, 1)]
    assert sorted(grouped[0] + grouped[1]) == sorted(plain[0] + plain[1])  # the same epoch
    assert grouped == [EpochSampler(n, rank=r, lengths=lengths, **kwargs).indices() for r in (0, 1)]  # seeded

    def spread(order: list[int]) -> float:  # mean length range inside a micro-batch
        batches = [[lengths[i] for i in order[k : k + 2]] for k in range(0, len(order), 2)]
        return sum(max(b) - min(b) for b in batches) / len(batches)

    assert spread(grouped[0]) < spread(plain[0]) / 10
    # a resumed epoch continues with the same micro-batches
    resumed = EpochSampler(n, rank=1, lengths=lengths, **kwargs)
    resumed.set_epoch(0, start_micro_batch=5)
    assert resumed.indices() == grouped[1][10:]


def test_rows_are_balanced_without_an_extra_row() -> None:
    pack = PackingCollator(0, 100)
    lengths = [50, 40, 30, 30, 20, 10]  # first fit decreasing: rows of 100 and 80 tokens
    rows = pack.rows(lengths)
    assert sorted(sum(lengths[i] for i in row) for row in rows) == [90, 90]  # two rows, padded to 90
    assert pack.rows([100, 100]) == [[0], [1]] and pack.rows([150, 10]) == [[0], [1]]
