"""A Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster): a sweep whose trial
spreads its two workers over both nodes completes with its MLflow runs; a local storage path
on a multi-node cluster is refused before the first trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _space(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "tiny_cpu.yaml").read_text())
    raw["base"] = {k: str(ROOT / v) for k, v in raw["base"].items()}
    raw.update(
        name="multi",
        strategy="joint",
        joint_trials=1,
        parameters={"training.learning_rate": {"choices": [1.5e-3]}},
        trials_per_stage=1,
        resources={"workers_per_trial": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD"},
        storage_path=str(tmp_path / "shared"),
        shared_storage=True,
        output_dir=str(tmp_path / "sweeps"),
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "multi"},
    )
    raw["overrides"].update({"training.num_epochs": 1, "training.per_device_train_batch_size": 4, "training.gradient_accumulation_steps": 2,
                             "evaluation.generation_samples": 2})
    raw.update(changes)
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_trial_workers_span_two_nodes(two_nodes, tiny_assets: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    result = run_cli("raytune_qvl.sweep", str(_space(tmp_path)), "--address", two_nodes.address, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((tmp_path / "sweeps" / "multi" / "sweep_state.json").read_text())
    (trial,) = [t for t in state["trials"] if t["status"] != "reused"]
    assert trial["status"] == "completed"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("multi").experiment_id])
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert child.data.metrics["num_nodes"] == 2  # the two workers ran on different nodes
    assert child.info.status == "FINISHED" and "eval_loss" in child.data.metrics
    assert any(r.data.tags.get("raytune_qvl.kind") == "sweep" and r.info.status == "FINISHED" for r in runs)


def test_local_storage_on_a_multinode_cluster_is_refused(two_nodes, tiny_assets: Path, tmp_path: Path) -> None:
    result = run_cli("raytune_qvl.sweep", str(_space(tmp_path, shared_storage=False)), "--address", two_nodes.address, timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "storage_path" in result.stderr and "cluster has 2 nodes" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "shared").exists() or not any((tmp_path / "shared").rglob("checkpoint*"))
