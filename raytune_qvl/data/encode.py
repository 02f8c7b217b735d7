"""One sample as token ids and labels. Only assistant tokens are trained: their character spans
come from rendering the chat template up to each assistant turn (with the generation prompt) and
through it, and tokens are labelled by their offsets, so no token id is ever searched for. A
sample longer than `max_length` is dropped, never cut (a cut inside image tokens breaks the
model)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raytune_qvl.data.images import image_grid, image_size, load_image
from raytune_qvl.data.records import BadRecord, Sample

__all__ = ["IGNORE_INDEX", "Encoded", "encode_sample"]

IGNORE_INDEX = -100  # label value the loss skips


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image_grid_thw: list[list[int]]  # per image: (t, h, w) in patches
    images: list[str]
    prompt_len: int  # tokens before the last assistant answer (the generation prompt)
    answer: str
    id: str
    line: int
    image_tokens: int

    @property
    def text_tokens(self) -> int:
        return len(self.input_ids) - self.image_tokens


def encode_sample(sample: Sample, processor: Any, max_length: int, *, check_images: bool = True) -> Encoded:
    """Token ids and labels (assistant answers + their end-of-turn token; the rest masked)."""
    tokenizer = processor.tokenizer
    merge = processor.image_processor.merge_size**2
    grids = []
    for path in sample.images:
        img = load_image(path) if check_images else None
        grids.append(image_grid(processor, img.size if img is not None else image_size(path)))
    n_image_tokens = [math.prod(g) // merge for g in grids]
    image_token = processor.image_token

    def render(messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        pieces = text.split(image_token)
        out = [pieces[0]]
        for i, piece in enumerate(pieces[1:]):
            out.append(image_token * n_image_tokens[i] + piece)
        return "".join(out)

    full = render(sample.messages, False)
    spans: list[tuple[int, int]] = []  # character spans that are trained
    prompt_chars = 0
    for k, message in enumerate(sample.messages):
        if message["role"] != "assistant":
            continue
        before = render(sample.messages[:k], True)
        through = render(sample.messages[: k + 1], False)
        if not full.startswith(through) or not through.startswith(before):
            raise BadRecord("template_mismatch", f"turn {k}")
        spans.append((len(before), len(through.rstrip())))  # the answer and its end-of-turn token
        prompt_chars = len(before)

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = enc["input_ids"]
    if len(input_ids) > max_length:
        raise BadRecord("too_long", f"{len(input_ids)} tokens")
    labels = [IGNORE_INDEX] * len(input_ids)
    prompt_len = len(input_ids)
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        if any(start >= s and end <= e and end > start for s, e in spans):
            labels[i] = input_ids[i]
        if start >= prompt_chars and prompt_len == len(input_ids):
            prompt_len = i
    return Encoded(
        input_ids=input_ids,
        labels=labels,
        image_grid_thw=grids,
        images=sample.images,
        prompt_len=prompt_len,
        answer=sample.answer,
        id=sample.id,
        line=sample.line,
        image_tokens=sum(n_image_tokens),
    )
