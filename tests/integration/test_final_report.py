"""The report that says a run finished goes out after the final adapter is on disk: a sweep's
scheduler answers that report with STOP, and whoever reads the run then (best/, the table) must
find the adapter it describes."""

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
from pathlib import Path
sys.path.insert(0, {root!r})
from raytune_qvl import runtime; runtime.quiet_libraries()
from raytune_qvl.config.load import load_config
from raytune_qvl.train.engine import WorkerContext
from raytune_qvl.train.loop import train
from raytune_qvl.train.outputs import COMPLETE_MARKER, FINAL_DIR
from raytune_qvl.train.session import LocalReporter

out = Path({out!r})
cfg = load_config({train!r}, {lora!r}, {ds!r}, [
    f"output.dir={{out}}", "output.report_to=none", "ray.num_workers=1", "training.max_steps=4",
    "training.logging_steps=1", "training.eval_steps=2", "training.save_steps=2", "evaluation.generation_samples=0",
])
seen = []

def on_metrics(report):
    final = out / FINAL_DIR
    seen.append({{"step": report.get("step"), "finished": bool(report.get("finished")),
                 "complete": (final / COMPLETE_MARKER).is_file(),
                 "adapter": (final / "adapter_model.safetensors").is_file()}})

train(cfg, WorkerContext(), LocalReporter(cfg, on_metrics))
print("SEEN", json.dumps(seen))
"""


def test_the_finished_report_comes_after_the_final_adapter(tiny_assets: Path, tmp_path: Path) -> None:
    code = SCRIPT.format(
        root=str(ROOT), out=str(tmp_path / "out"), train=str(TINY_TRAIN), lora=str(TINY_LORA), ds=str(ZERO2)
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = json.loads(next(ln for ln in result.stdout.splitlines() if ln.startswith("SEEN"))[5:])
    finished = [r for r in seen if r["finished"]]
    assert len(finished) == 1 and finished[0]["step"] == 4, seen
    assert finished[0]["complete"] and finished[0]["adapter"], seen  # on disk when the report arrives
    assert not any(r["complete"] for r in seen if not r["finished"])  # and not before the last step
