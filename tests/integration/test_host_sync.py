"""An ordinary optimizer step reads nothing back from the device: the loop's sums, the token
count of the token-weighted loss and the NaN check stay there until a row step (logging,
evaluation, save, the first and the last), which reads back once. On a GPU a read-back
(`float(loss)`, `.item()`, `.tolist()`) drains the CUDA stream; on CPU the same calls are
counted here, by the loop's own frames, on every tensor that is not an integer count of a host
batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_LORA, TINY_TRAIN, ZERO2

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys
from collections import Counter
from pathlib import Path
sys.path.insert(0, {root!r})
from raytune_qvl import runtime; runtime.quiet_libraries()
import torch
from raytune_qvl.config.load import load_config
from raytune_qvl.train import loop
from raytune_qvl.train.engine import WorkerContext
from raytune_qvl.train.session import LocalReporter

out = Path({out!r})
cfg = load_config({train!r}, {lora!r}, {ds!r}, [
    f"output.dir={{out}}", "output.report_to=none", "ray.num_workers=1", "training.max_steps=8",
    "training.logging_steps=4", "training.eval_steps=4", "training.save_steps=8", "evaluation.generation_samples=0",
])
phase = ["setup", 0]
reads = Counter()

def counted(name):
    original = getattr(torch.Tensor, name)
    def read(self, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        integer = not self.is_floating_point() and self.dtype != torch.bool
        if caller.startswith("raytune_qvl") and not (integer and self.device.type == "cpu" and not self.requires_grad):
            reads[f"{{phase[0]}}:{{phase[1]}}"] += 1
        return original(self, *args, **kwargs)
    setattr(torch.Tensor, name, read)

for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
    counted(name)
window = loop.train_window
def train_window(*args, **kwargs):
    phase[:] = ["step", phase[1] + 1]
    result = window(*args, **kwargs)
    phase[0] = "after"  # the loop's code between this step's window and the next one's
    return result
loop.train_window = train_window
loop.train(cfg, WorkerContext(), LocalReporter(cfg))
print("READS", json.dumps(reads))
"""


def test_only_row_steps_read_back_from_the_device(tiny_assets: Path, tmp_path: Path) -> None:
    code = SCRIPT.format(
        root=str(ROOT), out=str(tmp_path / "out"), train=str(TINY_TRAIN), lora=str(TINY_LORA), ds=str(ZERO2)
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reads = json.loads(next(ln for ln in result.stdout.splitlines() if ln.startswith("READS"))[6:])
    ordinary = {2, 3, 5, 6, 7}  # steps 1 (first), 4 (log + eval) and 8 (last) are row steps
    assert not {k: v for k, v in reads.items() if int(k.split(":")[1]) in ordinary}, reads
    assert reads.get("after:4", 0) >= 1 and reads.get("after:8", 0) >= 1, reads  # the counter sees reads
