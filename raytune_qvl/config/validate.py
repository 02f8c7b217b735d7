"""Checks across keys and files, each naming the file, the key, the value and the rule: image
sizes, the best-model metric, precision, referenced files, resources, and the DeepSpeed JSON
against the training config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel

from raytune_qvl.config.batch_math import BatchMathError
from raytune_qvl.config.deepspeed import check_deepspeed
from raytune_qvl.config.problems import Sources, closest
from raytune_qvl.config.schema import (
    EVAL_METRICS,
    REPORT_TO,
    DataConfig,
    EnvironmentConfig,
    EvaluationConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    RayConfig,
    TrainingConfig,
    metric_reported,
)
from raytune_qvl.errors import Problem

__all__ = ["validate_config"]


def validate_config(
    sections: Mapping[str, BaseModel],
    ds_dict: Mapping[str, Any],
    source_of: Sources,
    *,
    check_files: bool = True,
    world_size: int | None = None,
) -> list[Problem]:
    """Checks across keys and files. Each runs only if the sections it needs parsed."""
    problems: list[Problem] = []

    def add(loc: list[str], rule: str, value: Any = None, show_value: bool = True) -> None:
        problems.append(Problem(source_of(loc), ".".join(loc), rule, value, show_value))

    data: DataConfig | None = sections.get("data")  # type: ignore[assignment]
    training: TrainingConfig | None = sections.get("training")  # type: ignore[assignment]
    model: ModelConfig | None = sections.get("model")  # type: ignore[assignment]
    env: EnvironmentConfig | None = sections.get("environment")  # type: ignore[assignment]
    output: OutputConfig | None = sections.get("output")  # type: ignore[assignment]
    ray: RayConfig | None = sections.get("ray")  # type: ignore[assignment]
    evaluation: EvaluationConfig | None = sections.get("evaluation")  # type: ignore[assignment]
    lora: LoraConfig | None = sections.get("lora")  # type: ignore[assignment]

    if data is not None:
        if data.min_image_size > data.max_image_size:
            add(
                ["data", "min_image_size"],
                f"must be <= data.max_image_size ({data.max_image_size})",
                data.min_image_size,
            )
        if data.image_factor % 14:
            add(
                ["data", "image_factor"],
                "must be a multiple of the 14-pixel patch (Qwen2.5-VL uses 28)",
                data.image_factor,
            )
        if check_files:
            _check_file(add, ["data", "train_path"], data.train_path, "training data")
            if data.eval_path is not None:
                _check_file(add, ["data", "eval_path"], data.eval_path, "eval data")
            if data.test_path is not None:
                _check_file(add, ["data", "test_path"], data.test_path, "test data")

    if training is not None:
        metric = training.metric_for_best_model
        if metric not in EVAL_METRICS:
            guess = closest(metric, list(EVAL_METRICS))
            add(
                ["training", "metric_for_best_model"],
                f"not a metric the loop reports; one of {', '.join(EVAL_METRICS)}"
                + (f" (did you mean {guess!r}?)" if guess else ""),
                metric,
            )
        else:
            if training.greater_is_better is not None and training.greater_is_better != (EVAL_METRICS[metric] == "max"):
                add(
                    ["training", "greater_is_better"],
                    f"contradicts {metric}, where {'higher' if EVAL_METRICS[metric] == 'max' else 'lower'} is better",
                    training.greater_is_better,
                )
            if evaluation is not None:
                rule = metric_reported(metric, evaluation)
                if rule:
                    add(["training", "metric_for_best_model"], rule, metric)
        if training.logging_steps > training.eval_steps:
            add(
                ["training", "logging_steps"],
                f"must be <= training.eval_steps ({training.eval_steps})",
                training.logging_steps,
            )

    if lora is not None:
        lora_run = training is None or training.finetuning_type == "lora"
        if training is not None and training.freeze_vision_tower and lora.vision_lora.enabled and lora_run:
            rule = "contradicts training.freeze_vision_tower = true; turn one of them off"
            add(["lora", "vision_lora", "enabled"], rule, True)

    if env is not None:
        if env.bf16 and env.fp16:
            add(["environment", "fp16"], "bf16 and fp16 cannot both be true; keep one", env.fp16)
        if model is not None:
            want = "bfloat16" if env.bf16 else "float16" if env.fp16 else "float32"
            if model.torch_dtype != want and not (env.bf16 and env.fp16):
                add(
                    ["model", "torch_dtype"],
                    f"must be {want} to match environment.bf16={str(env.bf16).lower()}, fp16={str(env.fp16).lower()}",
                    model.torch_dtype,
                )
        if env.deepspeed is None:
            add(
                ["environment", "deepspeed"],
                "a DeepSpeed config is required: pass --deepspeed or set environment.deepspeed",
                None,
            )

    if model is not None and check_files and model.name.startswith(("/", "./", "../", "~")):
        path = Path(model.name).expanduser()
        if not (path / "config.json").exists():
            add(["model", "name"], "local model folder not found or has no config.json", model.name)

    if output is not None and output.report_to not in REPORT_TO:
        add(["output", "report_to"], f"must be one of {', '.join(REPORT_TO)}", output.report_to)

    if ray is not None:
        gpus = (ray.resources_per_worker or {}).get("GPU", 0)
        if gpus and not ray.use_gpu:
            add(["ray", "resources_per_worker"], "asks for GPUs but ray.use_gpu is false", ray.resources_per_worker)
        for key, amount in (ray.resources_per_worker or {}).items():
            if amount < 0:
                add(["ray", "resources_per_worker", key], "must be >= 0", amount)
        if ray.use_gpu and ray.num_workers > 1 and gpus and gpus != int(gpus):
            rule = "must be a whole number with several workers (a fraction puts two NCCL ranks on one GPU)"
            add(["ray", "resources_per_worker", "GPU"], rule, gpus)

    if ds_dict and training is not None and env is not None and check_files and not problems:
        workers = world_size or (ray.num_workers if ray is not None else 1)
        try:
            for loc, rule, value in check_deepspeed(ds_dict, training, env, workers):
                problems.append(Problem(_ds_source(env, source_of), loc, rule, value))
        except BatchMathError as exc:
            problems.append(Problem(_ds_source(env, source_of), "", str(exc), show_value=False))
    return problems


def _ds_source(env: EnvironmentConfig, source_of: Sources) -> str:
    return env.deepspeed or source_of(["environment", "deepspeed"])


def _check_file(add: Any, loc: list[str], path: str, what: str) -> None:
    p = Path(path).expanduser()
    if not p.exists():
        add(loc, f"{what} file not found", path)
    elif p.is_dir():
        add(loc, f"{what} must be a file, not a folder", path)
