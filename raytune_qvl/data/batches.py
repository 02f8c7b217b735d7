"""Encoded samples as model inputs: the dataset (pixels computed in DataLoader workers), the
right-padding collator, and the sampler that shards each epoch over workers and resumes exactly.

Every sample carries `mm_token_type_ids` (text 0, image 1, video 2), made by the processor's own
`create_mm_token_type_ids` from the prepared ids: Qwen2.5-VL builds its 3-D M-RoPE positions for
image tokens only when it gets them, so training sees the positions of a standard inference call
(processor -> generate), the ones the model was pre-trained with."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from raytune_qvl.data.encode import IGNORE_INDEX, Encoded
from raytune_qvl.data.images import load_image

__all__ = [
    "TrainDataset",
    "Collator",
    "PackingCollator",
    "EpochSampler",
    "input_tokens",
    "mm_token_types",
    "packed_inputs",
    "sample_lengths",
]


class TrainDataset:
    """Encoded samples as model inputs; pixels are computed here, in DataLoader workers."""

    def __init__(self, items: Sequence[Encoded], processor: Any):
        self.items = list(items)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        item = self.items[index]
        out: dict[str, Any] = {
            "input_ids": torch.tensor(item.input_ids, dtype=torch.long),
            "labels": torch.tensor(item.labels, dtype=torch.long),
            "mm_token_type_ids": mm_token_types(self.processor, item.input_ids),
        }
        if item.images:
            images = [load_image(p) for p in item.images]
            pixels = self.processor.image_processor(images=images, return_tensors="pt")
            grid = pixels["image_grid_thw"]
            if grid.tolist() != item.image_grid_thw:  # the cache and the processor disagree
                raise RuntimeError(f"record {item.id}: image grid {grid.tolist()} != prepared {item.image_grid_thw}")
            out["pixel_values"] = pixels["pixel_values"]
            out["image_grid_thw"] = grid
        return out


def mm_token_types(processor: Any, input_ids: Sequence[int]) -> Any:
    """The modality of every token, as the processor marks it for the model (a long tensor)."""
    import torch

    return torch.tensor(processor.create_mm_token_type_ids([list(input_ids)])[0], dtype=torch.long)


class Collator:
    """Right-pads a list of samples into one batch (padding is masked in labels and attention)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(s["input_ids"]) for s in samples)
        n = len(samples)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        modality = torch.zeros((n, longest), dtype=torch.long)  # padding is text (0), as the processor pads
        for i, s in enumerate(samples):
            length = len(s["input_ids"])
            input_ids[i, :length] = s["input_ids"]
            labels[i, :length] = s["labels"]
            attention[i, :length] = 1
            modality[i, :length] = s["mm_token_type_ids"]
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention,
            "mm_token_type_ids": modality,
        }
        with_images = [s for s in samples if "pixel_values" in s]
        if with_images:
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
            batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
        return batch


class PackingCollator:
    """Packs a micro-batch's samples into as few rows of at most `max_length` tokens as they fit
    (`rows`: never a sample split across rows), instead of padding every sample to the longest
    (HF's padding-free collator, LLaMA-Factory's neat_packing). The same samples train as in
    `Collator`, so a step, the plan and the token-weighted loss are unchanged; only the padding goes.

    A row's samples stay apart: the first label of each is masked (no prediction across a
    boundary), and `packed_segments` (row, start, length, images, sample or padding) goes to
    `packed_inputs`, which gives each sample its own Qwen2.5-VL 3-D rope positions, computed by the model's own
    `get_rope_index`, with a text row that restarts at 0 — the 4-row `position_ids` from which
    transformers confines attention to each sample (a block mask with SDPA, varlen with
    FlashAttention-2). Trailing padding is a segment of its own, its labels masked.

    `one_row` (FlashAttention): transformers keeps packed samples apart in FlashAttention's varlen
    kernel only in a batch of one row (with several rows each row would attend across its samples),
    so the micro-batch is one row of all its samples back to back, with no padding at all: the
    kernel's cost grows with the tokens, not with the row's length squared as SDPA's block mask does."""

    def __init__(self, pad_token_id: int, max_length: int, *, one_row: bool = False):
        self.pad_token_id, self.max_length, self.one_row = pad_token_id, max_length, one_row

    def rows(self, lengths: Sequence[int]) -> list[list[int]]:
        """Sample indices per row, each row in its samples' batch order: as few rows as first fit
        decreasing needs, then the samples spread over that many rows, longest first onto the
        shortest row that has room, so the rows end close together and the batch pads little.
        One row of every sample with `one_row`."""
        if self.one_row:
            return [list(range(len(lengths)))]
        order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
        rows: list[list[int]] = []
        room: list[int] = []
        for i in order:  # first fit decreasing: the row count
            for r, free in enumerate(room):
                if lengths[i] <= free:
                    rows[r].append(i)
                    room[r] -= lengths[i]
                    break
            else:
                rows.append([i])
                room.append(max(self.max_length, lengths[i]) - lengths[i])
        capacity = max(self.max_length, max(lengths, default=0))
        balanced: list[list[int]] = [[] for _ in rows]
        used = [0] * len(rows)
        for i in order:  # the same number of rows, balanced
            fits = [r for r in range(len(rows)) if used[r] + lengths[i] <= capacity]
            if not fits:
                return [sorted(row) for row in rows]  # balancing would need another row
            r = min(fits, key=lambda k: (used[k], k))
            balanced[r].append(i)
            used[r] += lengths[i]
        return [sorted(row) for row in balanced]

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(s["input_ids"]) for s in samples]
        rows = self.rows(lengths)
        longest = max(sum(lengths[i] for i in row) for row in rows)
        n = len(rows)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        modality = torch.zeros((n, longest), dtype=torch.long)
        segments: list[list[int]] = []  # row, start, length, images, 1 for a sample (0: padding)
        pixels, grids = [], []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                s, length = samples[i], lengths[i]
                input_ids[r, start : start + length] = s["input_ids"]
                labels[r, start : start + length] = s["labels"]
                labels[r, start] = IGNORE_INDEX  # nothing predicts a sample's first token
                modality[r, start : start + length] = s["mm_token_type_ids"]
                images = 0
                if "pixel_values" in s:
                    pixels.append(s["pixel_values"])
                    grids.append(s["image_grid_thw"])
                    images = len(s["image_grid_thw"])
                segments.append([r, start, length, images, 1])
                start += length
            if start < longest:
                segments.append([r, start, longest - start, 0, 0])  # padding: a segment of its own
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "mm_token_type_ids": modality,
            "packed_segments": torch.tensor(segments, dtype=torch.long),
        }
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat(grids)
        return batch


def packed_inputs(batch: dict[str, Any], rope_index: Any) -> dict[str, Any]:
    """A packed host batch as model inputs: `packed_segments` replaced by 4-row `position_ids`
    (text positions restarting at 0 per sample, then the model's 3-D M-RoPE rows, each sample's
    computed alone by `rope_index` — the model's `get_rope_index`), no attention mask."""
    import torch

    out = {k: v for k, v in batch.items() if k != "packed_segments"}
    input_ids, modality = batch["input_ids"], batch["mm_token_type_ids"]
    positions = torch.zeros((4, *input_ids.shape), dtype=torch.long)
    grids = batch.get("image_grid_thw")
    image = 0
    for row, start, length, images, _ in batch["packed_segments"].tolist():
        span = slice(start, start + length)
        positions[0, row, span] = torch.arange(length)
        grid = grids[image : image + images] if images else None
        rope, _ = rope_index(input_ids[row : row + 1, span], modality[row : row + 1, span], image_grid_thw=grid)
        positions[1:, row, span] = rope[:, 0]
        image += images
    out["position_ids"] = positions
    return out


def input_tokens(batch: dict[str, Any]) -> int:
    """Tokens of a host batch that are samples, not padding (packed or padded)."""
    if "packed_segments" in batch:
        segments = batch["packed_segments"]
        return int((segments[:, 2] * segments[:, 4]).sum())
    return int(batch["attention_mask"].sum())


def sample_lengths(items: Sequence[Encoded]) -> list[int]:
    """Tokens per sample, from the cache's column when it is one (no row is built)."""
    lengths = getattr(items, "lengths", None)
    return lengths() if callable(lengths) else [len(e.input_ids) for e in items]


GROUP_STEPS = 50  # optimizer steps per length-sorted mega-batch (HF's megabatch_mult is 50 too)


class EpochSampler:
    """This worker's sample indices for one epoch: a seeded permutation (the same on every
    worker), cut to whole optimizer steps, then strided by rank. `start` skips micro-batches
    already trained, for exact resume."""

    def __init__(
        self,
        num_samples: int,
        *,
        micro: int,
        accum: int,
        rank: int,
        world: int,
        seed: int,
        shuffle: bool,
        lengths: Sequence[int] | None = None,
    ):
        """`lengths` (tokens per sample): group by length, as HF's LengthGroupedSampler does —
        the epoch's permutation cut into mega-batches of GROUP_STEPS optimizer steps, each sorted
        by length and cut into its steps again, the steps shuffled within it (seeded), so that a
        micro-batch pads to a neighbour's length. The epoch trains the same samples; a step's
        samples differ from the ungrouped order's."""
        self.num_samples, self.micro, self.accum = num_samples, micro, accum
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        self.lengths = lengths
        self.epoch = 0
        self.start_micro_batch = 0

    def set_epoch(self, epoch: int, start_micro_batch: int = 0) -> None:
        self.epoch, self.start_micro_batch = epoch, start_micro_batch

    def micro_batches_per_epoch(self) -> int:
        return (self.num_samples // (self.micro * self.world * self.accum)) * self.accum

    def indices(self) -> list[int]:
        import torch

        order = list(range(self.num_samples))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        used = self.micro_batches_per_epoch() * self.micro * self.world
        order = order[:used]
        if self.lengths is not None:
            order = self._grouped(order)
        mine = order[self.rank :: self.world]
        return mine[self.start_micro_batch * self.micro :]

    def _grouped(self, order: list[int]) -> list[int]:
        import torch

        step = self.micro * self.world * self.accum
        lengths = self.lengths
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7)
        out: list[int] = []
        for start in range(0, len(order), step * GROUP_STEPS):
            mega = sorted(order[start : start + step * GROUP_STEPS], key=lambda k: (lengths[k], k))
            steps = [mega[s : s + step] for s in range(0, len(mega), step)]
            for k in torch.randperm(len(steps), generator=g).tolist():
                out += steps[k]
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())
