"""A two-node cluster whose worker node has its own output folder (a mount namespace: the same
path, other files), as separate machines have, and a head that runs no trial: a trial's outputs
written on the worker node reach the driver through storage_path. Its own module, so that its
cluster never runs beside test_multinode.py's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from test_multinode import RayStartCluster, _space, _submit

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


@pytest.fixture(scope="module")
def split_nodes():
    """A head that runs no trial (no CPUs to give) and a worker node with its own output folder."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs mount namespaces (unshare -m) to give a node an output folder of its own")
    cluster = RayStartCluster(head_cpus=0, node_cpus=2, own_outputs=True)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def test_a_trials_outputs_on_another_node_reach_the_driver(
    split_nodes: RayStartCluster, tiny_assets: Path, tmp_path: Path
) -> None:
    """The trial trains on the worker node, which writes its final/ and best/ into a folder the
    driver cannot see; the driver's trial folder, best/ and MLflow get them through storage_path.
    The data cache is a per-node folder too: the driver prepares into its own, and the worker
    node's first rank prepares into the node's."""
    from mlflow.tracking import MlflowClient

    space = _space(
        tmp_path,
        overrides={"data.cache_dir": str(split_nodes.outputs / "cache")},
        output_dir=str(split_nodes.outputs / "sweeps"),
        resources={"workers_per_trial": 1, "cpus_per_worker": 1},
    )
    result = _submit(split_nodes, str(space))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for cache in (split_nodes.outputs / "cache", split_nodes.node_outputs / "cache"):
        assert len(list(cache.glob("train-*.arrow"))) == 1, cache  # prepared once on each node
    state = json.loads((split_nodes.outputs / "sweeps" / "multi" / "sweep_state.json").read_text())
    (trial,) = [t["trial_id"] for t in state["trials"] if t["status"] == "completed"]
    here = split_nodes.outputs / "sweeps" / "multi" / "trials" / trial
    there = split_nodes.node_outputs / "sweeps" / "multi" / "trials" / trial
    adapter = Path("final") / "adapter_model.safetensors"
    assert (there / adapter).is_file()  # rank 0 wrote it on the worker node
    assert _same_file(here / adapter, there / adapter)  # and the driver has it
    assert _same_file(here / "best" / "predictions.json", there / "best" / "predictions.json")
    best = split_nodes.outputs / "sweeps" / "multi" / "best"
    assert _same_file(best / "adapter" / "adapter_model.safetensors", here / adapter)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("multi").experiment_id])
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert child.data.metrics["num_nodes"] == 1
    assert "eval/predictions.html" in {a.path for a in client.list_artifacts(child.info.run_id, "eval")}


def test_a_training_runs_outputs_on_another_node_reach_the_driver(
    split_nodes: RayStartCluster, tiny_assets: Path, tmp_path: Path
) -> None:
    from conftest import TINY_LORA, TINY_TRAIN, ZERO2

    assets = ROOT / ".assets"
    out = split_nodes.outputs / "train"
    result = _submit(
        split_nodes,
        "--config",
        str(TINY_TRAIN),
        "--lora_config",
        str(TINY_LORA),
        "--deepspeed",
        str(ZERO2),
        f"output.dir={out}",
        "output.report_to=none",
        "ray.num_workers=1",
        f"ray.storage_path={tmp_path / 'shared'}",
        "ray.shared_storage=true",
        "training.max_steps=8",
        "training.eval_steps=4",
        "training.save_steps=4",
        "evaluation.generation_samples=2",
        f"model.name={assets / 'tiny-qwen25vl'}",
        f"data.train_path={assets / 'data' / 'forms' / 'train.jsonl'}",
        f"data.eval_path={assets / 'data' / 'forms' / 'eval.jsonl'}",
        f"data.test_path={assets / 'data' / 'forms' / 'test.jsonl'}",
        module="raytune_qvl.train",
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    there = split_nodes.node_outputs / "train"
    for name in ("final/adapter_model.safetensors", "final/training_complete.json", "best/predictions.json"):
        assert (there / name).is_file(), name
        assert _same_file(out / name, there / name), name
