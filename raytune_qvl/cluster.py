"""Connecting to Ray: join a running cluster (--address / ray.address / RAY_ADDRESS) or start
a local one sized for the job, and shut down only what we started."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

__all__ = ["ray_session", "is_multinode", "storage_is_shared"]

log = logging.getLogger("raytune_qvl")


@contextmanager
def ray_session(address: str | None, *, min_cpus: int = 1, min_gpus: int = 0) -> Iterator[None]:
    """Ray for the duration of the block. A new local cluster gets at least `min_cpus`
    logical CPUs: Tune does not count the Train workers' CPUs, so the logical pool must hold
    every concurrent trial's controller and workers even on a 2-core machine."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        cpus = max(os.cpu_count() or 1, min_cpus)
        ray.init(num_cpus=cpus, num_gpus=min_gpus or None, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def is_multinode() -> bool:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")) > 1


def storage_is_shared(storage_path: str) -> bool:
    """A cloud URI (s3://, gs://, ...) is reachable from every node; a local path is only if it
    is a shared filesystem, which we cannot check: it must be said with ray.shared_storage."""
    return "://" in storage_path and not storage_path.startswith("file://")
