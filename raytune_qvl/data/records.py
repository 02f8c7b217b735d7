"""Reading data files: JSONL or a JSON list, in three record schemas, normalised to chat messages
in the Hugging Face multimodal format plus image paths. A bad record is skipped with a reason
and its line number, never fatal here.

* raytune_qvl's own: {"image": "a.png" | "images": [...], "prompt": "...", "answer": "...",
  "task": "ocr_doc", "system": "..."} (prompt optional for the OCR tasks)
* LLaMA-Factory's: {"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant",
  ...}], "images": [...]}
* the Qwen fine-tuning code's: {"conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}], "image": "a.png" | [...]}
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from raytune_qvl.config.schema import DEFAULT_PROMPTS, TASK_METRICS, DataConfig
from raytune_qvl.errors import DataError, Problem

__all__ = ["DROP_REASONS", "IMAGE_TAG", "BadRecord", "Sample", "iter_raw", "read_samples", "infer_task", "sample_task"]

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

    @property
    def prompt(self) -> str:
        """The text of the user turn the last answer replies to ('' for an image alone)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        users = [m for m in self.messages[:last] if m["role"] == "user"]
        return "".join(c["text"] for c in users[-1]["content"] if c["type"] == "text") if users else ""


class BadRecord(Exception):
    """A record that cannot be trained on: `reason` is a key of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or BadRecord) for JSONL, or for each element of a JSON list."""
    if not path.is_file():
        raise DataError(
            [
                Problem(
                    str(path),
                    "",
                    "data file not found" if not path.exists() else "expected a data file, found a folder",
                    show_value=False,
                )
            ]
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(
            [Problem(str(path), "", f"cannot read the data file ({exc.strerror})", show_value=False)]
        ) from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(
            [
                Problem(
                    str(path),
                    "",
                    "the data file is UTF-16 (it starts with a byte-order mark): save it as UTF-8",
                    show_value=False,
                )
            ]
        )
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
    if not raw.strip():
        raise DataError([Problem(str(path), "", "the data file is empty", show_value=False)])
    stripped = raw.lstrip()
    if path.suffix == ".json" or stripped[:1] == b"[":
        try:
            items = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(
                [Problem(str(path), "", f"not UTF-8 text (byte {exc.start}): save it as UTF-8", show_value=False)]
            ) from None
        except json.JSONDecodeError as exc:
            raise DataError(
                [Problem(f"{path}:{exc.lineno}", "", f"invalid JSON: {exc.msg}", show_value=False)]
            ) from None
        if not isinstance(items, list):
            raise DataError(
                [Problem(str(path), "", "a .json data file must hold a list of records", type(items).__name__)]
            )
        for i, item in enumerate(items, start=1):
            yield i, item
        return
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield number, BadRecord("not_utf8")
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, BadRecord("invalid_json", exc.msg)


def _as_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadRecord("bad_field", f"{name} must be a path or a list of paths")


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
        raise BadRecord("bad_field", "the conversation must be a non-empty list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise BadRecord("bad_field", f"each turn needs a string {text_key!r}")
        role = _ROLE_ALIASES.get(str(turn.get(role_key)))
        if role is None:
            raise BadRecord("bad_field", f"unknown role {turn.get(role_key)!r}")
        if role == "assistant":
            if IMAGE_TAG in turn[text_key]:
                raise BadRecord("bad_field", "an assistant turn contains <image>")
            messages.append({"role": role, "content": [{"type": "text", "text": turn[text_key]}]})
        else:
            messages.append({"role": role, "content": _content(turn[text_key])})
    return messages


def _normalise(obj: Any, system_prompt: str | None) -> tuple[list[dict[str, Any]], list[str], str | None]:
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object")
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
            raise BadRecord("bad_field", "answer must be a string")
        if task is None and isinstance(obj.get("question"), str):
            task = "general_vqa"  # a question field is visual QA, whatever the answer's length
        if prompt is None:
            if task == "general_vqa":
                prompt = obj.get("question")
            prompt = prompt if prompt is not None else DEFAULT_PROMPTS.get(task or "ocr_doc")
        if not isinstance(prompt, str):
            raise BadRecord("bad_field", "prompt must be a string")
        images = _as_list(obj.get("images", obj.get("image")), "image")
        user = [{"type": "image"} for _ in images] + ([{"type": "text", "text": prompt}] if prompt else [])
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        if isinstance(obj.get("system"), str):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": obj["system"]}]})
    else:
        raise BadRecord("unknown_schema")

    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant_turn")
    if messages[-1]["role"] != "assistant":
        messages = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1]
    tags = sum(1 for m in messages for c in m["content"] if c["type"] == "image")
    if tags != len(images):
        raise BadRecord("image_count_mismatch", f"{tags} <image> tags, {len(images)} images")
    last = messages[-1]["content"][0]["text"]
    if not last.strip():
        raise BadRecord("empty_answer")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return messages, images, task


def _resolve_image(rel: str, base: Path, allow_outside: bool) -> Path:
    path = (base / rel).resolve() if not os.path.isabs(rel) else Path(rel).resolve()
    if not allow_outside and not path.is_relative_to(base.resolve()):
        raise BadRecord("path_outside_data_dir", rel)
    if not path.is_file():
        raise BadRecord("missing_image", rel)
    return path


def read_samples(path: str | os.PathLike, data: DataConfig) -> tuple[list[Sample], list[tuple[int, str, str]]]:
    """Normalised samples and the bad records as (line, reason, detail)."""
    path = Path(path)
    base = path.parent
    samples: list[Sample] = []
    bad: list[tuple[int, str, str]] = []
    for line, obj in iter_raw(path):
        try:
            messages, rel_images, task = _normalise(obj, data.system_prompt)
            images = [str(_resolve_image(rel, base, data.allow_outside_paths)) for rel in rel_images]
        except BadRecord as exc:
            bad.append((line, exc.reason, exc.detail))
            continue
        rid = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else f"line-{line}"
        samples.append(Sample(messages, images, line, rid, task))
    return samples, bad


_QUESTION_WORDS = frozenset(
    "what which who whom whose when where why how is are was were does do did can could should will would "
    "has have".split()
)
_FORMULA_WORDS = ("latex", "formula", "equation", "math")


def _squash(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def sample_task(sample: Sample) -> str:
    """The task one record is, from its fields: a declared `task` (or a `question` field); else
    its prompt: a shipped default prompt names its task, a question is visual QA, an instruction
    that names LaTeX or formulas (or a LaTeX answer) is formula OCR, anything else document OCR.
    The answer's length decides nothing: a form's short line ("total 42") is still OCR."""
    if sample.task:
        return sample.task
    prompt = _squash(sample.prompt)
    for task, default in DEFAULT_PROMPTS.items():
        if prompt == _squash(default):
            return task
    words = prompt.replace("?", " ? ").split()
    if "?" in words or (words and words[0] in _QUESTION_WORDS):
        return "general_vqa"
    answer = sample.answer
    if any(w in prompt for w in _FORMULA_WORDS) or "\\" in answer or "^{" in answer or "_{" in answer:
        return "ocr_formula"
    return "ocr_doc"


def infer_task(samples: Sequence[Sample]) -> str:
    """The task most records are (`sample_task` of each); document OCR for an empty file."""
    if not samples:
        return "ocr_doc"
    return Counter(sample_task(s) for s in samples).most_common(1)[0][0]
