"""The prepared-data cache: a split encoded once and reused by every worker and every trial,
keyed by the data file's content, the images it names, the processor's files and the settings
that change encoding. One preparer per node: concurrent workers wait on a file lock and then
read what the first one wrote."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from raytune_qvl.config.schema import Config, DataConfig
from raytune_qvl.data.audit import Audit, PreparedSplit, prepare_split
from raytune_qvl.data.encode import Encoded
from raytune_qvl.data.records import iter_raw
from raytune_qvl.errors import DataError, Problem

__all__ = ["CACHE_VERSION", "cache_root", "load_or_prepare"]

log = logging.getLogger("raytune_qvl")

CACHE_VERSION = 3  # bump when the encoding changes, so stale caches are not reused


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


def _to_blob(split: PreparedSplit) -> dict[str, Any]:
    return {"items": [e.__dict__ for e in split.items], "audit": split.audit.to_dict()}


def _from_blob(blob: dict[str, Any]) -> PreparedSplit:
    audit_fields = {k: v for k, v in blob["audit"].items() if k != "bad_fraction"}
    return PreparedSplit([Encoded(**e) for e in blob["items"]], Audit(**audit_fields))


def load_or_prepare(cfg: Config, processor: Any, split: str, *, progress: bool = False) -> PreparedSplit | None:
    """The encoded split from the cache, or prepared now and cached (one preparer per node:
    concurrent workers wait on a file lock and then read what the first one wrote)."""
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
