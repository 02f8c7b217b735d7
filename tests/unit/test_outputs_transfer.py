"""A rank 0 on another node than the driver ships final/ and best/ in its last checkpoint; the
driver fetches only those folders, whole, from the checkpoint Ray Train reports (a real Ray
Checkpoint on the local filesystem here; any pyarrow filesystem on a cluster)."""

from __future__ import annotations

from pathlib import Path

from ray.train import Checkpoint

from raytune_qvl.train.outputs import BEST_DIR, FINAL_DIR, checkpoint_in, fetch_outputs, ship_outputs


def _outputs(folder: Path) -> Path:
    (folder / FINAL_DIR).mkdir(parents=True)
    (folder / FINAL_DIR / "adapter_model.safetensors").write_bytes(b"final weights")
    (folder / BEST_DIR).mkdir()
    (folder / BEST_DIR / "predictions.json").write_text('{"rows": []}')
    return folder


def test_shipped_outputs_are_fetched_whole_and_replace_stale_ones(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-000008"
    (checkpoint / "engine").mkdir(parents=True)
    (checkpoint / "engine" / "state.pt").write_bytes(b"engine state")
    ship_outputs(_outputs(tmp_path / "rank0"), checkpoint)
    driver = tmp_path / "driver"
    (driver / FINAL_DIR).mkdir(parents=True)
    (driver / FINAL_DIR / "stale.txt").write_text("from an earlier run")

    assert fetch_outputs(Checkpoint.from_directory(str(checkpoint)), driver) == [FINAL_DIR, BEST_DIR]
    assert (driver / FINAL_DIR / "adapter_model.safetensors").read_bytes() == b"final weights"
    assert (driver / BEST_DIR / "predictions.json").read_text() == '{"rows": []}'
    assert not (driver / FINAL_DIR / "stale.txt").exists()  # swapped in whole
    assert not (driver / "engine").exists()  # the engine state stays in storage
    # the path Tune reports (checkpoint_path) in the storage it names
    again = tmp_path / "again"
    assert fetch_outputs(checkpoint_in(str(tmp_path), str(checkpoint)), again) == [FINAL_DIR, BEST_DIR]


def test_a_checkpoint_without_shipped_outputs_fetches_nothing(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-000008"
    checkpoint.mkdir()
    driver = tmp_path / "driver"
    assert fetch_outputs(Checkpoint.from_directory(str(checkpoint)), driver) == []
    assert fetch_outputs(None, driver) == []
    assert not driver.exists()
