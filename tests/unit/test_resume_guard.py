"""A rerun of an output folder resumes only the run it holds: a config that changed what is trained
is refused, naming the keys; an out-of-memory style re-split of the same effective batch, or a
change of where and how often the run logs, is not a change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytune_qvl.config.load import load_config
from raytune_qvl.data.batches import EpochSampler
from raytune_qvl.errors import ConfigError
from raytune_qvl.train.checkpoint import TrainState
from raytune_qvl.train.outputs import RUN_FILE, check_output, training_fingerprint

from conftest import TINY_LORA, TINY_TRAIN, ZERO2


def _config(out: Path, *overrides: str):
    return load_config(TINY_TRAIN, TINY_LORA, ZERO2, [f"output.dir={out}", *overrides], check_files=False)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An output folder holding the record of a run of the tiny config (micro 8 x accumulation 1)."""
    out = tmp_path / "out"
    out.mkdir()
    cfg = _config(out, "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1")
    (out / RUN_FILE).write_text(json.dumps({"mlflow_run_id": "abc", "config": training_fingerprint(cfg)}))
    return out


def test_a_changed_training_setting_is_refused_naming_the_keys(folder: Path) -> None:
    cfg = _config(
        folder,
        "training.per_device_train_batch_size=8",
        "training.gradient_accumulation_steps=1",
        "training.learning_rate=1e-4",
        "lora.r=4",
    )
    with pytest.raises(ConfigError) as error:
        check_output(cfg, overwrite=False)
    text = str(error.value)
    assert "training.learning_rate" in text and "r 16 -> 4" in text and "--overwrite" in text
    assert check_output(cfg, overwrite=True) == {}  # --overwrite starts over


def test_the_same_effective_batch_split_differently_and_new_log_settings_resume(folder: Path) -> None:
    cfg = _config(
        folder,
        "training.per_device_train_batch_size=4",
        "training.gradient_accumulation_steps=2",  # 4 x 2 = 8 x 1 on the same workers
        "training.logging_steps=1",
        "evaluation.generation_samples=4",
    )
    assert check_output(cfg, overwrite=False)["mlflow_run_id"] == "abc"


def test_a_changed_effective_batch_is_refused(folder: Path) -> None:
    cfg = _config(folder, "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=2")
    with pytest.raises(ConfigError, match="effective_batch 16 -> 32"):
        check_output(cfg, overwrite=False)


@pytest.mark.parametrize("lengths", [None, [(i * 37) % 101 for i in range(70)]], ids=["shuffled", "length-grouped"])
def test_a_resplit_resume_goes_on_at_the_sample_where_the_run_stopped(lengths: list[int] | None) -> None:
    """Micro 8 x accumulation 1 stopped after 3 of its epoch's steps; resumed at micro 4 x
    accumulation 2 (an out-of-memory retry), the epoch trains exactly the samples the first split had
    left, in the same order, and has as many steps."""
    common = dict(rank=1, world=2, seed=3, shuffle=True, lengths=lengths)
    before = EpochSampler(70, micro=8, accum=1, **common)
    before.set_epoch(2)
    whole = before.indices()
    state = TrainState(epoch=2, global_step=3, micro_batch=3, micro_size=8)
    state.count_in_micro_batches_of(4)
    after = EpochSampler(70, micro=4, accum=2, **common)
    after.set_epoch(state.epoch, state.micro_batch)
    assert state.micro_batch == 6 and after.indices() == whole[3 * 8 :]
    assert after.micro_batches_per_epoch() // 2 == before.micro_batches_per_epoch()
    # a checkpoint written before the micro batch was kept counts in the run's own size
    old = TrainState(micro_batch=3)
    old.count_in_micro_batches_of(4)
    assert (old.micro_batch, old.micro_size) == (3, 4)
