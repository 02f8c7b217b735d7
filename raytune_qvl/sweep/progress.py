"""The sweep's terminal view, one line per event: a trial starts (with the point it trains), reports
an evaluation (its epoch and metric), and ends — completed, stopped by ASHA, or failed with its
one-line reason. Worker output stays in Ray's session logs, and Tune's own trial-error traceback
stays in the trial's error file and its MLflow run: a stopped trial prints no stack dump."""

from __future__ import annotations

import json
import logging
from typing import Any

from ray.tune import Callback

from raytune_qvl.errors import trial_error
from raytune_qvl.runtime import WARNINGS_KEY

__all__ = ["SweepProgress", "quiet_trial_errors"]

# the overrides a line shows, with their short names
_SHOWN = {
    "training.learning_rate": "lr",
    "lora.r": "r",
    "training.gradient_accumulation_steps": "accum",
    "training.num_epochs": "epochs",
}


class _Drop(logging.Filter):
    """Drops the records whose message starts with one of `prefixes` (known noise, by message)."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# logger -> the messages of it that a sweep's terminal does without
_NOISE = {
    # a failed trial's whole traceback: SweepProgress prints its reason in one line; the traceback
    # stays in the trial's error file and its MLflow run
    "ray.tune.execution.tune_controller": ("Trial task failed for trial",),
    # Optuna's brute-force (grid) sampler stops its study when every point is tried: that is the plan
    "ray.tune.search.optuna.optuna_search": ("`Study.stop` is supposed to be invoked",),
}


def quiet_trial_errors() -> None:
    """Known noise of Tune and Optuna out of the sweep's terminal, by message (never whole levels)."""
    import warnings

    for name, prefixes in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(*prefixes))
    warnings.filterwarnings("ignore", message="BruteForceSampler is experimental")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created
    except ImportError:
        pass


class SweepProgress(Callback):
    """`overrides(sampled) -> config overrides` names what a trial trains (the sweep's PointResolver);
    `micro`: the base's micro batch (a trial that ran out of memory halves it, and says so);
    `warned`: the workers' warnings shown so far, shared by the sweep's stages (each shows once)."""

    def __init__(
        self, stage: str, metric: str, overrides: Any, micro: int | None = None, *, warned: set[str] | None = None
    ):
        self.stage, self.metric, self.overrides, self.micro = stage, metric, overrides, micro
        self.warned = warned if warned is not None else set()

    def _micro(self, trial: Any) -> int | None:
        try:
            return self.overrides(trial.config).get("training.per_device_train_batch_size", self.micro)
        except Exception:  # noqa: BLE001
            return self.micro

    def _say(self, trial: Any, text: str) -> None:
        print(f"  [{self.stage}] {trial.trial_id}  {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            chosen = self.overrides(trial.config)
        except Exception:  # noqa: BLE001 - the trial itself will report a point that cannot be built
            chosen = dict(trial.config)
        point = ", ".join(f"{short} {_fmt(chosen[key])}" for key, short in _SHOWN.items() if key in chosen)
        sampler = trial.config.get("sampler")
        self._say(trial, f"started{f' ({sampler})' if sampler else ''}: {point}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        for key, text in json.loads(result.get(WARNINGS_KEY) or "[]"):  # the worker's output is in Ray's log files
            if key not in self.warned:
                self.warned.add(key)
                self._say(trial, f"warning: {text}")
        if result.get(self.metric) is not None:
            self._say(trial, f"epoch {result.get('epoch', 0):.2f}  {self.metric} {result[self.metric]:.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        value = last.get(self.metric)
        shown = f" ({self.metric} {value:.4f})" if isinstance(value, (int, float)) else ""
        if last.get("finished"):
            micro = last.get("micro_batch")
            fitted = ""
            given = self._micro(trial)
            if micro is not None and given is not None and micro != given:
                accum = last.get("accumulation_steps")
                fitted = f" (out of memory at micro {given}: ran at micro {micro} x accumulation {accum})"
            self._say(trial, f"completed{shown}{fitted}")
        else:
            self._say(trial, f"stopped by ASHA at epoch {last.get('epoch', 0):.2f}{shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trial, f"failed: {trial_error(trial)}")


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
