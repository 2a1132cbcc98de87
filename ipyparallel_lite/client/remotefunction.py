"""``@remote``/``@parallel`` (and ``@view.remote``/``@view.parallel``): functions that run
on a view's engines when called."""

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
    ``chunksize`` and ``ordered`` apply to load-balanced views.
    """

    def __init__(self, view: Any, f: Callable, dist: str = "b", block: bool | None = None,
                 chunksize: int | None = None, ordered: bool = True,
                 return_exceptions: bool = False, **flags: Any):
        if dist != "b":
            raise ValueError(f"only block distribution ('b') is supported, not {dist!r}")
        super().__init__(view, f, block=block, **flags)
        self.dist = dist
        # chunksize and ordered only mean something to a load-balanced view's map: passed
        # on only when set, so that a DirectView's map is not handed options it refuses
        self.map_options: dict[str, Any] = {"return_exceptions": return_exceptions}
        if chunksize is not None:
            self.map_options["chunksize"] = chunksize
        if not ordered:
            self.map_options["ordered"] = False

    def __call__(self, *sequences: Any, **kwargs: Any) -> Any:
        return self.map(*sequences, **kwargs)

    def map(self, *sequences: Any, **kwargs: Any) -> Any:
        block = self.view.block if self.block is None else self.block
        with self.view.temp_flags(**self.flags):
            return self.view.map(self.func, *sequences, block=block, **{**self.map_options, **kwargs})


def remote(view: Any, block: bool | None = None, **flags: Any) -> Callable[[Callable], RemoteFunction]:
    """Decorator: calling the function runs it on ``view`` (``view.apply`` with ``flags``).

    ``@ipp.remote(rc[:])`` is the same as ``@rc[:].remote()``.
    """

    def remote_function(f: Callable) -> RemoteFunction:
        return RemoteFunction(view, f, block=block, **flags)

    return remote_function


def parallel(view: Any, dist: str = "b", block: bool | None = None, ordered: bool = True,
             **flags: Any) -> Callable[[Callable], ParallelFunction]:
    """Decorator: calling the function on sequences maps it over ``view``'s engines.

    ``@ipp.parallel(rc[:])`` is the same as ``@rc[:].parallel()``.
    """

    def parallel_function(f: Callable) -> ParallelFunction:
        return ParallelFunction(view, f, dist=dist, block=block, ordered=ordered, **flags)

    return parallel_function
