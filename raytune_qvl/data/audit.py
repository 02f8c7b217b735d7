"""The pre-flight pass over one data file: every record read, validated and encoded; the bad ones
counted by reason with their line numbers; token counts; and the stop before training when too
much of a file is bad."""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from raytune_qvl.config.schema import DataConfig
from raytune_qvl.data.encode import Encoded, encode_sample
from raytune_qvl.data.images import check_aspect, load_image
from raytune_qvl.data.records import DROP_REASONS, BadRecord, infer_task, read_samples
from raytune_qvl.errors import DataError, Problem

__all__ = ["Audit", "PreparedSplit", "prepare_split", "check_audit"]


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
    digest: str = ""  # of the encoded rows (cache.py), what the ranks compare before training

    @property
    def bad_fraction(self) -> float:
        return (self.total - self.kept) / max(self.total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"bad_fraction": self.bad_fraction}

    def lengths(self) -> tuple[int, int] | None:
        """(text, image) tokens per sample at the 99th percentile, when the tokens were counted."""
        return (self.text_tokens_p99, self.image_tokens_p99) if self.tokens_counted and self.kept else None

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
            more = ", ..." if n > len(lines) else ""
            where = f" (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}{more})" if lines else ""
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
    items: Sequence[Encoded]  # a list, or the cache's memory-mapped rows (table.EncodedRows)
    audit: Audit
    fingerprint: str = ""  # the encoded rows' digest (the cache's), what the ranks compare


def prepare_split(
    path: str | os.PathLike,
    processor: Any | None,
    data: DataConfig,
    *,
    progress: bool = False,
    sink: Callable[[Encoded], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PreparedSplit:
    """Read, validate and encode every record of one file; bad ones are counted, not fatal.
    Without a processor, records and images are checked but nothing is tokenized. With a `sink`,
    each encoded sample goes there as it is made (the cache's writer) and `items` stays empty;
    `on_progress(done, total)` is called after every record."""
    samples, bad = read_samples(path, data)
    items: list[Encoded] = []
    text_tokens: list[int] = []
    image_tokens: list[int] = []
    iterator: Any = samples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(samples, desc=f"preparing {Path(path).name}", unit="rec", mininterval=2.0, file=sys.stderr)
    kept = 0
    for done, sample in enumerate(iterator, start=1):
        if on_progress is not None:
            on_progress(done, len(samples))
        try:
            if processor is None:  # records and images only: no tokenizer to count with
                for image in sample.images:
                    check_aspect(*load_image(image).size)
            else:
                encoded = encode_sample(sample, processor, data.max_length)
                text_tokens.append(encoded.text_tokens)
                image_tokens.append(encoded.image_tokens)
                (sink or items.append)(encoded)
            kept += 1
        except BadRecord as exc:
            bad.append((sample.line, exc.reason, exc.detail))
    audit = Audit(path=str(path), total=kept + len(bad), kept=kept, tokens_counted=processor is not None)
    reasons: dict[str, list[int]] = defaultdict(list)
    for line, reason, _ in sorted(bad):
        reasons[reason].append(line)
    audit.dropped = {r: len(lines) for r, lines in reasons.items()}
    audit.examples = {r: lines[:5] for r, lines in reasons.items()}
    audit.text_tokens_p50 = _percentile(text_tokens, 50)
    audit.text_tokens_p99 = _percentile(text_tokens, 99)
    audit.image_tokens_p50 = _percentile(image_tokens, 50)
    audit.image_tokens_p99 = _percentile(image_tokens, 99)
    audit.task = infer_task(samples)
    return PreparedSplit(items, audit)


def check_audit(audit: Audit, data: DataConfig) -> None:
    """Stop before training when too much of a file is bad, or nothing is left (one line; the
    full report comes from `python -m raytune_qvl.data`)."""
    if audit.kept == 0:
        raise DataError(
            [
                Problem(
                    audit.path,
                    "",
                    f"no usable records ({audit.reasons()}); see python -m raytune_qvl.data {audit.path}",
                    show_value=False,
                )
            ]
        )
    if audit.bad_fraction > data.max_bad_fraction:
        raise DataError(
            [
                Problem(
                    audit.path,
                    "",
                    f"{100 * audit.bad_fraction:.1f}% of records are bad ({audit.reasons()}), "
                    "above data.max_bad_fraction "
                    f"({100 * data.max_bad_fraction:.1f}%): fix them or raise the limit",
                    show_value=False,
                )
            ]
        )
