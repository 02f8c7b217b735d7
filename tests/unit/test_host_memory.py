"""A CPU worker's freed tensors go back to the OS (train/session.fixed_mmap_threshold): with glibc's
moving mmap threshold, once a large block was freed, later blocks come from the heap and, freed
between blocks still in use, stay in the process's RSS; under ZeRO-3 every gathered weight is one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

_PROGRAM = """
import sys, psutil, torch
from raytune_qvl.train.session import fixed_mmap_threshold, mmap_threshold
mode, block = sys.argv[1], int(sys.argv[2])
if mode != "default":
    assert fixed_mmap_threshold(mmap_threshold({"zero_optimization": {"stage": int(mode)}}))
rss = lambda: psutil.Process().memory_info().rss
big = torch.ones(16 << 20, dtype=torch.uint8); del big  # a 16 MB block freed: glibc raises its threshold
before = rss()
blocks, kept = [], []
# 300 MB of blocks (a gathered weight, or its piece, each), a 64 KB tensor kept after each
for _ in range((300 << 20) // block):
    blocks.append(torch.ones(block, dtype=torch.uint8))
    kept.append(torch.ones(64 << 10, dtype=torch.uint8))
del blocks
print((rss() - before) / 2**20, len(kept) / 16)
"""


def _retained_mib(mode: str, block: int) -> tuple[float, float]:
    """MiB the process holds after freeing 300 MB of `block`-byte tensors, and MiB still in use."""
    run = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode, str(block)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    retained, kept = run.stdout.split()[-2:]
    return float(retained), float(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_return_to_the_os_with_the_fixed_mmap_threshold() -> None:
    retained, kept = _retained_mib("default", 2 << 20)
    assert retained > kept + 200  # the freed 300 MB stay in the heap
    retained, kept = _retained_mib("2", 2 << 20)
    assert retained < kept + 20  # unmapped when freed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_zero3_pieces_below_a_megabyte_return_to_the_os() -> None:
    # a 1 MB weight gathered by 2 ranks moves in 512 KB pieces: above ZeRO-3's threshold, below ZeRO-2's
    retained, kept = _retained_mib("2", 512 << 10)
    assert retained > kept + 200
    retained, kept = _retained_mib("3", 512 << 10)
    assert retained < kept + 20


def test_a_threshold_set_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from raytune_qvl.train.session import fixed_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fixed_mmap_threshold() is False
