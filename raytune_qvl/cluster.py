"""Connecting to Ray: join a running cluster (--address / ray.address / RAY_ADDRESS) or start
a local one sized for the job, and shut down only what we started."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = [
    "ray_session",
    "alive_nodes",
    "check_storage",
    "job_working_dir",
    "check_outputs_outside_job_dir",
]

log = logging.getLogger("raytune_qvl")


@contextmanager
def ray_session(
    address: str | None, *, min_cpus: int = 1, min_gpus: int = 0, log_to_driver: bool = True
) -> Iterator[None]:
    """Ray for the duration of the block. A new local cluster gets at least `min_cpus`
    logical CPUs: Tune does not count the Train workers' CPUs, so the logical pool must hold
    every concurrent trial's controller and workers even on a 2-core machine. Without
    `log_to_driver`, worker output stays in Ray's session logs (a sweep shows its own progress)."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"log_to_driver": log_to_driver, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        cpus = max(os.cpu_count() or 1, min_cpus)
        # One machine has no node drains to watch for; Ray Train's preemption watcher would only
        # print a core-worker error line for every run. The cluster's processes inherit this.
        with _env(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")):
            ray.init(
                num_cpus=cpus,
                num_gpus=min_gpus or None,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                runtime_env={"worker_process_setup_hook": "raytune_qvl.runtime.quiet_ray_worker"},
                **kwargs,
            )
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables set for the block, then restored."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def check_storage(storage_path: str, *, shared: bool, source: str, key: str) -> None:
    """On a cluster of several nodes, checkpoints and results must land where every node
    reads them: a cloud URI, or a path declared shared and seen from every node."""
    from raytune_qvl.errors import ConfigError, Problem

    if "://" in storage_path and not storage_path.startswith("file://"):
        return
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    if not shared:
        raise ConfigError(
            [
                Problem(
                    source,
                    key,
                    f"{storage_path} is a local path, but the Ray cluster has {len(nodes)} nodes: "
                    "use storage every node reaches (a cloud URI such as s3://bucket/runs, "
                    "or a shared filesystem mount declared with shared_storage: true)",
                    show_value=False,
                )
            ]
        )
    missing = _nodes_missing(storage_path, nodes)
    if missing:
        raise ConfigError(
            [
                Problem(
                    source,
                    key,
                    f"{storage_path} is declared shared but nodes {', '.join(missing)} do not see it",
                    show_value=False,
                )
            ]
        )


def _nodes_missing(storage_path: str, nodes: list[dict]) -> list[str]:
    """Write a probe file here and ask a task pinned to every node whether it sees it."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = Path(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".raytune_qvl_probe_{uuid.uuid4().hex}"
    probe.write_text("")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        checks = {
            node["NodeManagerAddress"] + ":" + node["NodeID"][:8]: sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(probe))
            for node in nodes
        }
        return [name for name, ref in checks.items() if not ray.get(ref, timeout=60)]
    finally:
        probe.unlink(missing_ok=True)


def job_working_dir() -> Path | None:
    """The folder a `ray job submit --working-dir` entrypoint runs in: Ray's unpacked copy of
    the working directory, deleted when the job ends. None outside such a job."""
    cwd = Path.cwd()
    return (
        cwd
        if "runtime_resources" in cwd.parts and any(part.startswith("working_dir_files") for part in cwd.parts)
        else None
    )


def check_outputs_outside_job_dir(outputs: list[tuple[str, str, str | None]]) -> None:
    """In a Ray job, refuse outputs that resolve inside its temporary working directory: the
    adapters, checkpoints and MLflow store would vanish with the job. `outputs` holds
    (source, key, path or URI) triples; URIs other than file:// and sqlite:// are remote."""
    from raytune_qvl.errors import ConfigError, Problem
    from raytune_qvl.config.uris import local_store_path

    work = job_working_dir()
    if work is None:
        return
    problems = []
    for source, key, target in outputs:
        if not target:
            continue
        local = local_store_path(target) or (None if "://" in target else Path(target))
        if local is None:
            continue
        path = local.absolute()
        if path == work or work in path.parents:
            problems.append(
                Problem(
                    source,
                    key,
                    f"{path} lies in this Ray job's temporary working directory, deleted when the job ends: "
                    "give an absolute path every node can reach (e.g. /shared/...)",
                    show_value=False,
                )
            )
    if problems:
        raise ConfigError(problems)
