"""Configs written back as files `python -m raytune_qvl.train` runs as they are: a run's resolved
configs (in `final/` and MLflow's `config/`) and a sweep's best (`best/`). Passwords in the
tracking URI are struck out: these files are stored and shared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from raytune_qvl.config.schema import Config
from raytune_qvl.config.uris import redact

__all__ = ["TRAINING_FILE", "LORA_FILE", "DEEPSPEED_FILE", "write_configs"]

TRAINING_FILE = "training_config.yaml"
LORA_FILE = "lora_config.yaml"
DEEPSPEED_FILE = "ds_config.json"


def write_configs(cfg: Config, deepspeed: dict[str, Any], folder: Path, *, header: str = "") -> None:
    """training_config.yaml, lora_config.yaml and ds_config.json of `cfg` into `folder`;
    `header` is a comment line above the training YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    training = cfg.training_dict()
    training["output"]["tracking_uri"] = redact(training["output"]["tracking_uri"])
    comment = f"# {header}\n" if header else ""
    (folder / TRAINING_FILE).write_text(comment + yaml.safe_dump(training, sort_keys=False))
    (folder / LORA_FILE).write_text(yaml.safe_dump(cfg.lora_dict(), sort_keys=False))
    (folder / DEEPSPEED_FILE).write_text(json.dumps(deepspeed, indent=2))
