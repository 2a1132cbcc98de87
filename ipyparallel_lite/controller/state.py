"""The controller's decisions as a pure state machine: events in, actions out.

:class:`ControllerState` owns the Hub (engines, task records), the task scheduler and
THE table of work in flight (``pending``: every request received and not yet
answered, with who waits for it and where it runs). The server (``server.py``)
verifies and parses frames, calls one event method here, and carries out the actions
it gets back (small dataclasses below). Nothing here touches a socket, an event loop
or a clock: times come in with the events (``now``, the loop's monotonic time), and
what must be signed is signed by the server when it carries an action out.

Events: a request from a client (:meth:`fan_out`, :meth:`task`, :meth:`abort`), a
direct request or its reply as the mux device routed it (:meth:`routed_request`,
:meth:`routed_reply`: recorded, never sent; a load-balanced task its client sent that
way is :meth:`claimed`), a reply from an engine (:meth:`reply`), an engine registering,
ready, answering a heartbeat or lost (:meth:`register`, :meth:`engine_ready`,
:meth:`pong`, :meth:`engine_lost`), a send the server could not make
(:meth:`engine_refused`), time passing (:meth:`tick`), and Hub queries
(:meth:`queue_status`, :meth:`results`, :meth:`db_records`, :meth:`purge`, ...).

Per-client flow control: a client connection may have at most ``client_window`` requests waiting
here (received, not yet answered). A request beyond that is answered at once with a
``TooManyPendingTasks`` error and never queued, so what one client can make the
controller hold is bounded. The window is announced in ``connection_reply`` (0: no limit).
Direct requests do not count: the mux device has delivered them before the core hears
of them, and the client's own window bounds them.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipyparallel_lite.connection import (
    LONE_TASK_IDENT,
    TASK_IDENT,
    is_claim,
    is_lone_claim,
    takes_replies_on_mux,
)
from ipyparallel_lite.controller import scheduler as sched
from ipyparallel_lite.controller.dependency import parse_dependency
from ipyparallel_lite.controller.hub import Engine, Hub, as_datetime
from ipyparallel_lite.controller.scheduler import TaskScheduler
from ipyparallel_lite.controller.store import NoStore, RecordNotFound
from ipyparallel_lite.controller.throttle import ThrottledLog

#: routing tags of requests forwarded to engines: which client socket a reply returns by
#: (engines know the task tag: see connection.TASK_IDENT)
MUX, TASK, BROADCAST = b"m", TASK_IDENT, b"b"
#: an engine's tag for a task it holds alone: a TASK whose success it may send the
#: client itself, through the mux device (:meth:`ControllerState.routed_reply`)
LONE_TASK = LONE_TASK_IDENT
#: requests that engines answer with exactly one reply: all that tasks and broadcasts carry
WORK_TYPES = ("apply_request", "execute_request")
#: what an engine answers on its shell channel (ipykernel's requests, and apply): a
#: direct request of any other type would wait forever for its reply
DIRECT_TYPES = (*WORK_TYPES, "kernel_info_request", "complete_request", "inspect_request",
                "is_complete_request", "history_request", "comm_info_request")
#: the ename of the answer to a request beyond its client's window
WINDOW_ENAME = "TooManyPendingTasks"
#: default of ``client_window``: requests one client may have waiting in the controller
CLIENT_WINDOW = 4096
#: record keys an engine's iopub fills, sent along with results from the Hub
OUTPUT_KEYS = ("execute_input", "execute_result", "error", "stdout", "stderr")
#: record keys holding times: a query's ISO strings for them are read as datetimes
DATE_KEYS = ("submitted", "started", "completed", "received", "resubmitted")


@dataclass(slots=True)
class Pending:
    """A request the controller has received and not yet seen answered."""

    client: bytes
    header: dict
    tag: bytes
    frames: list  # from DELIM on, kept to (re)send load-balanced tasks
    engine_id: int | None = None
    sends: int = 0  # times a load-balanced task went to an engine (reruns re-sign)


# ---- actions ----------------------------------------------------------------------


@dataclass(slots=True)
class SendToEngine:
    """Send ``frames`` (``[engine_ident, tag, client, DELIM, ...]``) to an engine's shell.

    ``header``: a fan-out copy's own header, to pack and sign in place of the client's.
    ``attempt`` > 0: a rerun, whose metadata gains ``attempt`` and is signed anew
    (engines drop a signature they have seen). If the engine cannot take it, tell
    :meth:`ControllerState.engine_refused`.
    """

    engine_id: int
    msg_id: str
    frames: list
    header: dict | None = None
    attempt: int = 0


@dataclass(slots=True)
class ReplyToClient:
    """Forward an engine's reply (``frames``, the client's identity first) to its client
    through the client socket of routing ``tag``."""

    tag: bytes
    client: bytes
    msg_id: str
    frames: list


@dataclass(slots=True)
class Fail:
    """Answer request ``msg_id`` with an error the client raises as ``ename``; with
    ``record``, the error is also the Hub record's result (``Store``)."""

    msg_id: str
    client: bytes
    tag: bytes
    parent: dict
    ename: str
    evalue: str
    engine_id: int | None
    record: bool = True


@dataclass(slots=True)
class Notify:
    """Publish ``msg_type`` with ``content`` on the notification channel."""

    msg_type: str
    content: dict


@dataclass(slots=True)
class Interrupt:
    """Stop task ``msg_id`` running on an engine (``ename``: TaskAborted or TaskTimeout)."""

    engine_ident: bytes
    msg_id: str
    ename: str


@dataclass(slots=True)
class Steal:
    """Ask an engine for those of ``msg_ids`` it has not begun (work stealing); its
    answer goes to :meth:`ControllerState.stolen`."""

    engine_ident: bytes
    msg_ids: tuple[str, ...]


@dataclass(slots=True)
class TellToExit:
    """Send an engine ``removal_notification`` in ``delay`` seconds; with ``restart``,
    the engine may register again instead of exiting (a restored controller to the
    engines of the one before), and :meth:`ControllerState.told_to_restart` is told once
    it was sent."""

    uuid: str
    engine_id: int
    reason: str
    restart: bool = False
    delay: float = 0.0


# ---- the state machine -----------------------------------------------------------


class ControllerState:
    """The Hub, the task scheduler and the work in flight of one controller.

    Every event method returns a list of actions (above) for the server to carry out,
    in order. ``record_output``: fill records' ``execute_input`` from requests.
    ``unpack`` turns a verified, stored frame (request or reply content) into
    a dict, for queries (when it reads JSON, the Hub keeps each message's header and
    metadata frames too, which its SQLite store writes as they came); ``restored``: the
    records are those of a controller that died (finished tasks named as dependencies
    are recalled from them).
    """

    def __init__(
        self,
        hub: Hub | None = None,
        scheduler: TaskScheduler | None = None,
        *,
        unpack: Callable[[bytes], Any],
        client_window: int = CLIENT_WINDOW,
        remember_finished: int = 10_000,
        restored: bool = False,
        record_output: bool = True,
        log: logging.Logger | None = None,
    ):
        if not isinstance(client_window, int) or client_window < 0:
            raise ValueError(f"client_window must be an int >= 0 (0: no limit), not {client_window!r}")
        self.hub = hub or Hub()
        self.scheduler = scheduler or TaskScheduler()
        self.unpack = unpack
        self.json_frames = _reads_json(unpack)
        self.client_window = client_window
        #: finished tasks that later tasks may still name as dependencies
        self.remember_finished = remember_finished
        self.restored = restored
        #: the Hub records output (an execute_request's code, when its engine echoes none)
        self.record_output = record_output and not isinstance(self.hub.store, NoStore)
        self.log = log or logging.getLogger("ipyparallel_lite.controller")
        #: for what a peer can provoke at will (garbage, late replies): bounded log volume
        self.warn = ThrottledLog(self.log).warning
        #: THE table of work in flight: msg_id -> who waits for it, where it runs
        self.pending: dict[str, Pending] = {}
        #: client connection (ROUTER identity) -> how many of ``pending`` it waits for
        self.waiting: dict[bytes, int] = {}
        #: replies each engine has sent, by engine identity: ``completed`` of a ``queue_reply``
        self.completed: dict[bytes, int] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._told_to_restart: set[str] = set()
        #: msg_ids added to ``pending`` since the server last took them, collected only
        #: while the server holds work until some requests arrive (controller.awaited)
        self.arrivals: list[str] | None = None

    def _json(self, frames: list) -> tuple:
        """The header and metadata frames of a message (``frames`` from DELIM on), the
        JSON text its dicts were read from, for the Hub to keep; Nones when the
        session's packer is not JSON."""
        return (frames[2], frames[4]) if self.json_frames else (None, None)

    # ---- the table of work in flight ---------------------------------------------

    def _admit(self, client: bytes, count: int) -> bool:
        """Whether ``client`` may have ``count`` more requests waiting here (direct
        requests do not count: the mux device routes them, and the client's own window
        bounds them).

        A client that takes replies on its mux socket (our own: it keeps to the window
        itself) may have as many more as there are tasks running on engines: an engine
        may have sent it some of their replies through the mux device (see
        :meth:`routed_reply`), and the client counts those slots free before this core
        reads the device's copies. What waits here stays bounded by the window plus
        what the engines hold."""
        window = self.client_window
        if not window:
            return True
        waiting = self.waiting.get(client, 0) + count
        return waiting <= window or (takes_replies_on_mux(client)
                                     and waiting <= window + self.scheduler.running())

    def _add(self, msg_id: str, pending: Pending) -> Pending:
        self.pending[msg_id] = pending
        if self.arrivals is not None:
            self.arrivals.append(msg_id)
        if pending.tag != MUX:
            client = pending.client
            self.waiting[client] = self.waiting.get(client, 0) + 1
        return pending

    def _take(self, msg_id: str) -> Pending | None:
        """Remove ``msg_id`` from the work in flight (it is answered now)."""
        pending = self.pending.pop(msg_id, None)
        if pending is not None and pending.tag != MUX:
            client = pending.client
            left = self.waiting[client] - 1
            if left:
                self.waiting[client] = left
            else:
                del self.waiting[client]
        return pending

    def _window_full(self, msg_id: str, client: bytes, tag: bytes, header: dict) -> Fail:
        waiting = self.waiting.get(client, 0)
        return Fail(msg_id, client, tag, header, WINDOW_ENAME, (
            f"Request refused: this client already has {waiting} requests waiting in the "
            f"controller, its limit (IPController.client_window = {self.client_window}). Wait "
            "for some results before submitting more, or raise the controller's client_window."),
            None, record=False)

    def _fail(self, msg_id: str, ename: str, evalue: str, engine_id: int | None = None) -> list:
        """Answer a request in flight with an error; [] if it was answered already."""
        pending = self._take(msg_id)
        if pending is None:
            return []
        self._forget_later(msg_id)
        eid = engine_id if engine_id is not None else pending.engine_id
        out: list = [Fail(msg_id, pending.client, pending.tag, pending.header, ename, evalue, eid)]
        if pending.tag != TASK and pending.engine_id is not None:
            # a direct request others may depend on: they learn it failed
            out.extend(self._scheduled(self.scheduler.record_result(msg_id, pending.engine_id, False)))
        return out

    def _forget_later(self, msg_id: str) -> None:
        """Keep the scheduler's memory of finished tasks as long as the Hub keeps records."""
        finished = self._finished
        finished.append(msg_id)
        if len(finished) > self.remember_finished:
            self.scheduler.forget([finished.popleft() for _ in range(len(finished) // 10)])

    # ---- requests from clients ---------------------------------------------------

    def routed_request(self, client: bytes, target_uuid: str, frames: list, header: dict,
                       metadata: Any, now: float) -> list:
        """A direct request the mux device routed to engine ``target_uuid`` (``frames``
        from DELIM on): recorded and tracked until its reply. It fails at once, answered
        by the controller, if no such engine is ready (the device dropped it, or gave it
        to an engine not serving yet) or engines do not answer its type. A load-balanced
        task its client sent that way is :meth:`claimed`."""
        msg_id = header["msg_id"]
        engine = self.hub.by_uuid(target_uuid)
        if is_claim(metadata) and header.get("msg_type") in WORK_TYPES:
            return self.claimed(client, engine, frames, header, metadata, now)
        pending = self._add(msg_id, Pending(client, header, MUX, []))
        self.hub.submitted(msg_id, header, metadata, header.get("session", ""), "mux",
                           target_uuid, frames[5], frames[6:], *self._json(frames))
        if engine is None or engine.state != "ready":
            return self._fail(msg_id, "EngineError", f"No engine with uuid {target_uuid!r} is "
                              "registered; it may have died. Use rc.ids for the live engines.")
        if header.get("msg_type") not in DIRECT_TYPES:
            return self._fail(msg_id, "ValueError", f"Request rejected: engines do not answer "
                              f"{header.get('msg_type')!r} requests")
        pending.engine_id = engine.id
        self.scheduler.note_pending(msg_id)
        return []

    def claimed(self, client: bytes, engine: Engine | None, frames: list, header: dict,
                metadata: dict, now: float) -> list:
        """A load-balanced task its client sent straight to ``engine`` through the mux
        device (a claim, connection.CLAIM): recorded, and placed there as if the
        scheduler had chosen it (which may ask tasks back from that engine: see
        :meth:`TaskScheduler.claim`). Its reply comes back through the device. If that
        engine is gone, the device dropped the task: the scheduler places it."""
        msg_id = header["msg_id"]
        if engine is None or engine.state != "ready":
            self.log.debug("claim %s for an engine that is gone: placed by the scheduler", msg_id)
            return self.task(client, frames, header, metadata, now)
        # sent once already: a send from here is a rerun, signed anew (engines drop a
        # signature they have seen, and this engine may get it back after a steal)
        self._add(msg_id, Pending(client, header, TASK, frames, engine_id=engine.id, sends=1))
        self.hub.submitted(msg_id, header, metadata, header.get("session", ""), "task",
                           engine.uuid, frames[5], frames[6:], *self._json(frames))
        try:
            return self._scheduled(self.scheduler.claim(msg_id, engine.id, now,
                                                        lone=is_lone_claim(metadata)))
        except ValueError as e:
            return self._fail(msg_id, "ValueError", f"Task rejected: {e}")

    def fan_out(self, client: bytes, frames: list, header: dict, metadata: Any) -> list:
        """One request for the engines its ``metadata["targets"]`` names (``broadcast``).

        Each engine gets its own copy whose ``msg_id`` is ``f"{msg_id}_{engine_id}"`` (the
        ids the client waits on); parent, metadata, content and buffers are the frames
        the client sent. From then on each copy is an ordinary direct request.
        """
        targets = metadata.get("targets") if isinstance(metadata, dict) else None
        if (not isinstance(targets, list) or not targets
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in targets)):
            # the client registered no reply ids we could answer: nothing to fail
            self.warn(client, "bad targets", "dropped broadcast request %s: metadata 'targets' "
                      "must be a non-empty list of engine ids, got %r", header["msg_id"], targets)
            return []
        msg_id, session_id = header["msg_id"], header.get("session", "")
        eids = list(dict.fromkeys(targets))  # repeated targets count once
        if not self._admit(client, len(eids)):
            return [self._window_full(f"{msg_id}_{eid}", client, BROADCAST,
                                      {**header, "msg_id": f"{msg_id}_{eid}"}) for eid in eids]
        work = header.get("msg_type") in WORK_TYPES
        tail = frames[3:]  # parent, metadata, content, *buffers: forwarded as they came
        out: list = []
        for eid in eids:
            sub_header = {**header, "msg_id": f"{msg_id}_{eid}"}
            sub_id = sub_header["msg_id"]
            engine = self.hub.engines.get(eid)
            # the copy's header is its own (packed when it is sent): only the metadata
            # is as it came
            self.hub.submitted(sub_id, sub_header, metadata, session_id, "broadcast",
                               engine.uuid if engine is not None else None, tail[2], tail[3:],
                               None, self._json(frames)[1])
            pending = self._add(sub_id, Pending(client, sub_header, BROADCAST, []))
            if not work:
                out += self._fail(sub_id, "ValueError", "Request rejected: only "
                                  f"{' and '.join(WORK_TYPES)} can go to several engines at "
                                  f"once, not {header.get('msg_type')!r}")
            elif engine is None or engine.state != "ready":
                out += self._fail(sub_id, "EngineError", f"No engine with id {eid} is "
                                  "registered; it may have died. Use rc.ids for the live engines.")
            else:
                pending.engine_id = eid
                self.scheduler.note_pending(sub_id)
                out.append(SendToEngine(eid, sub_id, [engine.ident, BROADCAST, client, *frames],
                                        header=sub_header))
        return out

    def task(self, client: bytes, frames: list, header: dict, metadata: Any, now: float) -> list:
        """A load-balanced task: recorded, then placed by the scheduler."""
        msg_id = header["msg_id"]
        if client and not self._admit(client, 1):  # b"": a resubmission, nobody waits
            return [self._window_full(msg_id, client, TASK, header)]
        md = metadata if isinstance(metadata, dict) else {}
        out: list = []
        if self.restored and (md.get("after") or md.get("follow")):
            out = self.recall_dependencies(md)  # tasks finished before the restart
        self._add(msg_id, Pending(client, header, TASK, frames))
        self.hub.submitted(msg_id, header, metadata, header.get("session", ""), "task", None,
                           frames[5], frames[6:], *self._json(frames))
        if header.get("msg_type") not in WORK_TYPES:
            # an engine answers nothing else: the task would hold its slot forever
            return out + self._fail(msg_id, "ValueError", f"Task rejected: only {' and '.join(WORK_TYPES)} "
                              f"can be load-balanced, not {header.get('msg_type')!r}")
        try:
            actions = self.scheduler.submit(
                msg_id,
                after=md.get("after") or None,
                follow=md.get("follow") or None,
                targets=md.get("targets") or None,
                timeout=md.get("timeout"),
                retries=md.get("retries") or 0,
                now=now,
            )
        except (ValueError, TypeError) as e:
            return out + self._fail(msg_id, "ValueError", f"Task rejected: {e}")
        return out + self._scheduled(actions)

    def abort(self, msg_ids: Any, now: float) -> list:
        """Abort tasks: waiting ones fail with TaskAborted, running ones are interrupted."""
        if not isinstance(msg_ids, list | str):
            msg_ids = []
        return self._scheduled(self.scheduler.abort(msg_ids, now))

    def tick(self, now: float) -> list:
        """Time passed: timeouts due at ``now`` fail or interrupt their tasks."""
        return self._scheduled(self.scheduler.tick(now))

    def next_deadline(self) -> float | None:
        """When :meth:`tick` is due next (the loop's time), or None."""
        return self.scheduler.next_deadline()

    def _scheduled(self, decisions: list) -> list:
        """The scheduler's decisions as actions for the server."""
        out: list = []
        for decision in decisions:
            if isinstance(decision, sched.Assign):
                out += self._assign(decision.msg_id, decision.engine_id)
            elif isinstance(decision, sched.Fail):
                out += self._fail(decision.msg_id, decision.ename, decision.evalue)
            elif isinstance(decision, sched.Interrupt):
                engine = self.hub.engines.get(decision.engine_id)
                if engine is not None and decision.msg_id in self.pending:
                    out.append(Interrupt(engine.ident, decision.msg_id, decision.ename))
            elif isinstance(decision, sched.Steal):
                engine = self.hub.engines.get(decision.engine_id)
                if engine is not None:
                    out.append(Steal(engine.ident, tuple(decision.msg_ids)))
        return out

    def _assign(self, msg_id: str, eid: int) -> list:
        pending = self.pending.get(msg_id)
        engine = self.hub.engines.get(eid)
        if pending is None or engine is None:
            return []
        pending.engine_id = eid
        self.hub.assigned(msg_id, engine.uuid)
        attempt = pending.sends
        pending.sends += 1
        client = pending.client
        # a task its engine holds alone: its success may go straight to the client
        tag = (LONE_TASK if self.scheduler.load(eid) == 1 and takes_replies_on_mux(client)
               else TASK)
        return [SendToEngine(eid, msg_id, [engine.ident, tag, client, *pending.frames],
                             attempt=attempt)]

    def stolen(self, engine_uuid: str, stolen: list[str], kept: list[str], now: float,
               begun: int | None = None, window: int | None = None) -> list:
        """An engine's answer to :class:`Steal`: it handed back ``stolen`` (not begun),
        and keeps ``kept`` (begun): the handed-back tasks are placed again, once the
        replies of the tasks it began before its last ``window`` of ``begun`` are in
        (see :meth:`TaskScheduler.stolen`)."""
        engine = self.hub.by_uuid(engine_uuid)
        if engine is None:
            return []  # removed meanwhile: its tasks were retried or failed then
        self.log.debug("engine %d handed back %d task(s), kept %d", engine.id, len(stolen), len(kept))
        for msg_id in stolen:
            pending = self.pending.get(msg_id)
            if pending is not None and pending.engine_id == engine.id:
                pending.engine_id = None  # unassigned until placed again
        return self._scheduled(self.scheduler.stolen(engine.id, stolen, kept=kept, now=now,
                                                     begun=begun, window=window))

    def engine_refused(self, engine_id: int, msg_id: str, queue_bytes: int) -> list:
        """A request could not be sent: ``queue_bytes`` of requests already wait for its
        engine. (An engine that is gone is :meth:`engine_lost`.)"""
        return self._fail(msg_id, "EngineError", f"Engine {engine_id} has not read the "
                          f"{queue_bytes >> 20} MB of requests already waiting for it; this one "
                          "was refused. Wait for its queue to shrink, or use other engines.",
                          engine_id=engine_id)

    # ---- replies from engines ----------------------------------------------------

    def reply(self, engine_uuid: str, tag: bytes, client: bytes, parent_id: str, frames: list,
              header: dict, metadata: dict, msg_type: str, now: float) -> list:
        """An engine's reply to ``parent_id``; ``frames`` from DELIM on, as they arrived.
        A load-balanced task's carries its number on that engine (``seq``), which steal
        answers wait for (:meth:`TaskScheduler.replied`): counted after the reply, so
        that the task is done here before an answer naming it is taken."""
        engine = self.hub.by_uuid(engine_uuid)
        if engine is None:
            return self._late_reply(engine_uuid, parent_id, frames, header, metadata)
        out = self._reply(engine, tag, client, parent_id, frames, header, metadata, msg_type, now)
        seq = metadata.get("seq")
        if seq is not None:
            out += self._scheduled(self.scheduler.replied(engine.id, seq, now))
        return out

    def _reply(self, engine: Engine, tag: bytes, client: bytes, parent_id: str, frames: list,
               header: dict, metadata: dict, msg_type: str, now: float) -> list:
        if tag == LONE_TASK:
            tag = TASK
        pending = self.pending.get(parent_id)
        out: list = []
        if tag == TASK and pending is not None:
            decisions = self.scheduler.task_done(parent_id, engine.id, success=metadata.get("status") == "ok",
                                                 now=now, unmet=metadata.get("dependencies_met") is False,
                                                 run_time=metadata.get("run_time"))
            rerun = self.scheduler.is_pending(parent_id)  # retries, or an unmet dependency
            overruled = any(isinstance(d, sched.Fail) and d.msg_id == parent_id for d in decisions)
            if rerun:
                pending.engine_id = None
            out = self._scheduled(decisions)
            if rerun or overruled:
                return out  # the client waits for the rerun, or gets the scheduler's verdict
        # the client before the bookkeeping (a task's next assignment goes first: its
        # engine starts sooner); what follows only records the result
        out.append(ReplyToClient(tag, client, parent_id, [client, *frames]))
        if tag != TASK:
            out += self._scheduled(self.scheduler.record_result(parent_id, engine.id,
                                                                metadata.get("status") == "ok"))
        self._take(parent_id)
        ident = engine.ident
        self.completed[ident] = self.completed.get(ident, 0) + 1
        self._forget_later(parent_id)
        self.hub.finished(parent_id, header, metadata, frames[5], frames[6:], *self._json(frames))
        if self.record_output and msg_type == "execute_reply":
            self.hub.input_from_request(parent_id, self._unpacked)
        return out

    def routed_reply(self, engine_uuid: str, client: bytes, parent_id: str, frames: list,
                     header: dict, metadata: dict, msg_type: str, now: float) -> list:
        """An engine's reply that the mux device delivered to ``client``: :meth:`reply`,
        without sending it again. A direct request's, or a load-balanced task's success
        (engines send a lone one that way; it is final, so nothing holds it back)."""
        pending = self.pending.get(parent_id)
        tag = TASK if pending is not None and pending.tag == TASK else MUX
        return [action for action in self.reply(engine_uuid, tag, client, parent_id, frames,
                                                 header, metadata, msg_type, now)
                if type(action) is not ReplyToClient]

    def _late_reply(self, engine_uuid: str, parent_id: str, frames: list, header: dict,
                    metadata: dict) -> list:
        """A reply from an engine removed before it answered (it stalled past its
        heartbeats, then came back). Its client already has an answer (EngineError, or
        a rerun's result), so nothing goes to the client; the computed result replaces
        the controller's EngineError in the Hub's record, for ``get_result``/``db_query``."""
        if parent_id not in self.pending and self.hub.late_result(
                parent_id, header, metadata, frames[5], frames[6:], *self._json(frames)):
            self.warn(engine_uuid.encode(), "late reply", "stored the late result of %s from "
                      "removed engine %s in the Hub; its client had its answer already",
                      parent_id, engine_uuid)
        else:
            self.warn(engine_uuid.encode(), "late reply", "dropped the reply to %s from an "
                      "engine removed before it answered; the task has another answer", parent_id)
        return []

    # ---- engines -----------------------------------------------------------------

    def register(self, uuid: Any, requested_id: Any, info: Any, now: float) -> Engine:
        """An engine asks to register: admitted (``registering``) or RegistrationError."""
        return self.hub.register(uuid, requested_id, info, now)

    def engine_ready(self, uuid: str, channel: str, now: float) -> list:
        """An engine's ``channel`` (shell or control) says it is connected."""
        engine = self.hub.confirm(uuid, channel, now)
        if engine is None:
            return []
        self.log.info("engine %d ready", engine.id)
        out = self._scheduled(self.scheduler.add_engine(engine.id, now))
        out.append(Notify("registration_notification",
                          {"id": engine.id, "uuid": engine.uuid, "info": engine.info}))
        return out

    def pong(self, uuid: str, now: float) -> list:
        """An engine answered a heartbeat."""
        if self.hub.beat(uuid, now):
            return []
        removed = self.hub.take_removed(uuid)
        if removed is not None:
            # alive after all (it stalled past its heartbeats): it will get no work, so it
            # should not linger unnoticed; told one heartbeat period later, so that the
            # replies it finished while stalled reach the Hub before it exits
            eid, reason = removed
            self.log.warning("engine %d answers again after it was removed (%s): told to exit",
                             eid, reason)
            return [TellToExit(uuid, eid, reason, delay=self.hub.hb_period)]
        if self.restored and uuid not in self._told_to_restart:
            # registered with the controller that died: its id, and any task it ran, are
            # gone with it; a plain message in its log beats an engine nobody can reach
            return [TellToExit(uuid, -1, "the controller was restarted and this engine's "
                               "registration was lost with it", restart=True)]
        return []

    def told_to_restart(self, uuid: str) -> None:
        """An engine of the controller before a restart was told to exit (once is enough)."""
        self._told_to_restart.add(uuid)
        self.log.warning("engine %s registered with the controller before its restart: "
                         "told to register again (or exit)", uuid)

    def dead_engines(self, now: float, since: float | None = None) -> list[int]:
        """Engines silent too long (or since ``since``, after a dropped connection)."""
        grace = None if since is None else now - since
        return [engine.id for engine in self.hub.dead_engines(now, grace)]

    def engine_lost(self, eid: int, reason: str, now: float) -> list:
        """Engine ``eid`` is gone (dead, unreachable, or unregistered): its direct
        requests fail with EngineError, its tasks fail or run elsewhere."""
        engine = self.hub.remove(eid, None if reason == "unregistered" else reason)
        if engine is None:
            return []
        self.log.warning("engine %d removed: %s", eid, reason)
        out: list = []
        lost = [m for m, p in self.pending.items() if p.engine_id == eid and p.tag != TASK]
        for msg_id in lost:
            out += self._fail(msg_id, "EngineError", f"Engine {eid} died or was stopped "
                              f"({reason}) while running this task. Its result is lost; "
                              "resubmit to another engine.", engine_id=eid)
        if engine.state == "ready":
            out += self._scheduled(self.scheduler.remove_engine(eid, now))
            out.append(Notify("unregistration_notification",
                              {"id": eid, "uuid": engine.uuid, "reason": reason}))
        return out

    # ---- Hub queries ---------------------------------------------------------------
    #
    # Each reads or changes the Hub's records; a bad request raises, and the server
    # answers it with ``status: error`` and the exception's message.

    def connection(self) -> dict:
        """What a ``connection_reply`` says about engines, scheduling and the window."""
        return {
            "engines": {str(k): v for k, v in self.hub.ready_engines().items()},
            "engine_info": {str(k): v for k, v in self.hub.engine_infos().items()},
            "task_scheme": self.scheduler.scheme,
            "window": self.client_window,
            # the hwm of the tasks a client sends straight to engines (CLAIM; 0: none)
            "claims": self.scheduler.claim_hwm,
        }

    def queue_status(self, targets: Any, verbose: bool) -> dict:
        """Per engine its direct requests (``queue``), tasks and replies sent; the
        tasks not assigned yet."""
        targets = targets or list(self.hub.ready_engines())
        reply: dict[str, Any] = {}
        for eid in targets:
            if eid not in self.hub.engines:
                raise ValueError(f"no engine {eid!r}; registered engines are {sorted(self.hub.engines)}")
            mine = [m for m, p in self.pending.items() if p.engine_id == eid]
            queue = [m for m in mine if self.pending[m].tag != TASK]
            tasks = [m for m in mine if self.pending[m].tag == TASK]
            completed = self.completed.get(self.hub.engines[eid].ident, 0)
            if verbose:
                reply[str(eid)] = {"queue": queue, "tasks": tasks, "completed": completed}
            else:
                reply[str(eid)] = {"queue": len(queue), "tasks": len(tasks), "completed": completed}
        unassigned = [m for m, p in self.pending.items() if p.tag == TASK and p.engine_id is None]
        reply["unassigned"] = unassigned if verbose else len(unassigned)
        return reply

    def unrecorded(self, msg_ids: list) -> list[str]:
        """Those of ``msg_ids`` (str) the controller has no record of, in flight or done."""
        return [m for m in msg_ids if isinstance(m, str) and m not in self.pending
                and m not in self.hub.store]

    def known_records(self, msg_ids: Any, request: str) -> list[str]:
        """``msg_ids`` checked to be a list of str naming records; the unknown ones are
        named in one error."""
        if not isinstance(msg_ids, list) or not all(isinstance(m, str) for m in msg_ids):
            raise TypeError(f"{request} needs 'msg_ids', a list of str, got {msg_ids!r}")
        unknown = self.unrecorded(msg_ids)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            if isinstance(self.hub.store, NoStore):
                raise RecordNotFound(f"no record of {shown}: this controller keeps no task records "
                                     "(store_class='none')")
            raise RecordNotFound(f"no record of task(s) {shown}: never submitted to this "
                                 "controller, or purged")
        return msg_ids

    def _is_pending(self, msg_id: str) -> bool:
        return msg_id in self.pending or self.hub.store.get_record(msg_id).get("completed") is None

    def _unpacked(self, value: Any) -> Any:
        """A message part as a dict: stored frames are unpacked here, on query."""
        if isinstance(value, dict | list) or value is None:
            return value
        return self.unpack(value)

    def results(self, msg_ids: Any, status_only: bool) -> tuple[dict, list]:
        """A ``result_reply``'s content, and its buffers."""
        msg_ids = self.known_records(msg_ids, "result_request")
        reply: dict[str, Any] = {"status": "ok", "pending": [], "completed": []}
        buffers: list = []
        for msg_id in msg_ids:
            record = None if msg_id in self.pending else self.hub.store.get_record(msg_id)
            if record is None or record.get("completed") is None:
                reply["pending"].append(msg_id)
                continue
            reply["completed"].append(msg_id)
            if not status_only:
                result_buffers = record["result_buffers"] or []
                reply[msg_id] = {
                    "header": record["result_header"],
                    "metadata": record["result_metadata"],
                    "content": self._unpacked(record["result_content"]),
                    "nbuffers": len(result_buffers),
                    "outputs": {k: record.get(k) for k in OUTPUT_KEYS if record.get(k) is not None},
                }
                buffers.extend(result_buffers)
        return reply, buffers

    def db_records(self, query: Any, keys: Any) -> tuple[dict, list]:
        """A ``db_reply``'s content for ``{query, keys}``, and its buffers (counted per
        record in ``buffer_lens`` and ``result_buffer_lens``)."""
        if keys is not None and (not isinstance(keys, list)
                                 or not all(isinstance(k, str) for k in keys)):
            raise TypeError(f"db_request 'keys' must be a list of str or None, got {keys!r}")
        records = self.hub.store.find_records(_dates_in_query(query), keys)
        buffers: list = []
        lens: dict[str, list] = {"buffers": [], "result_buffers": []}
        for record in records:
            for key in ("content", "result_content"):
                if key in record:
                    record[key] = self._unpacked(record[key])
            for key, counts in lens.items():
                bufs = record.pop(key, None)
                counts.append(None if bufs is None else len(bufs))
                buffers.extend(bufs or [])
        return {"status": "ok", "records": records, "buffer_lens": lens["buffers"],
                "result_buffer_lens": lens["result_buffers"]}, buffers

    def purge(self, msg_ids: Any, engine_ids: Any) -> None:
        """Forget completed records: ``msg_ids`` (a list, or ``"all"``) and the records of
        ``engine_ids``. Pending tasks cannot be purged; nothing is purged then."""
        msg_ids, engine_ids = msg_ids or [], engine_ids or []
        if not isinstance(engine_ids, list) or not all(isinstance(e, int) for e in engine_ids):
            raise TypeError(f"purge_request 'engine_ids' must be a list of engine ids, got {engine_ids!r}")
        gone = [e for e in engine_ids if e not in self.hub.engines]
        if gone:
            raise ValueError(f"no engine {gone}; registered engines are {sorted(self.hub.engines)}")
        store = self.hub.store
        if msg_ids == "all":
            store.drop_matching_records({"completed": {"$ne": None}})
        else:
            msg_ids = self.known_records(msg_ids, "purge_request")
            pending = [m for m in msg_ids if self._is_pending(m)]
            if pending:
                raise ValueError(f"cannot purge pending task(s) {', '.join(pending[:5])}: wait for "
                                 "them (or abort them) first; nothing was purged")
            for msg_id in msg_ids:
                store.drop_record(msg_id)
        for eid in engine_ids:
            store.drop_matching_records({"engine_uuid": self.hub.engines[eid].uuid,
                                         "completed": {"$ne": None}})

    def to_resubmit(self, msg_ids: Any) -> list[dict]:
        """The records of finished requests ``msg_ids``, checked to hold their request."""
        msg_ids = self.known_records(msg_ids, "resubmit_request")
        pending = [m for m in msg_ids if self._is_pending(m)]
        if pending:
            raise ValueError(f"cannot resubmit pending task(s) {', '.join(pending[:5])}: they have "
                             "not finished; nothing was resubmitted")
        records = [self.hub.store.get_record(m) for m in msg_ids]
        missing = [r["msg_id"] for r in records if not isinstance(r.get("header"), dict)
                   or r.get("content") is None]
        if missing:
            raise ValueError(f"cannot resubmit {', '.join(missing[:5])}: the record does not hold "
                             "the request")
        return records

    def resubmit_metadata(self, record: dict) -> dict:
        """The metadata a resubmission of ``record`` runs with: a direct request keeps
        its engine (or fails plainly when that engine is gone)."""
        md = dict(record.get("metadata") or {})
        if record.get("queue") != "task":
            engine = self.hub.by_uuid(record.get("engine_uuid") or "")
            md["targets"] = [engine.id] if engine is not None else [-1]
        return md

    @staticmethod
    def _dependency_ids(md: dict) -> list[str]:
        """The msg_ids ``md``'s ``after``/``follow`` name (none of a malformed one: the
        scheduler rejects it with the reason)."""
        ids: list[str] = []
        for key in ("after", "follow"):
            try:
                spec = parse_dependency(md.get(key) or None)
            except ValueError:
                continue
            if spec is not None:
                ids += spec.ids
        return ids

    def unknown_dependencies(self, md: Any) -> list[str]:
        """The msg_ids a task with metadata ``md`` depends on that the controller does
        not know (neither submitted nor recorded by the Hub)."""
        if not isinstance(md, dict):
            return []
        scheduler, store = self.scheduler, self.hub.store
        return [dep for dep in self._dependency_ids(md) if not (scheduler.knows(dep) or dep in store)]

    def recall_dependencies(self, md: dict) -> list:
        """Tell the scheduler how the finished tasks that ``md``'s ``after``/``follow``
        name ended, from the Hub's records: it forgets finished tasks after a while (and
        a restored controller never saw them), which would make them unknown ids."""
        out: list = []
        for dep in self._dependency_ids(md):
            if dep in self.pending or dep not in self.hub.store:
                continue
            record = self.hub.store.get_record(dep)
            if record.get("completed") is None:
                continue
            engine = self.hub.by_uuid(record.get("engine_uuid") or "")
            status = (record.get("result_metadata") or {}).get("status")
            out += self._scheduled(self.scheduler.record_result(dep, engine.id if engine else -1,
                                                                status == "ok"))
        return out


def _reads_json(unpack: Callable[[bytes], Any]) -> bool:
    """Whether ``unpack`` reads JSON (the session's default packer), so that the
    frames it verified are JSON text a store can keep as it is."""
    try:
        return unpack(b'{"json": [1, null]}') == {"json": [1, None]}
    except Exception:  # a pickle or msgpack reader, say
        return False


def _dates_in_query(query: Any) -> Any:
    """``query`` with ISO time strings on DATE_KEYS as datetimes (JSON carried them as str)."""
    if not isinstance(query, dict):
        return query

    def convert(value: Any) -> Any:
        if isinstance(value, str):
            return as_datetime(value) or value
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return {k: convert(v) if k in DATE_KEYS else v for k, v in query.items()}
