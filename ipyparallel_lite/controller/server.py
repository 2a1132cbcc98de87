"""The controller's I/O: zmq sockets on one asyncio loop, moving frames.

Everything that decides something lives elsewhere: :class:`~.hub.Hub` keeps engines
and records, :class:`~.scheduler.TaskScheduler` picks engines for load-balanced tasks.
This module reads the header and metadata a decision needs, verifies the signature,
and forwards the original frames: content and buffers are never re-serialized.

Routing frames (after the ROUTER's identity frame)::

    client -> mux      [engine_uuid, DELIM, sig, header, parent, metadata, content, *buffers]
    client -> mux      [DELIM, ...]  to several engines: metadata["targets"] (see _fan_out)
    client -> task     [DELIM, ...]
    client -> control  [engine_uuid, DELIM, ...]  to one engine, or [DELIM, ...] to the controller
    client -> broadcast  [DELIM, ...]  metadata["targets"] lists engine ids (see on_broadcast)
    controller -> engine (shell or control)  [engine_uuid, tag, client_ident, DELIM, ...]

Engines answer with the identities they were given, so ``tag`` (``m`` mux, ``t`` task,
``b`` broadcast, ``c`` control) tells which client socket a reply returns through.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from jupyter_client.session import Session
from zmq.devices import ThreadDevice

from ipyparallel_lite import fastzmq
from ipyparallel_lite.connection import unpack_message
from ipyparallel_lite.controller.hub import Hub, RegistrationError, utcnow
from ipyparallel_lite.controller.scheduler import Assign, Fail, Interrupt, TaskScheduler

DELIM = b"<IDS|MSG>"
MUX, TASK, CONTROL = b"m", b"t", b"c"
#: a broadcast request's per-engine copy; handled like a mux request once fanned out
BROADCAST = b"b"
#: requests that engines answer with exactly one reply: all that tasks and broadcasts carry
WORK_TYPES = ("apply_request", "execute_request")
#: what an engine answers on its shell channel (ipykernel's requests, and apply): a
#: direct request of any other type would wait forever for its reply
DIRECT_TYPES = (*WORK_TYPES, "kernel_info_request", "complete_request", "inspect_request",
                "is_complete_request", "history_request", "comm_info_request")
#: how far into a message the delimiter may sit; anything deeper is garbage
MAX_IDENTS = 4
#: messages handled per socket before other sockets get their turn
BATCH = 256


@dataclass(slots=True)
class Pending:
    """A request the controller has forwarded (or holds) and not yet seen answered."""

    client: bytes
    header: dict
    tag: bytes
    frames: list  # from DELIM on, kept to (re)send load-balanced tasks
    engine_id: int | None = None
    sends: int = 0  # times a load-balanced task went to an engine (reruns re-sign)


def _split(frames: list) -> tuple[list[bytes], list] | None:
    """Routing identities and the message frames from DELIM on, or None if malformed."""
    for i in range(min(len(frames), MAX_IDENTS + 1)):
        if frames[i].bytes == DELIM:
            return [f.bytes for f in frames[:i]], frames[i:]
    return None


class Controller:
    """One controller process: Hub, schedulers and relays over zmq.

    ``ip`` is the interface every socket binds to (127.0.0.1 unless told otherwise).
    Call :meth:`bind` then :meth:`start` inside a running loop; :meth:`connection_info`
    gives what the connection files hold.
    """

    def __init__(
        self,
        session: Session,
        hub: Hub | None = None,
        scheduler: TaskScheduler | None = None,
        ip: str = "127.0.0.1",
        log: logging.Logger | None = None,
        disconnect_grace: float = 1.0,
        remember_finished: int = 10_000,
    ):
        self.session = session
        self.hub = hub or Hub()
        self.scheduler = scheduler or TaskScheduler()
        self.ip = ip
        self.log = log or logging.getLogger("ipyparallel_lite.controller")
        self.disconnect_grace = disconnect_grace
        #: finished tasks that later tasks may still name as dependencies
        self.remember_finished = remember_finished
        self._finished: collections.deque[str] = collections.deque()
        self.context = zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        self.ports: dict[str, int] = {}
        self.engine_ports: dict[str, int] = {}
        self.pending: dict[str, Pending] = {}
        #: replies each engine has sent, by engine uuid: ``completed`` of a ``queue_reply``
        self.completed: dict[bytes, int] = {}
        self._readers: list[fastzmq.Drainer] = []
        self._timers: list[asyncio.TimerHandle] = []
        self._deadline: asyncio.TimerHandle | None = None
        self._hb_counter = 0
        self._iopub: ThreadDevice | None = None
        self.stopped = asyncio.Event()

    # ---- set-up ----------------------------------------------------------------

    def _bind(self, name: str, kind: int, ports: dict) -> zmq.Socket:
        sock = fastzmq.socket(self.context, kind)
        sock.linger = 0
        if kind == zmq.ROUTER:
            sock.router_mandatory = 1  # a send to a vanished peer raises instead of vanishing
        ports[name] = sock.bind_to_random_port(f"tcp://{self.ip}")
        self.sockets[f"{name}@{'engine' if ports is self.engine_ports else 'client'}"] = sock
        return sock

    def bind(self) -> None:
        c, e = self.ports, self.engine_ports
        self.registration = self._bind("registration", zmq.ROUTER, c)
        e["registration"] = c["registration"]
        self.notification = self._bind("notification", zmq.PUB, c)
        self.mux = self._bind("mux", zmq.ROUTER, c)
        self.task = self._bind("task", zmq.ROUTER, c)
        self.control = self._bind("control", zmq.ROUTER, c)
        self.broadcast = self._bind("broadcast", zmq.ROUTER, c)
        self.engine_shell = self._bind("shell", zmq.ROUTER, e)
        self.engine_control = self._bind("control", zmq.ROUTER, e)
        self.hb_ping = self._bind("hb_ping", zmq.PUB, e)
        self.hb_pong = self._bind("hb_pong", zmq.ROUTER, e)
        # iopub is a pure relay: libzmq forwards it in its own thread, without the GIL
        self._iopub = ThreadDevice(zmq.FORWARDER, zmq.SUB, zmq.PUB)
        self._iopub.setsockopt_in(zmq.SUBSCRIBE, b"")
        self._iopub.setsockopt_in(zmq.LINGER, 0)
        self._iopub.setsockopt_out(zmq.LINGER, 0)
        e["iopub"] = self._iopub.bind_in_to_random_port(f"tcp://{self.ip}")
        c["iopub"] = self._iopub.bind_out_to_random_port(f"tcp://{self.ip}")
        self._iopub.daemon = True
        self._iopub.start()
        self._monitor = self.engine_shell.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def connection_info(self, kind: str) -> dict:
        ports = self.ports if kind == "client" else self.engine_ports
        return {
            "interface": f"tcp://{self.ip}",
            "ports": dict(ports),
            "key": self.session.key.decode(),
            "signature_scheme": self.session.signature_scheme,
            "unpacker": self.session.unpacker,
            "pack": self.session.packer,
            "task_scheme": self.scheduler.scheme,
            "hwm": self.scheduler.hwm,
            "hb_period": self.hub.hb_period,
            "controller_pid": os.getpid(),
        }

    def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        handlers = {
            self.registration: self.on_registration,
            self.mux: self.on_mux,
            self.task: self.on_task,
            self.control: self.on_control,
            self.broadcast: self.on_broadcast,
            self.engine_shell: self.on_engine_shell,
            self.engine_control: self.on_engine_control,
            self.hb_pong: self.on_pong,
            self._monitor: self.on_monitor,
        }
        self._reader_of = {}
        for sock, handler in handlers.items():
            reader = fastzmq.Drainer(loop, sock, self._guarded(handler), BATCH)
            self._readers.append(reader)
            self._reader_of[sock] = reader
        self._heartbeat()
        self.log.info("controller ready: client ports %s", self.ports)

    def _guarded(self, handler: Callable[[list], None]) -> Callable[[list], None]:
        def handle(frames: list) -> None:
            try:
                handler(frames)
            except Exception:
                self.log.exception("error handling a message; the controller goes on")
        return handle

    def stop(self) -> None:
        for reader in self._readers:
            reader.close()
        for timer in self._timers:
            timer.cancel()
        if self._deadline:
            self._deadline.cancel()
        try:
            self.engine_shell.disable_monitor()
        except zmq.ZMQError:
            pass
        self.context.destroy(linger=0)
        self.stopped.set()

    # ---- sending ---------------------------------------------------------------

    def _send(self, sock: zmq.Socket, frames: list) -> bool:
        """Send frames; False when the peer is gone (router_mandatory)."""
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise
        finally:
            reader = self._reader_of.get(sock)
            if reader is not None:
                reader.kick()
        return True

    def _reply(self, sock: zmq.Socket, ident: list[bytes], msg_type: str, content: dict,
               parent: dict | None = None, metadata: dict | None = None) -> None:
        msg = self.session.msg(msg_type, content, parent=parent, metadata=metadata)
        self._send(sock, self.session.serialize(msg, ident=ident))

    def _notify(self, msg_type: str, content: dict) -> None:
        msg = self.session.msg(msg_type, content)
        self.notification.send_multipart(self.session.serialize(msg, ident=[msg_type.encode()]))

    def _parse(self, frames: list, *, content: bool = False) -> tuple[list[bytes], list, dict] | None:
        """Verify and unpack a message; None (and a log line) for anything malformed."""
        split = _split(frames)
        if split is None:
            self.log.warning("dropped a message with no <IDS|MSG> delimiter (%d frames)", len(frames))
            return None
        idents, rest = split
        if len(rest) < 6:
            self.log.warning("dropped a truncated message (%d frames after the delimiter)", len(rest))
            return None
        try:
            msg = unpack_message(self.session, rest[1:], content=content)
        except Exception as e:
            self.log.warning("dropped a message that failed verification: %s", e)
            return None
        if not isinstance(msg.get("header"), dict) or "msg_id" not in msg["header"]:
            self.log.warning("dropped a message without a header msg_id")
            return None
        return idents, rest, msg

    # ---- registration and queries ----------------------------------------------

    def on_registration(self, frames: list) -> None:
        parsed = self._parse(frames, content=True)
        if parsed is None:
            return
        idents, _, msg = parsed
        msg_type = msg["header"]["msg_type"]
        handler = getattr(self, f"handle_{msg_type}", None)
        if handler is None:
            self.log.warning("unknown message type %r on the registration socket", msg_type)
            reply_type = msg_type.replace("_request", "") + "_reply"
            self._reply(self.registration, idents, reply_type, _error_content(
                "ValueError", f"the controller does not know the message type {msg_type!r}"
            ), parent=msg["header"])
            return
        content = msg["content"] if isinstance(msg["content"], dict) else {}
        try:
            handler(idents, msg, content)
        except Exception as e:
            self.log.exception("%s failed", msg_type)
            self._reply(self.registration, idents, msg_type.replace("_request", "_reply"),
                        _error_content(type(e).__name__, str(e)), parent=msg["header"])

    def handle_registration_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        try:
            engine = self.hub.register(
                content.get("uuid"), content.get("id"), content.get("info", {}), self.loop.time()
            )
        except RegistrationError as e:
            self.log.warning("refused an engine registration: %s", e)
            reply = _error_content("RegistrationError", str(e))
        else:
            self.log.info("engine %d registering (uuid %s)", engine.id, engine.uuid)
            reply = {
                "status": "ok",
                "id": engine.id,
                "hb_period": self.hub.hb_period,
                "connection_info": self.connection_info("engine"),
            }
        self._reply(self.registration, idents, "registration_reply", reply, parent=msg["header"])

    def handle_unregistration_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        eid = content.get("id")
        if eid in self.hub.engines:
            self.remove_engine(eid, "unregistered")
        self._reply(self.registration, idents, "unregistration_reply", {"status": "ok"},
                    parent=msg["header"])

    def handle_connection_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        reply = {
            "status": "ok",
            "engines": {str(k): v for k, v in self.hub.ready_engines().items()},
            "engine_info": {str(k): v for k, v in self.hub.engine_infos().items()},
            "task_scheme": self.scheduler.scheme,
        }
        self._reply(self.registration, idents, "connection_reply", reply, parent=msg["header"])

    def handle_queue_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        targets = content.get("targets") or list(self.hub.ready_engines())
        reply: dict[str, Any] = {"status": "ok"}
        for eid in targets:
            if eid not in self.hub.engines:
                raise ValueError(f"no engine {eid!r}; registered engines are {sorted(self.hub.engines)}")
            mine = [m for m, p in self.pending.items() if p.engine_id == eid]
            queue = [m for m in mine if self.pending[m].tag in (MUX, BROADCAST)]
            tasks = [m for m in mine if self.pending[m].tag == TASK]
            completed = self.completed.get(self.hub.engines[eid].ident, 0)
            if content.get("verbose"):
                reply[str(eid)] = {"queue": queue, "tasks": tasks, "completed": completed}
            else:
                reply[str(eid)] = {"queue": len(queue), "tasks": len(tasks), "completed": completed}
        unassigned = [m for m, p in self.pending.items() if p.tag == TASK and p.engine_id is None]
        reply["unassigned"] = unassigned if content.get("verbose") else len(unassigned)
        self._reply(self.registration, idents, "queue_reply", reply, parent=msg["header"])

    def handle_result_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        msg_ids = content.get("msg_ids") or []
        if not isinstance(msg_ids, list):
            raise ValueError("result_request needs 'msg_ids', a list")
        reply: dict[str, Any] = {"status": "ok", "pending": [], "completed": []}
        buffers: list = []
        for msg_id in msg_ids:
            if msg_id in self.pending:
                reply["pending"].append(msg_id)
                continue
            try:
                record = self.hub.store.get_record(msg_id)
            except KeyError:
                raise KeyError(f"no record of task {msg_id!r} (never submitted, or purged)") from None
            if record.get("completed") is None:
                reply["pending"].append(msg_id)
                continue
            reply["completed"].append(msg_id)
            if not content.get("status_only"):
                result_content = record["result_content"]
                if isinstance(result_content, (bytes, zmq.Frame)):
                    result_content = self.session.unpack(_bytes(result_content))
                reply[msg_id] = {
                    "header": record["result_header"],
                    "metadata": record["result_metadata"],
                    "content": result_content,
                    "nbuffers": len(record["result_buffers"] or []),
                }
                buffers.extend(record["result_buffers"] or [])
        msg_out = self.session.msg("result_reply", reply, parent=msg["header"])
        self._send(self.registration, self.session.serialize(msg_out, ident=idents) + buffers)

    def handle_shutdown_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        self._reply(self.registration, idents, "shutdown_reply", {"status": "ok"}, parent=msg["header"])
        self._notify("shutdown_notification", {"status": "ok"})
        self.log.info("shutdown requested by a client")
        self.loop.call_later(0.1, self.stop)

    # ---- engines ---------------------------------------------------------------

    def _engine_message(self, frames: list, channel: str) -> tuple[bytes, list[bytes], list, dict] | None:
        engine_ident = frames[0].bytes
        parsed = self._parse(frames[1:])
        if parsed is None:
            return None
        idents, rest, msg = parsed
        if msg["header"]["msg_type"] == "engine_ready":
            engine = self.hub.confirm(engine_ident.decode(), channel, self.loop.time())
            if engine is not None:
                self._engine_ready(engine)
            return None
        return engine_ident, idents, rest, msg

    def _engine_ready(self, engine: Any) -> None:
        self.log.info("engine %d ready", engine.id)
        self._apply(self.scheduler.add_engine(engine.id))
        self._notify("registration_notification",
                     {"id": engine.id, "uuid": engine.uuid, "info": engine.info})

    def on_engine_shell(self, frames: list) -> None:
        parsed = self._engine_message(frames, "shell")
        if parsed is None:
            return
        engine_ident, idents, rest, msg = parsed
        if len(idents) != 2:
            self.log.warning("dropped an engine reply without its routing identities")
            return
        tag, client = idents
        parent_id = msg["parent_header"].get("msg_id")
        pending = self.pending.get(parent_id)
        md = msg["metadata"]
        if tag == TASK and pending is not None:
            engine = self.hub.by_uuid(engine_ident.decode())
            success = md.get("status") == "ok"
            unmet = md.get("dependencies_met") is False
            actions = self.scheduler.task_done(
                parent_id, engine.id if engine else -1, success=success, now=self.loop.time(), unmet=unmet
            )
            rerun = self.scheduler.is_pending(parent_id)  # retries, or an unmet dependency
            overruled = any(isinstance(a, Fail) and a.msg_id == parent_id for a in actions)
            if rerun:
                pending.engine_id = None
            self._apply(actions)
            if rerun or overruled:
                return  # the client waits for the rerun, or gets the scheduler's verdict
        # the client first: what follows only records the result
        if not self._send(self._client_socket(tag), [client, *rest]):
            self.log.info("client of %s is gone; its result stays in the Hub", parent_id)
        if tag == MUX or tag == BROADCAST:
            engine = self.hub.by_uuid(engine_ident.decode())
            self._apply(self.scheduler.record_result(
                parent_id, engine.id if engine else -1, md.get("status") == "ok"
            ))
        self.pending.pop(parent_id, None)
        self.completed[engine_ident] = self.completed.get(engine_ident, 0) + 1
        self._forget_later(parent_id)
        self.hub.finished(parent_id, msg["header"], md, rest[5], rest[6:])

    def on_engine_control(self, frames: list) -> None:
        parsed = self._engine_message(frames, "control")
        if parsed is None:
            return
        _, idents, rest, _msg = parsed
        if len(idents) == 2 and idents[0] == CONTROL:
            self._send(self.control, [idents[1], *rest])

    def on_pong(self, frames: list) -> None:
        uuid = frames[0].bytes.decode(errors="replace")
        if self.hub.beat(uuid, self.loop.time()):
            return
        removed = self.hub.take_removed(uuid)
        if removed is not None:
            # alive after all (it stalled past its heartbeats): it has no work and will get
            # none, so it should not linger unnoticed
            eid, reason = removed
            self.log.warning("engine %d answers again after it was removed (%s): told to exit", eid, reason)
            msg = self.session.msg("removal_notification", {"id": eid, "reason": reason})
            self._send(self.engine_control, [uuid.encode(), *self.session.serialize(msg, ident=[b"x", b"-"])])

    def on_monitor(self, frames: list) -> None:
        # an engine's connection dropped; the event does not say which engine, so a
        # heartbeat round right now finds out instead of waiting out the missed beats
        probe_start = self.loop.time()
        self._ping()
        self.loop.call_later(self.disconnect_grace, self._reap, probe_start)

    def _ping(self) -> None:
        self._hb_counter += 1
        self.hb_ping.send(str(self._hb_counter).encode())

    def _heartbeat(self) -> None:
        self._reap(None)
        self._ping()
        self._timers = [t for t in self._timers if not t.cancelled()]
        self._timers.append(self.loop.call_later(self.hub.hb_period, self._heartbeat))

    def _reap(self, since: float | None) -> None:
        """Remove engines that stopped answering (since ``since``, or for too long)."""
        now = self.loop.time()
        grace = None if since is None else now - since
        for engine in self.hub.dead_engines(now, grace):
            self.remove_engine(engine.id, "stopped answering heartbeats")

    def remove_engine(self, eid: int, reason: str) -> None:
        engine = self.hub.remove(eid, None if reason == "unregistered" else reason)
        if engine is None:
            return
        self.log.warning("engine %d removed: %s", eid, reason)
        lost = [m for m, p in self.pending.items() if p.engine_id == eid and p.tag in (MUX, BROADCAST)]
        for msg_id in lost:
            self._fail(msg_id, "EngineError", f"Engine {eid} died or was stopped ({reason}) "
                       "while running this task. Its result is lost; resubmit to another engine.",
                       engine_id=eid)
        if engine.state == "ready":
            self._apply(self.scheduler.remove_engine(eid, self.loop.time()))
            self._notify("unregistration_notification", {"id": eid, "uuid": engine.uuid, "reason": reason})

    # ---- direct (mux) and control ----------------------------------------------

    def on_mux(self, frames: list) -> None:
        parsed = self._parse(frames)
        if parsed is None:
            return
        idents, rest, msg = parsed
        if len(idents) == 1:  # several engines: one message, fanned out here
            self._fan_out(idents[0], MUX, rest, msg)
            return
        if len(idents) != 2:
            self.log.warning("dropped a mux request with unexpected routing identities")
            return
        client, target = idents
        header = msg["header"]
        msg_id = header["msg_id"]
        target_uuid = target.decode(errors="replace")
        engine = self.hub.by_uuid(target_uuid)
        pending = self.pending[msg_id] = Pending(client, header, MUX, [], None)
        self.hub.submitted(msg_id, header, msg["metadata"], header.get("session", ""), "mux",
                           target_uuid)
        if engine is None or engine.state != "ready":
            self._fail(msg_id, "EngineError", f"No engine with uuid {target!r} is registered; "
                       "it may have died. Use rc.ids for the live engines.")
            return
        if header.get("msg_type") not in DIRECT_TYPES:
            self._fail(msg_id, "ValueError", f"Request rejected: engines do not answer "
                       f"{header.get('msg_type')!r} requests")
            return
        pending.engine_id = engine.id
        self.scheduler.note_pending(msg_id)
        if not self._send(self.engine_shell, [target, MUX, client, *rest]):
            self.remove_engine(engine.id, "unreachable")

    def _client_socket(self, tag: bytes) -> zmq.Socket:
        """The client-facing socket a reply with routing ``tag`` goes back through."""
        if tag == MUX:
            return self.mux
        if tag == BROADCAST:
            return self.broadcast
        return self.task

    def on_broadcast(self, frames: list) -> None:
        parsed = self._parse(frames)
        if parsed is None:
            return
        idents, rest, msg = parsed
        if len(idents) != 1:
            self.log.warning("dropped a broadcast request with unexpected routing identities")
            return
        self._fan_out(idents[0], BROADCAST, rest, msg)

    def _fan_out(self, client: bytes, tag: bytes, rest: list, msg: dict) -> None:
        """Send one client request to the engines its ``metadata["targets"]`` names.

        Each engine gets its own copy whose header ``msg_id`` is ``f"{msg_id}_{engine_id}"``
        (the ids the client waits on), re-signed here; parent, metadata, content and
        buffers are the frames the client sent, never re-serialized. From then on each
        copy is an ordinary direct request: recorded in the Hub, failed with
        ``EngineError`` when its engine is gone or dies, its reply routed back through
        the client socket ``tag`` names.
        """
        header, md = msg["header"], msg["metadata"]
        targets = md.get("targets") if isinstance(md, dict) else None
        if (not isinstance(targets, list) or not targets
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in targets)):
            # the client registered no reply ids we could answer: nothing to fail
            self.log.warning("dropped %s request %s: metadata 'targets' must be a non-empty list "
                             "of engine ids, got %r", "broadcast" if tag == BROADCAST else "direct",
                             header["msg_id"], targets)
            return
        msg_id, session_id = header["msg_id"], header.get("session", "")
        queue = "broadcast" if tag == BROADCAST else "mux"
        work = header.get("msg_type") in WORK_TYPES
        tail = rest[3:]  # parent, metadata, content, *buffers: forwarded as they came
        signed_tail = [f.buffer for f in tail[:3]]
        # one copy per distinct engine: its header, and the engine (None if unknown)
        copies = {eid: ({**header, "msg_id": f"{msg_id}_{eid}"}, self.hub.engines.get(eid))
                  for eid in targets}
        sent: dict[int, bool] = {}
        # engines first, so they start sooner; their replies are read on later loop
        # turns, after the bookkeeping below
        for eid, (sub_header, engine) in copies.items():
            if work and engine is not None and engine.state == "ready":
                packed = self.session.pack(sub_header)
                signature = self.session.sign([packed, *signed_tail])
                sent[eid] = self._send(self.engine_shell, [engine.ident, tag, client, DELIM,
                                                          signature, packed, *tail])
        for eid, (sub_header, engine) in copies.items():
            sub_id = sub_header["msg_id"]
            self.hub.submitted(sub_id, sub_header, md, session_id, queue,
                               engine.uuid if engine is not None else None)
            self.pending[sub_id] = Pending(client, sub_header, tag, [], eid if eid in sent else None)
            if not work:
                self._fail(sub_id, "ValueError", f"Request rejected: only {' and '.join(WORK_TYPES)} "
                           f"can go to several engines at once, not {header.get('msg_type')!r}")
            elif eid not in sent:
                self._fail(sub_id, "EngineError", f"No engine with id {eid} is registered; "
                           "it may have died. Use rc.ids for the live engines.")
            elif sent[eid]:
                self.scheduler.note_pending(sub_id)
            else:
                self.remove_engine(eid, "unreachable")  # fails this request, and any other it ran

    def on_control(self, frames: list) -> None:
        parsed = self._parse(frames, content=True)
        if parsed is None:
            return
        idents, rest, msg = parsed
        if len(idents) == 2:
            client, target = idents
            if not self._send(self.engine_control, [target, CONTROL, client, *rest]):
                self._reply(self.control, [client], msg["header"]["msg_type"].replace("_request", "_reply"),
                            _error_content("EngineError", f"engine {target!r} is not connected"),
                            parent=msg["header"])
            return
        self._controller_control(idents, msg)

    def _controller_control(self, idents: list[bytes], msg: dict) -> None:
        msg_type = msg["header"]["msg_type"]
        content = msg["content"] if isinstance(msg["content"], dict) else {}
        if msg_type == "abort_request":
            msg_ids = content.get("msg_ids") or []
            self._apply(self.scheduler.abort(msg_ids, self.loop.time()))
            self._reply(self.control, idents, "abort_reply", {"status": "ok"}, parent=msg["header"])
        else:
            self._reply(self.control, idents, msg_type.replace("_request", "_reply"),
                        _error_content("ValueError", f"the controller does not handle {msg_type!r}"),
                        parent=msg["header"])

    # ---- load-balanced tasks ---------------------------------------------------

    def on_task(self, frames: list) -> None:
        parsed = self._parse(frames)
        if parsed is None:
            return
        idents, rest, msg = parsed
        if len(idents) != 1:
            self.log.warning("dropped a task request with unexpected routing identities")
            return
        header, md = msg["header"], msg["metadata"]
        msg_id = header["msg_id"]
        self.pending[msg_id] = Pending(idents[0], header, TASK, rest, None)
        self.hub.submitted(msg_id, header, md, header.get("session", ""), "task")
        if header.get("msg_type") not in WORK_TYPES:
            # an engine answers nothing else: the task would hold its slot forever
            self._fail(msg_id, "ValueError", f"Task rejected: only {' and '.join(WORK_TYPES)} can "
                       f"be load-balanced, not {header.get('msg_type')!r}")
            return
        try:
            actions = self.scheduler.submit(
                msg_id,
                after=md.get("after") or None,
                follow=md.get("follow") or None,
                targets=md.get("targets") or None,
                timeout=md.get("timeout"),
                retries=md.get("retries") or 0,
                now=self.loop.time(),
            )
        except (ValueError, TypeError) as e:
            self._fail(msg_id, "ValueError", f"Task rejected: {e}")
            return
        self._apply(actions)

    def _apply(self, actions: list) -> None:
        """Carry out the scheduler's decisions."""
        for action in actions:
            if isinstance(action, Assign):
                self._assign(action.msg_id, action.engine_id)
            elif isinstance(action, Fail):
                self._fail(action.msg_id, action.ename, action.evalue)
            elif isinstance(action, Interrupt):
                self._interrupt(action)
        self._arm_deadline()

    def _assign(self, msg_id: str, eid: int) -> None:
        pending = self.pending.get(msg_id)
        engine = self.hub.engines.get(eid)
        if pending is None or engine is None:
            return
        pending.engine_id = eid
        self.hub.assigned(msg_id, engine.uuid)
        frames = pending.frames if not pending.sends else self._rerun_frames(pending)
        pending.sends += 1
        if not self._send(self.engine_shell, [engine.ident, TASK, pending.client, *frames]):
            self.remove_engine(eid, "unreachable")

    def _rerun_frames(self, pending: Pending) -> list:
        """The frames of a task sent again (retries, unmet dependency), freshly signed.

        Engines drop a signature they have seen (replay protection), so a rerun that
        lands on an engine the task already visited would vanish. The rerun carries
        ``metadata["attempt"]``, which changes its signature; the msg_id, content and
        buffers stay as they are.
        """
        delim, _sig, header, parent, metadata, content, *buffers = pending.frames
        md = self.session.unpack(_bytes(metadata))
        md["attempt"] = pending.sends
        packed = self.session.pack(md)
        signature = self.session.sign([_bytes(header), _bytes(parent), packed, _bytes(content)])
        return [delim, signature, header, parent, packed, content, *buffers]

    def _interrupt(self, action: Interrupt) -> None:
        engine = self.hub.engines.get(action.engine_id)
        pending = self.pending.get(action.msg_id)
        if engine is None or pending is None:
            return
        msg = self.session.msg("signal_request", {"sig": "SIGINT", "msg_id": action.msg_id,
                                                  "reason": action.ename})
        self._send(self.engine_control, [engine.ident, *self.session.serialize(msg, ident=[b"x", b"-"])])

    def _arm_deadline(self) -> None:
        deadline = self.scheduler.next_deadline()
        if self._deadline is not None:
            if deadline is not None and self._deadline.when() <= deadline:
                return
            self._deadline.cancel()
            self._deadline = None
        if deadline is not None:
            self._deadline = self.loop.call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._deadline = None
        self._apply(self.scheduler.tick(self.loop.time()))

    def _forget_later(self, msg_id: str) -> None:
        """Keep the scheduler's memory of finished tasks as long as the Hub keeps records."""
        finished = self._finished
        finished.append(msg_id)
        if len(finished) > self.remember_finished:
            self.scheduler.forget([finished.popleft() for _ in range(len(finished) // 10)])

    def _fail(self, msg_id: str, ename: str, evalue: str, engine_id: int | None = None) -> None:
        """Answer a request with an error the client raises as ``ename``."""
        pending = self.pending.pop(msg_id, None)
        if pending is None:
            return
        self._forget_later(msg_id)
        eid = engine_id if engine_id is not None else pending.engine_id
        content = _error_content(ename, evalue)
        content["engine_info"] = {"engine_id": eid if eid is not None else -1}
        metadata = {
            "status": "error",
            "engine_id": eid if eid is not None else -1,
            "dependencies_met": ename not in ("ImpossibleDependency", "InvalidDependency"),
            "started": None,
            "completed": utcnow(),
        }
        reply_type = pending.header.get("msg_type", "apply_request").replace("_request", "_reply")
        msg = self.session.msg(reply_type, content, parent=pending.header, metadata=metadata)
        self.hub.finished(msg_id, msg["header"], metadata, content, [])
        self._send(self._client_socket(pending.tag), self.session.serialize(msg, ident=[pending.client]))


def _error_content(ename: str, evalue: str) -> dict:
    return {"status": "error", "ename": ename, "evalue": evalue, "traceback": [], "engine_info": {}}


def _bytes(value: Any) -> bytes:
    return value.bytes if isinstance(value, zmq.Frame) else bytes(value)
