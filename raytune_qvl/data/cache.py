"""The prepared-data cache: a split encoded once and reused by every worker and every trial,
keyed by the data file's content, the images it names, the processor's files and the settings
that change encoding. Stored as an Arrow IPC file (table.py) beside a JSON audit, and read through
a memory map: a rank's memory grows by the pages it touches, not by the split's size, and the
ranks and DataLoader workers of a node share those pages. One preparer per node (or per shared
cache folder): concurrent workers wait on a file lock only while the file is missing, and read it
outside the lock."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Sequence

from raytune_qvl.config.schema import Config, DataConfig
from raytune_qvl.data.audit import Audit, PreparedSplit, prepare_split
from raytune_qvl.data.table import EncodedRows, EncodedWriter
from raytune_qvl.data.records import iter_raw
from raytune_qvl.errors import DataError, Problem

__all__ = ["CACHE_VERSION", "cache_root", "load_or_prepare"]

log = logging.getLogger("raytune_qvl")

CACHE_VERSION = 5  # bump when the encoding changes, so stale caches are not reused
WAIT_LOG_SECONDS = 30.0  # how often a worker waiting for its node's preparer says so
PROGRESS_LOG_SECONDS = 30.0  # how often a preparing worker says how far it is


def _fingerprint(path: Path, processor_dir_files: Sequence[Path], data: DataConfig, model_name: str) -> str:
    """Content hash of the data file, the images it names (size + mtime), the processor's files
    and the settings that change encoding."""
    h = hashlib.sha256()
    h.update(
        f"v{CACHE_VERSION}|{model_name}|{data.max_length}|{data.min_image_size}|{data.max_image_size}|"
        f"{data.allow_outside_paths}|{data.system_prompt}".encode()
    )
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
        for _, obj in iter_raw(path):
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


def _cached(arrow: Path, audit: Path) -> PreparedSplit | None:
    """The split a finished preparation left (the Arrow file is renamed into place last), or None."""
    if not arrow.exists():
        return None
    try:
        fields = json.loads(audit.read_text())
        rows = EncodedRows(arrow)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("data cache %s is unreadable (%s); preparing again", arrow, exc)
        return None
    fields.pop("bad_fraction", None)
    return PreparedSplit(rows, Audit(**fields))


def load_or_prepare(cfg: Config, processor: Any, split: str, *, progress: bool = False) -> PreparedSplit | None:
    """The encoded split from the cache, or prepared now and cached. The cache key is the data,
    its images (size and mtime), the processor and the encoding settings; `fingerprint` on the
    result is the digest of the encoded rows themselves, which the ranks compare."""
    from filelock import FileLock

    path_str = {"train": cfg.data.train_path, "eval": cfg.data.eval_path, "test": cfg.data.test_path}[split]
    if path_str is None:
        return None
    path = Path(path_str)
    if not path.is_file():
        raise DataError([Problem(str(path), f"data.{split}_path", "data file not found", show_value=False)])
    key = _fingerprint(path, _processor_files(cfg.model.name), cfg.data, cfg.model.name)
    root = cache_root(cfg.data)
    root.mkdir(parents=True, exist_ok=True)
    arrow, audit = root / f"{path.stem}-{key}.arrow", root / f"{path.stem}-{key}.audit.json"
    found = _cached(arrow, audit)
    if found is None:
        lock = FileLock(str(arrow) + ".lock")
        _acquire(lock, path)
        try:
            if _cached(arrow, audit) is None:  # not written by another worker while this one waited
                _prepare(path, processor, cfg, arrow, audit, progress=progress)
        finally:
            lock.release()
        found = _cached(arrow, audit)
        if found is None:
            raise DataError(
                [Problem(str(arrow), "data.cache_dir", "the prepared cache cannot be read back", show_value=False)]
            )
    found.fingerprint = found.audit.digest
    return found


def _acquire(lock: Any, path: Path) -> None:
    """Take the node's preparation lock, saying every WAIT_LOG_SECONDS that this worker waits (the
    preparer logs its own progress), so no rank waits silently. The lock is an OS lock: it goes
    with a preparer that dies, and the next waiter prepares."""
    from filelock import Timeout

    waited = 0.0
    while True:
        try:
            lock.acquire(timeout=WAIT_LOG_SECONDS)
            return
        except Timeout:
            waited += WAIT_LOG_SECONDS
            log.info(
                "%s: waiting %.0f s for another worker of this cache folder to prepare %s",
                socket.gethostname(),
                waited,
                path.name,
            )


class _ProgressLog:
    """A log line every PROGRESS_LOG_SECONDS while a split is prepared (workers have no terminal
    bar), and one at its end when any was written: a preparation quicker than that says nothing."""

    def __init__(self, path: Path):
        self.name, self.started = path.name, time.monotonic()
        self.last, self.said = self.started, False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_LOG_SECONDS or (done == total and self.said):
            self.last, self.said = now, True
            log.info(
                "%s: preparing %s: %d of %d records (%.0f%%), %.0f s",
                socket.gethostname(),
                self.name,
                done,
                total,
                100 * done / max(total, 1),
                now - self.started,
            )


def _prepare(path: Path, processor: Any, cfg: Config, arrow: Path, audit: Path, *, progress: bool) -> None:
    """Encode the split straight into a temporary Arrow file; the audit first, then the Arrow file
    renamed into place, so a reader never sees half a cache."""
    tmp = arrow.with_name(arrow.name + f".{os.getpid()}.tmp")
    writer = EncodedWriter(tmp)
    try:
        prepared = prepare_split(
            path,
            processor,
            cfg.data,
            progress=progress,
            sink=writer.add,
            on_progress=None if progress else _ProgressLog(path),
        )
        writer.close()
        prepared.audit.digest = writer.digest()
        audit_tmp = audit.with_name(audit.name + f".{os.getpid()}.tmp")
        audit_tmp.write_text(json.dumps(prepared.audit.to_dict()))
        audit_tmp.replace(audit)
        tmp.replace(arrow)
    finally:
        tmp.unlink(missing_ok=True)
