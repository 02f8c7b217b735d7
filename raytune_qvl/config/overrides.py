"""`section.key=value` overrides and the dotted-key arithmetic on nested mappings."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from raytune_qvl.config.files import parse_yaml_text
from raytune_qvl.errors import ConfigError, Problem

__all__ = ["parse_override", "apply_overrides", "flatten"]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=1e-4` -> (["training", "learning_rate"], 0.0001). Values are YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")) or "." not in key:
        raise ConfigError(
            [
                Problem(
                    "command line",
                    text,
                    "an override is section.key=value, e.g. training.learning_rate=1e-4",
                    show_value=False,
                )
            ]
        )
    value = parse_yaml_text(raw, f"command line {text!r}") if raw.strip() else None
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[tuple[list[str], Any]]) -> None:
    """Set each dotted key in a nested dict, creating intermediate mappings."""
    for parts, value in overrides:
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
