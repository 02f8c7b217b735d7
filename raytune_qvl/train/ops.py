"""DeepSpeed's compiled ops: which ones a DeepSpeed config makes the engine load, and whether
this machine has them prebuilt or can build them. DeepSpeed compiles a missing op on first use
(JIT, with ninja and a C++ compiler, and nvcc for CUDA ops); on a cluster without them the
first trial fails minutes in, inside `deepspeed.initialize`. This check runs before any trial,
where the workers run (`check_ops_on_workers`), and imports neither torch nor
DeepSpeed, so it costs nothing."""

from __future__ import annotations

import importlib.util
import os
import runpy
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

__all__ = ["required_ops", "missing_ops", "check_ops", "check_ops_on_workers"]

# op name -> (what needs it, whether it is a CUDA op needing nvcc, its DS_BUILD_ variable)
_OPS = {
    "cpu_adam": ("ZeRO optimizer offload's Adam (DeepSpeedCPUAdam)", False, "DS_BUILD_CPU_ADAM"),
    "fused_adam": ("DeepSpeed's FusedAdam on GPUs", True, "DS_BUILD_FUSED_ADAM"),
    "async_io": ("NVMe offload", False, "DS_BUILD_AIO"),
    "fused_lamb": ("the Lamb optimizer", True, "DS_BUILD_FUSED_LAMB"),
    "fused_lion": ("the Lion optimizer on GPUs", True, "DS_BUILD_FUSED_LION"),
    "cpu_lion": ("ZeRO optimizer offload's Lion", False, "DS_BUILD_CPU_LION"),
    "cpu_adagrad": ("ZeRO optimizer offload's Adagrad", False, "DS_BUILD_CPU_ADAGRAD"),
}


def required_ops(ds: dict[str, Any], *, on_gpu: bool) -> list[str]:
    """The compiled ops `deepspeed.initialize` loads for this (device-adapted) config."""
    zero = ds.get("zero_optimization") or {}
    devices = {(zero.get(k) or {}).get("device") for k in ("offload_optimizer", "offload_param")}
    offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    optimizer = ds.get("optimizer") or {}
    kind = str(optimizer.get("type", "")).lower()
    params = optimizer.get("params") or {}
    ops = ["async_io"] if "nvme" in devices else []
    if kind in ("adam", "adamw") and not params.get("torch_adam"):
        if offload:
            ops.append("cpu_adam")
        elif on_gpu:
            ops.append("fused_adam")
    elif kind == "lamb" and on_gpu:
        ops.append("fused_lamb")
    elif kind == "lion" and (offload or on_gpu):
        ops.append("cpu_lion" if offload else "fused_lion")
    elif kind == "adagrad" and offload:
        ops.append("cpu_adagrad")
    return ops


def _installed_ops() -> dict[str, bool]:
    """The ops this DeepSpeed install was built with (DS_BUILD_*), read from its own record
    without importing DeepSpeed."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return {}
    record = Path(next(iter(spec.submodule_search_locations))) / "git_version_info_installed.py"
    if not record.is_file():
        return {}
    return dict(runpy.run_path(str(record)).get("installed_ops", {}))


def _cuda_home() -> str | None:
    """Where torch's extension builder looks for nvcc (torch.utils.cpp_extension.CUDA_HOME)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    return "/usr/local/cuda" if Path("/usr/local/cuda").exists() else None


def missing_ops(ops: list[str]) -> list[str]:
    """One line per op that is neither prebuilt nor buildable here, naming what is missing."""
    installed = _installed_ops()
    lines = []
    for op in ops:
        if installed.get(op):
            continue
        needs, cuda, build_var = _OPS[op]
        lacking = []
        if shutil.which("ninja") is None:
            lacking.append("ninja (pip install ninja)")
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            lacking.append(f"a C++ compiler ({compiler} not on PATH)")
        headers = Path(sysconfig.get_paths()["include"])
        if not (headers / "Python.h").is_file():  # a Python without its -dev package
            version = "{}.{}".format(*sys.version_info[:2])
            lacking.append(f"Python's C headers ({headers / 'Python.h'}: install python{version}-dev)")
        if cuda:
            home = _cuda_home()
            if home is None or not (Path(home) / "bin" / "nvcc").exists():
                lacking.append("nvcc matching torch's CUDA (set CUDA_HOME)")
        if lacking:
            lines.append(
                f"{needs} needs DeepSpeed's {op} op, which this DeepSpeed install does not include and this "
                f"machine cannot compile: missing {', '.join(lacking)}; install those, or reinstall DeepSpeed "
                f"with {build_var}=1"
            )
    return lines


def check_ops(ds: dict[str, Any], *, on_gpu: bool) -> list[str]:
    """`missing_ops` of what this config needs (an empty list: nothing to build, or buildable)."""
    return missing_ops(required_ops(ds, on_gpu=on_gpu))


def check_ops_on_workers(ds_config: dict, *, on_gpu: bool, source: str) -> None:
    """Before any trial: DeepSpeed's compiled ops this config needs are prebuilt or buildable
    where the workers run (every alive node that can host one: its GPUs, or its CPUs), checked by
    a task on each node of a cluster, in this process when Ray runs on this machine alone."""
    from raytune_qvl.cluster import alive_nodes
    from raytune_qvl.errors import ConfigError, Problem

    if not required_ops(ds_config, on_gpu=on_gpu):
        return
    import ray

    nodes = alive_nodes() if ray.is_initialized() else []
    if len(nodes) <= 1:
        found = {"": check_ops(ds_config, on_gpu=on_gpu)}
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(num_cpus=0)(check_ops)
        need = "GPU" if on_gpu else "CPU"
        refs = {
            f" on node {node['NodeManagerAddress']}": remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(ds_config, on_gpu=on_gpu)
            for node in nodes
            if node.get("Resources", {}).get(need, 0) > 0
        }
        found = {where: ray.get(ref, timeout=120) for where, ref in refs.items()}
    problems = [
        Problem(source, "optimizer", line + where, show_value=False) for where, lines in found.items() for line in lines
    ]
    if problems:
        raise ConfigError(problems)
