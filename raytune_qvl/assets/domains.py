"""OCR domains for the embedded default: what the text is (kinds of text), how it is set (fonts,
sizes, one 28-pixel cell per character) and how the page looks (ink, paper texture, noise, blur,
rotation). Deterministic from a `random.Random`.

Two domains make the miniature of the real job: the tiny base model is pre-trained on `base`
(clean upright monospace strings of any characters) until it reads, and the demo and the tests
fine-tune it with LoRA on `forms` (slanted form fields, dates, amounts and codes on textured,
slightly blurred paper) — a domain it reads badly before, as a pre-trained VLM reads a new
document type.

Fonts are the TrueType files matplotlib ships (DejaVu, Computer Modern, STIX: the same bytes on
every machine with the same matplotlib); a missing one falls back to the system's DejaVu, then to
PIL's built-in font, with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import random
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["CELL", "FONTS", "Domain", "DOMAINS", "TEXT_KINDS", "font_path", "fonts_digest", "render", "sample"]

log = logging.getLogger("raytune_qvl")

CELL = 28  # pixels per character: the vision tower's patch (14) x spatial merge (2) = one merged token

# font name -> file name in matplotlib's mpl-data/fonts/ttf (or a system font folder)
FONTS = {
    "dejavu-sans-mono": "DejaVuSansMono.ttf",
    "dejavu-sans-mono-bold": "DejaVuSansMono-Bold.ttf",
    "dejavu-sans-mono-oblique": "DejaVuSansMono-Oblique.ttf",
    "dejavu-sans": "DejaVuSans.ttf",
    "dejavu-serif": "DejaVuSerif.ttf",
    "cm-typewriter": "cmtt10.ttf",
    "cm-roman": "cmr10.ttf",
    "stix": "STIXGeneral.ttf",
}
_SYSTEM_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype", "/usr/share/fonts")

# The characters a base model learns to read: letters, digits, the punctuation of forms.
CHARSET = string.ascii_letters + string.digits + ":.,-/$#%"
_KEYS = ("no", "id", "qty", "ref", "tax", "net", "sum", "vat", "due")  # short: a field fits in 10 cells


def _random_string(rng: random.Random, lengths: tuple[int, int]) -> str:
    n = rng.randint(*lengths)
    return "".join(rng.choice(CHARSET) for _ in range(n))


def _date(rng: random.Random) -> str:
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice((f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y % 100:02d}", f"{d:02d}.{m:02d}.{y % 100:02d}"))


def _amount(rng: random.Random) -> str:
    value = f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
    return f"${value}" if rng.random() < 0.6 else value


def _code(rng: random.Random) -> str:
    letters = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(2, 3)))
    return f"{letters}-{rng.randint(10, 9_999)}"


def _field(rng: random.Random) -> str:
    key = rng.choice(_KEYS)
    if key in ("tax", "net", "sum", "vat"):
        value = f"{rng.randint(1, 99)}.{rng.randint(0, 99):02d}"
    elif key == "due":
        value = f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}"
    else:
        value = str(rng.randint(1, 99_999))
    return f"{key}:{value}"


# kind -> generator(rng, lengths); `lengths` bounds the kinds of free length
TEXT_KINDS: dict[str, Callable[[random.Random, tuple[int, int]], str]] = {
    "strings": _random_string,
    "dates": lambda rng, _: _date(rng),
    "amounts": lambda rng, _: _amount(rng),
    "codes": lambda rng, _: _code(rng),
    "fields": lambda rng, _: _field(rng),
}


@dataclass(frozen=True)
class Domain:
    name: str
    fonts: tuple[str, ...]  # names in FONTS, one drawn per sample
    texts: tuple[str, ...]  # kinds in TEXT_KINDS, one drawn per sample
    lengths: tuple[int, int] = (3, 10)  # characters, for the kinds of free length
    sizes: tuple[int, int] = (18, 22)  # font size in pixels (the cell is 28)
    jitter: int = 1  # pixels a glyph may move in its cell
    ink: tuple[int, int] = (10, 40)  # glyph gray level
    paper: tuple[int, int] = (244, 252)  # background gray level
    texture: float = 0.0  # amplitude of the paper's blotchy texture (gray levels)
    noise: float = 0.0  # standard deviation of per-pixel noise (gray levels)
    blur: float = 0.0  # largest Gaussian blur radius (pixels)
    rotation: float = 0.0  # largest rotation (degrees)


DOMAINS = {
    "base": Domain("base", fonts=("dejavu-sans-mono", "dejavu-sans-mono-bold"), texts=("strings",)),
    "forms": Domain(
        "forms",
        fonts=("dejavu-sans-mono-oblique",),
        texts=("fields", "fields", "dates", "amounts", "codes"),
        ink=(20, 60),
        paper=(220, 236),
        texture=12.0,
        noise=8.0,
        blur=0.6,
        rotation=0.8,
    ),
}


@lru_cache(maxsize=None)
def font_path(name: str) -> Path | None:
    """The TrueType file of a font name: matplotlib's copy, else a system one, else None."""
    file = FONTS[name]
    spec = importlib.util.find_spec("matplotlib")
    packages = (spec.submodule_search_locations or []) if spec else []
    folders = [Path(loc) / "mpl-data" / "fonts" / "ttf" for loc in packages]
    for folder in [*folders, *map(Path, _SYSTEM_FONT_DIRS)]:
        if (folder / file).is_file():
            return folder / file
    log.warning("font %s (%s) not found; using PIL's built-in font instead", name, file)
    return None


@lru_cache(maxsize=None)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = font_path(name)
    return ImageFont.truetype(str(path), size) if path else ImageFont.load_default(size=size)


def fonts_digest(domains: list[Domain]) -> str:
    """A hash of the font files these domains draw with (part of what a built base depends on)."""
    h = hashlib.sha256()
    for name in sorted({f for d in domains for f in d.fonts}):
        path = font_path(name)
        h.update(name.encode() + (path.read_bytes() if path else b"pil-default"))
    return h.hexdigest()[:16]


def _paper(width: int, height: int, domain: Domain, rng: random.Random) -> Image.Image:
    import numpy as np

    gen = np.random.default_rng(rng.randrange(1 << 32))
    level = rng.randint(*domain.paper)
    page = np.full((height, width), float(level))
    if domain.texture:  # low-frequency blotches: noise drawn coarse, then scaled up smoothly
        coarse = gen.normal(0.0, domain.texture, (max(1, height // 7), max(1, width // 7)))
        blotches = Image.fromarray(coarse.astype("float32"), mode="F").resize((width, height), Image.BICUBIC)
        page += np.asarray(blotches)
    return Image.fromarray(page.clip(0, 255).astype("uint8"), mode="L")


def render(text: str, domain: Domain, rng: random.Random) -> Image.Image:
    """`text` set one character per CELL-pixel cell on the domain's paper, then degraded."""
    import numpy as np

    font = _font(rng.choice(domain.fonts), rng.randint(*domain.sizes))
    img = _paper(CELL * max(1, len(text)), CELL, domain, rng)
    draw = ImageDraw.Draw(img)
    ink = rng.randint(*domain.ink)
    for i, ch in enumerate(text):
        dx, dy = rng.randint(-domain.jitter, domain.jitter), rng.randint(-domain.jitter, domain.jitter)
        draw.text((i * CELL + CELL / 2 + dx, CELL / 2 + dy), ch, fill=ink, font=font, anchor="mm")
    if domain.rotation:
        angle = rng.uniform(-domain.rotation, domain.rotation)
        img = img.rotate(angle, resample=Image.BILINEAR, fillcolor=img.getpixel((0, 0)))
    if domain.blur:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, domain.blur)))
    if domain.noise:
        pixels = np.asarray(img).astype("float32")
        pixels += np.random.default_rng(rng.randrange(1 << 32)).normal(0.0, domain.noise, pixels.shape)
        img = Image.fromarray(pixels.clip(0, 255).astype("uint8"), mode="L")
    return img.convert("RGB")


def sample(domain: Domain, rng: random.Random, lengths: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """One (image, text) of the domain; `lengths` overrides the domain's string lengths."""
    text = TEXT_KINDS[rng.choice(domain.texts)](rng, lengths or domain.lengths)
    return render(text, domain, rng), text
