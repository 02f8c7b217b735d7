"""One Tune trial, the Ray Train V2 way: a function trainable that builds a TorchTrainer for
its sampled point and reports through TuneReportCallback (rank 0's metrics reach Tune)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

__all__ = [
    "TrialFailed",
    "run_trial",
    "trial_dir",
    "train_storage",
    "is_transient",
    "is_out_of_memory",
    "smaller_micro",
    "FetchOutputs",
]

log = logging.getLogger("raytune_qvl")

# what a run that failed for no fault of its point dies of: a lost worker or node, start-up
_TRANSIENT = (
    "ActorDiedError",
    "RayActorError",
    "ActorUnavailableError",
    "NodeDiedError",
    "WorkerCrashedError",
    "WorkerGroupStartupTimeoutError",
    "died unexpectedly",
)
# what a run that needs more memory than it has dies of: torch's (GPU) OutOfMemoryError, or Ray's
# memory monitor killing a worker for the host's (NODE_MEMORY: which may be another trial's doing)
_MEMORY = ("OutOfMemoryError", "out of memory", "CUDA error: out of memory", "running low on memory")
_NODE_MEMORY = ("running low on memory",)


def _failure_texts(exc: BaseException, reason: str) -> list[str]:
    seen, texts, visited = exc, [reason], set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        texts.append(f"{type(seen).__name__}: {seen}")
        for failure in (getattr(seen, "worker_failures", None) or {}).values():
            texts.append(f"{type(failure).__name__}: {failure}")
        seen = seen.__cause__ or seen.__context__
    return texts


def is_out_of_memory(exc: BaseException, reason: str) -> bool:
    """A failure for want of memory: the point may fit at a smaller micro batch."""
    return any(marker in text for text in _failure_texts(exc, reason) for marker in _MEMORY)


def is_node_memory(exc: BaseException, reason: str) -> bool:
    """Ray's memory monitor killed a worker: the node ran low, perhaps for other trials on it."""
    return any(marker in text for text in _failure_texts(exc, reason) for marker in _NODE_MEMORY)


def is_transient(exc: BaseException, reason: str) -> bool:
    """A failure worth one more try of the same point (not a divergence, memory or a bug in its config)."""
    if is_out_of_memory(exc, reason):
        return False
    return any(marker in text for text in _failure_texts(exc, reason) for marker in _TRANSIENT)


def smaller_micro(micro: int) -> int | None:
    """The next micro batch to try after running out of memory at `micro`: the largest divisor of
    it up to its half (so accumulation x micro / next keeps the effective batch whole), down to 1.

    >>> [smaller_micro(m) for m in (8, 6, 3, 1)]
    [4, 3, 1, None]
    """
    return next((d for d in range(micro // 2, 0, -1) if micro % d == 0), None)


class TrialFailed(RuntimeError):
    """A trial that could not finish: its one-line reason is what MLflow and the table show."""


def trial_dir(sweep_dir: str, trial_id: str) -> str:
    return str(Path(sweep_dir) / "trials" / trial_id)


def train_storage(space: Any) -> str:
    """Where the trials' Ray Train runs (and their checkpoints) live."""
    return f"{space.tune_storage}/trials"


class FetchOutputs(Callback):
    """On the driver: when a trial finishes, the outputs its rank 0 shipped from another node
    (final/, best/ with its predictions; see train/outputs.py) come into the trial's folder here,
    before the tracking callback after it logs them. Nothing to do when rank 0 ran on this node."""

    def __init__(self, storage: str, sweep_dir: str):
        self.storage, self.sweep_dir = storage, sweep_dir

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        fetch_trial_outputs(self.storage, self.sweep_dir, trial.trial_id, trial.last_result or {})


def fetch_trial_outputs(storage: str, sweep_dir: str, trial_id: str, last: dict[str, Any]) -> list[str]:
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from raytune_qvl.train.outputs import checkpoint_in, fetch_outputs

    path = last.get(CHECKPOINT_PATH_KEY)
    if not (last.get("finished") and path):
        return []
    try:
        fetched = fetch_outputs(checkpoint_in(storage, path), Path(trial_dir(sweep_dir, trial_id)))
    except Exception as exc:  # noqa: BLE001 - one trial's outputs must not fail the sweep
        log.warning("outputs of trial %s not fetched from %s: %s", trial_id, path, exc)
        return []
    if fetched:
        log.info("trial %s: %s fetched from rank 0's node through storage_path", trial_id, ", ".join(fetched))
    return fetched


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """Tune function trainable. `config` is the sampled part of the point; `context` holds the
    base config, the search space, the values fixed by earlier stages and the data size."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytune_qvl.config.schema import Config
    from raytune_qvl.errors import worker_error
    from raytune_qvl.sweep.points import apply_to_config, eval_steps_for, starting_batch, trial_config
    from raytune_qvl.sweep.records import INFEASIBLE
    from raytune_qvl.sweep.space import CONFIRM_KEY, EFFECTIVE_BATCH, SAMPLER_KEY, SearchSpace
    from raytune_qvl.train.trainer import build_trainer

    space = SearchSpace.model_validate(context["space"])
    base = Config.model_validate(context["base"])
    confirm = config.get(CONFIRM_KEY)  # a confirmation run of a trained config (confirm.py)
    point = {**context["fixed"], **{k: v for k, v in config.items() if k not in (SAMPLER_KEY, CONFIRM_KEY)}}
    trial_id = tune.get_context().get_trial_id()
    batch = int(point.get(EFFECTIVE_BATCH, starting_batch(base, space)))
    if confirm is not None:  # the confirmed config's own effective batch
        t = base.training
        given = confirm["overrides"]  # with the micro batch the search trial fitted at, where it had to
        accum = int(given.get("training.gradient_accumulation_steps", t.gradient_accumulation_steps))
        micro = int(given.get("training.per_device_train_batch_size", t.per_device_train_batch_size))
        batch = micro * space.resources.workers_per_trial * accum
    cfg = trial_config(
        space,
        base,
        point,
        context["lr_batch"],
        trial_dir(str(Path(context["sweep_dir"])), trial_id),
        eval_steps_for(space, context["num_samples"], batch),
        eval_on_start=context.get("eval_on_start", False),
        confirm=confirm,
    )
    retried, name = False, trial_id
    while True:
        trainer = build_trainer(
            cfg,
            None,
            callbacks=[TuneReportCallback()],
            name=name,
            storage_path=train_storage(space),
            verbose=False,
            driver_node=context.get("driver_node"),
        )
        try:
            result = trainer.fit()
            break
        except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; keep their one-line reason
            reason = worker_error(exc)
            if not retried and (is_transient(exc, reason) or is_node_memory(exc, reason)):
                # the same point once more, from its last checkpoint (the same run name and storage):
                # a lost worker or node, or a node that ran low on memory (perhaps for other trials on it)
                print(f"trial {trial_id}: {reason}; retrying once", flush=True)
                retried = True
                continue
            if is_out_of_memory(exc, reason):
                # the same experiment in less memory: half the micro batch, twice the accumulation
                # (the same effective batch, samples and steps), as a new run (no checkpoint of the old)
                t = cfg.training
                micro = smaller_micro(t.per_device_train_batch_size)
                if micro is None:
                    if is_node_memory(exc, reason):  # not proven the point's own need: not infeasible
                        raise TrialFailed(f"the node ran out of memory at micro batch 1 ({reason})") from None
                    raise TrialFailed(f"{INFEASIBLE}: out of memory at micro batch 1 ({reason})") from None
                accum = t.gradient_accumulation_steps * t.per_device_train_batch_size // micro
                print(
                    f"trial {trial_id}: out of memory at micro batch {t.per_device_train_batch_size}; "
                    f"retrying at micro {micro} x accumulation {accum} (the same effective batch)",
                    flush=True,
                )
                fit = {"training.per_device_train_batch_size": micro, "training.gradient_accumulation_steps": accum}
                cfg, name = apply_to_config(cfg, fit, space.source or "search space"), f"{trial_id}-micro{micro}"
                continue
            raise TrialFailed(reason) from None
    diverged = (result.metrics or {}).get("diverged")
    if diverged:
        raise TrialFailed(f"diverged: {diverged}")
