"""Images as the Qwen2.5-VL processor will see them: decoded (a corrupt file is a bad record, not a
crash), the aspect-ratio limit of its `smart_resize` checked up front, and the patch grid it
will produce."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raytune_qvl.data.records import BadRecord

__all__ = ["load_image", "check_aspect", "image_grid", "image_size"]


def load_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadRecord("corrupt_image", f"{Path(path).name}: {exc}") from None


def check_aspect(width: int, height: int) -> None:
    """The processor's smart_resize refuses more than 200:1 mid-training; refuse it here."""
    if max(width, height) / max(1, min(width, height)) > 200:
        raise BadRecord("bad_aspect_ratio", f"{width}x{height}")


def image_grid(processor: Any, size: tuple[int, int]) -> list[int]:
    """(t, h, w) patch grid the processor will produce for an image of size (width, height)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    width, height = size
    check_aspect(width, height)
    h, w = smart_resize(
        height,
        width,
        factor=ip.patch_size * ip.merge_size,
        min_pixels=ip.size["shortest_edge"],
        max_pixels=ip.size["longest_edge"],
    )
    return [1, h // ip.patch_size, w // ip.patch_size]


def image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size
