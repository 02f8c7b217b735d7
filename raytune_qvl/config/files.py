"""Reading the config files: YAML through a safe loader that reads YAML 1.2 floats (`2e-4` is a
number, not a string) and refuses duplicate keys, JSON that refuses duplicate keys. Every
failure is one `ConfigError` line naming the file (and line) and what to do."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from raytune_qvl.errors import ConfigError, Problem

__all__ = ["parse_yaml_text", "load_yaml", "load_json"]


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 floats (`2e-4` is a number, not a string) and no duplicate keys."""


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, regexp)
        for tag, regexp in _Loader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise ConfigError([Problem(str(path), "", f"{what} not found: check the path", show_value=False)])
    if path.is_dir():
        raise ConfigError([Problem(str(path), "", f"{what} is a folder, expected a file", show_value=False)])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(str(path), "", f"not UTF-8 text (byte {exc.start}): save it as UTF-8", show_value=False)]
        ) from None
    except OSError as exc:
        raise ConfigError([Problem(str(path), "", f"cannot read: {exc.strerror}", show_value=False)]) from None
    if not text.strip():
        raise ConfigError([Problem(str(path), "", f"{what} is empty", show_value=False)])
    return text


def parse_yaml_text(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([Problem(where, "", f"invalid YAML: {problem}", show_value=False)]) from None


def load_yaml(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A YAML file that must hold a mapping, read safely."""
    path = Path(path)
    data = parse_yaml_text(_read_text(path, what), str(path))
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "", f"{what} must be a mapping of sections", type(data).__name__)])
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_json(path: str | os.PathLike, what: str = "DeepSpeed config") -> dict[str, Any]:
    path = Path(path)
    text = _read_text(path, what)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [Problem(f"{path}:{exc.lineno}:{exc.colno}", "", f"invalid JSON: {exc.msg}", show_value=False)]
        ) from None
    except ValueError as exc:
        raise ConfigError([Problem(str(path), "", f"invalid JSON: {exc}", show_value=False)]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "", f"{what} must be a JSON object", type(data).__name__)])
    return data
