"""A worker shows the libraries' warnings (not silenced by level), each once, without the known
noise, and hands them to its next report; run in a subprocess (it sets up the process's logging)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, logging, warnings
from raytune_qvl.train.worker import quiet_worker
from raytune_qvl import runtime

quiet_worker(rank=0)
from deepspeed.utils import logger as ds
from transformers.utils import logging as hf

ds.warning("Attempting to get learning rate from scheduler before it has started")  # known noise
ds.warning("[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: %d", 65536)
ds.warning("[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: %d", 32768)  # the same message
hf.get_logger("transformers.modeling_utils").warning("Some weights of the model were not initialized: %s", "lm_head")
logging.getLogger("torch.distributed").warning("gloo: a first-run note")
logging.getLogger("raytune_qvl").warning("%d of %d generated answers were cut", 3, 64)
logging.getLogger("raytune_qvl").warning("%d of %d generated answers were cut", 5, 64)
logging.getLogger("raytune_qvl").info("step %d", 1)
logging.getLogger("raytune_qvl").info("step %d", 2)  # other levels are not deduplicated
warnings.warn("an attention fallback", UserWarning)
print(json.dumps(runtime.take_warnings()))
print(json.dumps(runtime.take_warnings()))
"""


@pytest.mark.parametrize("ci", [None, "true"], ids=["plain", "CI=true"])  # transformers propagates under CI
def test_a_worker_shows_each_library_warning_once_and_reports_it(ci: str | None) -> None:
    env = {key: value for key, value in os.environ.items() if key != "CI"} | ({"CI": ci} if ci else {})
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    texts = [text for _, text in first]
    assert texts[0] == "DeepSpeed: [deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 65536"
    assert texts[1] == "transformers.modeling_utils: Some weights of the model were not initialized: lm_head"
    assert texts[2] == "torch.distributed: gloo: a first-run note"
    assert texts[3] == "3 of 64 generated answers were cut"
    assert texts[4].startswith("py.warnings: ") and "UserWarning: an attention fallback" in texts[4]
    assert len(texts) == 5 and second == []  # the noise and the repeats never; taken once
    # what the worker's log shows (stdout for DeepSpeed's own handler): the same, once each
    shown = "\n".join(result.stdout.strip().splitlines()[:-2]) + result.stderr
    assert shown.count("OVERFLOW") == 1 and "scheduler before it has started" not in shown
    assert shown.count("generated answers were cut") == 1 and shown.count("not initialized") == 1
    assert "step 1" in shown and "step 2" in shown
