"""Exceptions of ipyparallel_lite, and their trip from an engine to the client.

The class names and their inheritance are those users of IPython parallel know::

    IPythonError
    └── KernelError
        ├── EngineError
        ├── NoEnginesRegistered
        ├── TaskAborted
        ├── TaskTimeout
        ├── TaskRejectError
        ├── UnmetDependency
        │   └── ImpossibleDependency
        │       ├── DependencyTimeout
        │       └── InvalidDependency
        └── RemoteError
            ├── CompositeError
            └── AlreadyDisplayedError

``TimeoutError`` is the builtin one, re-exported for code that imports it from here.

An exception crosses the wire as a JSON-able *error content* (see ``wrap_exception``)
and becomes a ``RemoteError`` again on the client (see ``unwrap_exception``). When the
content names one of the exceptions the scheduler raises instead of running a task
(``TaskTimeout``, ``DependencyTimeout``...), the client gets an instance of that class
which is also a ``RemoteError``, so both ``except TaskTimeout`` and
``except RemoteError`` catch it.
"""

from __future__ import annotations

import builtins
import os
import sys
import traceback as _tb
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

__all__ = [
    "AlreadyDisplayedError",
    "CompositeError",
    "DependencyTimeout",
    "EngineError",
    "IPythonError",
    "ImpossibleDependency",
    "InvalidDependency",
    "KernelError",
    "NoEnginesRegistered",
    "RemoteError",
    "TaskAborted",
    "TaskRejectError",
    "TaskTimeout",
    "TimeoutError",
    "UnmetDependency",
    "collect_exceptions",
    "unwrap_exception",
    "without_traceback",
    "wrap_exception",
]

#: one (ename, evalue, traceback, engine_info) entry of ``CompositeError.elist``
ErrorTuple = tuple[str, str, str, dict]

NO_TRACEBACK = "No traceback available"


# ---- the hierarchy ----------------------------------------------------------------


class IPythonError(Exception):
    """Base class of every exception defined here."""


class KernelError(IPythonError):
    """Something went wrong in the cluster (controller, scheduler or engines)."""


class EngineError(KernelError):
    """An engine failed to run a task, e.g. it died while running it."""


class NoEnginesRegistered(KernelError):
    """The operation needs engines, and none are registered with the controller."""

    def __str__(self) -> str:
        if self.args:
            return str(self.args[0])
        return (
            "This operation needs engines, and none are registered yet."
            " Use client.wait_for_engines(n) to wait until n engines are up."
        )


class TaskAborted(KernelError):
    """The task was aborted before it ran."""


class TaskTimeout(KernelError):
    """The task did not start before its timeout."""


# Same object as the builtin: ``except TimeoutError`` keeps catching every timeout.
TimeoutError = builtins.TimeoutError


class TaskRejectError(KernelError):
    """Raised by a task to ask the scheduler to run it on another engine.

    A task that finds its engine unsuitable (a missing module, not enough memory...)
    raises this; with ``retries`` > 0 the scheduler resubmits it elsewhere.
    """


class UnmetDependency(KernelError):
    """The task's dependencies are not met (yet) on this engine."""


class ImpossibleDependency(UnmetDependency):
    """The task's dependencies can never be met."""


class DependencyTimeout(ImpossibleDependency):
    """The task's dependencies were not met before its timeout."""


class InvalidDependency(ImpossibleDependency):
    """The task depends on something that is not a task (e.g. an unknown msg_id)."""


def _engine_label(engine_info: dict | None) -> str:
    """``[3:apply]`` style label of an engine_info dict, or "" when there is none."""
    if not engine_info:
        return ""
    engine_id = engine_info.get("engine_id")
    method = engine_info.get("method")
    if engine_id is None and not method:
        return ""
    ident = "?" if engine_id is None else str(engine_id)
    return f"[{ident}:{method}]" if method else f"[{ident}]"


class RemoteError(KernelError):
    """An exception raised somewhere else: on an engine, or by the scheduler.

    Attributes: ``ename`` (the remote exception's class name), ``evalue`` (its
    ``str()``), ``traceback`` (the remote traceback as one string, or None) and
    ``engine_info`` (dict with ``engine_id``, ``engine_uuid``, ``method``; may be
    empty).
    """

    ename: str | None = None
    evalue: str | None = None
    traceback: str | None = None
    engine_info: dict = {}

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: str | None = None,
        engine_info: dict | None = None,
    ) -> None:
        super().__init__(ename, evalue)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.engine_info = dict(engine_info or {})

    # Exceptions pickle their ``args`` by default, which would lose the traceback
    # and engine_info; rebuild from all four parts instead.
    def __reduce__(self) -> tuple:
        return type(self), (self.ename, self.evalue, self.traceback, self.engine_info)

    def __repr__(self) -> str:
        engine_id = self.engine_info.get("engine_id", " ")
        return f"<{type(self).__name__}[{engine_id}]:{self.ename}({self.evalue})>"

    def __str__(self) -> str:
        label = _engine_label(self.engine_info)
        message = f"{self.ename}: {self.evalue}"
        return f"{label}: {message}" if label else message

    def render_traceback(self) -> list[str]:
        """The remote traceback as a list of lines, headed by the engine label."""
        label = _engine_label(self.engine_info) or "[remote error]"
        if self.traceback:
            return [label + ":", *self.traceback.splitlines()]
        # without a traceback, still say what was raised
        return [label + ":", NO_TRACEBACK, f"{self.ename}: {self.evalue}"]

    def _render_traceback_(self) -> list[str]:
        # IPython calls this to display an exception instead of the local traceback,
        # which would only show our client internals.
        return self.render_traceback()

    def print_traceback(self, excid: int | None = None) -> None:
        """Print ``render_traceback()``."""
        print("\n".join(self.render_traceback()))


class CompositeError(RemoteError):
    """Several remote errors, e.g. from one ``view.apply`` on many engines.

    ``elist`` is a list of (ename, evalue, traceback, engine_info) tuples. ``str()``
    is a compact summary that groups identical errors; ``render_traceback(i)`` and
    ``raise_exception(i)`` give access to each one.
    """

    #: how many distinct errors ``str()`` lists before summing up the rest
    tb_limit = 4

    def __init__(self, message: str, elist: Iterable[ErrorTuple | RemoteError]) -> None:
        entries = [_as_error_tuple(e) for e in elist]
        super().__init__("CompositeError", str(message))
        self.msg = message
        self.elist: list[ErrorTuple] = entries
        self.args = (message, entries)

    def __reduce__(self) -> tuple:
        return type(self), (self.msg, self.elist)

    def __len__(self) -> int:
        return len(self.elist)

    def __iter__(self) -> Iterator[ErrorTuple]:
        return iter(self.elist)

    def __repr__(self) -> str:
        return f"CompositeError({len(self.elist)})"

    def __str__(self) -> str:
        lines = [str(self.msg)]
        groups = _group_errors(self.elist)
        lines.extend(_summarize_group(group) for group in groups[: self.tb_limit])
        hidden = groups[self.tb_limit :]
        if hidden:
            count = sum(len(g) for g in hidden)
            lines.append(f"... and {count} more errors of {len(hidden)} other kinds")
        return "\n".join(lines)

    def _check_index(self, excid: int) -> ErrorTuple:
        try:
            return self.elist[excid]
        except (IndexError, TypeError):
            raise IndexError(
                f"no exception with index {excid!r}: there are {len(self.elist)}"
            ) from None

    def render_traceback(self, excid: int | None = None) -> list[str]:
        """Lines of the summary plus the first traceback, or of traceback ``excid``."""
        if excid is not None:
            return _remote_error(*self._check_index(excid)).render_traceback()
        lines = str(self).splitlines()
        if self.elist:
            lines.append("")
            lines.extend(_remote_error(*self.elist[0]).render_traceback())
        if len(self.elist) > 1:
            lines.append("")
            lines.append(
                f"(traceback 0 of {len(self.elist)}; see the others with"
                " .print_traceback(i), raise one with .raise_exception(i))"
            )
        return lines

    def print_traceback(self, excid: int | None = None) -> None:
        """Print ``render_traceback(excid)``."""
        print("\n".join(self.render_traceback(excid)))

    def raise_exception(self, excid: int = 0) -> None:
        """Raise error ``excid`` on its own, as ``unwrap_exception`` would build it."""
        raise _remote_error(*self._check_index(excid))


class AlreadyDisplayedError(RemoteError):
    """Stands for a CompositeError whose tracebacks were already shown as output."""

    def __init__(self, original_error: CompositeError) -> None:
        super().__init__("AlreadyDisplayedError", f"{len(original_error.elist)} errors")
        self.original_error = original_error
        self.n = len(original_error.elist)

    def __reduce__(self) -> tuple:
        return type(self), (self.original_error,)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}({self.n} errors)>"

    def __str__(self) -> str:
        return f"{self.n} errors"

    def render_traceback(self) -> list[str]:
        # the tracebacks are on screen already: don't repeat them
        return [str(self)]


# ---- scheduler errors that keep their class on the client --------------------------

#: exceptions the scheduler raises instead of running a task; unwrapping content
#: naming one of them gives an instance of (a RemoteError subclass of) that class
_SCHEDULER_ERRORS: tuple[type[KernelError], ...] = (
    TaskTimeout,
    TaskAborted,
    UnmetDependency,
    ImpossibleDependency,
    InvalidDependency,
    DependencyTimeout,
    EngineError,
    NoEnginesRegistered,
)


def _reduce_remote_variant(self: RemoteError) -> tuple:
    # the variant classes are not importable by name: pickle through the factory
    return _remote_error, (self.ename, self.evalue, self.traceback, self.engine_info)


def _make_remote_variant(base: type[KernelError]) -> type[RemoteError]:
    """A class that is both ``base`` and RemoteError, displayed with base's name.

    RemoteError comes first in the bases so its ``__init__``/``__str__`` win (e.g.
    over NoEnginesRegistered's fixed message); both bases derive from KernelError, so
    the inheritance of the public classes stays exactly as documented above.
    """
    namespace = {
        "__module__": __name__,
        "__qualname__": base.__qualname__,
        "__doc__": f"{base.__name__} raised remotely; also a RemoteError.",
        "__reduce__": _reduce_remote_variant,
    }
    return type(base.__name__, (RemoteError, base), namespace)


_REMOTE_VARIANTS: dict[str, type[RemoteError]] = {
    cls.__name__: _make_remote_variant(cls) for cls in _SCHEDULER_ERRORS
}


def _remote_error(
    ename: str, evalue: str, traceback: str | None, engine_info: dict | None
) -> RemoteError:
    """The RemoteError for these parts: a scheduler-error variant when ename names one."""
    cls = _REMOTE_VARIANTS.get(ename, RemoteError)
    return cls(ename, evalue, traceback, engine_info)


# ---- CompositeError summary ---------------------------------------------------------


def _as_error_tuple(entry: ErrorTuple | RemoteError) -> ErrorTuple:
    if isinstance(entry, RemoteError):
        return (entry.ename, entry.evalue, entry.traceback, entry.engine_info)
    ename, evalue, traceback, engine_info = entry
    return (ename, evalue, traceback, engine_info or {})


def _group_errors(elist: list[ErrorTuple]) -> list[list[ErrorTuple]]:
    """Errors grouped by (ename, evalue), groups in order of first appearance."""
    groups: dict[tuple[str, str], list[ErrorTuple]] = {}
    for entry in elist:
        groups.setdefault((str(entry[0]), str(entry[1])), []).append(entry)
    return list(groups.values())


def _id_ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0-3, 7"``."""
    parts = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def _summarize_group(group: list[ErrorTuple]) -> str:
    """One line for errors sharing ename and evalue."""
    ename, evalue, _, engine_info = group[0]
    if len(group) == 1:
        return str(_remote_error(ename, evalue, None, engine_info))
    error = f"{ename}: {evalue}"
    engine_ids = {(e[3] or {}).get("engine_id") for e in group}
    known = sorted(i for i in engine_ids if isinstance(i, int))
    if len(known) == len(group):
        # one error per engine: "4 engines raised ..."
        return f"{len(group)} engines raised {error} (engines {_id_ranges(known)})"
    where = f" (on engines {_id_ranges(known)})" if known else ""
    return f"{len(group)} tasks raised {error}{where}"


def collect_exceptions(rdict_or_list: Any, method: str = "unspecified") -> Any:
    """Return ``rdict_or_list`` unchanged, unless it holds RemoteErrors.

    Values of a dict, or items of a list, that are RemoteErrors are gathered (the
    errors inside CompositeErrors are flattened) into one CompositeError, raised
    even when there is a single error.
    """
    values = rdict_or_list.values() if isinstance(rdict_or_list, dict) else rdict_or_list
    elist: list[ErrorTuple] = []
    for value in values:
        if isinstance(value, CompositeError):
            elist.extend(value.elist)
        elif isinstance(value, RemoteError):
            elist.append(_as_error_tuple(value))
    if elist:
        raise CompositeError(f"one or more exceptions raised in: {method}", elist)
    return rdict_or_list


# ---- the wire format ----------------------------------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def without_traceback(exc: BaseException) -> BaseException:
    """Mark ``exc`` (raised by our code about the user's input, e.g. a Reference to a
    missing name) to cross the wire as its message alone: its frames are all ours and
    say nothing to the user, who would otherwise get them as if it were our bug."""
    exc.__ipp_message_only__ = True  # type: ignore[attr-defined]
    return exc


def _skip_our_frames(tb: TracebackType | None) -> TracebackType | None:
    """Drop the leading frames of our own package (the engine calling user code).

    They say nothing to the user; if *every* frame is ours the error is a bug of
    ours and the whole traceback is kept.
    """
    first = tb
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return tb if tb is not None else first


def _safe_str(value: BaseException) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__} object>"


def _format_lines(exc: BaseException, tb: TracebackType | None) -> list[str]:
    """Python's traceback of ``exc`` as lines without newlines; never raises."""
    try:
        text = "".join(_tb.format_exception(type(exc), exc, tb))
    except Exception:
        # e.g. __str__ raises inside format_exception_only: format the parts ourselves
        try:
            frames = "".join(_tb.format_tb(tb))
        except Exception:
            frames = ""
        text = f"Traceback (most recent call last):\n{frames}{type(exc).__name__}: {_safe_str(exc)}"
    return text.splitlines()


def wrap_exception(engine_info: dict | None = None, *, exc: BaseException | None = None) -> dict:
    """The JSON-able error reply content of the exception being handled.

    Call it in an ``except`` block (or pass ``exc``). Returns ``{"status": "error",
    "ename", "evalue", "traceback": [lines], "engine_info"}``; the traceback lines
    are Python's (file names, line numbers, source) without the leading frames of
    ipyparallel_lite. Never raises, whatever the exception does.
    """
    try:
        if exc is None:
            exc = sys.exc_info()[1]
        if exc is None:
            exc = RuntimeError("wrap_exception() called with no exception being handled")
        try:
            ename = type(exc).__name__
        except Exception:
            ename = "Exception"
        tb = None if getattr(exc, "__ipp_message_only__", False) else exc.__traceback__
        lines = _format_lines(exc, _skip_our_frames(tb))
        return {
            "status": "error",
            "ename": ename,
            "evalue": _safe_str(exc),
            "traceback": lines,
            "engine_info": dict(engine_info or {}),
        }
    except Exception:  # last resort: the engine must always be able to reply
        return {
            "status": "error",
            "ename": "Exception",
            "evalue": "<the exception could not be serialized>",
            "traceback": [],
            "engine_info": {},
        }


def _join_traceback(traceback: Any) -> str | None:
    """Error content's traceback (list of lines, or a string) as one string."""
    if not traceback:
        return None
    if isinstance(traceback, str):
        return traceback
    # ipyparallel sends format_exception() chunks that end with "\n": don't double them
    return "\n".join(str(line).rstrip("\n") for line in traceback)


def unwrap_exception(content: dict) -> RemoteError:
    """The RemoteError described by error ``content`` (inverse of ``wrap_exception``).

    When ``ename`` names a scheduler error (TaskTimeout, TaskAborted, EngineError,
    NoEnginesRegistered, or a dependency error), the result is also an instance of
    that class, so ``except TaskTimeout`` works on the client.
    """
    return _remote_error(
        str(content.get("ename") or "UnknownError"),
        str(content.get("evalue", "")),
        _join_traceback(content.get("traceback")),
        content.get("engine_info") or {},
    )
