"""Shared fixtures: the tiny model and synthetic data (built once), configs pointing into a
per-test folder, and one local Ray cluster for the tests that need Ray."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / ".assets"
TINY_TRAIN = ROOT / "configs" / "tiny" / "training_config.yaml"
TINY_LORA = ROOT / "configs" / "tiny" / "lora_config.yaml"
# the seed's DeepSpeed JSONs (bf16) and the tiny CPU default's (the same, precision from the config: fp32)
SEED_ZERO2 = ROOT / "configs" / "ds_config_zero2.json"
SEED_ZERO3 = ROOT / "configs" / "ds_config_zero3_offload.json"
ZERO2 = ROOT / "configs" / "tiny" / "ds_config_zero2.json"
ZERO3 = ROOT / "configs" / "tiny" / "ds_config_zero3_offload.json"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Prepared-data cache and MLflow default store in a session folder, not in $HOME/cwd."""
    os.environ["RAYTUNE_QVL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """.assets/ as `make assets` builds it (built here if missing)."""
    model = ASSETS / "tiny-qwen25vl" / "MODEL_CARD.md"
    data = ASSETS / "data" / "forms" / "train.jsonl"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "raytune_qvl.tiny", str(model.parent)], check=True, cwd=ROOT)
    if not data.exists():
        synth = ["raytune_qvl.synth", str(data.parent), "--task", "ocr_doc", "--domain", "forms"]
        sizes = ["--train", "256", "--eval", "64", "--test", "64", "--seed", "0"]
        subprocess.run([sys.executable, "-m", *synth, *sizes], check=True, cwd=ROOT)
    return ASSETS


@pytest.fixture()
def in_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the repository root, where the shipped configs' relative paths point."""
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture()
def tiny_config(tiny_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A loader for the tiny config with every output (run folder, Ray storage, MLflow) in tmp_path."""
    from raytune_qvl.config.load import load_config

    monkeypatch.chdir(ROOT)

    def load(*overrides: str, deepspeed: Path = ZERO2, lora: Path = TINY_LORA):
        base = [
            f"output.dir={tmp_path / 'out'}",
            f"output.logging_dir={tmp_path / 'logs'}",
            f"ray.storage_path={tmp_path / 'ray'}",
            f"output.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
        return load_config(TINY_TRAIN, lora, deepspeed, [*base, *overrides])

    return load


@pytest.fixture(scope="session")
def processor(tiny_assets: Path):
    from raytune_qvl.config.schema import Config, DataConfig, ModelConfig
    from raytune_qvl.data.processor import load_processor

    cfg = Config(
        model=ModelConfig(name=str(tiny_assets / "tiny-qwen25vl")),
        data=DataConfig(min_image_size=112, max_image_size=336),
    )
    return load_processor(cfg)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every test that needs one (starting one costs ~10 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True, logging_level="WARNING"
        )
    yield ray
    ray.shutdown()


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """A raytune_qvl CLI in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def as_in_a_terminal() -> None:
    """preexec_fn for a CLI the test will Ctrl-C: SIGINT at its default, as a terminal starts a
    command, even when the suite itself runs in the background (where the shell ignores SIGINT
    and children inherit that, so Python installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """A CLI the test drives itself (signals, pauses): when the test fails before the CLI ended,
    the CLI and every process it started (its local Ray cluster) are killed, so a failure does not
    leave a second Ray instance for the rest of the suite to stumble on."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            import psutil

            try:
                family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                family = []
            for member in family:
                try:
                    member.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Poll `url` until it answers 200, or kill `proc` and fail with its output."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"{what} did not start: " + (proc.stdout.read() if proc.stdout else ""))


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tiny_space(folder: Path, name: str = "tiny_cpu", config_overrides: dict | None = None, **changes) -> Path:
    """search_spaces/tiny_cpu.yaml as folder/<name>.yaml, named `name`: base configs absolute,
    Ray storage, sweeps and MLflow store under `folder`, no confirmation runs, then `changes` to
    its top-level keys and `config_overrides` added to its `overrides`."""
    import yaml

    raw = yaml.safe_load((ROOT / "search_spaces" / "tiny_cpu.yaml").read_text())
    raw["base"] = {k: str(ROOT / v) for k, v in raw["base"].items()}
    raw.update(
        name=name,
        storage_path=str(folder / "ray"),
        output_dir=str(folder / "sweeps"),
        mlflow={"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"},
        confirm={"top_k": 0, "seeds": 0},
    )
    raw.update(changes)
    raw["overrides"].update(config_overrides or {})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def cer_sweep(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small joint sweep (2 trials, metric eval_cer) with its MLflow store, run once and
    shared by the evaluation and browser tests. Returns its folder."""
    tmp_path = tmp_path_factory.mktemp("cer_sweep")
    path = tiny_space(
        tmp_path,
        "cer",
        config_overrides={
            "training.num_epochs": 1,
            "evaluation.generation_every": 1,
            "evaluation.generation_samples": 4,
        },
        strategy="joint",
        joint_trials=2,
        metric="eval_cer",
        mode="min",
        parameters={"training.learning_rate": {"choices": [6.0e-4, 3.0e-3]}, "lora.r": {"choices": [8, 16]}},
        trials_per_stage=2,
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "cer"},
        resources={"workers_per_trial": 1, "max_concurrent_trials": 2},
    )
    result = run_cli("raytune_qvl.sweep", str(path), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path
