"""The chaos fault's kill plan: drawn from its seed and the run's training config, so a sweep's
point is killed at the same steps in every rerun; never at the last step; one rank per kill."""

from __future__ import annotations

import pytest

from raytune_qvl.config.load import load_config
from raytune_qvl.train.faults import FAULT_CHAOS_ENV, chaos_kills

from conftest import TINY_LORA, TINY_TRAIN, ZERO2


def _config(*overrides: str):
    return load_config(TINY_TRAIN, TINY_LORA, ZERO2, list(overrides), check_files=False)


def test_the_kill_plan_follows_the_seed_and_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    assert chaos_kills(_config(), 32, 2) == {}  # off unless asked
    monkeypatch.setenv(FAULT_CHAOS_ENV, "7:3")
    plan = chaos_kills(_config("output.dir=/tmp/a"), 32, 2)
    assert len(plan) == 3 and all(1 <= step < 32 for step in plan) and set(plan.values()) <= {0, 1}
    assert chaos_kills(_config("output.dir=/tmp/b"), 32, 2) == plan  # where it writes is not who it is
    others = [chaos_kills(_config(f"training.learning_rate={lr}"), 32, 2) for lr in (1e-4, 2e-4, 3e-4, 4e-4)]
    assert any(p != plan for p in others)
    monkeypatch.setenv(FAULT_CHAOS_ENV, "8:3")
    assert chaos_kills(_config("output.dir=/tmp/a"), 32, 2) != plan  # another seed, another plan
    monkeypatch.setenv(FAULT_CHAOS_ENV, "7:40")
    assert sorted(chaos_kills(_config(), 5, 1)) == [1, 2, 3, 4]  # at most every step but the last
