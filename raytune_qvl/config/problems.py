"""pydantic's errors as the project's one-line problems: the file (or "command line") each key
came from, the rule in plain words, and the closest valid key for a misspelt one."""

from __future__ import annotations

import difflib
from typing import Any, Mapping, Sequence

from pydantic import BaseModel

from raytune_qvl.config.schema import SECTIONS, Config
from raytune_qvl.errors import Problem

__all__ = ["closest", "pydantic_problems", "Sources"]


def closest(name: str, options: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def _model_for(loc: Sequence[Any], root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic class holding the last key of a location like ("training", "learning_rat")."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


_RULES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
}


def _rule(err: Mapping[str, Any]) -> str:
    etype = err["type"]
    ctx = err.get("ctx") or {}
    if etype in _RULES:
        return _RULES[etype]
    if etype == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if etype == "greater_than":
        return f"must be > {ctx['gt']}"
    if etype == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if etype == "less_than":
        return f"must be < {ctx['lt']}"
    if etype == "literal_error":
        return f"must be one of {ctx['expected']}"
    if etype == "too_short":
        return "must not be empty"
    return err["msg"][0].lower() + err["msg"][1:]


def pydantic_problems(
    errors: Sequence[Mapping[str, Any]], source_of: Any, root: type[BaseModel] | None = None
) -> list[Problem]:
    """pydantic errors as Problems; unknown keys get the closest valid key as a suggestion."""
    root = root or Config
    problems = []
    for err in errors:
        loc = list(err["loc"])
        key = ".".join(str(p) for p in loc)
        source = source_of(loc)
        if err["type"] == "extra_forbidden":
            section = _model_for(loc, root)
            options = list(section.model_fields) if section else []
            if section is Config:
                options = [s for s in SECTIONS if s not in ("deepspeed",)]
            guess = closest(str(loc[-1]), options)
            rule = "unknown key" + (f"; did you mean {'.'.join(map(str, loc[:-1] + [guess]))!r}?" if guess else "")
            if section is Config and str(loc[-1]) == "lora":
                rule = "the lora section belongs in the LoRA file (--lora_config)"
            problems.append(Problem(source, key, rule, err["input"]))
        elif err["type"] == "float_type" and isinstance(err["input"], str):
            problems.append(
                Problem(
                    source, key, "must be a number, not a quoted string (write 2.0e-4 or 2e-4 unquoted)", err["input"]
                )
            )
        else:
            problems.append(Problem(source, key, _rule(err), err["input"]))
    return problems


class Sources:
    """Maps a key location to the file (or command line) it came from."""

    def __init__(self, files: Mapping[str, str], overridden: set[str]):
        self.files = files
        self.overridden = overridden

    def __call__(self, loc: Sequence[Any]) -> str:
        dotted = ".".join(str(p) for p in loc)
        for key in self.overridden:
            if dotted == key or dotted.startswith(key + "."):
                return "command line"
        return self.files.get(str(loc[0]), "command line") if loc else "command line"
