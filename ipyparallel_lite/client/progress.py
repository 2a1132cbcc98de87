"""One-line progress for long waits, shown only to a person.

Interactive means a terminal on stderr or a Jupyter kernel; under pytest, CI or a
pipe nothing is printed.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def is_interactive() -> bool:
    stream = sys.stderr
    if stream is None:
        return False
    if type(stream).__module__.startswith("ipykernel"):
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:
        return False


class Progress:
    """``with Progress(total=4, label="engines") as p: p.update(2)``."""

    def __init__(self, total: int, label: str = "", unit: str = "", enabled: bool | None = None,
                 min_interval: float = 0.1):
        self.total, self.label, self.unit = total, label, unit
        self.enabled = is_interactive() if enabled is None else enabled
        self.min_interval = min_interval
        self._last = 0.0
        self._shown = False
        self._start = time.monotonic()

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        elapsed = now - self._start
        sys.stderr.write(f"\r{self.label}: {done}/{self.total} {self.unit} ({elapsed:.1f}s)".rstrip() + " ")
        sys.stderr.flush()
        self._shown = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
