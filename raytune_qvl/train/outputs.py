"""A run's output folder: its layout, folders swapped in whole, and the rules checked before
anything is written (a folder that can be written; a finished or diverged run is not silently
redone; the previous MLflow run of a resumed one).

    <output.dir>/
      final/                    the trained adapter, processor, resolved configs, training_complete.json
      best/                     the adapter at the best evaluation so far, with its predictions.json
      checkpoints/              --no-ray runs' checkpoints (Ray runs keep theirs under ray.storage_path)
      .raytune_qvl_run.json     the MLflow run of this folder, for resumes

On a cluster, rank 0 writes final/ and best/ on its own node. When that is not the driver's node,
it also puts them in the run's last checkpoint (outputs/, through storage_path, which every node
shares) and the driver fetches them into its own output folder: output.dir need not be shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from raytune_qvl.config.schema import Config
from raytune_qvl.errors import ConfigError, Problem

__all__ = [
    "FINAL_DIR",
    "BEST_DIR",
    "COMPLETE_MARKER",
    "DIVERGED_FILE",
    "RUN_FILE",
    "PREDICTIONS_FILE",
    "OUTPUTS_DIR",
    "replace_dir",
    "ship_outputs",
    "fetch_outputs",
    "checkpoint_in",
    "writable_dir_problem",
    "make_dir",
    "ray_run_name",
    "check_output",
    "make_output",
    "training_fingerprint",
    "config_changes",
    "remember_out_of_memory",
    "ran_out_of_memory",
]

FINAL_DIR = "final"  # <output.dir>/final: the trained adapter, processor and resolved configs
BEST_DIR = "best"  # <output.dir>/best: the adapter at the best evaluation so far
COMPLETE_MARKER = "training_complete.json"
DIVERGED_FILE = "diverged.json"  # in the checkpoint reported when the loss became NaN
RUN_FILE = ".raytune_qvl_run.json"  # the MLflow run id of this output folder, for resumes
PREDICTIONS_FILE = "predictions.json"  # in best/: the generation eval behind the best adapter
OUTPUTS_DIR = "outputs"  # in a run's last checkpoint: final/ and best/ from a node other than the driver's


MEMORY_DIR = ".memory"  # <output.dir>/.memory/micro-<N>.json: this launch ran out of memory at micro N


def remember_out_of_memory(output_dir: Path, micro: int, launched: float, reason: str) -> None:
    """Mark that this launch of the run (`launched`: the driver's start time, the same for every
    worker-group restart of it) ran out of memory at micro batch `micro`: Ray Train restarts the
    worker group from its last checkpoint, and the restarted workers fail at once
    (ran_out_of_memory) instead of loading the model to run out of memory again; a sweep then
    halves the micro batch. A new launch (a rerun of the command) tries again."""
    folder = Path(output_dir) / MEMORY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"micro-{micro}.json").write_text(json.dumps({"launched": launched, "reason": reason[:500]}))


def ran_out_of_memory(output_dir: Path, micro: int, launched: float) -> str | None:
    """The reason this launch of the run ran out of memory at this micro batch before, or None."""
    marker = Path(output_dir) / MEMORY_DIR / f"micro-{micro}.json"
    try:
        seen = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return seen.get("reason") if seen.get("launched") == launched else None


def replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write into a sibling folder, then swap it in: readers never see half a folder."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def ship_outputs(output_dir: Path, checkpoint: Path) -> None:
    """Rank 0, at the last step: final/ and best/ into the checkpoint it reports."""
    for name in (FINAL_DIR, BEST_DIR):
        if (output_dir / name).is_dir():
            shutil.copytree(output_dir / name, checkpoint / OUTPUTS_DIR / name)


def fetch_outputs(checkpoint: Any, output_dir: Path) -> list[str]:
    """On the driver: the outputs a remote rank 0 shipped in `checkpoint` (a Ray Train
    Checkpoint, on any storage) into `output_dir`, each folder swapped in whole. Only outputs/
    is downloaded, not the engine state. Returns the folders fetched (none when rank 0 ran here)."""
    import pyarrow.fs
    from ray.train import Checkpoint

    if checkpoint is None:
        return []
    path = f"{checkpoint.path.rstrip('/')}/{OUTPUTS_DIR}"
    if checkpoint.filesystem.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return []
    with tempfile.TemporaryDirectory(prefix="raytune_qvl-outputs-") as tmp:
        Checkpoint(path, filesystem=checkpoint.filesystem).to_directory(tmp)
        fetched = []
        for name in (FINAL_DIR, BEST_DIR):
            if (Path(tmp) / name).is_dir():
                replace_dir(
                    output_dir / name, lambda dst, src=Path(tmp) / name: shutil.copytree(src, dst, dirs_exist_ok=True)
                )
                fetched.append(name)
    return fetched


def checkpoint_in(storage_path: str, path: str) -> Any:
    """A Ray Train Checkpoint from the path Tune reports (`checkpoint_path`: without the URI's
    scheme) in the storage it was written to."""
    import pyarrow.fs
    from ray.train import Checkpoint

    fs = pyarrow.fs.FileSystem.from_uri(storage_path)[0] if "://" in storage_path else pyarrow.fs.LocalFileSystem()
    return Checkpoint(path, filesystem=fs)


def writable_dir_problem(path: Path) -> str | None:
    """Why a folder could not be created and written here, checked without creating it."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "no existing parent folder"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:  # a real attempt (permission bits say little to root, or on /proc and read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".raytune_qvl_probe_", dir=probe))
    except OSError as exc:
        return f"{probe} is not writable ({exc.strerror})"
    return None


def make_dir(path: Path, source: str, key: str) -> None:
    """Create a folder and prove it is writable, or fail with one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        rule = f"{path} is not writable ({exc.strerror}); choose another folder"
        raise ConfigError([Problem(source, key, rule, show_value=False)]) from None


def ray_run_name(cfg: Config) -> str:
    """Stable for one output folder: the same command finds its checkpoints again."""
    base = cfg.output.run_name or Path(cfg.output.dir).name
    digest = hashlib.sha1(cfg.output.dir.encode()).hexdigest()[:8]
    return f"{base}-{digest}"


def check_output(cfg: Config, *, overwrite: bool) -> dict[str, Any]:
    """Before anything is written: refuse to silently redo a finished (or diverged) run, and a
    folder that cannot be written. Returns the previous run record (MLflow run id) to resume."""
    out = Path(cfg.output.dir)
    source = cfg.paths.training or "config"
    problem = writable_dir_problem(out)
    if problem:
        rule = f"cannot write {out}: {problem}; choose another output.dir"
        raise ConfigError([Problem(source, "output.dir", rule, show_value=False)])
    if overwrite:
        return {}
    if (out / FINAL_DIR / COMPLETE_MARKER).exists():
        rule = "holds a finished run; pass --overwrite to start over or choose another output.dir"
        raise ConfigError([Problem(str(out), "output.dir", rule, show_value=False)])
    ray_run = Path(cfg.ray.storage_path) / ray_run_name(cfg)
    diverged = sorted((out / "checkpoints").glob(f"*/{DIVERGED_FILE}"))  # --no-ray runs
    if "://" not in cfg.ray.storage_path:
        diverged += sorted(ray_run.glob(f"*/{DIVERGED_FILE}"))
    if diverged:
        message = json.loads(diverged[-1].read_text()).get("message", "the loss diverged")
        rule = f"this run diverged ({message}); change the config and pass --overwrite to start over"
        raise ConfigError([Problem(str(out), "output.dir", rule, show_value=False)])
    record_file = out / RUN_FILE
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    changed = config_changes(record.get("config"), training_fingerprint(cfg))
    if changed:
        rule = (
            f"holds a run trained with another config ({'; '.join(changed)}): resuming would mix the two; "
            "pass --overwrite to start over or choose another output.dir"
        )
        raise ConfigError([Problem(str(out), "output.dir", rule, show_value=False)])
    return record


# What a resumed run may change: where it logs and reports, how often, how it is evaluated, the
# resources it runs on. Everything else decides what is trained and must match the checkpoint's.
_RESUMABLE = (
    "output.",
    "evaluation.",
    "ray.address",
    "ray.storage_path",
    "ray.shared_storage",
    "ray.max_failures",
    "ray.placement_strategy",
    "ray.resources_per_worker",
    "data.num_workers",
    "data.cache_dir",
    "environment.dataloader_pin_memory",
    "environment.deepspeed",  # the file's path: its content is compared as `deepspeed`
    "training.logging_steps",
    "training.eval_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.final_checkpoint",
    "training.eval_on_start",
    "training.per_device_eval_batch_size",
    "training.metric_for_best_model",
    "training.greater_is_better",
)
# micro batch x accumulation may change when the effective batch stays (an out-of-memory retry does)
_SPLIT = ("training.per_device_train_batch_size", "training.gradient_accumulation_steps")


def training_fingerprint(cfg: Config) -> dict[str, Any]:
    """The settings that decide what a run trains (flattened), and its effective batch."""
    from raytune_qvl.config.overrides import flatten

    flat = flatten({**cfg.training_dict(), **cfg.lora_dict(), "deepspeed": cfg.deepspeed})
    kept = {k: v for k, v in flat.items() if not k.startswith(_RESUMABLE)}
    t = cfg.training
    kept["effective_batch"] = t.per_device_train_batch_size * cfg.ray.num_workers * t.gradient_accumulation_steps
    return json.loads(json.dumps(kept, default=str))  # as it reads back from the run file


def config_changes(before: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """'key old -> new' for each training setting that differs (none when there is no record)."""
    if before is None:
        return []
    changed = []
    for key in sorted(set(before) | set(now)):
        if key in _SPLIT and before.get("effective_batch") == now.get("effective_batch"):
            continue
        if before.get(key) != now.get(key):
            changed.append(f"{key} {before.get(key)!r} -> {now.get(key)!r}")
    return changed


def make_output(cfg: Config, *, overwrite: bool, resume: str | None = None) -> None:
    """The output folder, emptied of a previous run's results with --overwrite. A folder without
    a run record starts a new run: Ray checkpoints left under its run name (its folder was
    deleted) are not resumed, unless --resume names a checkpoint."""
    out = Path(cfg.output.dir)
    fresh = overwrite or (resume is None and not (out / RUN_FILE).exists())
    if overwrite:
        for name in (FINAL_DIR, BEST_DIR, "checkpoints", RUN_FILE, ".faults"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
    if fresh and "://" not in cfg.ray.storage_path:
        shutil.rmtree(Path(cfg.ray.storage_path) / ray_run_name(cfg), ignore_errors=True)
    make_dir(out, cfg.paths.training or "config", "output.dir")
