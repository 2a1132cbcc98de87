"""Progress of long waits (engines starting, results arriving), shown only to a person.

Drawn by ``tqdm.auto``, as ipyparallel does: a widget in Jupyter, a bar on stderr in a
terminal, nothing under pytest, CI or a pipe. (``tqdm.auto`` alone takes any process
that imported ipykernel for a notebook; only a process that *is* a kernel gets the
widget here.) The bar reads ``label: done/total unit``, then the bar itself. The bar opens at the first update, so a
wait that ends at once shows nothing, and always closes on the last count it was
given, even when that update came faster than ``min_interval``.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def _in_kernel() -> bool:
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return getattr(shell, "kernel", None) is not None


def is_interactive() -> bool:
    """Whether someone watches: a Jupyter kernel, or a terminal on stderr."""
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
    """``with Progress(total=4, label="engines") as p: p.update(2)``.

    ``update(done)`` sets the count (it does not add to it). ``enabled`` defaults to
    :func:`is_interactive`; redraws come at most every ``min_interval`` seconds unless
    ``force``.
    """

    def __init__(self, total: int, label: str = "", unit: str = "", enabled: bool | None = None,
                 min_interval: float = 0.1):
        self.total, self.label, self.unit = total, label, unit
        self.enabled = is_interactive() if enabled is None else enabled
        self.min_interval = min_interval
        self.done = 0
        self._last = 0.0
        self._bar: Any = None

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        if self._bar is None:
            if _in_kernel():
                from tqdm.auto import tqdm
            else:
                from tqdm.std import tqdm
            form = ("{desc}: " if self.label else "") + "{n}/{total}" + (" {unit}" if self.unit else "")
            self._bar = tqdm(total=self.total, desc=self.label, unit=self.unit, file=sys.stderr,
                             dynamic_ncols=True, leave=True,
                             bar_format=form + " {bar} {percentage:3.0f}% [{elapsed}]")
        self._draw()

    def _draw(self) -> None:
        self._bar.n = self.done
        self._bar.refresh()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._draw()  # the last count given, even if it came too soon to be drawn
            self._bar.close()
            self._bar = None
