"""The load-balancing task scheduler, as a pure state machine.

Events go in as method calls (a task was submitted, an engine came or went, a reply
arrived, time passed) and decisions come out as a list of actions:

- :class:`Assign`: send this task to that engine now;
- :class:`Fail`: answer this task with an error, it will not run (again);
- :class:`Interrupt`: this task is running and must be stopped;
- :class:`Steal`: ask an engine to hand back those of these tasks it has not begun.

Nothing here does I/O or reads a clock: the caller passes ``now`` and calls
:meth:`TaskScheduler.tick` at :meth:`TaskScheduler.next_deadline`. That keeps the
policy testable without sockets and cheap enough to sit on every task.

Task life cycle::

    submit -> WAITING -(dependencies met)-> QUEUED -(engine with room)-> RUNNING -> done
    WAITING, QUEUED -(impossible, timeout, abort)-> Fail
    RUNNING -(failure with retries, unmet dependency, engine death with retries)-> QUEUED
    RUNNING -(timeout, abort)-> Interrupt; done when the engine replies (no retries)

Adaptive prefetch and work stealing (with ``0 < hwm``, unless ``prefetch=False``; the
rule is :mod:`ipyparallel_lite.prefetch`, which clients follow for their claims): each
engine reports how long each task ran (``run_time``); the scheduler keeps an EWMA of that
and of the round trip around it (reply time minus assign time minus run time, from tasks
that found the engine idle). While an engine's tasks take under a quarter of
a round trip, it may hold up to ``ceil(round trip / run time)`` tasks beyond ``hwm``
(at most :data:`PREFETCH_MAX`), so it never waits a round trip for its next task; an
idle engine still goes first, whatever the scheme. Tasks beyond the head of an engine's
line may not have started; they are stolen back:

- when an engine has nothing left to do and no task is queued here, from the engine
  with the most unstarted tasks (half of them, as many as the idle engine has room for;
  all of them if that engine's running task has run long);
- when the task at the head of an engine's line has run long (:meth:`long_after`:
  8 x its EWMA, 2 round trips, at least :data:`LONG_MIN`): everything beyond ``hwm``,
  and the engine gets no more than ``hwm`` until that task is done.

The engine answers a steal with the tasks it had not begun and drops them (a task is
either run or handed back, never both); :meth:`TaskScheduler.stolen` re-places them
ahead of everything queued. A task stolen back from an engine that already began it is
simply left to finish there. The engine knows only the last ``window`` tasks it began:
one begun earlier it cannot tell from one not yet read, and names it among those handed
back. Such a task has replied, but its reply may still be on its way here (behind a
busy controller). So each answer says how many tasks the engine had begun, each reply
the number (``seq``) of its task, and an answer waits (:meth:`TaskScheduler.replied`)
until the replies of every task begun before that window are in: then the tasks it
names that did run are done here, and only those truly not begun are placed again.

Data structures are chosen so that each event costs O(1) amortized in the common case
(no dependencies, no targets): unconstrained runnable tasks sit in one FIFO deque,
which is only non-empty while every engine is at its high-water mark, so a free slot
just pops its head. Tasks restricted to some engines (targets, follow, engines that
reported an unmet dependency) sit in per-engine deques instead. Waiting tasks are
indexed by the msg_ids they wait on. Stale entries in the deques and the deadline
heap are skipped lazily (each entry carries the task's queue ticket).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from ipyparallel_lite.connection import STEAL_WINDOW
from ipyparallel_lite.controller.dependency import (
    IMPOSSIBLE,
    MET,
    WAITING,
    DependencySpecError,
    DepSpec,
    DepTracker,
    parse_dependency,
)
from ipyparallel_lite.prefetch import PREFETCH_MAX, Estimate

__all__ = ["LONG_MIN", "PREFETCH_MAX", "SCHEMES", "Assign", "Fail", "Interrupt", "Steal", "TaskScheduler"]

#: a running task is long after this many times the engine's EWMA run time ...
LONG_FACTOR = 8
#: ... and after at least this many seconds: short enough that nothing waits behind a long
#: task noticeably, long enough that a fast task stalled by a busy machine rarely counts
LONG_MIN = 0.05
#: seconds a steal answer waits for replies (:meth:`TaskScheduler.replied`) before it is
#: taken as it is: a reply that never comes (lost with its message) must not keep the
#: tasks the engine handed back unplaced for ever
ANSWER_WAIT_MAX = 10.0


@dataclass(frozen=True, slots=True)
class Assign:
    """Forward task ``msg_id`` to engine ``engine_id`` now."""

    msg_id: str
    engine_id: int


@dataclass(frozen=True, slots=True)
class Fail:
    """Task ``msg_id`` will not run (again): answer it with the error ``ename``."""

    msg_id: str
    ename: str
    evalue: str


@dataclass(frozen=True, slots=True)
class Interrupt:
    """Task ``msg_id`` is running on ``engine_id`` and must be stopped (``ename`` says why).

    The engine's reply to the interrupted task still arrives through
    :meth:`TaskScheduler.task_done`; it finishes the task (no retries).
    """

    msg_id: str
    engine_id: int
    ename: str


@dataclass(frozen=True, slots=True)
class Steal:
    """Ask engine ``engine_id`` to hand back those of ``msg_ids`` it has not begun.

    Its answer arrives through :meth:`TaskScheduler.stolen`.
    """

    msg_ids: tuple[str, ...]
    engine_id: int


SCHEMES = ("leastload", "lru", "twobin", "weighted", "plainrandom")

# Task states (compared by identity).
_WAITING = "waiting"  # dependencies not met yet
_QUEUED = "queued"  # runnable, waiting for an engine with room
_RUNNING = "running"
_DONE = "done"  # finished or failed; only lazily-skipped references remain


class _Task:
    """Scheduler-side record of one load-balanced task."""

    __slots__ = (
        "after",
        "alone",
        "assigned_at",
        "avoid",
        "blacklist",
        "deadline",
        "engine",
        "follow",
        "interrupted",
        "msg_id",
        "retries",
        "state",
        "stealing",
        "targets",
        "ticket",
        "timeout",
    )

    def __init__(self, msg_id: str, targets: frozenset[int] | None, timeout: float | None,
                 retries: int) -> None:
        self.msg_id = msg_id
        self.state = _WAITING
        self.after: DepTracker | None = None
        self.follow: DepTracker | None = None
        self.targets = targets
        self.blacklist: set[int] | None = None  # engines that reported the task's condition unmet
        self.avoid: set[int] | None = None  # engines it failed on; used only if nothing else can
        self.retries = retries
        self.timeout = timeout
        self.deadline: float | None = None
        self.engine: int | None = None
        self.ticket = 0  # queue entries carrying another ticket are stale
        self.interrupted: str | None = None  # ename of a pending Interrupt
        self.assigned_at = 0.0
        self.alone = False  # assigned to an engine with nothing outstanding
        self.stealing = False  # a Steal for it awaits the engine's answer


class _EngineStats(Estimate):
    """What the scheduler has measured of one engine (for prefetch and stealing)."""

    __slots__ = ("last_done", "slow", "watched")

    def __init__(self) -> None:
        super().__init__()
        self.last_done = 0.0  # when its last reply arrived
        self.slow = False  # its running task has run long: no prefetch until it is done
        self.watched: str | None = None  # the head task a long-run check is armed for

    def long_after(self) -> float:
        """How long a task must run on this engine to count as long."""
        return max(LONG_FACTOR * (self.run_time or 0.0), 2 * (self.round_trip or 0.0), LONG_MIN)


class _Replies:
    """Which replies of one engine's load-balanced tasks arrived, by the number the
    engine gives each task it begins (``seq``, from 1): all up to :attr:`through`, and
    some after it (replies come by two ways, the controller's socket and the mux
    device's copies, so not in order)."""

    __slots__ = ("after", "through")

    def __init__(self) -> None:
        self.through = 0
        self.after: set[int] = set()

    def add(self, seq: int) -> None:
        if seq == self.through + 1:
            through, after = seq, self.after
            while after and through + 1 in after:
                through += 1
                after.remove(through)
            self.through = through
        elif seq > self.through:
            after = self.after
            after.add(seq)
            if len(after) > STEAL_WINDOW:
                # a gap that many replies did not fill (a reply lost, or numbers restarted
                # by an engine that joined a restarted controller): give it up
                first = min(after)
                after.remove(first)
                self.through = first - 1
                self.add(first)

    def cover(self, begun: int, window: int) -> bool:
        """Whether every task the engine began before its last ``window`` of ``begun``
        has its reply in."""
        return self.through >= begun - window


class TaskScheduler:
    """Load-balancing task scheduler with dependencies, as a pure state machine.

    Every event method returns a list of actions (:class:`Assign`, :class:`Fail`,
    :class:`Interrupt`, :class:`Steal`) that the caller must carry out in order.

    Parameters
    ----------
    scheme:
        How to pick among engines with room: one of :data:`SCHEMES`.
    hwm:
        Maximum number of outstanding tasks per engine; 0 means unlimited.
    seed:
        Seed for the random schemes (reproducible choices in tests).
    prefetch:
        Place fast tasks beyond ``hwm`` and steal unstarted ones back (see the module
        docstring). Off, or with ``hwm=0``, at most ``hwm`` tasks go to an engine and
        nothing is stolen, as in ipyparallel.
    """

    def __init__(self, scheme: str = "leastload", hwm: int = 1, seed: int | None = None,
                 prefetch: bool = True) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheduling scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        if isinstance(hwm, bool) or not isinstance(hwm, int) or hwm < 0:
            raise ValueError(f"hwm must be an int >= 0 (0 = unlimited), not {hwm!r}")
        self.scheme = scheme
        self.hwm = hwm
        self._rng = random.Random(seed)
        # live engines -> msg_ids outstanding there (an ordered set; its size is the load)
        self._running: dict[int, dict[str, None]] = {}
        self._last_used: dict[int, int] = {}  # engine -> assignment counter (lru, twobin)
        self._use_counter = 0
        self._tasks: dict[str, _Task] = {}  # unfinished tasks of this scheduler
        self._done: dict[str, tuple[int | None, bool]] = {}  # msg_id -> (engine, success)
        self._pending_ext: set[str] = set()  # direct tasks that may still finish
        self._dependents: dict[str, list[_Task]] = {}  # msg_id -> tasks waiting on it
        # FIFO of (ticket, task) runnable anywhere; non-empty only while no engine has room
        self._queue: deque[tuple[int, _Task]] = deque()
        # engine -> FIFO of (ticket, task) runnable only on some engines (incl. this one)
        self._engine_queues: dict[int, deque[tuple[int, _Task]]] = {}
        self._compact_at: dict[int, int] = {}
        # queued tasks runnable on any engine except a few: new engines must see them
        self._excluded_anywhere: dict[str, _Task] = {}
        self._deadlines: list[tuple[float, int, _Task]] = []
        self._tickets = 0
        self._finished: deque[str] = deque()  # finished msg_ids whose dependents await release
        self._releasing = False
        # engines remember STEAL_WINDOW begun tasks: enough while hwm + prefetch stays under it
        self.prefetch = bool(prefetch) and 0 < hwm <= STEAL_WINDOW - PREFETCH_MAX
        self._now = 0.0  # the latest time an event brought
        self._limit: dict[int, int] = {}  # engine -> tasks it may hold now (hwm + prefetch)
        self._stats: dict[int, _EngineStats] = {}
        self._deep: set[int] = set()  # engines holding more than one task (some not begun)
        self._idle: set[int] = set()  # engines holding nothing
        self._watches: list[tuple[float, int, int, str]] = []  # (due, seq, engine, head msg_id)
        self._replies: dict[int, _Replies] = {}  # engine -> replies in, by task number
        # engine -> steal answers waiting for replies: (due, msg_ids, kept, begun, window)
        self._answers: dict[int, list[tuple[float, tuple, tuple, int, int]]] = {}
        self._chooser = _CHOOSERS[scheme](self)

    # ------------------------------------------------------------------ engines

    @property
    def engines(self) -> list[int]:
        """Ids of the live engines, ascending."""
        return sorted(self._running)

    def add_engine(self, engine_id: int, now: float | None = None) -> list:
        """A new engine is ready for tasks. May assign queued tasks to it at once, or
        steal unstarted ones for it from busy engines."""
        if engine_id in self._running:
            return []
        if now is not None:
            self._now = now
        self._running[engine_id] = {}
        self._limit[engine_id] = self.hwm
        self._stats[engine_id] = _EngineStats()
        self._idle.add(engine_id)
        self._last_used[engine_id] = 0  # never used: first in line for lru
        self._chooser.add(engine_id)
        if self._excluded_anywhere:
            self._offer_excluded(engine_id)
        out: list = []
        self._fill(engine_id, out)
        if self._deep and not self._running[engine_id]:
            self._steal_for(engine_id, out)
        return out

    def remove_engine(self, engine_id: int, now: float) -> list:
        """An engine died or left.

        Its outstanding tasks are resubmitted if they have retries left, else they fail
        with ``EngineError``. Tasks that could only run there (follow pinned to it,
        targets naming no other live engine) fail with ``ImpossibleDependency``.
        """
        lost = self._running.pop(engine_id, None)
        if lost is None:
            return []
        self._now = now
        del self._last_used[engine_id]
        del self._limit[engine_id]
        del self._stats[engine_id]
        self._deep.discard(engine_id)
        self._idle.discard(engine_id)
        self._chooser.remove(engine_id)
        self._engine_queues.pop(engine_id, None)
        self._compact_at.pop(engine_id, None)
        self._replies.pop(engine_id, None)
        self._answers.pop(engine_id, None)
        out: list = []
        lost_tasks = [self._tasks[m] for m in lost]
        for task in list(self._tasks.values()):
            if task.state is _WAITING or task.state is _QUEUED:
                self._recheck_after_removal(task, engine_id, out)
        for task in lost_tasks:
            self._engine_lost(task, engine_id, out)
        return out

    def _recheck_after_removal(self, task: _Task, engine_id: int, out: list) -> None:
        """Fail or re-place a not-running task that may have depended on ``engine_id``."""
        if task.state is _WAITING:
            if task.targets is not None and engine_id in task.targets:
                if not any(e in self._running for e in task.targets):
                    self._fail_task(task, "ImpossibleDependency", self._no_live_home(task), out)
                    return
            if self._follow_pinned_dead(task):
                self._fail_task(task, "ImpossibleDependency", self._no_live_home(task), out)
            return
        constrained = task.targets is not None or task.follow is not None
        if constrained:
            allowed = self._allowed(task)
            if allowed is not None and engine_id not in allowed:
                return  # it never could run there: unaffected
        elif not (task.blacklist or task.avoid):
            return  # unconstrained tasks wait in the shared queue
        self._place(task, out, strict=True, keep_ticket=True)

    def _engine_lost(self, task: _Task, engine_id: int, out: list) -> None:
        """Task was outstanding on a dead engine: retry it elsewhere or fail it.

        A prefetched task may have begun there too (its predecessor's reply may have
        died with the engine), so it is treated the same way.
        """
        task.engine = None
        task.stealing = False
        if task.interrupted:
            self._fail_task(task, task.interrupted, (
                f"Task {task.msg_id} was being stopped ({task.interrupted}) when engine "
                f"{engine_id} went away; it did not complete."), out)
        elif task.retries > 0:
            task.retries -= 1
            self._place(task, out)
        else:
            self._fail_task(task, "EngineError", (
                f"Engine {engine_id} died or was removed while running task {task.msg_id}, "
                "and the task has no retries left. Resubmit it, or submit with retries=N "
                "to rerun it on another engine automatically."), out)

    def load(self, engine_id: int) -> int:
        """Number of tasks outstanding on ``engine_id`` (0 for unknown engines)."""
        return len(self._running.get(engine_id, ()))

    def running(self) -> int:
        """Number of tasks outstanding on engines, all together."""
        return sum(len(tasks) for tasks in self._running.values())

    def queue_status(self) -> dict:
        """``{"unassigned": n, engine_id: {"tasks": [msg_ids outstanding]}, ...}``."""
        status: dict = {}
        running = 0
        for eid in sorted(self._running):
            tasks = list(self._running[eid])
            running += len(tasks)
            status[eid] = {"tasks": tasks}
        status["unassigned"] = len(self._tasks) - running
        return status

    def is_pending(self, msg_id: str) -> bool:
        """Whether ``msg_id`` is a task of this scheduler that has not finished yet.

        After :meth:`task_done`, ``True`` means the reply was not final (the task was
        resubmitted for a retry or an unmet dependency).
        """
        return msg_id in self._tasks

    def knows(self, msg_id: str) -> bool:
        """Whether a task may depend on ``msg_id``: a task of this scheduler, a direct
        request not finished, or one that finished and is not forgotten."""
        return msg_id in self._done or msg_id in self._tasks or msg_id in self._pending_ext

    # ------------------------------------------------------------------ tasks in

    def note_pending(self, msg_id: str) -> None:
        """A direct (MUX) task exists and has not finished; it may be depended on."""
        if msg_id not in self._done:
            self._pending_ext.add(msg_id)

    def submit(
        self,
        msg_id: str,
        *,
        after: object = None,
        follow: object = None,
        targets: Iterable[int] | int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        now: float,
    ) -> list:
        """A load-balanced task arrives.

        ``after``/``follow``: ``None``, a list of msg_ids, or a Dependency dict
        ``{"dependencies": [...], "all": bool, "success": bool, "failure": bool}``.
        ``targets``: engine ids the task may run on (``None`` or empty: any).
        ``timeout``: seconds from ``now`` (``None`` or 0: no timeout); a task still
        waiting then fails with ``TaskTimeout``, a running one is interrupted.
        ``retries``: how many times to rerun it after a failure or engine death.

        Raises ``ValueError`` for a negative/non-numeric timeout or retries, malformed
        targets, or an msg_id already known. Returns the actions: an immediate
        ``Assign``, or a ``Fail`` for invalid/impossible dependencies, or nothing (it
        waits).
        """
        if self.knows(msg_id):
            raise ValueError(f"msg_id {msg_id!r} was already submitted")
        timeout = _check_timeout(timeout)
        if retries:
            if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
                raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        target_set = _check_targets(targets)
        self._now = now
        task = _Task(msg_id, target_set, timeout, retries)
        out: list = []
        if timeout is not None:
            task.deadline = now + timeout
        if after is None and follow is None and target_set is None:
            # fast path: no constraints at all
            self._tasks[msg_id] = task
            if task.deadline is not None:
                self._push_deadline(task)
            self._place(task, out)
            return out
        try:
            after_spec = parse_dependency(after)
            follow_spec = parse_dependency(follow)
        except DependencySpecError as e:
            return self._reject(msg_id, "InvalidDependency", f"Task {msg_id} has a malformed dependency: {e}")
        for kind, spec in (("after", after_spec), ("follow", follow_spec)):
            if spec is not None:
                problem = self._invalid_reason(msg_id, kind, spec)
                if problem:
                    return self._reject(msg_id, "InvalidDependency", problem)
        if target_set is not None and self._running and not any(e in self._running for e in target_set):
            return self._reject(msg_id, "ImpossibleDependency", (
                f"Task {msg_id} can never run: none of its targets {sorted(target_set)} is a "
                f"registered engine (live engines: {self.engines}). Choose targets among the live engines."))
        self._tasks[msg_id] = task
        if task.deadline is not None:
            self._push_deadline(task)
        self._attach_dependencies(task, after_spec, follow_spec, out)
        return out

    @property
    def takes_claims(self) -> bool:
        """Whether clients may send tasks straight to engines (:meth:`claim`): with the
        least-load scheme, whose pick among engines with room no client relies on, and
        with stealing, which settles a claim that meets another task or a long one."""
        return self.prefetch and self.scheme == "leastload"

    @property
    def claim_hwm(self) -> int:
        """The ``hwm`` of a client's claims (0: no claims): a client may have that many
        claimed on one engine, plus the prefetch its own measure of that engine's tasks
        allows (prefetch.Estimate), as this scheduler would place them."""
        return self.hwm if self.takes_claims else 0

    def claim(self, msg_id: str, engine_id: int, now: float, *, lone: bool = True) -> list:
        """A task its client sent straight to ``engine_id`` (a claim: see
        connection.CLAIM), which that engine has or will have: it runs there as if
        assigned (no dependencies, targets, timeout or retries; no :class:`Assign`).

        ``lone``: the client had nothing else in flight and believed the engine idle. If
        it holds other tasks (placed there meanwhile, for another client), nobody knows
        which the engine began first, so every task there is asked back: those not begun
        are placed again, and none waits behind a long one while another engine has
        room. A queued claim (not ``lone``: the client placed it behind its own claims,
        within :attr:`claim_hwm` and prefetch) is asked back, with the others there,
        only when the engine's head task has run long (:meth:`_hold_back`); otherwise an
        idle engine steals from it as from any engine. Raises ``ValueError`` for an
        msg_id already known or an engine that is not live.
        """
        if self.knows(msg_id):
            raise ValueError(f"msg_id {msg_id!r} was already submitted")
        if engine_id not in self._running:
            raise ValueError(f"engine {engine_id} is not live")
        self._now = now
        task = _Task(msg_id, None, None, 0)
        self._tasks[msg_id] = task
        self._tickets += 1
        task.ticket = self._tickets
        others = list(self._running[engine_id])
        self._assign(task, engine_id, [])  # the device delivered it: no Assign
        # its assignment time is when the device's copy was read, not when it was sent:
        # no round-trip sample from it
        task.alone = False
        out: list = []
        if others and self.prefetch and (lone or self._stats[engine_id].slow):
            self._ask_back(engine_id, [m for m in [*others, msg_id] if not self._tasks[m].stealing], out)
        return out

    def _invalid_reason(self, msg_id: str, kind: str, spec: DepSpec) -> str | None:
        """Why a dependency spec is invalid (self-reference, unknown ids), or None."""
        if msg_id in spec.ids:
            return (f"Task {msg_id} depends on itself (in {kind!r}); a task cannot wait for "
                    f"its own result. Remove its own msg_id from {kind!r}.")
        unknown = [d for d in spec.ids if not self.knows(d)]
        if unknown:
            shown = ", ".join(sorted(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
            return (f"Task {msg_id} depends (in {kind!r}) on msg_id(s) the scheduler does not know: "
                    f"{shown}. Dependencies must name tasks submitted earlier and not purged; "
                    "check for typos or purged results.")
        return None

    def _reject(self, msg_id: str, ename: str, evalue: str) -> list:
        """Fail a task at submission; it still counts as a failed task for dependents."""
        self._finish(msg_id, None, False, [])
        return [Fail(msg_id, ename, evalue)]

    def _attach_dependencies(self, task: _Task, after: DepSpec | None, follow: DepSpec | None,
                             out: list) -> None:
        """Resolve a new task's dependencies against what already finished, index the rest."""
        if after is not None:
            task.after = DepTracker(after, location=False)
        if follow is not None:
            task.follow = DepTracker(follow, location=True)
        ids = (after.ids if after is not None else frozenset()) | (
            follow.ids if follow is not None else frozenset())
        unfinished = []
        state = MET
        for dep_id in ids:
            outcome = self._done.get(dep_id)
            if outcome is None:
                unfinished.append(dep_id)
            else:
                state = self._observe(task, dep_id, outcome[0], outcome[1])
                if state is IMPOSSIBLE:
                    break
        else:
            state = self._combined(task)
        if self._settle(task, state, out):
            for dep_id in unfinished:
                self._dependents.setdefault(dep_id, []).append(task)

    def _settle(self, task: _Task, state: str, out: list) -> bool:
        """Act on a task's dependency state: fail it, place it, or (True) keep it waiting."""
        if state is IMPOSSIBLE:
            self._fail_task(task, "ImpossibleDependency", self._impossible_reason(task), out)
        elif state is MET:
            self._place(task, out)
        elif self._follow_pinned_dead(task):
            self._fail_task(task, "ImpossibleDependency", self._no_live_home(task), out)
        else:
            return True
        return False

    # ------------------------------------------------------------------ replies in

    def task_done(self, msg_id: str, engine_id: int, *, success: bool, now: float,
                  unmet: bool = False, run_time: float | None = None) -> list:
        """The reply of a task assigned by this scheduler arrived from ``engine_id``.

        ``unmet=True``: the engine refused it (``UnmetDependency`` from ``@depend`` /
        ``@require``): it is rescheduled on another engine, never again on one that
        refused it, or fails with ``ImpossibleDependency`` when none is left.
        ``success=False`` with retries left: it is resubmitted, avoiding this engine if
        another one can take it. Otherwise the task is finished and its dependents are
        released. Replies for tasks not running on ``engine_id`` are ignored.
        ``run_time``: seconds the engine spent on it (its reply's metadata), which feeds
        the prefetch estimate; ``None`` or nonsense: no estimate from this reply.

        Afterwards :meth:`is_pending` tells whether the task is still in the scheduler
        (resubmitted: the reply is not final).
        """
        task = self._tasks.get(msg_id)
        if task is None or task.state is not _RUNNING or task.engine != engine_id:
            return []
        out: list = []
        self._now = now
        self._leave(task, engine_id)
        if self.prefetch:
            self._measure(engine_id, task, now, run_time)
        self._chooser.changed(engine_id)
        # Fill the freed slot first: tasks queued earlier go before this one's
        # resubmission or dependents (FIFO fairness).
        self._fill(engine_id, out)
        if task.interrupted:
            if unmet:
                self._fail_task(task, task.interrupted, self._interrupted_reason(task), out)
            else:
                self._complete(task, engine_id, success, out)
        elif unmet:
            if task.blacklist is None:
                task.blacklist = set()
            task.blacklist.add(engine_id)
            self._place(task, out)
        elif not success and task.retries > 0:
            task.retries -= 1
            if task.avoid is None:
                task.avoid = set()
            task.avoid.add(engine_id)
            self._place(task, out)
        else:
            self._complete(task, engine_id, success, out)
        if self.prefetch:
            running = self._running[engine_id]
            if not running:
                if self._deep:
                    self._steal_for(engine_id, out)
            elif len(running) > self.hwm:
                self._watch(engine_id)
        return out

    def stolen(self, engine_id: int, msg_ids: Iterable[str], *, kept: Iterable[str] = (),
               now: float, begun: int | None = None, window: int | None = None) -> list:
        """Engine ``engine_id`` answered a :class:`Steal`: it handed back ``msg_ids``
        (not begun, dropped from its queue) and keeps ``kept`` (begun: they finish there).

        Handed-back tasks are placed again ahead of everything queued (or fail, if they
        were aborted or timed out meanwhile). Ids that are not outstanding on that engine
        with a steal pending are ignored.

        ``begun``: how many tasks the engine had begun when it answered; it remembers
        the last ``window`` of them. Until the replies of all the others are in
        (:meth:`replied`), a task among ``msg_ids`` may have run there long ago: the
        answer waits for them, at most :data:`ANSWER_WAIT_MAX` seconds (see :meth:`tick`).
        """
        self._now = now
        if engine_id not in self._running:
            return []  # removed meanwhile: its tasks were already retried or failed
        msg_ids, kept = tuple(msg_ids), tuple(kept)
        if begun is not None and window is not None and not self._replies_of(engine_id).cover(begun, window):
            self._answers.setdefault(engine_id, []).append(
                (now + ANSWER_WAIT_MAX, msg_ids, kept, begun, window))
            return []
        out: list = []
        self._take_back(engine_id, msg_ids, kept, out)
        return out

    def replied(self, engine_id: int, seq: object, now: float) -> list:
        """The reply of the ``seq``-th load-balanced task engine ``engine_id`` began
        arrived (any reply: this task's, a rerun's, one for a task no longer here), after
        :meth:`task_done`. Steal answers that waited for it are taken."""
        if engine_id not in self._running or isinstance(seq, bool) or not isinstance(seq, int):
            return []
        replies = self._replies_of(engine_id)
        replies.add(seq)
        answers = self._answers.get(engine_id)
        if not answers:
            return []
        self._now = now
        out: list = []
        while answers and replies.cover(answers[0][3], answers[0][4]):
            _, msg_ids, kept, _, _ = answers.pop(0)
            self._take_back(engine_id, msg_ids, kept, out)
        if not answers:
            del self._answers[engine_id]
        return out

    def _replies_of(self, engine_id: int) -> _Replies:
        replies = self._replies.get(engine_id)
        if replies is None:
            replies = self._replies[engine_id] = _Replies()
        return replies

    def _take_back(self, engine_id: int, msg_ids: tuple, kept: tuple, out: list) -> None:
        """Carry out a steal answer (:meth:`stolen`)."""
        for msg_id in kept:
            task = self._tasks.get(msg_id)
            if task is not None and task.engine == engine_id:
                task.stealing = False
        back: list[_Task] = []
        for msg_id in msg_ids:
            task = self._tasks.get(msg_id)
            if task is None or task.state is not _RUNNING or task.engine != engine_id or not task.stealing:
                continue
            self._leave(task, engine_id)
            back.append(task)
        if not back:
            return
        self._chooser.changed(engine_id)
        front: list[tuple[int, _Task]] = []
        for task in back:
            if task.interrupted:
                self._fail_task(task, task.interrupted, self._interrupted_reason(task), out)
            elif task.targets is None and task.follow is None and not task.blacklist and not task.avoid:
                task.state = _QUEUED
                front.append((task.ticket, task))
            else:
                self._place(task, out, keep_ticket=True)
        if front:
            self._queue.extendleft(reversed(front))
            self._drain(out)
        self._fill(engine_id, out)

    def record_result(self, msg_id: str, engine_id: int, success: bool, now: float | None = None) -> list:
        """A task *not* run through this scheduler (direct/MUX) finished on ``engine_id``.

        Releases tasks that depend on it. A negative ``engine_id`` means "unknown
        engine" (it then cannot satisfy a ``follow``).
        """
        if msg_id in self._tasks or msg_id in self._done:
            return []
        if now is not None:
            self._now = now
        self._pending_ext.discard(msg_id)
        out: list = []
        self._finish(msg_id, engine_id if engine_id is not None and engine_id >= 0 else None,
                     success, out)
        return out

    # ------------------------------------------------------------------ time, abort

    def tick(self, now: float) -> list:
        """Expire timeouts due at ``now``: waiting tasks fail, running ones are
        interrupted; engines whose running task has run long hand back their prefetch;
        steal answers that waited :data:`ANSWER_WAIT_MAX` for replies are taken as they are."""
        self._now = now
        out: list = []
        for engine_id, answers in list(self._answers.items()):
            while answers and answers[0][0] <= now:
                _, msg_ids, kept, _, _ = answers.pop(0)
                self._take_back(engine_id, msg_ids, kept, out)
            if not answers:
                del self._answers[engine_id]
        watches = self._watches
        while watches and watches[0][0] <= now:
            watch = heapq.heappop(watches)
            if self._watch_live(watch):
                self._hold_back(watch[2], out)
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, _, task = heapq.heappop(heap)
            if task.state is _DONE or task.deadline != deadline:
                continue
            task.deadline = None
            if task.state is _RUNNING:
                if not task.interrupted:
                    self._stop(task, "TaskTimeout", out)
            else:
                waiting_for = "its dependencies" if task.state is _WAITING else "a free engine"
                self._fail_task(task, "TaskTimeout", (
                    f"Task {task.msg_id} did not start within its timeout of {task.timeout:g}s "
                    f"(it was waiting for {waiting_for}). Increase the timeout, or check its "
                    "dependencies and the number of engines."), out)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has something to do (a timeout, a long-run check), or None."""
        heap = self._deadlines
        while heap:
            deadline, _, task = heap[0]
            if task.state is not _DONE and task.deadline == deadline:
                break
            heapq.heappop(heap)
        watches = self._watches
        while watches and not self._watch_live(watches[0]):
            heapq.heappop(watches)
        due = [queue[0][0] for queue in (heap, watches) if queue]
        due += [answers[0][0] for answers in self._answers.values()]
        return min(due) if due else None

    def abort(self, msg_ids: Iterable[str] | str, now: float) -> list:
        """Abort tasks: not-yet-running ones fail with ``TaskAborted``, running ones
        are interrupted. Unknown and finished msg_ids are ignored."""
        if isinstance(msg_ids, str):
            msg_ids = [msg_ids]
        self._now = now
        out: list = []
        for msg_id in msg_ids:
            task = self._tasks.get(msg_id)
            if task is None:
                continue
            if task.state is _RUNNING:
                if not task.interrupted:
                    self._stop(task, "TaskAborted", out)
            else:
                self._fail_task(task, "TaskAborted", (
                    f"Task {msg_id} was aborted before it started; it will not run."), out)
        return out

    def forget(self, msg_ids: Iterable[str] | str) -> None:
        """Drop bookkeeping of finished tasks (bounds memory). Later dependencies on
        them are invalid (unknown). Unfinished tasks are not affected."""
        if isinstance(msg_ids, str):
            msg_ids = [msg_ids]
        for msg_id in msg_ids:
            self._done.pop(msg_id, None)
            self._pending_ext.discard(msg_id)

    # ------------------------------------------------------------------ placement

    def _has_room(self, engine_id: int) -> bool:
        return not self.hwm or len(self._running[engine_id]) < self._limit[engine_id]

    def _allowed(self, task: _Task) -> set[int] | frozenset[int] | None:
        """Engines the task may ever run on (None: any), excluding refused ones."""
        allowed: set[int] | frozenset[int] | None = None
        if task.follow is not None:
            allowed = task.follow.engines
        if task.targets is not None:
            allowed = task.targets if allowed is None else allowed & task.targets
        if allowed is not None and task.blacklist:
            allowed = allowed - task.blacklist
        return allowed

    def _place(self, task: _Task, out: list, strict: bool = False, keep_ticket: bool = False) -> None:
        """A runnable task: assign it to an engine with room, queue it, or fail it.

        ``strict``: an engine just went away; a task whose allowed engines are all gone
        fails even if no engine at all is left (otherwise it would wait for one).
        """
        task.state = _QUEUED
        if not keep_ticket:
            self._tickets += 1
            task.ticket = self._tickets
        if task.targets is None and task.follow is None and not task.blacklist and not task.avoid:
            # unconstrained: FIFO behind older queued tasks, else the scheme picks
            if not self._queue:
                eid = self._pick_any()
                if eid is not None:
                    self._assign(task, eid, out)
                    return
            self._queue.append((task.ticket, task))
            return
        allowed = self._allowed(task)
        running = self._running
        if allowed is None:
            blacklist = task.blacklist or ()
            live = [e for e in running if e not in blacklist]
            if not live and running:
                self._fail_task(task, "ImpossibleDependency", self._no_live_home(task), out)
                return
            self._excluded_anywhere[task.msg_id] = task
            absent: list[int] = []
        else:
            live = [e for e in allowed if e in running]
            if not live and (not allowed or strict or task.follow is not None or running):
                self._fail_task(task, "ImpossibleDependency", self._no_live_home(task), out)
                return
            absent = [e for e in allowed if e not in running]  # may register later
        avoid = task.avoid
        preferred = [e for e in live if e not in avoid] if avoid else live
        if not preferred:
            preferred = live
        free = [e for e in preferred if self._has_room(e)]
        if free:
            if self.prefetch:  # engines under hwm first, as for unconstrained tasks
                free = [e for e in free if len(running[e]) < self.hwm] or free
            free.sort()
            self._assign(task, self._chooser.pick_from(free), out)
            return
        entry = (task.ticket, task)
        for eid in preferred:
            self._push_engine_queue(eid, entry)
        for eid in absent:
            self._push_engine_queue(eid, entry)

    def _assign(self, task: _Task, engine_id: int, out: list) -> None:
        task.state = _RUNNING
        task.engine = engine_id
        if task.blacklist or task.avoid:
            self._excluded_anywhere.pop(task.msg_id, None)
        running = self._running[engine_id]
        if not running:
            task.alone = True
            self._idle.discard(engine_id)
        else:
            task.alone = False
        task.assigned_at = self._now
        running[task.msg_id] = None
        if len(running) == 2:
            self._deep.add(engine_id)
        self._use_counter += 1
        self._last_used[engine_id] = self._use_counter
        self._chooser.changed(engine_id)
        out.append(Assign(task.msg_id, engine_id))
        if self.prefetch and len(running) > self.hwm:
            self._watch(engine_id)

    def _leave(self, task: _Task, engine_id: int) -> None:
        """The task is no longer outstanding on ``engine_id`` (its reply came, or it was handed back)."""
        running = self._running[engine_id]
        del running[task.msg_id]
        if len(running) == 1:
            self._deep.discard(engine_id)
        elif not running:
            self._idle.add(engine_id)
        task.engine = None
        task.stealing = False

    def _pick_any(self) -> int | None:
        """The scheme's pick among engines with room, except that an idle engine goes
        before a place beyond ``hwm`` (a scheme may pick a busy engine with prefetch room,
        and a task there could wait behind a long one)."""
        engine_id = self._chooser.pick_any()
        if (engine_id is not None and self._idle and self.prefetch
                and len(self._running[engine_id]) >= self.hwm):
            return min(self._idle)
        return engine_id

    def _drain(self, out: list) -> None:
        """Give the shared queue's head tasks to engines with room, as the scheme picks."""
        queue = self._queue
        while queue:
            ticket, task = queue[0]
            if task.state is not _QUEUED or task.ticket != ticket:
                queue.popleft()
                continue
            engine_id = self._pick_any()
            if engine_id is None:
                return
            queue.popleft()
            self._assign(task, engine_id, out)

    # ------------------------------------------------------------------ prefetch, stealing

    def _measure(self, engine_id: int, task: _Task, now: float, run_time: object) -> None:
        """Fold a reply's run time (and, from an idle engine, the round trip) into the
        engine's estimates and set how many tasks it may hold."""
        stats = self._stats[engine_id]
        stats.slow = False
        stats.last_done = now
        stats.measure(run_time, now - task.assigned_at if task.alone else None)
        self._limit[engine_id] = self._limit_of(stats)

    def _limit_of(self, stats: _EngineStats) -> int:
        """``hwm``, plus enough tasks to cover a round trip while the engine's tasks are
        fast (prefetch.Estimate), unless its running task has run long."""
        return self.hwm if stats.slow else stats.limit(self.hwm)

    def _watch(self, engine_id: int) -> None:
        """Tasks wait behind the engine's head task: check on it once it could have run long."""
        running = self._running[engine_id]
        head = next(iter(running))
        stats = self._stats[engine_id]
        if stats.watched == head:
            return
        stats.watched = head
        started = max(self._tasks[head].assigned_at, stats.last_done)
        self._tickets += 1
        heapq.heappush(self._watches, (started + stats.long_after(), self._tickets, engine_id, head))

    def _watch_live(self, watch: tuple[float, int, int, str]) -> bool:
        """The watched task still heads its engine's line, with tasks beyond ``hwm`` behind it."""
        running = self._running.get(watch[2])
        return bool(running) and len(running) > self.hwm and next(iter(running)) == watch[3]

    def _hold_back(self, engine_id: int, out: list) -> None:
        """The engine's head task runs long: no prefetch there until it is done, and the
        tasks beyond ``hwm`` are asked back."""
        self._stats[engine_id].slow = True
        self._limit[engine_id] = self.hwm
        self._chooser.changed(engine_id)
        tasks = self._tasks
        beyond = [m for m in itertools.islice(self._running[engine_id], self.hwm, None)
                  if not tasks[m].stealing]
        self._ask_back(engine_id, beyond, out)

    def _steal_for(self, thief: int, out: list) -> None:
        """Engine ``thief`` is idle and nothing is queued: ask the engine with the most
        tasks it could run, not begun, for some of them."""
        room = self._limit[thief] - len(self._running[thief])
        if not self.prefetch or room <= 0:
            return
        victim, candidates = None, []
        tasks = self._tasks
        for engine_id in self._deep:
            mine = [m for m in itertools.islice(self._running[engine_id], 1, None)
                    if self._may_take(tasks[m], thief)]
            if len(mine) > len(candidates):
                victim, candidates = engine_id, mine
        if victim is None:
            return
        stats = self._stats[victim]
        head = tasks[next(iter(self._running[victim]))]
        if self._now - max(head.assigned_at, stats.last_done) >= stats.long_after():
            stats.slow = True  # all of them: they would wait for the long task
            self._limit[victim] = self.hwm
            self._chooser.changed(victim)
        else:
            candidates = candidates[-min((len(candidates) + 1) // 2, room):]
        self._ask_back(victim, candidates, out)

    def _may_take(self, task: _Task, engine_id: int) -> bool:
        """Whether a task outstanding elsewhere could run on ``engine_id`` if stolen."""
        if task.stealing:
            return False
        if task.blacklist and engine_id in task.blacklist:
            return False
        allowed = self._allowed(task)
        return allowed is None or engine_id in allowed

    def _ask_back(self, engine_id: int, msg_ids: list[str], out: list) -> None:
        if not msg_ids:
            return
        tasks = self._tasks
        for msg_id in msg_ids:
            tasks[msg_id].stealing = True
        out.append(Steal(tuple(msg_ids), engine_id))

    def _stop(self, task: _Task, ename: str, out: list) -> None:
        """Stop an outstanding task: interrupt it if it runs, and, if it may still wait in
        the engine's line, ask for it back first (so it cannot start after the interrupt)."""
        task.interrupted = ename
        engine_id: int = task.engine  # type: ignore[assignment]
        if self.prefetch and not task.stealing and next(iter(self._running[engine_id])) != task.msg_id:
            self._ask_back(engine_id, [task.msg_id], out)
        out.append(Interrupt(task.msg_id, engine_id, ename))

    def _push_engine_queue(self, engine_id: int, entry: tuple[int, _Task]) -> None:
        q = self._engine_queues.get(engine_id)
        if q is None:
            q = self._engine_queues[engine_id] = deque()
        q.append(entry)
        # Entries go stale when their task runs elsewhere; compact once the deque has
        # doubled since the last compaction (amortized O(1) per push).
        if len(q) >= self._compact_at.get(engine_id, 64):
            fresh = deque(e for e in q if e[1].state is _QUEUED and e[1].ticket == e[0])
            self._engine_queues[engine_id] = fresh
            self._compact_at[engine_id] = max(64, 2 * len(fresh))

    def _offer_excluded(self, engine_id: int) -> None:
        """Give a new engine the queued tasks that may run anywhere but a few engines."""
        q = self._engine_queues.get(engine_id)
        entries = list(q) if q else []
        for task in self._excluded_anywhere.values():
            if task.blacklist and engine_id in task.blacklist:
                continue
            entries.append((task.ticket, task))
        entries.sort(key=lambda e: e[0])
        self._engine_queues[engine_id] = deque(entries)

    def _fill(self, engine_id: int, out: list) -> None:
        """``engine_id`` has room: give it the oldest queued tasks it may run."""
        shared = self._queue
        own = self._engine_queues.get(engine_id)
        while self._has_room(engine_id):
            while shared and (shared[0][1].state is not _QUEUED or shared[0][1].ticket != shared[0][0]):
                shared.popleft()
            while own and (own[0][1].state is not _QUEUED or own[0][1].ticket != own[0][0]):
                own.popleft()
            if shared and (not own or shared[0][0] < own[0][0]):
                task = shared.popleft()[1]
            elif own:
                task = own.popleft()[1]
            else:
                return
            self._assign(task, engine_id, out)

    # ------------------------------------------------------------------ finishing

    def _complete(self, task: _Task, engine_id: int, success: bool, out: list) -> None:
        """The task ran to its final outcome."""
        task.state = _DONE
        del self._tasks[task.msg_id]
        self._finish(task.msg_id, engine_id, success, out)

    def _fail_task(self, task: _Task, ename: str, evalue: str, out: list) -> None:
        """The task fails without (further) running; its dependents see a failure."""
        task.state = _DONE
        del self._tasks[task.msg_id]
        if task.blacklist or task.avoid:
            self._excluded_anywhere.pop(task.msg_id, None)
        out.append(Fail(task.msg_id, ename, evalue))
        self._finish(task.msg_id, None, False, out)

    def _finish(self, msg_id: str, engine_id: int | None, success: bool, out: list) -> None:
        """Record an outcome and release the tasks waiting on it.

        Releasing may fail dependents, which finishes them in turn; a worklist (rather
        than recursion) carries that through arbitrarily long chains.
        """
        self._done[msg_id] = (engine_id, success)
        if not self._dependents:
            return
        self._finished.append(msg_id)
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._finished:
                done_id = self._finished.popleft()
                waiting = self._dependents.pop(done_id, None)
                if waiting:
                    self._release(done_id, waiting, out)
        finally:
            self._releasing = False

    def _release(self, done_id: str, waiting: list[_Task], out: list) -> None:
        outcome = self._done.get(done_id)
        if outcome is None:  # forgotten meanwhile; cannot happen within one event
            return
        engine_id, success = outcome
        for task in waiting:
            if task.state is not _WAITING:
                continue
            self._settle(task, self._observe(task, done_id, engine_id, success), out)

    @staticmethod
    def _observe(task: _Task, dep_id: str, engine_id: int | None, success: bool) -> str:
        """Feed one finished dependency to the task's trackers; return the combined state."""
        after, follow = task.after, task.follow
        if after is not None and dep_id in after.spec.ids:
            after.observe(success, engine_id, dep_id)
        if follow is not None and dep_id in follow.spec.ids:
            follow.observe(success, engine_id, dep_id)
        return TaskScheduler._combined(task)

    @staticmethod
    def _combined(task: _Task) -> str:
        states = [t.state for t in (task.after, task.follow) if t is not None]
        if IMPOSSIBLE in states:
            return IMPOSSIBLE
        if WAITING in states:
            return WAITING
        return MET

    def _follow_pinned_dead(self, task: _Task) -> bool:
        """A follow-all dependency already ran (partly) on an engine that is gone."""
        follow = task.follow
        if follow is None or not follow.spec.all or not follow.engines:
            return False
        return any(e not in self._running for e in follow.engines)

    def _push_deadline(self, task: _Task) -> None:
        self._tickets += 1
        heapq.heappush(self._deadlines, (task.deadline, self._tickets, task))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ messages

    def _impossible_reason(self, task: _Task) -> str:
        for kind, tracker in (("after", task.after), ("follow", task.follow)):
            if tracker is None or tracker.state is not IMPOSSIBLE:
                continue
            culprit = tracker.culprit
            outcome = self._done.get(culprit) if culprit else None
            if kind == "follow" and tracker.spec.all and len(tracker.engines) > 1:
                why = (f"its dependencies ran on different engines {sorted(tracker.engines)}, so no "
                       "single engine satisfies all of them (use all=False to accept any)")
            elif outcome is not None and outcome[0] is None and kind == "follow" and outcome[1] is False:
                why = f"{culprit} failed without running on any engine, so there is no engine to follow"
            elif outcome is not None:
                why = f"{culprit} {'succeeded' if outcome[1] else 'failed'}, which does not count"
            else:
                why = "its dependencies finished in ways that do not count"
            return (f"Task {task.msg_id} can never run: its {kind!r} dependency "
                    f"({tracker.describe()}) can no longer be met: {why}.")
        return f"Task {task.msg_id} can never run: its dependencies can no longer be met."

    def _no_live_home(self, task: _Task) -> str:
        limits = []
        if task.follow is not None and task.follow.engines:
            limits.append(f"where its 'follow' dependencies ran (engines {sorted(task.follow.engines)})")
        if task.targets is not None:
            limits.append(f"on its targets {sorted(task.targets)}")
        where = " and ".join(limits) or "on any engine"
        refused = ""
        if task.blacklist:
            refused = f", except engines {sorted(task.blacklist)} which refused it (unmet @depend/@require)"
        return (f"Task {task.msg_id} can never run: it may only run {where}{refused}, and no "
                f"such engine is registered (live engines: {self.engines}).")

    def _interrupted_reason(self, task: _Task) -> str:
        return f"Task {task.msg_id} was stopped ({task.interrupted}) before it ran."


# ---------------------------------------------------------------------- validation


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"timeout must be a number of seconds, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds (0 or None: no timeout), not {timeout!r}")
    if timeout == 0 or math.isinf(timeout):
        return None  # ipyparallel: a zero timeout means none
    return float(timeout)


def _check_targets(targets: object) -> frozenset[int] | None:
    if targets is None:
        return None
    if isinstance(targets, bool):
        raise ValueError(f"targets must be engine ids, not {targets!r}")
    if isinstance(targets, int):
        return frozenset((targets,))
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Iterable):
        raise ValueError(f"targets must be a list of engine ids, not {targets!r}")
    ids = []
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, int):
            try:
                t = int(t)  # e.g. "3" from JSON metadata
            except (TypeError, ValueError):
                raise ValueError(f"targets must be engine ids (ints), got {t!r}") from None
        ids.append(t)
    return frozenset(ids) if ids else None


# ---------------------------------------------------------------------- schemes


class _Chooser:
    """Picks an engine with room. Subclasses keep whatever index makes that cheap.

    ``changed(e)`` is called after engine e's load or last-used time changed.
    ``pick_any()`` picks among all live engines with room (None if none);
    ``pick_from(candidates)`` among the given ones, all live with room, ascending.
    """

    def __init__(self, sched: TaskScheduler) -> None:
        self.sched = sched

    def add(self, engine_id: int) -> None:
        self.changed(engine_id)

    def remove(self, engine_id: int) -> None:
        pass

    def changed(self, engine_id: int) -> None:
        raise NotImplementedError

    def pick_any(self) -> int | None:
        raise NotImplementedError

    def pick_from(self, candidates: list[int]) -> int:
        raise NotImplementedError


class _LeastLoad(_Chooser):
    """Fewest outstanding tasks; ties go to the lowest engine id.

    A heap of (load, engine) over engines with room, with lazy deletion: entries whose
    load is out of date, or whose engine has no room (limits differ per engine with
    prefetch), are dropped when they surface; the heap is rebuilt when stale entries
    pile up.
    """

    def __init__(self, sched: TaskScheduler) -> None:
        super().__init__(sched)
        self.heap: list[tuple[int, int]] = []

    def changed(self, engine_id: int) -> None:
        sched = self.sched
        if sched._has_room(engine_id):
            heapq.heappush(self.heap, (len(sched._running[engine_id]), engine_id))
        if len(self.heap) > 4 * len(sched._running) + 32:
            self.heap = [(len(r), e) for e, r in sched._running.items() if sched._has_room(e)]
            heapq.heapify(self.heap)

    def pick_any(self) -> int | None:
        heap = self.heap
        sched = self.sched
        running = sched._running
        while heap:
            load, eid = heap[0]
            tasks = running.get(eid)
            if tasks is None or len(tasks) != load or not sched._has_room(eid):
                heapq.heappop(heap)
                continue
            return eid
        return None

    def pick_from(self, candidates: list[int]) -> int:
        running = self.sched._running
        return min(candidates, key=lambda e: len(running[e]))  # min() keeps the first (lowest id)


class _LRU(_Chooser):
    """Least recently assigned engine (never-used engines first, then lowest id).

    A heap of (last_used, engine) over engines with room, with lazy deletion.
    """

    def __init__(self, sched: TaskScheduler) -> None:
        super().__init__(sched)
        self.heap: list[tuple[int, int]] = []

    def changed(self, engine_id: int) -> None:
        sched = self.sched
        if sched._has_room(engine_id):
            heapq.heappush(self.heap, (sched._last_used[engine_id], engine_id))
        if len(self.heap) > 4 * len(sched._running) + 32:
            self.heap = [(sched._last_used[e], e) for e in sched._running if sched._has_room(e)]
            heapq.heapify(self.heap)

    def pick_any(self) -> int | None:
        heap = self.heap
        sched = self.sched
        last_used = sched._last_used
        while heap:
            used, eid = heap[0]
            if last_used.get(eid) != used or not sched._has_room(eid):
                heapq.heappop(heap)
                continue
            return eid
        return None

    def pick_from(self, candidates: list[int]) -> int:
        last_used = self.sched._last_used
        return min(candidates, key=lambda e: last_used[e])


class _RandomBase(_Chooser):
    """Random schemes: keep an indexable set of the engines with room."""

    def __init__(self, sched: TaskScheduler) -> None:
        super().__init__(sched)
        self.free: list[int] = []
        self.pos: dict[int, int] = {}

    def changed(self, engine_id: int) -> None:
        room = self.sched._has_room(engine_id)
        if room and engine_id not in self.pos:
            self.pos[engine_id] = len(self.free)
            self.free.append(engine_id)
        elif not room and engine_id in self.pos:
            self.remove(engine_id)

    def remove(self, engine_id: int) -> None:
        i = self.pos.pop(engine_id, None)
        if i is None:
            return
        last = self.free.pop()
        if last != engine_id:  # swap-remove keeps it O(1)
            self.free[i] = last
            self.pos[last] = i

    def pick_any(self) -> int | None:
        return self.pick_from(self.free) if self.free else None


class _PlainRandom(_RandomBase):
    """Uniformly random engine with room."""

    def pick_from(self, candidates: list[int]) -> int:
        return candidates[self.sched._rng.randrange(len(candidates))]


class _TwoBin(_RandomBase):
    """Draw two engines at random (with replacement), take the less recently used."""

    def pick_from(self, candidates: list[int]) -> int:
        rng = self.sched._rng
        n = len(candidates)
        a = candidates[rng.randrange(n)]
        b = candidates[rng.randrange(n)]
        last_used = self.sched._last_used
        return a if (last_used[a], a) <= (last_used[b], b) else b


class _Weighted(_RandomBase):
    """Draw two engines with probability proportional to inverse load, take the less loaded.

    An idle engine weighs a million times more than one with a single task (as in
    ipyparallel), so idle engines are strongly preferred.
    """

    def pick_from(self, candidates: list[int]) -> int:
        running = self.sched._running
        loads = [len(running[e]) for e in candidates]
        weights = [1.0 / (1e-6 + load) for load in loads]
        i, j = self.sched._rng.choices(range(len(candidates)), weights=weights, k=2)
        return candidates[j] if loads[j] < loads[i] else candidates[i]


_CHOOSERS: dict[str, type[_Chooser]] = {
    "leastload": _LeastLoad,
    "lru": _LRU,
    "twobin": _TwoBin,
    "weighted": _Weighted,
    "plainrandom": _PlainRandom,
}
