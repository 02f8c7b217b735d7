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

__all__ = ["TrainDataset", "Collator", "EpochSampler", "mm_token_types"]


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


class EpochSampler:
    """This worker's sample indices for one epoch: a seeded permutation (the same on every
    worker), cut to whole optimizer steps, then strided by rank. `start` skips micro-batches
    already trained, for exact resume."""

    def __init__(self, num_samples: int, *, micro: int, accum: int, rank: int, world: int, seed: int, shuffle: bool):
        self.num_samples, self.micro, self.accum = num_samples, micro, accum
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
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
        mine = order[:used][self.rank :: self.world]
        return mine[self.start_micro_batch * self.micro :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())
