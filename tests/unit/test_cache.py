"""The prepared-data cache (an Arrow file read through a memory map), the ranks' agreement on the
data before the step plan, and the task a data file is scored as."""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest

from raytune_qvl.assets.synth import write_dataset
from raytune_qvl.config.schema import DataConfig
from raytune_qvl.data.audit import prepare_split
from raytune_qvl.data.records import infer_task, read_samples
from raytune_qvl.data.table import EncodedRows
from raytune_qvl.errors import DataError


@pytest.fixture()
def forms_config(tiny_config, tmp_path: Path):
    paths = write_dataset(tmp_path / "data", "ocr_doc", 40, 4, seed=5, domain="forms")
    return tiny_config(
        f"data.train_path={paths['train']}", f"data.eval_path={paths['eval']}", f"data.cache_dir={tmp_path / 'cache'}"
    )


def test_the_cache_is_a_memory_mapped_arrow_file_with_the_prepared_rows(forms_config, processor) -> None:
    from raytune_qvl.data.cache import load_or_prepare

    cfg = forms_config
    first = load_or_prepare(cfg, processor, "train")
    fresh = prepare_split(cfg.data.train_path, processor, cfg.data)
    assert isinstance(first.items, EncodedRows) and len(first.items) == len(fresh.items) == fresh.audit.kept
    assert list(first.items) == fresh.items  # every field of every row, in order
    assert first.items[-1] == fresh.items[-1] and first.items[1:3] == fresh.items[1:3]
    assert first.audit.to_dict() == fresh.audit.to_dict() | {"digest": first.fingerprint} and first.fingerprint

    # read again: the same file (no second preparation), and a worker unpickles it by path
    files = sorted(Path(cfg.data.cache_dir).glob("train-*.arrow"))
    assert len(files) == 1
    written = files[0].stat().st_mtime_ns
    again = load_or_prepare(cfg, processor, "train")
    assert files[0].stat().st_mtime_ns == written and again.fingerprint == first.fingerprint
    clone = pickle.loads(pickle.dumps(again.items))
    assert len(pickle.dumps(again.items)) < 500 and clone[7] == fresh.items[7]
    assert not list(Path(cfg.data.cache_dir).glob("*.tmp"))


def test_a_cache_without_its_audit_is_prepared_again(forms_config, processor) -> None:
    from raytune_qvl.data.cache import load_or_prepare

    cfg = forms_config
    load_or_prepare(cfg, processor, "eval")
    (audit,) = Path(cfg.data.cache_dir).glob("eval-*.audit.json")
    audit.unlink()  # as if the preparer died between its two renames
    again = load_or_prepare(cfg, processor, "eval")
    assert audit.exists() and json.loads(audit.read_text())["kept"] == len(again.items) == 4


def _agree(rank: int, port: int, counts: list[int], out: str) -> None:
    import torch.distributed as dist

    from raytune_qvl.train.engine import WorkerContext, check_data_agrees

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ctx = WorkerContext(rank=rank, world_size=2, node=f"node-{rank}")
        check_data_agrees(
            ctx, {"train": ("train.jsonl", f"fp{counts[rank]}", counts[rank]), "eval": ("eval.jsonl", "e", 4)}
        )
        Path(out, f"{rank}.txt").write_text("agreed")
    except DataError as exc:
        Path(out, f"{rank}.txt").write_text(str(exc))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("counts", [[40, 40], [40, 38]])
def test_ranks_whose_data_differ_stop_together_naming_the_node_and_both_counts(
    counts: list[int], tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_agree, args=(_free_port(), counts, str(tmp_path)), nprocs=2, join=True)
    said = [Path(tmp_path, f"{r}.txt").read_text() for r in (0, 1)]
    if counts[0] == counts[1]:
        assert said == ["agreed", "agreed"]
    else:
        assert said[0] == said[1]  # every rank stops, with the same line
        assert said[0] == (
            "train.jsonl: data.train_path: rank 1 on node node-1 has 38 samples (data fingerprint fp38), rank 0 on "
            "node node-0 has 40 (fp40): every node needs the same data file, images and processor files (or put "
            "data and cache on shared storage)"
        )


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_task_comes_from_the_fields_not_the_answer_length(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (64, 32), "white").save(tmp_path / "a.png")
    data = DataConfig(train_path="x", eval_path=None)

    def task(records: list[dict]) -> str:
        samples, bad = read_samples(_write(tmp_path / "d.jsonl", records), data)
        assert not bad
        return infer_task(samples)

    # short lines of a form, no prompt: document OCR (the old word-count guess said visual QA)
    assert task([{"image": "a.png", "answer": a} for a in ("total 42", "date 3/4", "no 7")]) == "ocr_doc"
    # a question field is visual QA, however long the answers
    long = "the second paragraph of the letter, which talks about the shipment"
    assert task([{"image": "a.png", "question": "Which part?", "answer": long}] * 3) == "general_vqa"

    # LLaMA-Factory messages: questions, then an instruction naming LaTeX, then the shipped OCR prompt
    def chat(prompt: str, answer: str) -> dict:
        return {
            "messages": [{"role": "user", "content": f"<image>{prompt}"}, {"role": "assistant", "content": answer}],
            "images": ["a.png"],
        }

    assert task([chat("what is the total", "the total amount due on the invoice")] * 2) == "general_vqa"
    assert task([chat("Transcribe as LaTeX.", "x + 1")] * 2) == "ocr_formula"
    assert task([chat("Read the text in the image.", "yes")] * 2) == "ocr_doc"
    # a declared task wins over everything
    assert task([{"image": "a.png", "question": "Q?", "answer": "a", "task": "ocr_doc"}]) == "ocr_doc"


def test_pickled_rows_reopen_in_a_new_process(forms_config, processor, tmp_path: Path) -> None:
    """A DataLoader worker started by spawn reads the same rows from the same file."""
    import subprocess
    import sys

    from raytune_qvl.data.cache import load_or_prepare

    rows = load_or_prepare(forms_config, processor, "train").items
    blob = tmp_path / "rows.pkl"
    blob.write_bytes(pickle.dumps(rows))
    code = f"import pickle; rows = pickle.loads(open({str(blob)!r}, 'rb').read()); print(len(rows), rows[3].id)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ))
    assert out.stdout.split() == [str(len(rows)), rows[3].id]


def test_a_worker_waiting_for_the_preparer_says_so_and_the_preparer_logs_progress(
    forms_config, processor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The lock is held (as by a preparer on this node) until the waiting worker has said it waits;
    then the worker takes the lock, prepares, and logs its progress line."""
    import logging
    import threading

    from filelock import FileLock

    from raytune_qvl.data import cache

    monkeypatch.setattr(cache, "WAIT_LOG_SECONDS", 0.2)
    monkeypatch.setattr(cache, "PROGRESS_LOG_SECONDS", 0.0)  # a line per record: this split takes a second
    cfg = forms_config
    caplog.set_level(logging.INFO, logger="raytune_qvl")
    key = cache._fingerprint(
        Path(cfg.data.train_path), cache._processor_files(cfg.model.name), cfg.data, cfg.model.name
    )
    Path(cfg.data.cache_dir).mkdir(parents=True, exist_ok=True)
    holder = FileLock(str(Path(cfg.data.cache_dir) / f"train-{key}.arrow.lock"), thread_local=False)
    holder.acquire()
    result: list = []
    worker = threading.Thread(target=lambda: result.append(cache.load_or_prepare(cfg, processor, "train")))
    worker.start()
    while not any("waiting" in r.getMessage() for r in caplog.records):
        worker.join(timeout=0.05)
        assert worker.is_alive() and not result  # it cannot finish while the lock is held
    holder.release()
    worker.join()
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"to prepare {Path(cfg.data.train_path).name}" in m for m in messages)
    assert any(m.endswith("s") and "preparing train.jsonl: 40 of 40 records (100%)" in m for m in messages)
    assert len(result[0].items) == 40


def test_the_ranks_compare_the_encoded_rows_not_the_files_mtimes(forms_config, processor) -> None:
    """A node whose copy of the images has other mtimes prepares its own cache (the key sees the
    mtimes) and reaches the same fingerprint; a changed record changes it."""
    from raytune_qvl.data.cache import load_or_prepare

    cfg = forms_config
    first = load_or_prepare(cfg, processor, "train")
    for image in Path(cfg.data.train_path).parent.glob("images/*.png"):
        os.utime(image, ns=(1_000_000_000, 1_000_000_000))
    copied = load_or_prepare(cfg, processor, "train")
    assert len(list(Path(cfg.data.cache_dir).glob("train-*.arrow"))) == 2  # prepared again
    assert copied.fingerprint == first.fingerprint
    path = Path(cfg.data.train_path)
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    lines[0] = json.dumps({**record, "answer": record["answer"] + " x"})
    path.write_text("\n".join(lines) + "\n")
    assert load_or_prepare(cfg, processor, "train").fingerprint != first.fingerprint


def test_a_quick_preparation_logs_no_progress(forms_config, processor, caplog: pytest.LogCaptureFixture) -> None:
    """Under 30 s there is nothing to wait for: a bad-input error stays the one line it is."""
    import logging

    from raytune_qvl.data.cache import load_or_prepare

    caplog.set_level(logging.INFO, logger="raytune_qvl")
    load_or_prepare(forms_config, processor, "train")
    assert not [r for r in caplog.records if "preparing" in r.getMessage()]
