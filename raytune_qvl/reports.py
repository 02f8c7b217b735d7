"""What a run's reports carry beyond their own metrics: log rows held back and sent with a
later report, so that a worker never waits on Ray for a log line (Ray Train's controller takes
one report per worker per health check, 2 s by default, and a sweep's driver handles every
report on its one thread). Whoever reads reports (the train CLI, the sweep's tracking) unpacks
them with `unpack`."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["HELD_KEY", "pack", "unpack"]

HELD_KEY = "held_reports"  # the log-only rows since the previous report, oldest first


def pack(held: list[dict[str, Any]]) -> str:
    """The held rows as one JSON string: Tune's loggers skip a string, where a list of dicts would
    be taken for a histogram (and warned about)."""
    return json.dumps(held, default=float)


def unpack(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A report as the rows it stands for: the held ones, then itself (without them)."""
    held = result.get(HELD_KEY) or []
    if isinstance(held, str):
        held = json.loads(held)
    return [*held, {k: v for k, v in result.items() if k != HELD_KEY}]
