"""Records -> chat -> processor -> labels -> batches, with a pre-flight audit.

Three record schemas are read, from JSONL or a JSON list, image paths relative to the data file:

* raytune_qvl's own: {"image": "a.png" | "images": [...], "prompt": "...", "answer": "...",
  "task": "ocr_doc", "system": "..."} (prompt optional for the OCR tasks)
* LLaMA-Factory's: {"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant",
  ...}], "images": [...]}
* the Qwen fine-tuning code's: {"conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}], "image": "a.png" | [...]}

Only assistant tokens are trained. Their character spans come from rendering the chat template
up to each assistant turn (with the generation prompt) and through it; tokens are labelled by
their offsets, so no token id is ever searched for. Samples longer than `max_length` are
dropped, never cut (a cut inside image tokens breaks the model). Bad records are skipped with a
reason and their line number; more than `max_bad_fraction` of them stops before training.

Run as: python -m raytune_qvl.data PATH --config configs/tiny/training_config.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from raytune_qvl import runtime
from raytune_qvl.config import DEFAULT_PROMPTS, TASK_METRICS, Config, DataConfig
from raytune_qvl.errors import DataError, Problem

__all__ = [
    "DROP_REASONS",
    "Sample",
    "Encoded",
    "Audit",
    "PreparedSplit",
    "read_samples",
    "encode_sample",
    "prepare_split",
    "load_or_prepare",
    "infer_task",
    "TrainDataset",
    "Collator",
    "EpochSampler",
    "main",
]

log = logging.getLogger("raytune_qvl")

IGNORE_INDEX = -100  # label value the loss skips
CACHE_VERSION = 3  # bump when the encoding changes, so stale caches are not reused

DROP_REASONS = {
    "invalid_json": "the line is not valid JSON",
    "not_utf8": "the line is not UTF-8 text",
    "not_an_object": "the record is not a JSON object",
    "unknown_schema": "no 'answer', 'messages' or 'conversations' field",
    "bad_field": "a field has the wrong type",
    "no_assistant_turn": "no assistant answer to train on",
    "empty_answer": "the assistant answer is empty",
    "image_count_mismatch": "the number of <image> tags differs from the number of images",
    "missing_image": "an image file does not exist",
    "corrupt_image": "an image file cannot be decoded",
    "path_outside_data_dir": "an image path escapes the data folder (set data.allow_outside_paths)",
    "bad_aspect_ratio": "an image is more than 200 times wider than high (or the reverse)",
    "too_long": "longer than data.max_length tokens (samples are dropped, never cut)",
    "template_mismatch": "the chat template does not render the conversation turn by turn",
}

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TAG = "<image>"


@dataclass
class Sample:
    """A normalised record: chat messages in the HF multimodal format plus image paths."""

    messages: list[dict[str, Any]]
    images: list[str]
    line: int
    id: str
    task: str | None = None

    @property
    def answer(self) -> str:
        """The last assistant turn's text (what generation eval compares against)."""
        last = [m for m in self.messages if m["role"] == "assistant"][-1]
        return "".join(c["text"] for c in last["content"] if c["type"] == "text")


class _Bad(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- reading


def _iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or _Bad) for JSONL, or for each element of a JSON list."""
    if not path.is_file():
        raise DataError([Problem(str(path), "", "data file not found" if not path.exists() else "expected a data file, found a folder", show_value=False)])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError([Problem(str(path), "", f"cannot read the data file ({exc.strerror})", show_value=False)]) from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError([Problem(str(path), "", "the data file is UTF-16 (it starts with a byte-order mark): save it as UTF-8", show_value=False)])
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
    if not raw.strip():
        raise DataError([Problem(str(path), "", "the data file is empty", show_value=False)])
    stripped = raw.lstrip()
    if path.suffix == ".json" or stripped[:1] == b"[":
        try:
            items = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError([Problem(str(path), "", f"not UTF-8 text (byte {exc.start}): save it as UTF-8", show_value=False)]) from None
        except json.JSONDecodeError as exc:
            raise DataError([Problem(f"{path}:{exc.lineno}", "", f"invalid JSON: {exc.msg}", show_value=False)]) from None
        if not isinstance(items, list):
            raise DataError([Problem(str(path), "", "a .json data file must hold a list of records", type(items).__name__)])
        for i, item in enumerate(items, start=1):
            yield i, item
        return
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield number, _Bad("not_utf8")
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, _Bad("invalid_json", exc.msg)


def _as_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _Bad("bad_field", f"{name} must be a path or a list of paths")


def _content(text: str) -> list[dict[str, Any]]:
    """'<image>\\nRead this' -> [{type: image}, {type: text, text: 'Read this'}]."""
    parts: list[dict[str, Any]] = []
    pieces = text.split(IMAGE_TAG)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
        if len(pieces) > 1:
            piece = piece.strip("\n")  # the newline that separates a tag from the text
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _turns(turns: Any, role_key: str, text_key: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise _Bad("bad_field", "the conversation must be a non-empty list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise _Bad("bad_field", f"each turn needs a string {text_key!r}")
        role = _ROLE_ALIASES.get(str(turn.get(role_key)))
        if role is None:
            raise _Bad("bad_field", f"unknown role {turn.get(role_key)!r}")
        if role == "assistant":
            if IMAGE_TAG in turn[text_key]:
                raise _Bad("bad_field", "an assistant turn contains <image>")
            messages.append({"role": role, "content": [{"type": "text", "text": turn[text_key]}]})
        else:
            messages.append({"role": role, "content": _content(turn[text_key])})
    return messages


def _normalise(obj: Any, system_prompt: str | None) -> tuple[list[dict[str, Any]], list[str], str | None]:
    if isinstance(obj, _Bad):
        raise obj
    if not isinstance(obj, dict):
        raise _Bad("not_an_object")
    task = obj.get("task") if isinstance(obj.get("task"), str) and obj["task"] in TASK_METRICS else None
    if "messages" in obj:
        messages = _turns(obj["messages"], "role", "content")
        images = _as_list(obj.get("images"), "images")
    elif "conversations" in obj:
        messages = _turns(obj["conversations"], "from", "value")
        images = _as_list(obj.get("image", obj.get("images")), "image")
    elif "answer" in obj:
        answer, prompt = obj["answer"], obj.get("prompt")
        if not isinstance(answer, str):
            raise _Bad("bad_field", "answer must be a string")
        if prompt is None:
            if task == "general_vqa" or (task is None and "question" in obj):
                prompt = obj.get("question")
            prompt = prompt if prompt is not None else DEFAULT_PROMPTS.get(task or "ocr_doc")
        if not isinstance(prompt, str):
            raise _Bad("bad_field", "prompt must be a string")
        images = _as_list(obj.get("images", obj.get("image")), "image")
        user = [{"type": "image"} for _ in images] + ([{"type": "text", "text": prompt}] if prompt else [])
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        if isinstance(obj.get("system"), str):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": obj["system"]}]})
    else:
        raise _Bad("unknown_schema")

    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad("no_assistant_turn")
    if messages[-1]["role"] != "assistant":
        messages = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1]
    tags = sum(1 for m in messages for c in m["content"] if c["type"] == "image")
    if tags != len(images):
        raise _Bad("image_count_mismatch", f"{tags} <image> tags, {len(images)} images")
    last = messages[-1]["content"][0]["text"]
    if not last.strip():
        raise _Bad("empty_answer")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return messages, images, task


def _resolve_image(rel: str, base: Path, allow_outside: bool) -> Path:
    path = (base / rel).resolve() if not os.path.isabs(rel) else Path(rel).resolve()
    if not allow_outside and not path.is_relative_to(base.resolve()):
        raise _Bad("path_outside_data_dir", rel)
    if not path.is_file():
        raise _Bad("missing_image", rel)
    return path


def read_samples(path: str | os.PathLike, data: DataConfig) -> tuple[list[Sample], list[tuple[int, str, str]]]:
    """Normalised samples and the bad records as (line, reason, detail)."""
    path = Path(path)
    base = path.parent
    samples: list[Sample] = []
    bad: list[tuple[int, str, str]] = []
    for line, obj in _iter_raw(path):
        try:
            messages, rel_images, task = _normalise(obj, data.system_prompt)
            images = [str(_resolve_image(rel, base, data.allow_outside_paths)) for rel in rel_images]
        except _Bad as exc:
            bad.append((line, exc.reason, exc.detail))
            continue
        rid = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else f"line-{line}"
        samples.append(Sample(messages, images, line, rid, task))
    return samples, bad


def infer_task(samples: Sequence[Sample]) -> str:
    """The task most records declare; else a guess from the answers (LaTeX -> formulas,
    short answers to questions -> visual QA, otherwise documents)."""
    declared = Counter(s.task for s in samples if s.task)
    if declared:
        return declared.most_common(1)[0][0]
    if not samples:
        return "ocr_doc"
    answers = [s.answer for s in samples[:200]]
    latex = sum(1 for a in answers if "\\" in a or "^{" in a or "_{" in a)
    if latex > len(answers) / 2:
        return "ocr_formula"
    words = sum(len(a.split()) for a in answers) / len(answers)
    return "general_vqa" if words <= 3 else "ocr_doc"


# ----------------------------------------------------------------------------- encoding


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


def _load_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _Bad("corrupt_image", f"{Path(path).name}: {exc}") from None


def _check_aspect(width: int, height: int) -> None:
    """The processor's smart_resize refuses more than 200:1 mid-training; refuse it here."""
    if max(width, height) / max(1, min(width, height)) > 200:
        raise _Bad("bad_aspect_ratio", f"{width}x{height}")


def image_grid(processor: Any, size: tuple[int, int]) -> list[int]:
    """(t, h, w) patch grid the processor will produce for an image of size (width, height)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    width, height = size
    _check_aspect(width, height)
    h, w = smart_resize(
        height, width, factor=ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"]
    )
    return [1, h // ip.patch_size, w // ip.patch_size]


def encode_sample(sample: Sample, processor: Any, max_length: int, *, check_images: bool = True) -> Encoded:
    """Token ids and labels (assistant answers + their end-of-turn token; the rest masked)."""
    tokenizer = processor.tokenizer
    merge = processor.image_processor.merge_size**2
    grids = []
    for path in sample.images:
        img = _load_image(path) if check_images else None
        grids.append(image_grid(processor, img.size if img is not None else _image_size(path)))
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
            raise _Bad("template_mismatch", f"turn {k}")
        spans.append((len(before), len(through.rstrip())))  # the answer and its end-of-turn token
        prompt_chars = len(before)

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = enc["input_ids"]
    if len(input_ids) > max_length:
        raise _Bad("too_long", f"{len(input_ids)} tokens")
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


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


# ----------------------------------------------------------------------------- audit


def _percentile(values: Sequence[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Audit:
    """What the pre-flight pass found in one data file."""

    path: str
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)  # reason -> first line numbers
    text_tokens_p50: int = 0
    text_tokens_p99: int = 0
    image_tokens_p50: int = 0
    image_tokens_p99: int = 0
    task: str = "ocr_doc"
    tokens_counted: bool = True

    @property
    def bad_fraction(self) -> float:
        return (self.total - self.kept) / max(self.total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"bad_fraction": self.bad_fraction}

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {
            f"{prefix}_records": self.total,
            f"{prefix}_kept": self.kept,
            f"{prefix}_dropped": self.total - self.kept,
            f"{prefix}_text_tokens_p50": self.text_tokens_p50,
            f"{prefix}_text_tokens_p99": self.text_tokens_p99,
            f"{prefix}_image_tokens_p50": self.image_tokens_p50,
            f"{prefix}_image_tokens_p99": self.image_tokens_p99,
        }
        out.update({f"{prefix}_dropped_{reason}": n for reason, n in self.dropped.items()})
        return out

    def reasons(self) -> str:
        """'3 missing_image (lines 2, 5, 9), 1 invalid_json (line 4)': the drops on one line."""
        parts = []
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines = self.examples.get(reason, [])
            where = f" (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}{', ...' if n > len(lines) else ''})" if lines else ""
            parts.append(f"{n} {reason}{where}")
        return ", ".join(parts) or "none dropped"

    def summary(self) -> str:
        return f"{self.path}: {self.total - self.kept} of {self.total} records dropped: {self.reasons()}"

    def format(self) -> str:
        lines = [
            f"{self.path}: {self.total} records, {self.kept} kept, {self.total - self.kept} dropped "
            f"({100 * self.bad_fraction:.1f}%), task {self.task}",
            f"  tokens per sample: text p50 {self.text_tokens_p50}, p99 {self.text_tokens_p99}; "
            f"image p50 {self.image_tokens_p50}, p99 {self.image_tokens_p99}"
            if self.tokens_counted
            else "  tokens per sample: not counted (pass --config or --model for token counts and too_long drops)",
        ]
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            where = ", ".join(str(x) for x in self.examples.get(reason, []))
            lines.append(f"  dropped {n:>5} {reason}: {DROP_REASONS[reason]} (lines {where})")
        return "\n".join(lines)


@dataclass
class PreparedSplit:
    items: list[Encoded]
    audit: Audit


def prepare_split(path: str | os.PathLike, processor: Any | None, data: DataConfig, *, progress: bool = False) -> PreparedSplit:
    """Read, validate and encode every record of one file; bad ones are counted, not fatal.
    Without a processor, records and images are checked but nothing is tokenized."""
    samples, bad = read_samples(path, data)
    items: list[Encoded] = []
    iterator: Any = samples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(samples, desc=f"preparing {Path(path).name}", unit="rec", mininterval=2.0, file=sys.stderr)
    kept = 0
    for sample in iterator:
        try:
            if processor is None:  # records and images only: no tokenizer to count with
                for image in sample.images:
                    _check_aspect(*_load_image(image).size)
            else:
                items.append(encode_sample(sample, processor, data.max_length))
            kept += 1
        except _Bad as exc:
            bad.append((sample.line, exc.reason, exc.detail))
    audit = Audit(path=str(path), total=kept + len(bad), kept=kept, tokens_counted=processor is not None)
    reasons: dict[str, list[int]] = defaultdict(list)
    for line, reason, _ in sorted(bad):
        reasons[reason].append(line)
    audit.dropped = {r: len(lines) for r, lines in reasons.items()}
    audit.examples = {r: lines[:5] for r, lines in reasons.items()}
    audit.text_tokens_p50 = _percentile([e.text_tokens for e in items], 50)
    audit.text_tokens_p99 = _percentile([e.text_tokens for e in items], 99)
    audit.image_tokens_p50 = _percentile([e.image_tokens for e in items], 50)
    audit.image_tokens_p99 = _percentile([e.image_tokens for e in items], 99)
    audit.task = infer_task(samples)
    return PreparedSplit(items, audit)


def check_audit(audit: Audit, data: DataConfig) -> None:
    """Stop before training when too much of a file is bad, or nothing is left (one line; the
    full report comes from `python -m raytune_qvl.data`)."""
    if audit.kept == 0:
        raise DataError([Problem(audit.path, "", f"no usable records ({audit.reasons()}); see python -m raytune_qvl.data {audit.path}", show_value=False)])
    if audit.bad_fraction > data.max_bad_fraction:
        raise DataError(
            [
                Problem(
                    audit.path,
                    "",
                    f"{100 * audit.bad_fraction:.1f}% of records are bad ({audit.reasons()}), above data.max_bad_fraction "
                    f"({100 * data.max_bad_fraction:.1f}%): fix them or raise the limit",
                    show_value=False,
                )
            ]
        )


# ----------------------------------------------------------------------------- cache


def _fingerprint(path: Path, processor_dir_files: Sequence[Path], data: DataConfig, model_name: str) -> str:
    """Content hash of the data file, the images it names (size + mtime), the processor's files
    and the settings that change encoding."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{model_name}|{data.max_length}|{data.min_image_size}|{data.max_image_size}|"
             f"{data.allow_outside_paths}|{data.system_prompt}".encode())
    h.update(path.read_bytes())
    for f in processor_dir_files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    base = path.parent
    for name in sorted(_referenced_images(path)):
        p = base / name
        try:
            st = p.stat()
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"{name}|missing".encode())
    return h.hexdigest()[:20]


def _referenced_images(path: Path) -> set[str]:
    names: set[str] = set()
    try:
        for _, obj in _iter_raw(path):
            if isinstance(obj, dict):
                for key in ("image", "images"):
                    value = obj.get(key)
                    if isinstance(value, str):
                        names.add(value)
                    elif isinstance(value, list):
                        names.update(v for v in value if isinstance(v, str))
    except DataError:
        pass
    return names


def _processor_files(model_name: str) -> list[Path]:
    folder = Path(model_name)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".json", ".jinja", ".txt") and "model" not in p.name)


def cache_root(data: DataConfig) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir)
    return Path(os.environ.get("RAYTUNE_QVL_CACHE", Path.home() / ".cache" / "raytune_qvl")) / "data"


def _to_blob(split: PreparedSplit) -> dict[str, Any]:
    return {"items": [e.__dict__ for e in split.items], "audit": split.audit.to_dict()}


def _from_blob(blob: dict[str, Any]) -> PreparedSplit:
    audit_fields = {k: v for k, v in blob["audit"].items() if k != "bad_fraction"}
    return PreparedSplit([Encoded(**e) for e in blob["items"]], Audit(**audit_fields))


def load_or_prepare(cfg: Config, processor: Any, split: str, *, progress: bool = False) -> PreparedSplit | None:
    """The encoded split from the cache, or prepared now and cached (one preparer per node:
    concurrent workers wait on a file lock and then read what the first one wrote)."""
    from filelock import FileLock

    path_str = cfg.data.train_path if split == "train" else cfg.data.eval_path
    if path_str is None:
        return None
    path = Path(path_str)
    if not path.is_file():
        raise DataError([Problem(str(path), f"data.{split}_path", "data file not found", show_value=False)])
    key = _fingerprint(path, _processor_files(cfg.model.name), cfg.data, cfg.model.name)
    root = cache_root(cfg.data)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{path.stem}-{key}.json"
    with FileLock(str(target) + ".lock"):
        if target.exists():
            try:
                return _from_blob(json.loads(target.read_text()))
            except (ValueError, KeyError, TypeError):
                log.warning("data cache %s is unreadable; preparing again", target)
        prepared = prepare_split(path, processor, cfg.data, progress=progress)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(_to_blob(prepared)))
        tmp.replace(target)
    return prepared


# ----------------------------------------------------------------------------- batches


class TrainDataset:
    """Encoded samples as model inputs; pixels are computed here, in DataLoader workers."""

    def __init__(self, items: Sequence[Encoded], processor: Any):
        self.items = list(items)
        self.image_processor = processor.image_processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        item = self.items[index]
        out: dict[str, Any] = {
            "input_ids": torch.tensor(item.input_ids, dtype=torch.long),
            "labels": torch.tensor(item.labels, dtype=torch.long),
        }
        if item.images:
            images = [_load_image(p) for p in item.images]
            pixels = self.image_processor(images=images, return_tensors="pt")
            grid = pixels["image_grid_thw"]
            if grid.tolist() != item.image_grid_thw:  # the cache and the processor disagree
                raise RuntimeError(f"record {item.id}: image grid {grid.tolist()} != prepared {item.image_grid_thw}")
            out["pixel_values"] = pixels["pixel_values"]
            out["image_grid_thw"] = grid
        return out


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
        for i, s in enumerate(samples):
            length = len(s["input_ids"])
            input_ids[i, :length] = s["input_ids"]
            labels[i, :length] = s["labels"]
            attention[i, :length] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
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


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    from raytune_qvl.config import ModelConfig, load_config
    from raytune_qvl.errors import run_cli

    parser = argparse.ArgumentParser(
        prog="python -m raytune_qvl.data",
        description="Audit a data file: records, drops by reason (with line numbers), text/image token p50/p99.",
    )
    parser.add_argument("path", help="a JSONL or JSON data file")
    parser.add_argument("--config", help="training config: its model, image sizes and max_length are used")
    parser.add_argument("--model", help="a model folder or hub id whose processor counts tokens (instead of --config)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_intermixed_args(argv)

    def run() -> None:
        runtime.quiet_libraries()
        runtime.setup_logging()
        cfg = load_config(args.config, overrides=args.overrides, check_files=False) if args.config else None
        if cfg is None:
            from raytune_qvl.config import Config

            cfg = Config()
            if args.model:
                cfg = cfg.model_copy(update={"model": ModelConfig(name=args.model)})
        processor = None
        if args.config or args.model:
            from raytune_qvl.model import load_processor

            processor = load_processor(cfg)
        prepared = prepare_split(args.path, processor, cfg.data, progress=sys.stderr.isatty())
        print(prepared.audit.format())
        check_audit(prepared.audit, cfg.data)

    run_cli(run)


if __name__ == "__main__":
    main()
