"""Batch, step and learning-rate arithmetic: pure functions, each with its formula."""

from __future__ import annotations

import math

__all__ = [
    "BatchMathError",
    "effective_batch",
    "accumulation_for",
    "scale_lr",
    "steps_per_epoch",
    "total_steps",
    "warmup_steps",
]


class BatchMathError(ValueError):
    """A batch setting that cannot be realised (a target that does not divide, too little data)."""


def effective_batch(micro: int, workers: int, accum: int) -> int:
    """Samples per optimizer step: micro x workers x accum.

    >>> effective_batch(micro=2, workers=4, accum=8)
    64
    """
    return micro * workers * accum


def accumulation_for(target: int, micro: int, workers: int) -> int:
    """Gradient-accumulation steps that reach an effective batch: target / (micro x workers).

    >>> accumulation_for(target=64, micro=2, workers=4)
    8
    """
    per_step = micro * workers
    if target < per_step or target % per_step:
        raise BatchMathError(
            f"effective batch {target} is not a multiple of micro batch {micro} x {workers} workers = {per_step}"
        )
    return target // per_step


def scaling_rule_for(optimizer_type: str) -> str:
    """The learning-rate scaling rule of an optimizer (DeepSpeed's `optimizer.type`): linear for
    SGD (Goyal et al., 2017), the square root for Adam and the other adaptive optimizers (Malladi
    et al., 2022).

    >>> scaling_rule_for("AdamW"), scaling_rule_for("MuSGD")
    ('sqrt', 'linear')
    """
    return "linear" if "sgd" in optimizer_type.lower() else "sqrt"


def scale_lr(lr: float, new_batch: int, base_batch: int, rule: str = "linear") -> float:
    """A learning rate moved to another effective batch: lr x (B_new / B_base) ** p, with p = 1 for
    the linear rule (SGD's), 1/2 for the square-root rule (Adam's: Malladi et al. 2022, "On the
    SDEs and scaling rules for adaptive gradient algorithms"), 0 for none.

    >>> scale_lr(2e-4, new_batch=64, base_batch=32)
    0.0004
    >>> round(scale_lr(2e-4, new_batch=128, base_batch=32, rule="sqrt"), 10)
    0.0004
    """
    power = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}[rule]
    return lr * (new_batch / base_batch) ** power


def steps_per_epoch(num_samples: int, micro: int, workers: int, accum: int) -> int:
    """Optimizer steps in one pass: floor(num_samples / effective batch).

    The remainder (fewer samples than one effective batch) is left out of that epoch; the
    order is reshuffled every epoch, so no sample is left out every time.

    >>> steps_per_epoch(1000, micro=2, workers=4, accum=8)
    15
    """
    batch = effective_batch(micro, workers, accum)
    steps = num_samples // batch
    if steps < 1:
        raise BatchMathError(
            f"{num_samples} training samples are fewer than one effective batch of {batch} "
            f"(micro {micro} x {workers} workers x accumulation {accum}): lower the batch or add data"
        )
    return steps


def total_steps(
    num_samples: int, micro: int, workers: int, accum: int, epochs: int, max_steps: int | None = None
) -> int:
    """Optimizer steps of the whole run: steps_per_epoch x epochs, or max_steps when set.

    >>> total_steps(1000, micro=2, workers=4, accum=8, epochs=3)
    45
    """
    if max_steps is not None:
        return max_steps
    return steps_per_epoch(num_samples, micro, workers, accum) * epochs


def warmup_steps(total: int, ratio: float) -> int:
    """Warmup optimizer steps: ceil(total x ratio).

    >>> warmup_steps(45, 0.05)
    3
    """
    return math.ceil(total * ratio)
