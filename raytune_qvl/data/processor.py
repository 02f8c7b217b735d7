"""The Qwen2.5-VL processor (tokenizer + image processor) from a hub id or a local folder, with
the image sizes of the data config written where the image processor reads them."""

from __future__ import annotations

from typing import Any

from raytune_qvl.config.schema import Config, DataConfig
from raytune_qvl.errors import ConfigError, Problem

__all__ = ["hub_kwargs", "configure_processor", "load_processor"]


def hub_kwargs(cfg: Config) -> dict[str, Any]:
    """What from_pretrained needs to find the same checkpoint (revision; remote code only if asked)."""
    return {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code}


def configure_processor(processor: Any, data: DataConfig) -> Any:
    """Bound the image area by the data config: min_pixels = min_image_size**2 and
    max_pixels = max_image_size**2 (the seed's sizes are the long side of a square image).

    The `size` dict is what the image processor reads (a `min_pixels` given to
    `from_pretrained` can be silently ignored); it is saved with the processor.
    """
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    if factor != data.image_factor:
        raise ConfigError(
            [
                Problem(
                    "data",
                    "data.image_factor",
                    f"the model's vision tower uses {factor} (patch x merge); set {factor}",
                    data.image_factor,
                )
            ]
        )
    min_pixels, max_pixels = data.min_image_size**2, data.max_image_size**2
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if getattr(ip, "min_pixels", None) is not None:  # transformers < 5 also reads these
        ip.min_pixels, ip.max_pixels = min_pixels, max_pixels
    return processor


def load_processor(cfg: Config) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(cfg.model.name, **hub_kwargs(cfg))
    if not hasattr(processor, "image_processor"):
        raise ConfigError(
            [
                Problem(
                    cfg.model.name,
                    "model.name",
                    "AutoProcessor returned no image processor: not a vision-language checkpoint",
                    type(processor).__name__,
                )
            ]
        )
    return configure_processor(processor, cfg.data)
