"""The Hub's bookkeeping: engines, their liveness, and task records.

A plain object with no I/O: the controller's server feeds it events (a registration
request, a channel confirming it is connected, a heartbeat, a request or a reply seen
on the wire) and acts on what it returns. Time is passed in, never read.

Engine life cycle::

    registration_request -> "registering" -- shell and control both say engine_ready --> "ready"
    "ready" -- heartbeats missed / disconnected / unregistration_request --> removed

An engine counts as ready only when its shell and control connections have both
reached the controller, so the first request routed to it cannot be lost. An engine
removed while it was still alive (stalled past its heartbeats, then back) is
remembered, so that the controller can tell it when its heartbeat shows up again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ipyparallel_lite.controller.store import BaseStore, JSONDict, MemoryStore, RecordNotFound
from ipyparallel_lite.versions import conflicts, versions

#: the channels an engine must confirm before it is ready
ENGINE_READY_CHANNELS = frozenset({"shell", "control"})
#: iopub message types whose content :meth:`Hub.output` records
OUTPUT_TYPES = frozenset({"stream", "execute_input", "execute_result", "error"})
#: characters of text (stdout, stderr, execute_input) a record keeps, and bytes of an
#: execute_result or error: a chatty task cannot fill the controller's memory
OUTPUT_LIMIT = 1 << 20


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Engine:
    id: int
    uuid: str
    info: dict
    registered: float
    state: str = "registering"
    confirmed: set = field(default_factory=set)
    last_beat: float = 0.0

    @property
    def ident(self) -> bytes:
        """The zmq routing identity of the engine's shell and control sockets."""
        return self.uuid.encode()


class RegistrationError(ValueError):
    """A registration request the Hub refuses, with a reason for the engine's log."""


class Hub:
    """Engines and task records of one controller.

    ``hb_period`` is the heartbeat period in seconds; an engine that has not answered
    for ``hb_period * max_misses`` is declared dead by :meth:`dead_engines`.
    ``version_check`` says what to do with an engine whose versions would break
    unpickling (see :mod:`ipyparallel_lite.versions`): ``"refuse"`` it, ``"warn"``
    (admit it, its info listing the conflicts), or ``"off"``.
    """

    def __init__(
        self,
        store: BaseStore | None = None,
        hb_period: float = 1.0,
        max_misses: int = 5,
        registration_timeout: float = 30.0,
        version_check: str = "refuse",
        output_limit: int = OUTPUT_LIMIT,
    ):
        if version_check not in ("refuse", "warn", "off"):
            raise ValueError(f"version_check must be 'refuse', 'warn' or 'off', not {version_check!r}")
        self.version_check = version_check
        self.output_limit = output_limit
        self.store: BaseStore = store if store is not None else MemoryStore()
        self.hb_period = hb_period
        self.max_misses = max_misses
        self.registration_timeout = registration_timeout
        self.engines: dict[int, Engine] = {}
        self._by_uuid: dict[str, Engine] = {}
        self._next_id = 0
        #: engine set -> [its first id, ranks still to register]: the ids of an MPI set
        self._rank_blocks: dict[str, list[int]] = {}
        #: uuid -> (id, reason) of engines removed against their will, newest last
        self._removed: OrderedDict[str, tuple[int, str]] = OrderedDict()

    # ---- engines ---------------------------------------------------------------

    def register(self, uuid: str, requested_id: int | None, info: dict, now: float) -> Engine:
        """Admit an engine in the ``registering`` state; raises RegistrationError."""
        if not isinstance(uuid, str) or not uuid:
            raise RegistrationError("registration_request needs a non-empty 'uuid'")
        if uuid in self._by_uuid:
            raise RegistrationError(f"an engine with uuid {uuid} is already registered")
        if requested_id is not None:
            if not isinstance(requested_id, int) or requested_id < 0:
                raise RegistrationError(f"engine id must be a non-negative int, not {requested_id!r}")
            if requested_id in self.engines:
                raise RegistrationError(f"engine id {requested_id} is taken")
            eid = requested_id
        else:
            eid = self._id_by_rank(info)
            if eid is None:
                while self._next_id in self.engines:
                    self._next_id += 1
                eid = self._next_id
        info = dict(info) if isinstance(info, dict) else {}
        skew = conflicts(versions(), info) if self.version_check != "off" else []
        if skew and self.version_check == "refuse":
            raise RegistrationError(
                f"the engine runs other versions than the controller ({'; '.join(skew)}): "
                "functions and data pickled by clients would fail to load there. Install the "
                "same versions on every machine, or start the controller with "
                "version_check='warn' to admit it anyway.")
        if skew:
            info["version_conflicts"] = skew
        self._next_id = max(self._next_id, eid + 1)
        engine = Engine(id=eid, uuid=uuid, info=info, registered=now, last_beat=now)
        self.engines[eid] = engine
        self._by_uuid[uuid] = engine
        return engine

    def _id_by_rank(self, info: Any) -> int | None:
        """The id of an MPI rank of an engine set: the set's first id + its rank.

        The first rank to register reserves ids for the whole set (every id from
        ``_next_id`` on is free), so ids follow ranks whatever order ranks arrive in.
        """
        if not isinstance(info, dict):
            return None
        key, rank, size = info.get("engine_set"), info.get("mpi_rank"), info.get("mpi_size")
        if not (isinstance(key, str) and isinstance(rank, int) and isinstance(size, int)
                and 0 <= rank < size):
            return None
        block = self._rank_blocks.get(key)
        if block is None:
            block = self._rank_blocks[key] = [self._next_id, size]
            self._next_id += size
        block[1] -= 1
        if block[1] <= 0:  # every rank came: forget the set
            del self._rank_blocks[key]
        eid = block[0] + rank
        return None if eid in self.engines else eid

    def confirm(self, uuid: str, channel: str, now: float) -> Engine | None:
        """Note that ``channel`` of an engine is connected; the engine when it just became ready."""
        engine = self._by_uuid.get(uuid)
        if engine is None or engine.state != "registering":
            return None
        engine.confirmed.add(channel)
        engine.last_beat = now
        if ENGINE_READY_CHANNELS <= engine.confirmed:
            engine.state = "ready"
            return engine
        return None

    def beat(self, uuid: str, now: float) -> bool:
        """Note a heartbeat; False if no registered engine has that uuid."""
        engine = self._by_uuid.get(uuid)
        if engine is None:
            return False
        engine.last_beat = now
        return True

    def dead_engines(self, now: float, grace: float | None = None) -> list[Engine]:
        """Engines silent for longer than ``grace`` (default: the missed-heartbeat limit),
        and registrations that never completed."""
        limit = self.hb_period * self.max_misses if grace is None else grace
        dead = []
        for engine in self.engines.values():
            if engine.state == "ready" and now - engine.last_beat > limit:
                dead.append(engine)
            elif engine.state == "registering" and now - engine.registered > self.registration_timeout:
                dead.append(engine)
        return dead

    #: how many removed engines are remembered for :meth:`take_removed`
    REMEMBER_REMOVED = 1024

    def remove(self, eid: int, forced_because: str | None = None) -> Engine | None:
        """Forget an engine; with ``forced_because``, remember why it was removed."""
        engine = self.engines.pop(eid, None)
        if engine is not None:
            del self._by_uuid[engine.uuid]
            if forced_because is not None:
                self._removed[engine.uuid] = (eid, forced_because)
                if len(self._removed) > self.REMEMBER_REMOVED:
                    self._removed.popitem(last=False)
        return engine

    def take_removed(self, uuid: str) -> tuple[int, str] | None:
        """``(id, reason)`` if ``uuid`` is an engine removed against its will, once."""
        return self._removed.pop(uuid, None)

    def by_uuid(self, uuid: str) -> Engine | None:
        return self._by_uuid.get(uuid)

    def ready_engines(self) -> dict[int, str]:
        """``{id: uuid}`` of ready engines, the ``engines`` of a ``connection_reply``."""
        return {e.id: e.uuid for e in self.engines.values() if e.state == "ready"}

    def engine_infos(self) -> dict[int, dict]:
        return {e.id: e.info for e in self.engines.values() if e.state == "ready"}

    # ---- task records ----------------------------------------------------------
    #
    # One call per transition of a task, made by the server where the transition
    # happens (submitted, assigned to an engine, finished or failed, resubmitted, lost):
    # a dict update in the store, never a copy of the message and never disk I/O (a
    # SQLite store writes in batches when the server flushes it on a timer). The
    # request's and the reply's frames are kept as they arrived; they are unpacked only
    # when a client asks for them. Headers and metadata are kept as dicts, with the JSON
    # text they arrived as when the caller passes it (``header_json``,
    # ``metadata_json``: the verified frames), which SQLite stores as it is
    # (:class:`JSONDict`). ``started`` comes with the reply's metadata. The
    # output keys (stdout, stderr, execute_input, execute_result, error) come from the
    # engines' iopub messages, one :meth:`output` call each.

    def submitted(
        self,
        msg_id: str,
        header: dict,
        metadata: dict,
        client_uuid: str,
        queue: str,
        engine_uuid: str | None = None,
        content: Any = None,
        buffers: list | None = None,
        header_json: Any = None,
        metadata_json: Any = None,
    ) -> None:
        # a literal: twice as fast as filling dict.fromkeys(RECORD_KEYS), on the hot path
        self.store.add_record(msg_id, {
            "msg_id": msg_id, "header": JSONDict.of(header, header_json),
            "metadata": JSONDict.of(metadata, metadata_json), "content": content,
            "buffers": buffers, "submitted": as_datetime(header.get("date")),
            "client_uuid": client_uuid, "engine_uuid": engine_uuid, "started": None,
            "completed": None, "resubmitted": None, "received": None, "result_header": None,
            "result_metadata": None, "result_content": None, "result_buffers": None,
            "queue": queue, "execute_input": None, "execute_result": None, "error": None,
            "stdout": None, "stderr": None,
            "label": metadata.get("label") if isinstance(metadata, dict) else None,
        })

    def assigned(self, msg_id: str, engine_uuid: str) -> None:
        try:  # one lookup, not two: a record missing (dropped meanwhile) is rare
            self.store.update_record(msg_id, {"engine_uuid": engine_uuid})
        except RecordNotFound:
            pass

    def finished(
        self, msg_id: str, header: dict, metadata: dict, content: Any, buffers: list,
        header_json: Any = None, metadata_json: Any = None,
    ) -> None:
        """Record a reply; ``content`` may stay packed bytes, it is unpacked on query."""
        received = utcnow()
        try:
            self.store.update_record(msg_id, {
                "result_header": JSONDict.of(header, header_json),
                "result_metadata": JSONDict.of(metadata, metadata_json),
                "result_content": content,
                "result_buffers": buffers,
                "engine_uuid": metadata.get("engine"),
                "started": as_datetime(metadata.get("started")),
                "completed": as_datetime(metadata.get("completed")) or received,
                "received": received,
            })
        except RecordNotFound:
            pass  # dropped by a client's purge meanwhile

    def late_result(
        self, msg_id: str, header: dict, metadata: dict, content: Any, buffers: list,
        header_json: Any = None, metadata_json: Any = None,
    ) -> bool:
        """Record a reply that came after the controller answered the task itself (its
        engine was declared dead): it replaces the controller's error, never an
        engine's result. Whether it was recorded."""
        store = self.store
        if msg_id not in store or not isinstance(store.get_value(msg_id, "result_content"), dict):
            return False  # no record, or an engine's reply is there already (a rerun's)
        self.finished(msg_id, header, metadata, content, buffers, header_json, metadata_json)
        return True

    def output(self, msg_id: str, msg_type: str, content: Any, size: int = 0) -> bool:
        """Record an iopub message of task ``msg_id`` (its parent): stream text appends
        to ``stdout``/``stderr``, ``execute_input`` sets the code, ``execute_result``
        and ``error`` their content. ``size``: the bytes the content arrived as.

        Text is cut at ``output_limit`` characters with a marker saying so; an
        execute_result or error larger than ``output_limit`` bytes keeps its names and
        a marker instead of its data. Whether the record changed (False for other
        message types, records the store lacks, and text past the limit).
        """
        if msg_type not in OUTPUT_TYPES or not isinstance(content, dict):
            return False
        store = self.store
        if msg_id not in store:
            return False
        if msg_type == "stream":
            key = content.get("name")
            text = content.get("text")
            if key not in ("stdout", "stderr") or not isinstance(text, str):
                return False
            value = self._bounded(store.get_value(msg_id, key), text)
        elif msg_type == "execute_input":
            key, code = msg_type, content.get("code")
            value = self._bounded(None, code) if isinstance(code, str) else None
        else:
            key = msg_type
            value = content if size <= self.output_limit else self._too_big(msg_type, content, size)
        if value is None:
            return False
        store.update_record(msg_id, {key: value})
        return True

    def input_from_request(self, msg_id: str, unpack: Callable[[Any], Any]) -> bool:
        """Set ``execute_input`` from the code of the recorded request, when the engine
        published none (its fast path does not echo the code); whether it did.
        ``unpack`` turns the stored request content (frames as they came) into a dict."""
        store = self.store
        if msg_id not in store or store.get_value(msg_id, "execute_input") is not None:
            return False
        content = unpack(store.get_value(msg_id, "content"))
        code = content.get("code") if isinstance(content, dict) else None
        if not isinstance(code, str):
            return False
        store.update_record(msg_id, {"execute_input": self._bounded(None, code)})
        return True

    def _truncation_marker(self) -> str:
        return (f"\n[... truncated: the Hub keeps {self.output_limit:,} characters of this "
                "output per task; the client that ran it has all of it ...]\n")

    def _bounded(self, kept: str | None, text: str) -> str | None:
        """``kept + text``, cut at the limit with a marker; None if ``kept`` was cut already."""
        kept = kept or ""
        if len(kept) + len(text) <= self.output_limit:
            return kept + text
        marker = self._truncation_marker()
        if kept.endswith(marker):
            return None
        return (kept + text)[: self.output_limit] + marker

    def _too_big(self, msg_type: str, content: dict, size: int) -> dict:
        """What an execute_result or error over the limit is recorded as."""
        marker = (f"[{msg_type} of {size:,} bytes not kept: over the Hub's limit of "
                  f"{self.output_limit:,} per task]")
        if msg_type == "error":
            return {"ename": str(content.get("ename"))[:200],
                    "evalue": str(content.get("evalue"))[:1000], "traceback": [marker]}
        return {"execution_count": content.get("execution_count"),
                "data": {"text/plain": marker}, "metadata": {}}

    def resubmitted(self, msg_id: str, new_msg_id: str, now: datetime | None = None) -> None:
        """Note on the original record that it ran again as ``new_msg_id`` (when, in
        the new record's ``resubmitted``)."""
        self.store.update_record(msg_id, {"resubmitted": new_msg_id})
        if new_msg_id in self.store:
            self.store.update_record(new_msg_id, {"resubmitted": now or utcnow()})

    def mark_lost(self, reason: str) -> list[str]:
        """Complete every record still pending with an error saying it was lost (a
        controller restored from its records after it died); their msg_ids."""
        lost = [rec["msg_id"] for rec in self.store.find_records({"completed": None}, ["msg_id"])]
        now = utcnow()
        for msg_id in lost:
            content = {"status": "error", "ename": "EngineError", "evalue": reason,
                       "traceback": [], "engine_info": {}}
            self.store.update_record(msg_id, {
                "result_header": {"msg_id": f"{msg_id}-lost", "msg_type": "apply_reply",
                                  "date": now.isoformat()},
                "result_metadata": {"status": "error", "engine_id": -1, "started": None,
                                    "completed": now.isoformat(), "dependencies_met": True},
                "result_content": content,
                "result_buffers": [],
                "completed": now,
                "received": now,
            })
        return lost


def as_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(value)  # what our engines and clients send
    except (TypeError, ValueError):
        pass
    try:  # "Z" for UTC, which fromisoformat reads only from Python 3.11
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
