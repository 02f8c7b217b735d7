"""One Tune trial, the Ray Train V2 way: a function trainable that builds a TorchTrainer for
its sampled point and reports through TuneReportCallback (rank 0's metrics reach Tune)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["TrialFailed", "run_trial", "trial_dir", "train_storage"]


class TrialFailed(RuntimeError):
    """A trial that could not finish: its one-line reason is what MLflow and the table show."""


def trial_dir(sweep_dir: str, trial_id: str) -> str:
    return str(Path(sweep_dir) / "trials" / trial_id)


def train_storage(space: Any) -> str:
    """Where the trials' Ray Train runs (and their checkpoints) live."""
    return f"{space.tune_storage}/trials"


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """Tune function trainable. `config` is the sampled part of the point; `context` holds the
    base config, the search space, the values fixed by earlier stages and the data size."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytune_qvl.config.schema import Config
    from raytune_qvl.errors import worker_error
    from raytune_qvl.sweep.points import eval_steps_for, starting_batch, trial_config
    from raytune_qvl.sweep.space import EFFECTIVE_BATCH, SearchSpace
    from raytune_qvl.train.trainer import build_trainer

    space = SearchSpace.model_validate(context["space"])
    base = Config.model_validate(context["base"])
    point = {**context["fixed"], **config}
    trial_id = tune.get_context().get_trial_id()
    batch = int(point.get(EFFECTIVE_BATCH, starting_batch(base, space)))
    cfg = trial_config(
        space,
        base,
        point,
        context["lr_batch"],
        trial_dir(str(Path(context["sweep_dir"])), trial_id),
        eval_steps_for(space, context["num_samples"], batch),
    )
    trainer = build_trainer(
        cfg, None, callbacks=[TuneReportCallback()], name=trial_id, storage_path=train_storage(space), verbose=False
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; keep their one-line reason
        raise TrialFailed(worker_error(exc)) from None
    diverged = (result.metrics or {}).get("diverged")
    if diverged:
        raise TrialFailed(f"diverged: {diverged}")
