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
from raytune_qvl.train.session import fixed_mmap_threshold
if sys.argv[1] == "fixed":
    assert fixed_mmap_threshold()
rss = lambda: psutil.Process().memory_info().rss
big = torch.ones(16 << 20, dtype=torch.uint8); del big  # a 16 MB block freed: glibc raises its threshold
before = rss()
blocks, kept = [], []
for _ in range(150):  # 300 MB of 2 MB blocks (a gathered weight each), a 256 KB tensor kept after each
    blocks.append(torch.ones(2 << 20, dtype=torch.uint8))
    kept.append(torch.ones(256 << 10, dtype=torch.uint8))
del blocks
print((rss() - before) / 2**20)
"""


def _retained_mib(mode: str) -> float:
    run = subprocess.run([sys.executable, "-c", _PROGRAM, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return float(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_return_to_the_os_with_the_fixed_mmap_threshold() -> None:
    kept = 150 * 0.25  # MiB still in use
    assert _retained_mib("default") > kept + 200  # the freed 300 MB stay in the heap
    assert _retained_mib("fixed") < kept + 20  # unmapped when freed


def test_a_threshold_set_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from raytune_qvl.train.session import fixed_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fixed_mmap_threshold() is False
