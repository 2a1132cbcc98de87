"""``@view.remote`` and ``@view.parallel``: functions that run on a view's engines."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


class RemoteFunction:
    """Calling it applies the wrapped function on the view (``view.apply``)."""

    def __init__(self, view: Any, f: Callable, block: bool | None = None, **flags: Any):
        self.view, self.func, self.block, self.flags = view, f, block, flags
        functools.update_wrapper(self, f)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.view.block if self.block is None else self.block
        with self.view.temp_flags(**self.flags):
            return self.view._really_apply(self.func, args, kwargs, block=block)


class ParallelFunction(RemoteFunction):
    """Calling it on sequences maps the function over them (``view.map``).

    ``f.map(seq)`` does the same, element by element, as in IPython parallel.
    """

    def __init__(self, view: Any, f: Callable, dist: str = "b", block: bool | None = None,
                 **flags: Any):
        if dist != "b":
            raise ValueError(f"only block distribution ('b') is supported, not {dist!r}")
        super().__init__(view, f, block=block, **flags)
        self.dist = dist

    def __call__(self, *sequences: Any, **kwargs: Any) -> Any:
        return self.map(*sequences, **kwargs)

    def map(self, *sequences: Any, **kwargs: Any) -> Any:
        block = self.view.block if self.block is None else self.block
        with self.view.temp_flags(**self.flags):
            return self.view.map(self.func, *sequences, block=block, **kwargs)
