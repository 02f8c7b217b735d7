"""A Ray cluster of two nodes on this machine, started as the README's cluster section says
(`ray start --head`, `ray start --address`, token authentication, `ray job submit`): a sweep
submitted as a Ray job spreads its trial's two workers over both nodes and completes with its
MLflow runs; a local storage path on a multi-node cluster is refused before the first trial;
outputs inside the job's temporary working directory are refused. A second cluster gives its
worker node its own output folder (a mount namespace: the same path, other files), as separate
machines have: a trial's outputs written there reach the driver through storage_path."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, free_port, run_cli, tiny_space

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

RAY = str(Path(sys.executable).parent / "ray")


class RayStartCluster:
    """Two `ray start` nodes, each with its own temp folder (on one machine a shared one lets
    a node delete the other's unpacked job files), torn down by their processes, not `ray stop`
    (which would stop every Ray on the machine)."""

    def __init__(self, head_cpus: int = 2, node_cpus: int = 2, own_outputs: bool = False) -> None:
        """`own_outputs`: the worker node sees a folder of its own at `outputs` (`node_outputs`)."""
        self.head_cpus, self.node_cpus, self.own_outputs = head_cpus, node_cpus, own_outputs
        self.root = Path(tempfile.mkdtemp(prefix="rtq", dir="/tmp"))  # short: Ray's socket paths
        self.outputs = self.root / "outputs"  # what the head (the driver) sees
        self.node_outputs = self.root / "node_outputs"  # what the worker node sees at `outputs`
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env.pop("RAY_ADDRESS", None)

    def ray(self, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def start(self) -> None:
        head = self.ray(
            "start",
            "--head",
            "--port",
            str(self.port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--num-cpus",
            str(self.head_cpus),
            "--temp-dir",
            str(self.root / "head"),
            "--disable-usage-stats",
        )
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        start = [RAY, "start", "--address", self.address, "--num-cpus", str(self.node_cpus)]
        start += ["--temp-dir", str(self.root / "node")]
        if self.own_outputs:  # the node's processes (raylet, workers) live in a mount namespace
            self.outputs.mkdir()
            self.node_outputs.mkdir()
            mount = f"mount --bind {shlex.quote(str(self.node_outputs))} {shlex.quote(str(self.outputs))}"
            start = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mount} && exec "$@"', "sh", *start]
        node = subprocess.run(start, env=self.env, capture_output=True, text=True, timeout=180, cwd=ROOT)
        assert node.returncode == 0, node.stdout[-2000:] + node.stderr[-2000:]
        # the head's job agent comes up after `ray start` returns: wait until it takes a job
        deadline = time.time() + 180
        while True:
            probe = self.ray("job", "submit", "--address", self.dashboard, "--", "true", timeout=120)
            if probe.returncode == 0:
                break
            assert "No available agent" in probe.stderr and time.time() < deadline, probe.stderr[-2000:]
            time.sleep(1)

    def stop(self) -> None:
        marks = (str(self.root), f":{self.port}")
        roots = [
            p
            for p in psutil.process_iter(["cmdline"])
            if any(m in part for part in (p.info["cmdline"] or []) for m in marks)
        ]
        ours = {p.pid: p for p in roots}
        for proc in roots:
            try:
                ours.update({child.pid: child for child in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        ours = list(ours.values())
        for proc in ours:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(ours, timeout=15)
        for proc in alive:
            proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    cluster = RayStartCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


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


def _space(tmp_path: Path, **changes) -> Path:
    """A one-trial sweep with every path absolute, as a job on a cluster needs."""
    assets = ROOT / ".assets"
    settings = dict(
        strategy="joint",
        joint_trials=1,
        parameters={"training.learning_rate": {"choices": [1.5e-3]}},
        trials_per_stage=1,
        resources={"workers_per_trial": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD"},
        storage_path=str(tmp_path / "shared"),
        shared_storage=True,
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "multi"},
    )
    return tiny_space(
        tmp_path,
        "multi",
        config_overrides={
            "training.num_epochs": 1,
            "training.per_device_train_batch_size": 4,
            "training.gradient_accumulation_steps": 2,
            "evaluation.generation_samples": 2,
            "model.name": str(assets / "tiny-qwen25vl"),
            "data.train_path": str(assets / "data" / "forms" / "train.jsonl"),
            "data.eval_path": str(assets / "data" / "forms" / "eval.jsonl"),
            "data.test_path": str(assets / "data" / "forms" / "test.jsonl"),
        },
        **{**settings, **changes},
    )


def _submit(cluster: RayStartCluster, *args: str, module: str = "raytune_qvl.sweep") -> subprocess.CompletedProcess:
    """`ray job submit --working-dir .` from the repository, as the README shows."""
    runtime_env = json.dumps({"env_vars": {"RAYTUNE_QVL_CACHE": os.environ["RAYTUNE_QVL_CACHE"]}})
    return cluster.ray(
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--working-dir",
        ".",
        "--runtime-env-json",
        runtime_env,
        "--",
        sys.executable,
        "-m",
        module,
        *args,
        timeout=900,
    )


def test_sweep_job_spreads_a_trial_over_two_nodes(
    two_nodes: RayStartCluster, tiny_assets: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    result = _submit(two_nodes, str(_space(tmp_path)))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    state = json.loads((tmp_path / "sweeps" / "multi" / "sweep_state.json").read_text())
    (trial,) = [t for t in state["trials"] if t["status"] != "reused"]
    assert trial["status"] == "completed"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("multi").experiment_id])
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert child.data.metrics["num_nodes"] == 2  # the two workers ran on different nodes
    assert child.info.status == "FINISHED" and "eval_loss" in child.data.metrics
    assert any(r.data.tags.get("raytune_qvl.kind") == "sweep" and r.info.status == "FINISHED" for r in runs)
    assert (tmp_path / "sweeps" / "multi" / "best" / "training_config.yaml").exists()


def test_outputs_in_the_jobs_temporary_folder_are_refused(
    two_nodes: RayStartCluster, tiny_assets: Path, tmp_path: Path
) -> None:
    result = _submit(two_nodes, str(_space(tmp_path)), "output_dir=./outputs/sweeps", "mlflow.tracking_uri=null")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert (
        "output_dir:" in out
        and "mlflow.tracking_uri:" in out
        and "temporary working directory" in out
        and "Traceback" not in out
    )
    assert not (tmp_path / "shared").exists()


def test_local_storage_on_a_multinode_cluster_is_refused(
    two_nodes: RayStartCluster, tiny_assets: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "raytune_qvl.sweep",
        str(_space(tmp_path, shared_storage=False)),
        "--address",
        two_nodes.address,
        env=two_nodes.env,
        timeout=600,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert (
        "storage_path" in result.stderr and "cluster has 2 nodes" in result.stderr and "Traceback" not in result.stderr
    )
    assert not (tmp_path / "shared").exists() or not any((tmp_path / "shared").rglob("checkpoint*"))


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def test_a_trials_outputs_on_another_node_reach_the_driver(
    split_nodes: RayStartCluster, tiny_assets: Path, tmp_path: Path
) -> None:
    """The trial trains on the worker node, which writes its final/ and best/ into a folder the
    driver cannot see; the driver's trial folder, best/ and MLflow get them through storage_path."""
    from mlflow.tracking import MlflowClient

    space = _space(
        tmp_path,
        output_dir=str(split_nodes.outputs / "sweeps"),
        resources={"workers_per_trial": 1, "cpus_per_worker": 1},
    )
    result = _submit(split_nodes, str(space))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
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
