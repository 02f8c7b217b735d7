"""The prepared-data cache at scale: the Arrow cache (raytune_qvl/data/cache.py) against the JSON
cache it replaced (kept here, as it was, for this comparison), on one synthetic set of N records
whose images repeat. For each format: preparation seconds (encode + write, cold), size on disk, and
then 2 processes that load it at once as 2 ranks of a node do, each reporting its load seconds and
its PSS growth right after the load (proportional set size: pages shared by the ranks count half).

Run as: python -m bench.data_cache OUT_DIR [--records 100000] (prints one JSON object)."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------- the JSON cache, as it was (CACHE_VERSION 3)


def _json_write(items: list, audit: Any, target: Path) -> None:
    blob = {"items": [e.__dict__ for e in items], "audit": audit.to_dict()}
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(blob))
    tmp.replace(target)


def _json_read(target: Path) -> Any:
    from raytune_qvl.data.audit import Audit, PreparedSplit
    from raytune_qvl.data.encode import Encoded

    blob = json.loads(target.read_text())
    audit = {k: v for k, v in blob["audit"].items() if k != "bad_fraction"}
    return PreparedSplit([Encoded(**e) for e in blob["items"]], Audit(**audit))


# ------------------------------------------------------------- the data and the config


def _records(out: Path, n: int) -> Path:
    """N records cycling over 500 rendered forms (the images repeat, the ids do not)."""
    from raytune_qvl.assets.synth import write_dataset

    paths = write_dataset(out / "data", "ocr_doc", 500, 1, seed=11, domain="forms")
    base = [json.loads(line) for line in paths["train"].read_text().splitlines() if line.strip()]
    big = out / "data" / "big.jsonl"
    with big.open("w") as f:
        for i in range(n):
            f.write(json.dumps({**base[i % len(base)], "id": f"r{i}"}) + "\n")
    return big


def _config(data_file: Path, cache: Path) -> Any:
    from raytune_qvl.config.load import load_config

    return load_config(
        ROOT / "configs" / "tiny" / "training_config.yaml",
        ROOT / "configs" / "tiny" / "lora_config.yaml",
        ROOT / "configs" / "tiny" / "ds_config_zero2.json",
        [f"data.train_path={data_file}", "data.eval_path=null", f"data.cache_dir={cache}"],
    )


def _pss_mb() -> float:
    import psutil

    return psutil.Process().memory_full_info().pss / 2**20


def _rank(fmt: str, data_file: str, cache: str, json_file: str, start: Any, queue: Any) -> None:
    """One rank of a node: load the warm cache as training does, report seconds and PSS growth."""
    import pyarrow.ipc  # noqa: F401  (imported before the baseline in both formats: the load is measured, not the import)

    from raytune_qvl.data.cache import _fingerprint, _processor_files, load_or_prepare

    cfg = _config(Path(data_file), Path(cache))
    before = _pss_mb()
    start.wait()  # both ranks load at once
    t0 = time.perf_counter()
    if fmt == "arrow":
        split = load_or_prepare(cfg, None, "train")  # warm: nothing to prepare, no processor needed
    else:  # the old path: fingerprint, then parse the whole file into Python objects
        _fingerprint(Path(data_file), _processor_files(cfg.model.name), cfg.data, cfg.model.name)
        split = _json_read(Path(json_file))
    seconds = time.perf_counter() - t0
    growth = _pss_mb() - before
    # then a DataLoader's reads: 2,000 random rows, each as the `Encoded` the dataset gets
    picks = random.Random(0).sample(range(len(split.items)), min(2000, len(split.items)))
    t0 = time.perf_counter()
    tokens = sum(len(split.items[i].input_ids) for i in picks)
    row_us = 1e6 * (time.perf_counter() - t0) / len(picks)
    queue.put(
        {
            "load_seconds": seconds,
            "pss_growth_mb": growth,
            "rows": len(split.items),
            "row_read_us": row_us,
            "tokens_read": tokens,
        }
    )


def _load_with_ranks(fmt: str, data_file: Path, cache: Path, json_file: Path, ranks: int = 2) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    start, queue = ctx.Barrier(ranks), ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(fmt, str(data_file), str(cache), str(json_file), start, queue))
        for _ in range(ranks)
    ]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return rows


def run(out: Path, records: int) -> dict[str, Any]:
    from raytune_qvl.data.audit import prepare_split
    from raytune_qvl.data.cache import load_or_prepare
    from raytune_qvl.data.processor import load_processor

    data_file = _records(out, records)
    cache = out / "cache"
    cfg = _config(data_file, cache)
    processor = load_processor(cfg)

    t0 = time.perf_counter()
    arrow = load_or_prepare(cfg, processor, "train")
    arrow_prep = time.perf_counter() - t0
    kept = len(arrow.items)
    del arrow

    json_file = out / "json-cache.json"
    t0 = time.perf_counter()
    prepared = prepare_split(data_file, processor, cfg.data)
    _json_write(prepared.items, prepared.audit, json_file)
    json_prep = time.perf_counter() - t0
    del prepared

    arrow_bytes = sum(p.stat().st_size for p in cache.glob("big-*"))
    result = {
        "records": records,
        "kept": kept,
        "ranks": 2,
        "prep_seconds": {"arrow": arrow_prep, "json": json_prep},
        "cache_mb": {"arrow": arrow_bytes / 2**20, "json": json_file.stat().st_size / 2**20},
        "loads": {},
    }
    for fmt in ("arrow", "json"):
        result["loads"][fmt] = _load_with_ranks(fmt, data_file, cache, json_file)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        print(json.dumps(run(args.out, args.records)))
    finally:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
