"""Dependency specs and their resolution, for the task scheduler.

Pure code: no I/O, no clocks. The scheduler feeds in "this msg_id finished, on this
engine, successfully or not" and reads back whether a task's dependency is met, still
open, or can never be met.

A dependency arrives in request metadata (``after`` or ``follow``) either as a list of
msg_ids or as the dict form of :class:`ipyparallel_lite.dependency.Dependency`::

    {"dependencies": [msg_id, ...], "all": True, "success": True, "failure": False}

Meaning of the flags:

- ``success`` / ``failure``: which outcomes of a dependency count towards meeting it.
  A dependency that finished with an outcome that does not count is *unmet* forever.
- ``all``: every listed msg_id must count (``True``), or any single one (``False``).

``after`` is a *time* dependency: the task may start once it is met. ``follow`` is a
*location* dependency: the task must run on an engine where the dependencies ran, so
only outcomes that happened on an engine can count (a task that failed without ever
running, e.g. aborted, has no location).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "IMPOSSIBLE",
    "MET",
    "WAITING",
    "DependencySpecError",
    "DepSpec",
    "DepTracker",
    "parse_dependency",
]

# Resolution states of a DepTracker.
WAITING = "waiting"
MET = "met"
IMPOSSIBLE = "impossible"


class DependencySpecError(ValueError):
    """A dependency spec is malformed (wrong types, or counts neither successes nor failures)."""


@dataclass(frozen=True, slots=True)
class DepSpec:
    """A parsed, non-empty dependency: the msg_ids and how they must finish."""

    ids: frozenset[str]
    all: bool = True
    success: bool = True
    failure: bool = False

    def counts(self, success: bool) -> bool:
        """Whether a dependency that finished with this outcome counts towards the spec."""
        return self.success if success else self.failure


def _flag(raw: object, name: str, default: bool) -> bool:
    if raw is None:
        return default
    if not isinstance(raw, (bool, int)):
        raise DependencySpecError(f"dependency flag {name!r} must be a bool, not {type(raw).__name__}")
    return bool(raw)


def _ids(raw: object) -> frozenset[str]:
    if raw is None:
        return frozenset()
    if isinstance(raw, str):
        return frozenset((raw,))
    if isinstance(raw, (bytes, Mapping)) or not isinstance(raw, Iterable):
        raise DependencySpecError(
            f"dependencies must be a list of msg_id strings, not {type(raw).__name__}"
        )
    ids = []
    for item in raw:
        if not isinstance(item, str):
            raise DependencySpecError(
                f"a dependency must be a msg_id string, not {type(item).__name__}: {item!r}"
            )
        ids.append(item)
    return frozenset(ids)


def parse_dependency(raw: object) -> DepSpec | None:
    """Parse an ``after``/``follow`` value into a :class:`DepSpec`.

    Accepts ``None``, a msg_id string, an iterable of msg_ids (including a
    ``Dependency`` set, whose ``all``/``success``/``failure`` attributes are honoured),
    or the dict form ``{"dependencies", "all", "success", "failure"}``; missing flags
    default to ``all=True, success=True, failure=False``.

    Returns ``None`` when there is nothing to wait for (no msg_ids): an empty dependency
    is always met. Raises :class:`DependencySpecError` for malformed input, including
    ``success=False, failure=False`` (nothing could ever count).
    """
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        ids = _ids(raw.get("dependencies"))
        flags = (raw.get("all"), raw.get("success"), raw.get("failure"))
    else:
        ids = _ids(raw)
        flags = (getattr(raw, "all", None), getattr(raw, "success", None), getattr(raw, "failure", None))
    all_ = _flag(flags[0], "all", True)
    success = _flag(flags[1], "success", True)
    failure = _flag(flags[2], "failure", False)
    if not (success or failure):
        raise DependencySpecError(
            "a dependency with success=False and failure=False can never be met; "
            "set at least one of them"
        )
    if not ids:
        return None
    return DepSpec(ids, all_, success, failure)


class DepTracker:
    """Resolution state of one dependency (``after`` or ``follow``) of one task.

    Call :meth:`observe` once per msg_id of the spec when it finishes; read
    :attr:`state` (``WAITING``, ``MET`` or ``IMPOSSIBLE``; once it leaves ``WAITING``
    it never changes) and, for location dependencies, :attr:`engines`: the engines
    where counting dependencies ran, i.e. where the task may run.

    Location rules: with ``all=True`` every dependency must count *and* they must all
    have run on one engine (two different engines make it impossible); with
    ``all=False`` the first counting dependency meets it. An outcome without an engine
    (the dependency never ran) does not count for a location dependency.
    """

    __slots__ = ("culprit", "engines", "location", "pending", "spec", "state")

    def __init__(self, spec: DepSpec, location: bool = False) -> None:
        self.spec = spec
        self.location = location
        self.pending = len(spec.ids)  # msg_ids not observed yet
        self.engines: set[int] = set()
        self.state = WAITING
        self.culprit: str | None = None  # the msg_id whose outcome made it impossible

    def observe(self, success: bool, engine: int | None, msg_id: str | None = None) -> str:
        """Record that one of the spec's msg_ids finished; return the new state.

        Call it at most once per msg_id of the spec. ``engine`` is where it ran, or
        ``None`` if it never ran on an engine.
        """
        counts = self.spec.counts(success) and (engine is not None or not self.location)
        if self.state is not WAITING:
            # "any" location dependency: later counting outcomes add more places to run
            if counts and self.location and self.state is MET and not self.spec.all:
                self.engines.add(engine)  # type: ignore[arg-type]
            return self.state
        self.pending -= 1
        if self.spec.all:
            if not counts:
                self.state = IMPOSSIBLE
                self.culprit = msg_id
                return self.state
            if self.location:
                self.engines.add(engine)  # type: ignore[arg-type]  # not None: counts
                if len(self.engines) > 1:
                    self.state = IMPOSSIBLE
                    self.culprit = msg_id
                    return self.state
            if self.pending == 0:
                self.state = MET
        else:
            if counts:
                if self.location:
                    self.engines.add(engine)  # type: ignore[arg-type]
                self.state = MET
            elif self.pending == 0:
                self.state = IMPOSSIBLE
                self.culprit = msg_id
        return self.state

    def describe(self) -> str:
        """A short human-readable rendering, for error messages."""
        which = "all" if self.spec.all else "any"
        outcomes = [w for w, on in (("success", self.spec.success), ("failure", self.spec.failure)) if on]
        ids = ", ".join(sorted(self.spec.ids)[:5])
        more = f" (+{len(self.spec.ids) - 5} more)" if len(self.spec.ids) > 5 else ""
        return f"{which} of [{ids}{more}] finishing with {' or '.join(outcomes)}"
