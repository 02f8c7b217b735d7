"""User-facing errors: one line per problem, naming the file, the key, the value and the rule; and
the one line that says why a Ray worker or trial failed."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

__all__ = ["Problem", "UserError", "ConfigError", "DataError", "run_cli", "worker_error", "trial_error"]

log = logging.getLogger("raytune_qvl")

EXIT_USAGE = 2  # config, search-space and command-line errors (argparse uses 2 as well)
EXIT_RUNTIME = 1  # data errors and failed runs


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Problem:
    """One validation failure. `source` is a file path or "command line"."""

    source: str
    key: str
    rule: str
    value: Any = None
    show_value: bool = True

    def __str__(self) -> str:
        where = f"{self.source}: {self.key}" if self.key else self.source
        got = f" (got {_short(self.value)})" if self.show_value else ""
        return f"{where}: {self.rule}{got}"


class UserError(Exception):
    """An error in what the user gave us: printed as lines, no traceback."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: Sequence[Problem | str]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [f"error: {p}" for p in self.problems]


class ConfigError(UserError):
    """A configuration, search-space or command-line error (exit code 2)."""


class DataError(UserError):
    """The data cannot be trained on (too many bad records, nothing left, unreadable file)."""

    exit_code = EXIT_RUNTIME


T = TypeVar("T")


def run_cli(main: Callable[[], T]) -> T:
    """Run a CLI entry point: user errors become `error:` lines and an exit code, not tracebacks."""
    try:
        return main()
    except UserError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def worker_error(exc: BaseException) -> str:
    """The first Ray Train worker's error (or the exception's last line), in one line."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        text = str(err).strip().splitlines()
        last = next((line for line in reversed(text) if line.strip()), type(err).__name__)
        return f"worker {rank}: {last.strip()[:300]}"
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:300]


def trial_error(trial: Any) -> str:
    """The last meaningful line of a Tune trial's error (the TrialFailed message when it is ours)."""
    text = ""
    path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
    if path and Path(str(path)).is_file():
        text = Path(str(path)).read_text(errors="replace")
    text = text or str(getattr(trial, "error_msg", "") or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "TrialFailed:" in line:
            return line.split("TrialFailed:", 1)[1].strip()[:500]
    return (lines[-1] if lines else "unknown error")[:500]
