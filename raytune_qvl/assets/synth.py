"""Synthetic OCR data, rendered locally and deterministic from a seed: text lines (ocr_doc),
LaTeX-like formulas drawn as math (ocr_formula), shapes with questions (general_vqa), and the
OCR domains of the embedded default (`--domain base|forms`, see domains.py).

Run as: python -m raytune_qvl.synth OUT_DIR --task ocr_doc [--domain forms] [--train 256 --eval 32 --test 0]

Writes OUT_DIR/train.jsonl, OUT_DIR/eval.jsonl (and test.jsonl with --test) and OUT_DIR/images/,
in the project's own record schema (see README "Data") or, with --format, LLaMA-Factory's or Qwen's.
`--curriculum 6000:1-1,8000:1-4` writes the training split in that order first (6,000 samples of
one character, then 8,000 of one to four), then the rest at the domain's lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, ImageDraw, ImageFont

from raytune_qvl.assets import domains
from raytune_qvl.config.schema import DEFAULT_PROMPTS, TASKS

__all__ = ["TASKS", "Example", "generate", "write_dataset", "text_corpus", "main"]

FORMATS = ("raytune", "llamafactory", "qwen")

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no what up out "
    "book page line text chapter letter word read write paper print ink scan table figure total date "
    "name price order invoice receipt number amount street city office report note section summary "
    "model data train image vision layer token batch rate rank loss score value field form title"
).split()
_FONT_SIZE = 14
_FG, _BG = (20, 20, 20), (250, 250, 246)


@dataclass(frozen=True)
class Example:
    image: Image.Image
    prompt: str
    answer: str
    task: str


def _font(size: int = _FONT_SIZE) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


# ----------------------------------------------------------------------------- documents


def _doc_text(rng: random.Random) -> str:
    lines = rng.choice((1, 1, 1, 2))
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 4))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(1, 999)))
        out.append(" ".join(words))
    return "\n".join(out)


def _render_doc(text: str, rng: random.Random) -> Image.Image:
    font = _font()
    lines = text.split("\n")
    width = max(int(font.getlength(line)) for line in lines) + rng.randint(8, 20)
    height = len(lines) * (_FONT_SIZE + 6) + rng.randint(8, 14)
    img = Image.new("RGB", (max(width, 56), max(height, 28)), _BG)
    draw = ImageDraw.Draw(img)
    y = rng.randint(3, 6)
    for line in lines:
        draw.text((rng.randint(3, 7), y), line, fill=_FG, font=font)
        y += _FONT_SIZE + 6
    return img


def _doc(rng: random.Random) -> Example:
    text = _doc_text(rng)
    return Example(_render_doc(text, rng), DEFAULT_PROMPTS["ocr_doc"], text, "ocr_doc")


# ----------------------------------------------------------------------------- formulas
# A formula is a tree of ("atom", s) | ("seq", [...]) | ("sup", base, exp) | ("sub", base, idx)
# | ("frac", num, den) | ("sqrt", body); it is drawn as math and written as LaTeX.


def _atom(rng: random.Random) -> tuple:
    return ("atom", rng.choice("abcxyzmnk") if rng.random() < 0.7 else str(rng.randint(1, 9)))


def _term(rng: random.Random, depth: int) -> tuple:
    roll = rng.random()
    if depth > 0 and roll < 0.2:
        return ("frac", _expr(rng, depth - 1, 2), _expr(rng, depth - 1, 2))
    if depth > 0 and roll < 0.3:
        return ("sqrt", _expr(rng, depth - 1, 2))
    if roll < 0.55:
        return ("sup", _atom(rng), ("atom", str(rng.randint(2, 4))))
    if roll < 0.7:
        return ("sub", ("atom", rng.choice("xyab")), ("atom", rng.choice("ijn0123")))
    return _atom(rng)


def _expr(rng: random.Random, depth: int, max_terms: int = 3) -> tuple:
    items: list[tuple] = [_term(rng, depth)]
    for _ in range(rng.randint(0, max_terms - 1)):
        items += [("atom", rng.choice("+-")), _term(rng, depth)]
    return ("seq", items)


def _formula_tree(rng: random.Random) -> tuple:
    left = _expr(rng, 1, 2)
    return ("seq", [left, ("atom", "="), _expr(rng, 1, 2)]) if rng.random() < 0.6 else left


def to_latex(node: tuple) -> str:
    kind = node[0]
    if kind == "atom":
        return node[1]
    if kind == "seq":
        return " ".join(to_latex(n) for n in node[1])
    if kind == "sup":
        return f"{to_latex(node[1])}^{{{to_latex(node[2])}}}"
    if kind == "sub":
        return f"{to_latex(node[1])}_{{{to_latex(node[2])}}}"
    if kind == "frac":
        return f"\\frac{{{to_latex(node[1])}}}{{{to_latex(node[2])}}}"
    if kind == "sqrt":
        return f"\\sqrt{{{to_latex(node[1])}}}"
    raise ValueError(kind)


def _layout(node: tuple, size: int) -> tuple[int, int, int, Callable[[ImageDraw.ImageDraw, int, int], None]]:
    """(width, ascent, descent, draw(x, baseline)) of a formula node at a font size."""
    kind = node[0]
    if kind == "atom":
        font = _font(size)
        text = node[1] if node[1] in "+-=" else node[1]
        pad = size // 4 if node[1] in "+-=" else 1
        width = int(font.getlength(text)) + 2 * pad
        ascent, descent = font.getmetrics()

        def draw_atom(d: ImageDraw.ImageDraw, x: int, base: int) -> None:
            d.text((x + pad, base), text, fill=_FG, font=font, anchor="ls")

        return width, ascent, descent, draw_atom
    if kind == "seq":
        parts = [_layout(n, size) for n in node[1]]
        width = sum(p[0] for p in parts)
        ascent = max(p[1] for p in parts)
        descent = max(p[2] for p in parts)

        def draw_seq(d: ImageDraw.ImageDraw, x: int, base: int) -> None:
            for w, _, _, fn in parts:
                fn(d, x, base)
                x += w

        return width, ascent, descent, draw_seq
    if kind in ("sup", "sub"):
        bw, ba, bd, bfn = _layout(node[1], size)
        sw, sa, sd, sfn = _layout(node[2], max(8, int(size * 0.65)))
        shift = -int(ba * 0.55) if kind == "sup" else int(bd + sa * 0.3)

        def draw_script(d: ImageDraw.ImageDraw, x: int, base: int) -> None:
            bfn(d, x, base)
            sfn(d, x + bw, base + shift)

        return bw + sw, max(ba, sa - shift), max(bd, sd + shift), draw_script
    if kind == "frac":
        nw, na, nd, nfn = _layout(node[1], max(8, int(size * 0.8)))
        dw, da, dd, dfn = _layout(node[2], max(8, int(size * 0.8)))
        width = max(nw, dw) + 6
        axis = size // 3

        def draw_frac(d: ImageDraw.ImageDraw, x: int, base: int) -> None:
            line_y = base - axis
            nfn(d, x + (width - nw) // 2, line_y - nd - 2)
            d.line((x + 1, line_y, x + width - 2, line_y), fill=_FG, width=1)
            dfn(d, x + (width - dw) // 2, line_y + da + 2)

        return width, axis + nd + na + 2, da + dd + 2 - axis, draw_frac
    if kind == "sqrt":
        bw, ba, bd, bfn = _layout(node[1], size)

        def draw_sqrt(d: ImageDraw.ImageDraw, x: int, base: int) -> None:
            top = base - ba - 2
            d.line((x, base - ba // 3, x + 3, base + bd - 1, x + 7, top, x + 9 + bw, top), fill=_FG, width=1)
            bfn(d, x + 9, base)

        return bw + 11, ba + 3, bd, draw_sqrt
    raise ValueError(kind)


def _formula(rng: random.Random) -> Example:
    tree = _formula_tree(rng)
    width, ascent, descent, draw_fn = _layout(tree, 18)
    margin = rng.randint(4, 10)
    img = Image.new("RGB", (width + 2 * margin, ascent + descent + 2 * margin), _BG)
    draw_fn(ImageDraw.Draw(img), margin, margin + ascent)
    return Example(img, DEFAULT_PROMPTS["ocr_formula"], to_latex(tree), "ocr_formula")


# ----------------------------------------------------------------------------- visual QA

_COLORS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "orange": (240, 150, 20)}
_SHAPES = ("circle", "square", "triangle")


def _vqa(rng: random.Random) -> Example:
    img = Image.new("RGB", (168, 112), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    count = rng.randint(1, 3)
    picked = []
    slots = rng.sample(range(3), count)
    for slot in slots:
        shape, color = rng.choice(_SHAPES), rng.choice(list(_COLORS))
        picked.append((shape, color))
        x0, y0 = 8 + slot * 54 + rng.randint(0, 6), rng.randint(20, 50)
        box = (x0, y0, x0 + 40, y0 + 40)
        if shape == "circle":
            draw.ellipse(box, fill=_COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=_COLORS[color])
        else:
            draw.polygon([(x0 + 20, y0), (x0, y0 + 40), (x0 + 40, y0 + 40)], fill=_COLORS[color])
    kind = rng.random()
    if kind < 0.4:
        prompt, answer = "How many shapes are in the image?", str(count)
    elif kind < 0.7:
        shape, color = rng.choice(picked)
        prompt, answer = f"What color is the {shape}?", color
    else:
        shape, color = rng.choice(picked)
        prompt, answer = f"Which shape is {color}?", shape
    return Example(img, prompt, answer, "general_vqa")


_GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "ocr_doc": _doc,
    "ocr_formula": _formula,
    "general_vqa": _vqa,
}


def generate(
    task: str, n: int, seed: int = 0, domain: str | None = None, lengths: tuple[int, int] | None = None
) -> Iterator[Example]:
    """n examples of a task (of one of its domains); the same seed gives the same images and texts."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    if domain is not None:
        if task != "ocr_doc":
            raise ValueError(f"domains are document OCR; task {task!r} has none")
        rng = random.Random(f"{domain}-{seed}")
        for _ in range(n):
            image, text = domains.sample(domains.DOMAINS[domain], rng, lengths)
            yield Example(image, DEFAULT_PROMPTS["ocr_doc"], text, "ocr_doc")
        return
    rng = random.Random(f"{task}-{seed}")
    for _ in range(n):
        yield _GENERATORS[task](rng)


def text_corpus(n: int = 600, seed: int = 0) -> Iterator[str]:
    """Texts from every task (prompts and answers), to train the tiny model's tokenizer."""
    for task in TASKS:
        rng = random.Random(f"corpus-{task}-{seed}")
        for _ in range(n):
            ex = _GENERATORS[task](rng)
            yield ex.prompt
            yield ex.answer
    for name, domain in domains.DOMAINS.items():
        rng = random.Random(f"corpus-{name}-{seed}")
        for _ in range(n):
            yield domains.TEXT_KINDS[rng.choice(domain.texts)](rng, domain.lengths)
    yield " ".join(_WORDS)


# ----------------------------------------------------------------------------- writing


def _record(fmt: str, image: str, ex: Example, idx: str) -> dict:
    if fmt == "raytune":
        return {"id": idx, "image": image, "prompt": ex.prompt, "answer": ex.answer, "task": ex.task}
    if fmt == "llamafactory":
        return {
            "messages": [
                {"role": "user", "content": f"<image>{ex.prompt}"},
                {"role": "assistant", "content": ex.answer},
            ],
            "images": [image],
        }
    return {
        "id": idx,
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{ex.prompt}"}, {"from": "gpt", "value": ex.answer}],
    }


def _examples(task: str, n: int, seed: int, domain: str | None, curriculum: list[tuple[int, tuple[int, int]]]):
    """A split's examples: the curriculum's phases in order (each its own seed), then the rest."""
    done = 0
    for phase, (count, lengths) in enumerate(curriculum):
        count = min(count, n - done)
        yield from generate(task, count, seed * 7919 + phase + 1, domain, lengths)
        done += count
    yield from generate(task, n - done, seed, domain)


def write_dataset(
    out_dir: str | os.PathLike,
    task: str,
    n_train: int,
    n_eval: int,
    seed: int = 0,
    fmt: str = "raytune",
    *,
    n_test: int = 0,
    domain: str | None = None,
    curriculum: list[tuple[int, tuple[int, int]]] | None = None,
) -> dict[str, Path]:
    """Render and write train.jsonl / eval.jsonl (/ test.jsonl) (+ images/). Written to a temporary
    folder first and moved into place, so an interrupted run leaves nothing half-written."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    paths = {}
    splits = [("train", n_train, seed, curriculum or []), ("eval", n_eval, seed + 1_000_003, [])]
    if n_test:
        splits.append(("test", n_test, seed + 2_000_006, []))
    for split, n, split_seed, phases in splits:
        lines = []
        for i, ex in enumerate(_examples(task, n, split_seed, domain, phases)):
            rel = f"images/{split}_{i:05d}.png"
            ex.image.save(tmp / rel)
            lines.append(json.dumps(_record(fmt, rel, ex, f"{split}-{i:05d}"), ensure_ascii=False))
        (tmp / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[split] = out / f"{split}.jsonl"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raytune_qvl.synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--task", choices=TASKS, default="ocr_doc")
    parser.add_argument("--train", type=int, default=256, help="training examples (default 256)")
    parser.add_argument("--eval", type=int, default=32, help="eval examples (default 32)")
    parser.add_argument("--test", type=int, default=0, help="test examples, held out of every choice (default 0)")
    parser.add_argument("--domain", choices=sorted(domains.DOMAINS), default=None, help="an OCR domain (ocr_doc)")
    parser.add_argument("--curriculum", default="", help="COUNT:MIN-MAX,... phases of the training split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--format", choices=FORMATS, default="raytune", help="record schema (default: the project's own)"
    )
    args = parser.parse_args(argv)
    if args.train < 1 or args.eval < 0 or args.test < 0:
        parser.error("--train must be >= 1, --eval and --test >= 0")
    if args.domain and args.task != "ocr_doc":
        parser.error(f"--domain is for --task ocr_doc, not {args.task}")
    try:
        curriculum = [_phase(p) for p in args.curriculum.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--curriculum {args.curriculum!r}: write COUNT:MIN-MAX phases, e.g. 6000:1-1,8000:1-4")
    paths = write_dataset(
        args.out_dir, args.task, args.train, args.eval, args.seed, args.format,
        n_test=args.test, domain=args.domain, curriculum=curriculum,
    )  # fmt: skip
    what = f"{args.task}, domain {args.domain}" if args.domain else args.task
    counts = f"{args.train} training, {args.eval} eval" + (f" and {args.test} test" if args.test else "")
    print(f"wrote {counts} examples ({what}) to {paths['train'].parent}")


def _phase(text: str) -> tuple[int, tuple[int, int]]:
    """'6000:1-4' -> (6000, (1, 4))."""
    count, _, span = text.partition(":")
    low, _, high = span.partition("-")
    phase = int(count), (int(low), int(high or low))
    if phase[0] < 1 or not 1 <= phase[1][0] <= phase[1][1]:
        raise ValueError(text)
    return phase


if __name__ == "__main__":
    main()
