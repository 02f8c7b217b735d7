"""Loading a run's configuration: the training YAML + LoRA YAML + DeepSpeed JSON merged with
command-line overrides, validated once (every problem at once), with paths made absolute
(Ray workers run elsewhere).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ValidationError

from raytune_qvl.config.files import load_json, load_yaml
from raytune_qvl.config.overrides import apply_overrides, parse_override
from raytune_qvl.config.problems import Sources, closest, pydantic_problems
from raytune_qvl.config.schema import SECTIONS, TRAINING_SECTIONS, Config, ConfigPaths, EnvironmentConfig
from raytune_qvl.config.validate import validate_config
from raytune_qvl.errors import ConfigError, Problem

__all__ = ["load_config"]

log = logging.getLogger("raytune_qvl")


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().absolute())


def load_config(
    config_path: str | os.PathLike | None,
    lora_path: str | os.PathLike | None = None,
    deepspeed_path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    check_files: bool = True,
    world_size: int | None = None,
) -> Config:
    """Load, merge and validate. `--deepspeed` (deepspeed_path) wins over `environment.deepspeed`.

    Raises ConfigError listing every problem found. With `check_files`, referenced files
    (data, DeepSpeed JSON, a local model folder) must exist and the DeepSpeed JSON must be
    consistent with the training config.
    """
    problems: list[Problem] = []
    training_raw: dict[str, Any] = load_yaml(config_path, "training config") if config_path else {}
    lora_raw: dict[str, Any] = load_yaml(lora_path, "LoRA config") if lora_path else {}
    parsed_overrides = [parse_override(o) for o in overrides]

    files: dict[str, str] = {}
    for section in TRAINING_SECTIONS:
        files[section] = str(config_path) if config_path else "defaults"
    files["lora"] = str(lora_path) if lora_path else "defaults"

    # sections that are not ours, in the wrong file, or misspelt
    for key in list(training_raw):
        if key not in TRAINING_SECTIONS:
            guess = closest(str(key), TRAINING_SECTIONS)
            rule = (
                "the lora section belongs in the LoRA file (--lora_config)"
                if key == "lora"
                else "unknown section"
                + (f"; did you mean {guess!r}?" if guess else f"; sections are {', '.join(TRAINING_SECTIONS)}")
            )
            problems.append(Problem(str(config_path), str(key), rule, training_raw.pop(key), show_value=False))
    for key in list(lora_raw):
        if key != "lora":
            problems.append(
                Problem(
                    str(lora_path),
                    str(key),
                    "unknown section; the LoRA file holds one section, lora",
                    lora_raw.pop(key),
                    show_value=False,
                )
            )

    tree: dict[str, Any] = {**training_raw, "lora": lora_raw.get("lora", {})}
    for section in list(tree):
        if tree[section] is None:
            tree[section] = {}  # an empty section ("model:") means defaults

    ds_override = [(p, v) for p, v in parsed_overrides if p[0] == "deepspeed"]
    cfg_overrides = [(p, v) for p, v in parsed_overrides if p[0] != "deepspeed"]
    for parts, value in cfg_overrides:
        if parts[0] not in SECTIONS:
            guess = closest(parts[0], SECTIONS)
            problems.append(
                Problem(
                    "command line",
                    ".".join(parts),
                    "unknown section" + (f"; did you mean {guess!r}?" if guess else ""),
                    value,
                )
            )
    cfg_overrides = [(p, v) for p, v in cfg_overrides if p[0] in SECTIONS]
    apply_overrides(tree, cfg_overrides)
    sources = Sources(files, {".".join(p) for p, _ in cfg_overrides})

    # the DeepSpeed JSON: --deepspeed, else environment.deepspeed
    env_section = tree.get("environment") if isinstance(tree.get("environment"), dict) else {}
    env_ds = env_section.get("deepspeed", EnvironmentConfig.model_fields["deepspeed"].default)
    ds_file = deepspeed_path if deepspeed_path is not None else env_ds
    ds_dict: dict[str, Any] = {}
    if isinstance(ds_file, str | os.PathLike):
        if deepspeed_path is not None:
            tree.setdefault("environment", {})
            if isinstance(tree["environment"], dict):
                tree["environment"]["deepspeed"] = str(deepspeed_path)
        if Path(ds_file).exists() or check_files:
            try:
                ds_dict = load_json(ds_file)
            except ConfigError as exc:
                problems.extend(exc.problems)
    apply_overrides(ds_dict, [(p[1:], v) for p, v in ds_override])

    # each section on its own, so one bad section does not hide the problems of the others
    sections: dict[str, BaseModel] = {}
    for name in TRAINING_SECTIONS + ("lora",):
        raw = tree.get(name, {})
        if not isinstance(raw, dict):
            problems.append(Problem(sources([name]), name, "must be a mapping of keys", raw))
            continue
        try:
            sections[name] = Config.model_fields[name].annotation.model_validate(raw)  # type: ignore[union-attr]
        except ValidationError as exc:
            errors = [{**e, "loc": (name, *e["loc"])} for e in exc.errors()]
            problems.extend(pydantic_problems(errors, sources))

    problems.extend(validate_config(sections, ds_dict, sources, check_files=check_files, world_size=world_size))
    if problems:
        raise ConfigError(problems)
    cfg = Config(
        **sections,
        deepspeed=ds_dict,
        paths=ConfigPaths(
            training=_abs(str(config_path)) if config_path else None,
            lora=_abs(str(lora_path)) if lora_path else None,
            deepspeed=_abs(str(ds_file)) if ds_file else None,
        ),
    )
    if cfg.output.report_to in ("wandb", "tensorboard"):
        log.warning(
            "%s: output.report_to is %s; raytune_qvl tracks runs in MLflow and logs there instead (set mlflow or none)",
            sources(["output", "report_to"]),
            cfg.output.report_to,
        )
    if cfg.model.trust_remote_code:
        log.warning(
            "%s: model.trust_remote_code is true: code from the model repository will run on every worker; "
            "Qwen2.5-VL does not need it",
            sources(["model", "trust_remote_code"]),
        )
    if cfg.training.finetuning_type == "full" and lora_path:
        log.warning(
            "%s: not used: %s sets training.finetuning_type to full (every weight trains, no LoRA)",
            lora_path,
            sources(["training", "finetuning_type"]),
        )
    return _absolute_paths(cfg)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def _absolute_paths(cfg: Config) -> Config:
    data = cfg.data.model_copy(
        update={
            "train_path": _abs(cfg.data.train_path),
            "eval_path": _abs(cfg.data.eval_path),
            "test_path": _abs(cfg.data.test_path),
            "cache_dir": _abs(cfg.data.cache_dir),
        }
    )
    model = cfg.model
    if _looks_like_path(model.name):
        model = model.model_copy(update={"name": _abs(model.name)})
    output = cfg.output.model_copy(update={"dir": _abs(cfg.output.dir), "logging_dir": _abs(cfg.output.logging_dir)})
    environment = cfg.environment.model_copy(update={"deepspeed": _abs(cfg.environment.deepspeed)})
    ray = cfg.ray
    if "://" not in ray.storage_path:
        ray = ray.model_copy(update={"storage_path": _abs(ray.storage_path)})
    return cfg.model_copy(
        update={"data": data, "model": model, "output": output, "environment": environment, "ray": ray}
    )
