"""Search-space files: the schema (Optuna's domain words), the priority stages and the grid of a
finite domain. Pure: no torch, Ray or Optuna.

A file names the base config files, the task's starting point (overrides), the parameters in
priority order with Optuna-style domains, the strategy, trials per stage, metric and mode,
ASHA, resources per trial, MLflow and storage. See search_spaces/ocr_doc.yaml; `load.py` reads
and validates one.
"""

from __future__ import annotations

import itertools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from raytune_qvl.config.schema import field_at

__all__ = [
    "EFFECTIVE_BATCH",
    "LR_FACTOR",
    "LR_KEY",
    "RANK_KEY",
    "EPOCHS_KEY",
    "SAMPLER_KEY",
    "CONFIRM_KEY",
    "Domain",
    "Confirm",
    "SearchSpace",
    "Stage",
    "stages",
    "grid",
    "param_type",
]

EFFECTIVE_BATCH = "effective_batch"  # a derived parameter: it becomes gradient accumulation
LR_FACTOR = "lr_factor"  # the local search around the linearly scaled learning rate
LR_KEY = "training.learning_rate"
RANK_KEY = "lora.r"
EPOCHS_KEY = "training.num_epochs"
SAMPLER_KEY = "sampler"  # in a suggestion: what made it (grid, random, TPE); not a parameter
CONFIRM_KEY = "confirm"  # in a confirmation run's config: {of, overrides, seed}; not a parameter


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Domain(_Strict):
    """Optuna's words: `choices`, or `low`/`high` with `log` or `step`."""

    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def values(self) -> list[Any] | None:
        """Every value of a finite domain (choices, or an integer range with a step)."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is not None and self.low is not None and self.high is not None:
            n = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(n + 1)]
        return None

    def extremes(self) -> list[Any]:
        return self.values() or [self.low, self.high]

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this domain can suggest (a choice, or in the range on its step)."""
        if self.choices is not None:
            return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float) or self.low is None or self.high is None:
            return False
        tol = 1e-9 * max(abs(self.low), abs(self.high), 1e-12)
        if not self.low - tol <= value <= self.high + tol:
            return False
        return self.step is None or abs((value - self.low) / self.step - round((value - self.low) / self.step)) < 1e-6


class BaseFiles(_Strict):
    config: str  # training YAML
    lora_config: str | None = None
    deepspeed: str | None = None


class LrScaling(_Strict):
    # lr_new = lr_base x (B_new / B_base) ** p: p = 1/2 (sqrt, Adam's rule), 1 (linear, SGD's), 0 (none);
    # auto: the base DeepSpeed optimizer's (linear for SGD, sqrt for Adam and the other adaptive ones)
    rule: Literal["auto", "sqrt", "linear", "none"] = "auto"
    local_search: float = Field(0.5, ge=0.0, le=4.0)  # then a factor in [1/(1+w), 1+w], log-uniform; 0: none


class Asha(_Strict):
    enabled: bool = True  # false: every trial runs its full budget (a baseline)
    time_attr: Literal["epoch", "samples_seen"] = "epoch"  # budget-fair across batch sizes
    grace_period: float = Field(1.0, gt=0)  # in time_attr units
    max_t: float | None = Field(None, gt=0)  # None: the longest trial of the stage
    reduction_factor: float = Field(3.0, ge=2)
    brackets: int = Field(1, ge=1)


class Resources(_Strict):
    workers_per_trial: int = Field(1, ge=1)  # Ray Train workers (DeepSpeed world size) per trial
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)  # with use_gpu
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = (
        "PACK"  # a trial's workers over nodes
    )
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: from the cluster's resources
    # the memory a worker has, for the pre-flight estimate's warnings (GPU memory per GPU with
    # use_gpu, else host memory); None: this machine's GPU, or its host memory over the workers at once
    memory_per_worker_gb: float | None = Field(None, gt=0)


class Confirm(_Strict):
    """The top configs trained again with other seeds: the winner is chosen by the mean, and its
    score on the held-out test split (data.test_path) is the sweep's reported result."""

    top_k: int = Field(3, ge=0)  # configs confirmed (0: none)
    seeds: int = Field(2, ge=0)  # extra runs of each, with environment.seed (and the data order) moved


class Cost(_Strict):
    """The front of the metric against a trial's cost (sweep/cost.py): which measure, and how close
    to the best a cheaper config must be to be named."""

    measure: Literal["auto", "worker_seconds", "gpu_seconds", "samples", "trainable_params", "peak_memory_gb"] = (
        "auto"  # auto: gpu_seconds with use_gpu, else worker_seconds
    )
    within: float = Field(0.01, ge=0)  # relative: the cheapest config within within x |best| of the best


class Mlflow(_Strict):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str | None = None  # None: raytune_qvl-<name>


class SearchSpace(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    base: BaseFiles
    overrides: dict[str, Any] = Field(default_factory=dict)  # the task's starting point: section.key: value
    parameters: dict[str, Domain] = Field(min_length=1)  # in priority order (the file's order)
    strategy: Literal["staged", "joint", "random"] = "staged"  # random: a baseline without TPE
    trials_per_stage: int | dict[str, int] = 4
    joint_trials: int = Field(16, ge=1)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    lora_alpha_ratio: float = Field(2.0, gt=0)  # lora_alpha = ratio x r
    lr_scaling: LrScaling = LrScaling()
    evals_per_epoch: float = Field(4.0, gt=0)  # evaluations (ASHA decision points) per epoch
    # evaluations between a trial's engine checkpoints, which a restarted worker group or a resumed
    # sweep continues from (0: none before its last step; a restarted trial starts over)
    checkpoint_every: int = Field(1, ge=0)
    asha: Asha = Asha()
    resources: Resources = Resources()
    mlflow: Mlflow = Mlflow()
    storage_path: str = "./ray_results"  # shared storage or a cloud URI on a multi-node cluster
    shared_storage: bool = False  # storage_path is a filesystem every node mounts (checked at start)
    output_dir: str = "./outputs/sweeps"  # <output_dir>/<name>: trials, best/, sweep state
    keep_best_adapters: int = Field(3, ge=0)
    confirm: Confirm = Confirm()
    cost: Cost = Cost()
    seed: int = 42
    source: str = Field("", exclude=True)  # the file it came from (set by the loader)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def tune_storage(self) -> str:
        """Where this sweep's Tune experiments (one per stage) and trial runs live."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or f"raytune_qvl-{self.name}"

    def trials_for(self, stage: str) -> int:
        if isinstance(self.trials_per_stage, int):
            return self.trials_per_stage
        return self.trials_per_stage.get(stage, 4)


@dataclass(frozen=True)
class Stage:
    """One Tuner run: the parameters it searches (the rest fixed at the best so far)."""

    index: int
    name: str
    params: dict[str, Domain]
    trials: int

    @property
    def label(self) -> str:
        return f"stage{self.index}-{self.name.replace('.', '_')}"


def stages(space: SearchSpace) -> list[Stage]:
    """`staged`: one stage per parameter in the file's (priority) order; the effective-batch
    stage also searches a factor around the linearly scaled learning rate. `joint` (TPE) and
    `random`: one stage over every parameter."""
    if space.strategy in ("joint", "random"):
        return [Stage(1, space.strategy, dict(space.parameters), space.joint_trials)]
    out = []
    for i, (key, domain) in enumerate(space.parameters.items(), start=1):
        params = {key: domain}
        if (
            key == EFFECTIVE_BATCH
            and LR_KEY in space.parameters
            and space.lr_scaling.rule != "none"
            and space.lr_scaling.local_search > 0
        ):
            w = space.lr_scaling.local_search
            params[LR_FACTOR] = Domain(low=1 / (1 + w), high=1 + w, log=True)
        out.append(Stage(i, key, params, space.trials_for(key)))
    return out


def grid(domains: Mapping[str, Domain]) -> list[dict[str, Any]] | None:
    """Every combination of finite domains (None if any domain is continuous)."""
    values = {k: d.values() for k, d in domains.items()}
    if any(v is None for v in values.values()):
        return None
    keys = list(values)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values[k] for k in keys))]


def param_type(key: str) -> Any:
    """The Python type a parameter takes (int for the effective batch; None: not a config key)."""
    if key == EFFECTIVE_BATCH:
        return int
    info = field_at(key)
    if info is None:
        return None
    kinds = [k for k in typing.get_args(info.annotation) if k is not type(None)]
    return kinds[0] if len(kinds) == 1 else info.annotation  # an optional number (loraplus_lr_ratio) is a number
