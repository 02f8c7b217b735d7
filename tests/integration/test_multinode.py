"""A Ray cluster of two nodes on this machine, started as the README's cluster section says
(`ray start --head`, `ray start --address`, token authentication, `ray job submit`): a sweep
submitted as a Ray job spreads its trial's two workers over both nodes and completes with its
MLflow runs; a local storage path on a multi-node cluster is refused before the first trial;
outputs inside the job's temporary working directory are refused. (A node with an output folder of
its own: test_multinode_outputs.py.)"""

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
            assert time.time() < deadline, probe.stderr[-2000:]
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


def _space(tmp_path: Path, overrides: dict | None = None, **changes) -> Path:
    """A one-trial sweep with every path absolute, as a job on a cluster needs; `overrides` are
    added to its config overrides."""
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
            **(overrides or {}),
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
