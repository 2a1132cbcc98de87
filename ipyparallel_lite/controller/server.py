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
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from uuid import uuid4

import zmq
from jupyter_client.session import Session
from zmq.devices import ThreadDevice

from ipyparallel_lite import fastzmq
from ipyparallel_lite.connection import (
    CURVE_SERVERKEY,
    NOTIFICATION_HWM,
    curve_server_options,
    reply_type,
    set_device_options,
    set_options,
    unpack_message,
)
from ipyparallel_lite.controller.dependency import parse_dependency
from ipyparallel_lite.controller.hub import (
    OUTPUT_TYPES,
    Hub,
    RegistrationError,
    as_datetime,
    utcnow,
)
from ipyparallel_lite.controller.outbox import Outbox, Sent
from ipyparallel_lite.controller.scheduler import Assign, Fail, Interrupt, TaskScheduler
from ipyparallel_lite.controller.store import NoStore, RecordNotFound
from ipyparallel_lite.controller.throttle import ThrottledLog
from ipyparallel_lite.dask_bridge import ControllerDask
from ipyparallel_lite.processes import process_alive, process_start_time

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
#: iopub messages that may wait for the Hub's reader (beyond the relay's own 1,000):
#: a PUB drops what a subscriber cannot take, so a busy controller would miss output
IOPUB_RECORD_HWM = 100_000
#: connections each bound socket lets wait to be accepted (zmq's default is 100; the
#: kernel caps it at net.core.somaxconn). Past it, a connection's SYN is dropped and
#: retried after 1, 3, 7... s: 2,000 engines starting at once lost ~19,000 SYNs, and
#: some took longer than the registration timeout to connect their shell and control.
LISTEN_BACKLOG = 4096
#: the prefix of every topic engines publish on iopub
ENGINE_TOPIC = b"engine."
#: record keys an engine's iopub fills, sent along with results from the Hub
OUTPUT_KEYS = ("execute_input", "execute_result", "error", "stdout", "stderr")
#: messages handled per socket before other sockets get their turn: small enough that a
#: client flooding one socket delays others' requests by milliseconds (256 let a flood of
#: 40,000 requests delay them by up to 1.3 s on a loaded machine; 64: at most 71 ms)
BATCH = 64


@dataclass(slots=True)
class Pending:
    """A request the controller has forwarded (or holds) and not yet seen answered."""

    client: bytes
    header: dict
    tag: bytes
    frames: list  # from DELIM on, kept to (re)send load-balanced tasks
    engine_id: int | None = None
    sends: int = 0  # times a load-balanced task went to an engine (reruns re-sign)


class PortTaken(RuntimeError):
    """A restored controller cannot have the port its predecessor had."""


def _split(frames: list) -> tuple[list[bytes], list] | None:
    """Routing identities and the message frames from DELIM on, or None if malformed."""
    for i in range(min(len(frames), MAX_IDENTS + 1)):
        if frames[i].bytes == DELIM:
            return [f.bytes for f in frames[:i]], frames[i:]
    return None


class Controller:
    """One controller process: Hub, schedulers and relays over zmq.

    ``ip`` is the interface every socket binds to (127.0.0.1 unless told otherwise).
    ``curve_keypair`` (public, secret), from ``zmq.curve_keypair()``, makes every socket
    a CURVE server: all traffic encrypted, clients and engines need the public key.
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
        peer_queue_bytes: int = 64 << 20,
        peer_queue_entries: int = 200_000,
        flush_interval: float = 0.2,
        restored: bool = False,
        curve_keypair: tuple[bytes, bytes] | None = None,
        record_output: bool = True,
    ):
        self.session = session
        self.curve_keypair = curve_keypair
        #: options every bound socket gets before binding (none without CURVE)
        self._server_options = curve_server_options(curve_keypair[1]) if curve_keypair else {}
        self.hub = hub or Hub()
        self.scheduler = scheduler or TaskScheduler()
        self.ip = ip
        self.log = log or logging.getLogger("ipyparallel_lite.controller")
        #: for what a peer can provoke at will (garbage, slow reading): bounded log volume
        self.warn = ThrottledLog(self.log).warning
        self.disconnect_grace = disconnect_grace
        #: finished tasks that later tasks may still name as dependencies
        self.remember_finished = remember_finished
        #: seconds between writes of the Hub's store (batched, off the hot path)
        self.flush_interval = flush_interval
        #: restored from the records of a controller that died: engines that still
        #: answer heartbeats registered with that one, and are told to start again
        self.restored = restored
        #: subscribe to the iopub relay and record output in the Hub (off: faster %px)
        self.record_output = record_output and not isinstance(self.hub.store, NoStore)
        self._iopub_record: zmq.Socket | None = None
        self._told_to_restart: set[str] = set()
        #: engine id -> (pid, start time) of engines running on this machine: when a
        #: connection drops, their processes say at once which one died
        self._local_processes: dict[int, tuple[int, float]] = {}
        self._finished: collections.deque[str] = collections.deque()
        #: per-peer bounds on what waits for a peer that does not read (see outbox.py)
        self.peer_queue_bytes = peer_queue_bytes
        self.peer_queue_entries = peer_queue_entries
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
        #: the probe of dropped connections (see on_monitor): due, last one, its rechecks
        self._probe_due: asyncio.TimerHandle | None = None
        self._last_probe = float("-inf")
        self._rechecks: list[asyncio.TimerHandle] = []
        self._iopub: ThreadDevice | None = None
        #: the dask scheduler of ``rc.become_dask()``, made on the first request
        self._dask: ControllerDask | None = None
        self.stopped = asyncio.Event()

    # ---- set-up ----------------------------------------------------------------

    def _bind(self, name: str, kind: int, ports: dict, **options: Any) -> zmq.Socket:
        """A socket bound for channel ``name``, with ``options`` (socket options by
        attribute name) set first: a bound socket's connections take the options it had
        when it was bound."""
        sock = set_options(fastzmq.socket(self.context, kind), self._server_options)
        sock.linger = 0
        sock.backlog = LISTEN_BACKLOG
        for option, value in options.items():
            setattr(sock, option, value)
        if kind == zmq.ROUTER:
            sock.router_mandatory = 1  # a send to a vanished peer raises instead of vanishing
        ports[name] = self._bind_port(name, ports, lambda p: sock.bind(f"tcp://{self.ip}:{p}"),
                                      lambda: sock.bind_to_random_port(f"tcp://{self.ip}"))
        self.sockets[f"{name}@{'engine' if ports is self.engine_ports else 'client'}"] = sock
        return sock

    def _bind_port(self, name: str, ports: dict, bind: Callable[[int], Any],
                   bind_random: Callable[[], int]) -> int:
        """Bind to the port a restored controller had (``self.wanted``), else any port."""
        wanted = self.wanted["client" if ports is self.ports else "engine"].get(name)
        if wanted is None:
            return bind_random()
        try:
            bind(wanted)
        except zmq.ZMQError as e:
            raise PortTaken(f"cannot bind the {name} channel to port {wanted}, the previous "
                            f"controller's ({e}). Is that controller still running?") from None
        return wanted

    def bind(self, ports: dict[str, dict[str, int]] | None = None) -> None:
        """Bind every channel; ``ports`` (``{"client": {...}, "engine": {...}}``, as in
        the connection files) asks for the ports of a controller being restored."""
        self.wanted = {"client": {}, "engine": {}, **(ports or {})}
        c, e = self.ports, self.engine_ports
        self.registration = self._bind("registration", zmq.ROUTER, c)
        e["registration"] = c["registration"]
        self.notification = self._bind("notification", zmq.PUB, c, sndhwm=NOTIFICATION_HWM)
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
        self._iopub.setsockopt_in(zmq.BACKLOG, LISTEN_BACKLOG)
        self._iopub.setsockopt_out(zmq.LINGER, 0)
        set_device_options(self._iopub, self._server_options)
        iopub = self._iopub
        e["iopub"] = self._bind_port("iopub", e, lambda p: iopub.bind_in(f"tcp://{self.ip}:{p}"),
                                     lambda: iopub.bind_in_to_random_port(f"tcp://{self.ip}"))
        c["iopub"] = self._bind_port("iopub", c, lambda p: iopub.bind_out(f"tcp://{self.ip}:{p}"),
                                     lambda: iopub.bind_out_to_random_port(f"tcp://{self.ip}"))
        if self.record_output:
            # the Hub reads the relay's output side over inproc: the device's context
            # is zmq's global instance, so this socket lives there too
            inproc = f"inproc://ipp-lite-iopub-record-{uuid4()}"
            self._iopub.bind_out(inproc)
            self._iopub_record = fastzmq.socket(zmq.Context.instance(), zmq.SUB)
            self._iopub_record.linger = 0
            self._iopub_record.rcvhwm = IOPUB_RECORD_HWM
            # engines publish under topics "engine.<id>.<kind>" (stdout, error...):
            # the relay filters anything else out before it reaches this socket
            self._iopub_record.subscribe(ENGINE_TOPIC)
        self._iopub.daemon = True
        self._iopub.start()
        if self._iopub_record is not None:
            self._iopub_record.connect(inproc)
        self._monitor = self.engine_shell.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def connection_info(self, kind: str) -> dict:
        ports = self.ports if kind == "client" else self.engine_ports
        info = {
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
        if self.curve_keypair:
            info[CURVE_SERVERKEY] = self.curve_keypair[0].decode("ascii")
        return info

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
        if self._iopub_record is not None:
            handlers[self._iopub_record] = self.on_iopub
        self._reader_of = {}
        self.outbox = Outbox(loop, max_bytes=self.peer_queue_bytes,
                             max_entries=self.peer_queue_entries, on_gone=self._peer_gone,
                             after_send=self._after_send, log=self.log)
        for sock, handler in handlers.items():
            reader = fastzmq.Drainer(loop, sock, self._guarded(handler), BATCH)
            self._readers.append(reader)
            self._reader_of[sock] = reader
        self._heartbeat()
        self._flush_store()
        self.log.info("controller ready: client ports %s", self.ports)

    def _guarded(self, handler: Callable[[list], None]) -> Callable[[list], None]:
        def handle(frames: list) -> None:
            try:
                handler(frames)
            except Exception:
                self.log.exception("error handling a message; the controller goes on")
        return handle

    def _flush_store(self) -> None:
        """Write the Hub's records that changed since the last time, then come back."""
        try:
            self.hub.store.flush()
        except Exception:
            self.log.exception("writing task records failed; they stay in memory for the next try")
        self._timers = [t for t in self._timers if not t.cancelled()]
        self._timers.append(self.loop.call_later(self.flush_interval, self._flush_store))

    def stop(self) -> None:
        if hasattr(self, "outbox"):
            self.outbox.close()
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
        if self._iopub_record is not None:
            self._iopub_record.close(linger=0)
        if self._dask is not None:
            self._dask.close()
        try:
            self.hub.store.close()
        except Exception:
            self.log.exception("closing the task record store failed")
        self.stopped.set()

    # ---- sending ---------------------------------------------------------------

    def _send(self, sock: zmq.Socket, frames: list,
              later: Callable[[], list | None] | None = None) -> Sent:
        """Send frames without blocking (behind the peer's backlog if it has one)."""
        return self.outbox.send(sock, frames, later)

    def _after_send(self, sock: zmq.Socket) -> None:
        # a send consumes the socket's edge-triggered FD events: its reader looks again
        reader = self._reader_of.get(sock)
        if reader is not None:
            reader.kick()

    def _peer_gone(self, sock: zmq.Socket, peer: bytes) -> None:
        """A peer left while messages waited for it (they are dropped with its queue)."""
        if sock is self.engine_shell or sock is self.engine_control:
            engine = self.hub.by_uuid(peer.decode(errors="replace"))
            if engine is not None:
                self.remove_engine(engine.id, "unreachable")

    def _to_engine(self, engine: Any, frames: list, msg_id: str) -> bool:
        """Send a request to an engine's shell; on failure, answer the client for it."""
        return self._engine_took(engine.id, self._send(self.engine_shell, frames), msg_id)

    def _engine_took(self, eid: int, sent: Sent, msg_id: str) -> bool:
        """True if request ``msg_id`` reached engine ``eid`` or waits for it; else it is failed."""
        if sent is Sent.GONE:
            self.remove_engine(eid, "unreachable")  # fails this request, and any other it ran
            return False
        if sent is Sent.FULL:
            self._fail(msg_id, "EngineError", f"Engine {eid} has not read the "
                       f"{self.peer_queue_bytes >> 20} MB of requests already waiting for it; "
                       "this one was refused. Wait for its queue to shrink, or use other engines.",
                       engine_id=eid)
            return False
        return True

    def _to_client(self, tag: bytes, client: bytes, frames: list, msg_id: str) -> None:
        """Send a reply to its client: one that cannot wait now waits in the Hub's records."""
        sent = self._send(self._client_socket(tag), frames, partial(self._replay, client, msg_id))
        if sent is Sent.GONE:
            self.log.info("client of %s is gone; its result stays in the Hub", msg_id)
        elif sent is Sent.FULL:
            self.warn(client, "slow client", "client %r reads too slowly: the reply to %s stays "
                      "in the Hub only", client, msg_id)

    def _replay(self, client: bytes, msg_id: str) -> list:
        """A reply rebuilt from the Hub's record, for a client that fell far behind."""
        try:
            record = self.hub.store.get_record(msg_id)
        except KeyError:
            record = None
        if record is None or record.get("result_header") is None:
            header = record["header"] if record else {"msg_id": msg_id, "msg_type": "apply_request"}
            content = _error_content(
                "EngineError", "This result is lost: this client did not read its replies for a "
                "long time, and meanwhile the Hub's record of it was purged (or the controller "
                "keeps no records). Keep clients reading, or use a store that keeps records.")
            msg = self.session.msg(reply_type(header.get("msg_type", "apply_request")), content,
                                   parent=header, metadata={"status": "error", "engine_id": -1})
            return self.session.serialize(msg, ident=[client])
        return self._signed([client], record["result_header"], record["header"],
                            record["result_metadata"], record["result_content"],
                            record["result_buffers"] or [])

    def _signed(self, idents: list[bytes], header: dict, parent: dict, metadata: dict,
                content: Any, buffers: list) -> list:
        """A message rebuilt from stored parts, signed anew: ``content`` may stay the packed
        frame it arrived as (it is forwarded as is), or be a dict."""
        body = _bytes(content) if isinstance(content, bytes | zmq.Frame) else self.session.pack(content)
        packed = [self.session.pack(header), self.session.pack(parent), self.session.pack(metadata), body]
        return [*idents, DELIM, self.session.sign(packed), *packed, *buffers]

    def _reply(self, sock: zmq.Socket, ident: list[bytes], msg_type: str, content: dict,
               parent: dict | None = None, metadata: dict | None = None) -> None:
        msg = self.session.msg(msg_type, content, parent=parent, metadata=metadata)
        self._send(sock, self.session.serialize(msg, ident=ident))

    def _notify(self, msg_type: str, content: dict) -> None:
        msg = self.session.msg(msg_type, content)
        self.notification.send_multipart(self.session.serialize(msg, ident=[msg_type.encode()]))

    def _parse(self, frames: list, *, content: bool = False,
               peer: bytes | None = None) -> tuple[list[bytes], list, dict] | None:
        """Verify and unpack a message; None (and a log line) for anything malformed.

        ``peer``: who sent it, for the log (default: the first frame, a ROUTER's identity).
        """
        if peer is None:
            peer = frames[0].bytes if frames else b""
        split = _split(frames)
        if split is None:
            self.warn(peer, "garbage", "dropped a message with no <IDS|MSG> delimiter (%d frames)",
                      len(frames))
            return None
        idents, rest = split
        if len(rest) < 6:
            self.warn(peer, "truncated", "dropped a truncated message (%d frames after the "
                      "delimiter)", len(rest))
            return None
        try:
            msg = unpack_message(self.session, rest[1:], content=content)
        except Exception as e:
            self.warn(peer, "unverified", "dropped a message that failed verification: %s", e)
            return None
        if not isinstance(msg.get("header"), dict) or "msg_id" not in msg["header"]:
            self.warn(peer, "no msg_id", "dropped a message without a header msg_id")
            return None
        return idents, rest, msg

    # ---- output, for the Hub's records ------------------------------------------

    def on_iopub(self, frames: list) -> None:
        """An engine's iopub message, as the relay forwards it to clients: verified,
        then recorded by the Hub if it is output of a task it has a record of."""
        parsed = self._parse(frames, peer=b"iopub")
        if parsed is None:
            return
        _, rest, msg = parsed
        if msg["msg_type"] not in OUTPUT_TYPES:
            return
        parent = msg["parent_header"]
        parent_id = parent.get("msg_id") if isinstance(parent, dict) else None
        if not isinstance(parent_id, str):
            return
        raw = msg["content"]
        self.hub.output(parent_id, msg["msg_type"], self.session.unpack(raw), len(raw))

    # ---- registration and queries ----------------------------------------------

    def on_registration(self, frames: list) -> None:
        parsed = self._parse(frames, content=True)
        if parsed is None:
            return
        idents, _, msg = parsed
        msg_type = msg["header"]["msg_type"]
        handler = getattr(self, f"handle_{msg_type}", None)
        if handler is None:
            self.warn(idents[0] if idents else b"", "unknown type",
                      "unknown message type %r on the registration socket", msg_type)
            self._reply(self.registration, idents, reply_type(msg_type), _error_content(
                "ValueError", f"the controller does not know the message type {msg_type!r}"
            ), parent=msg["header"])
            return
        content = msg["content"] if isinstance(msg["content"], dict) else {}
        try:
            handler(idents, msg, content)
        except Exception as e:
            self.log.exception("%s failed", msg_type)
            self._reply(self.registration, idents, reply_type(msg_type),
                        _error_content(type(e).__name__, str(e)), parent=msg["header"])

    def handle_registration_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        try:
            engine = self.hub.register(
                content.get("uuid"), content.get("id"), content.get("info", {}), self.loop.time()
            )
        except RegistrationError as e:
            self.warn(idents[0] if idents else b"", "registration refused",
                      "refused an engine registration: %s", e)
            reply = _error_content("RegistrationError", str(e))
        else:
            self.log.info("engine %d registering (uuid %s)", engine.id, engine.uuid)
            self._note_local_process(engine.id, engine.info)
            reply = {
                "status": "ok",
                "id": engine.id,
                "hb_period": self.hub.hb_period,
                "connection_info": self.connection_info("engine"),
            }
        self._reply(self.registration, idents, "registration_reply", reply, parent=msg["header"])

    def _note_local_process(self, eid: int, info: dict) -> None:
        """Remember the process of an engine that runs here (same host, pid running now)."""
        pid = info.get("pid")
        if info.get("hostname") != socket.gethostname() or not isinstance(pid, int):
            return
        started = process_start_time(pid)
        if started is not None:
            self._local_processes[eid] = (pid, started)

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
            "controller_pid": os.getpid(),  # a client reconnecting learns of a restart
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
        reply["backlog"] = self.outbox.backlog()
        self._reply(self.registration, idents, "queue_reply", reply, parent=msg["header"])

    # ---- Hub queries: result, db, history, purge, resubmit -------------------------
    #
    # Each reads or changes the Hub's records; a bad request raises, and
    # on_registration answers it with ``status: error`` and the exception's message.

    def _known_records(self, msg_ids: Any, request: str) -> list[str]:
        """``msg_ids`` checked to be a list of str naming records; the unknown ones are
        named in one error."""
        if not isinstance(msg_ids, list) or not all(isinstance(m, str) for m in msg_ids):
            raise TypeError(f"{request} needs 'msg_ids', a list of str, got {msg_ids!r}")
        unknown = [m for m in msg_ids if m not in self.pending and m not in self.hub.store]
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
        if isinstance(value, (bytes, zmq.Frame)):
            return self.session.unpack(_bytes(value))
        return value

    def handle_result_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        msg_ids = self._known_records(content.get("msg_ids"), "result_request")
        reply: dict[str, Any] = {"status": "ok", "pending": [], "completed": []}
        buffers: list = []
        for msg_id in msg_ids:
            record = None if msg_id in self.pending else self.hub.store.get_record(msg_id)
            if record is None or record.get("completed") is None:
                reply["pending"].append(msg_id)
                continue
            reply["completed"].append(msg_id)
            if not content.get("status_only"):
                result_buffers = record["result_buffers"] or []
                reply[msg_id] = {
                    "header": record["result_header"],
                    "metadata": record["result_metadata"],
                    "content": self._unpacked(record["result_content"]),
                    "nbuffers": len(result_buffers),
                    "outputs": {k: record.get(k) for k in OUTPUT_KEYS if record.get(k) is not None},
                }
                buffers.extend(result_buffers)
        msg_out = self.session.msg("result_reply", reply, parent=msg["header"])
        self._send(self.registration, self.session.serialize(msg_out, ident=idents) + buffers)

    def handle_db_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        """``{query, keys}`` -> the matching records; their buffers travel as frames,
        counted per record in ``buffer_lens`` and ``result_buffer_lens``."""
        keys = content.get("keys")
        if keys is not None and (not isinstance(keys, list)
                                 or not all(isinstance(k, str) for k in keys)):
            raise TypeError(f"db_request 'keys' must be a list of str or None, got {keys!r}")
        query = _dates_in_query(content.get("query"))
        records = self.hub.store.find_records(query, keys)
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
        reply = {"status": "ok", "records": records, "buffer_lens": lens["buffers"],
                 "result_buffer_lens": lens["result_buffers"]}
        msg_out = self.session.msg("db_reply", reply, parent=msg["header"])
        self._send(self.registration, self.session.serialize(msg_out, ident=idents) + buffers)

    def handle_history_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        self._reply(self.registration, idents, "history_reply",
                    {"status": "ok", "history": self.hub.store.get_history()}, parent=msg["header"])

    def handle_purge_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        """Forget completed records: ``msg_ids`` (a list, or ``"all"``) and the records of
        ``engine_ids``. Pending tasks cannot be purged; nothing is purged then."""
        msg_ids, engine_ids = content.get("msg_ids") or [], content.get("engine_ids") or []
        if not isinstance(engine_ids, list) or not all(isinstance(e, int) for e in engine_ids):
            raise TypeError(f"purge_request 'engine_ids' must be a list of engine ids, got {engine_ids!r}")
        gone = [e for e in engine_ids if e not in self.hub.engines]
        if gone:
            raise ValueError(f"no engine {gone}; registered engines are {sorted(self.hub.engines)}")
        store = self.hub.store
        if msg_ids == "all":
            store.drop_matching_records({"completed": {"$ne": None}})
        else:
            msg_ids = self._known_records(msg_ids, "purge_request")
            pending = [m for m in msg_ids if self._is_pending(m)]
            if pending:
                raise ValueError(f"cannot purge pending task(s) {', '.join(pending[:5])}: wait for "
                                 "them (or abort them) first; nothing was purged")
            for msg_id in msg_ids:
                store.drop_record(msg_id)
        for eid in engine_ids:
            store.drop_matching_records({"engine_uuid": self.hub.engines[eid].uuid,
                                         "completed": {"$ne": None}})
        self._reply(self.registration, idents, "purge_reply", {"status": "ok"}, parent=msg["header"])

    def handle_resubmit_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        """Run completed tasks again as new load-balanced tasks: same function, arguments,
        dependencies, targets and flags; a direct request keeps its engine. Replies to
        ``{"resubmitted": {old_id: new_id}}``; the results are fetched from the Hub."""
        msg_ids = self._known_records(content.get("msg_ids"), "resubmit_request")
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
        resubmitted = {}
        for record in records:
            new_id = self._resubmit(record)
            self.hub.resubmitted(record["msg_id"], new_id)
            resubmitted[record["msg_id"]] = new_id
        self._reply(self.registration, idents, "resubmit_reply",
                    {"status": "ok", "resubmitted": resubmitted}, parent=msg["header"])

    def _resubmit(self, record: dict) -> str:
        """Submit the request of ``record`` again under a new msg_id; that msg_id."""
        header = {**record["header"], "msg_id": str(uuid4()),
                  "date": utcnow().isoformat()}
        md = dict(record.get("metadata") or {})
        if record.get("queue") != "task":
            engine = self.hub.by_uuid(record.get("engine_uuid") or "")
            md["targets"] = [engine.id] if engine is not None else [-1]  # gone: fails plainly
        rest = self._signed([], header, {}, md, record["content"], record.get("buffers") or [])
        self._recall_dependencies(md)
        # nobody waits on the task socket: the result is read from the Hub
        self._submit_task(b"", rest, header, md)
        return header["msg_id"]

    def _recall_dependencies(self, md: dict) -> None:
        """Tell the scheduler how the finished tasks that ``md``'s ``after``/``follow``
        name ended, from the Hub's records: it forgets finished tasks after a while (and
        a restored controller never saw them), which would make them unknown ids."""
        for key in ("after", "follow"):
            try:
                spec = parse_dependency(md.get(key) or None)
            except ValueError:
                continue  # the scheduler rejects it with the reason
            for dep in spec.ids if spec is not None else ():
                if dep in self.pending or dep not in self.hub.store:
                    continue
                record = self.hub.store.get_record(dep)
                if record.get("completed") is None:
                    continue
                engine = self.hub.by_uuid(record.get("engine_uuid") or "")
                status = (record.get("result_metadata") or {}).get("status")
                self._apply(self.scheduler.record_result(dep, engine.id if engine else -1,
                                                         status == "ok"))

    def handle_shutdown_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        self._reply(self.registration, idents, "shutdown_reply", {"status": "ok"}, parent=msg["header"])
        self._notify("shutdown_notification", {"status": "ok"})
        self.log.info("shutdown requested by a client")
        self.loop.call_later(0.1, self.stop)

    def handle_become_dask_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        """Start the dask scheduler of ``rc.become_dask()`` off the loop; reply once it
        listens, with its address."""
        if self._dask is None:
            self._dask = ControllerDask(self.loop, self.ip, _error_content)
        self._dask.become(content, partial(self._reply, self.registration, idents,
                                           "become_dask_reply", parent=msg["header"]))

    def handle_stop_distributed_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        answer = partial(self._reply, self.registration, idents, "stop_distributed_reply",
                         parent=msg["header"])
        if self._dask is None:
            answer({"status": "ok", "stopped": False})
        else:
            self._dask.stop(answer)

    # ---- engines ---------------------------------------------------------------

    def _engine_message(self, frames: list, channel: str) -> tuple[bytes, list[bytes], list, dict] | None:
        engine_ident = frames[0].bytes
        parsed = self._parse(frames[1:], peer=engine_ident)
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
            self.warn(engine_ident, "no identities", "dropped an engine reply without its routing "
                      "identities")
            return
        tag, client = idents
        parent_id = msg["parent_header"].get("msg_id")
        engine = self.hub.by_uuid(engine_ident.decode())
        if engine is None:
            # removed (it stalled past its heartbeats) and back: everything it held was
            # failed with EngineError or runs elsewhere, so this would be a second answer
            self.warn(engine_ident, "late reply", "dropped the reply to %s from an engine "
                      "removed before it answered; its client had its answer already", parent_id)
            return
        pending = self.pending.get(parent_id)
        md = msg["metadata"]
        if tag == TASK and pending is not None:
            success = md.get("status") == "ok"
            unmet = md.get("dependencies_met") is False
            actions = self.scheduler.task_done(
                parent_id, engine.id, success=success, now=self.loop.time(), unmet=unmet
            )
            rerun = self.scheduler.is_pending(parent_id)  # retries, or an unmet dependency
            overruled = any(isinstance(a, Fail) and a.msg_id == parent_id for a in actions)
            if rerun:
                pending.engine_id = None
            self._apply(actions)
            if rerun or overruled:
                return  # the client waits for the rerun, or gets the scheduler's verdict
        # the client first: what follows only records the result
        self._to_client(tag, client, [client, *rest], parent_id)
        if tag == MUX or tag == BROADCAST:
            self._apply(self.scheduler.record_result(parent_id, engine.id, md.get("status") == "ok"))
        self.pending.pop(parent_id, None)
        self.completed[engine_ident] = self.completed.get(engine_ident, 0) + 1
        self._forget_later(parent_id)
        self.hub.finished(parent_id, msg["header"], md, rest[5], rest[6:])
        if self.record_output and msg["msg_type"] == "execute_reply":
            self.hub.input_from_request(parent_id, self._unpacked)

    def on_engine_control(self, frames: list) -> None:
        parsed = self._engine_message(frames, "control")
        if parsed is None:
            return
        _, idents, rest, _msg = parsed
        if len(idents) == 2 and idents[0] == CONTROL:
            if self._send(self.control, [idents[1], *rest]) is not Sent.SENT:
                self.log.info("a control reply for client %r waits or is dropped: it does not read",
                              idents[1])

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
            self._tell_to_exit(uuid, eid, reason)
        elif self.restored and uuid not in self._told_to_restart:
            # registered with the controller that died: its id, and any task it ran, are
            # gone with it; a plain message in its log beats an engine nobody can reach
            if self._tell_to_exit(uuid, -1, "the controller was restarted and this engine's "
                                  "registration was lost with it; start a new engine"):
                self._told_to_restart.add(uuid)  # else its control channel is not back yet
                self.log.warning("engine %s registered with the controller before its restart: "
                                 "told to exit; start engines again", uuid)

    def _tell_to_exit(self, uuid: str, eid: int, reason: str) -> bool:
        """Send an engine ``removal_notification``; False if it cannot be reached."""
        msg = self.session.msg("removal_notification", {"id": eid, "reason": reason})
        return self._send(self.engine_control,
                          [uuid.encode(), *self.session.serialize(msg, ident=[b"x", b"-"])])

    #: at most one probe of dropped connections per this many seconds. Each probe pings
    #: every engine and looks at every local engine's process, so one probe per drop made
    #: n engines leaving together (a cluster stopping, a host lost) cost O(n^2): with
    #: 1,000 engines, 6.4 s of controller CPU. A drop while a probe is due waits for it.
    PROBE_INTERVAL = 0.05

    def on_monitor(self, frames: list) -> None:
        # an engine's connection dropped; the event does not say which engine. Engines
        # on this machine whose process is gone are removed now; for the others a
        # heartbeat round right now finds out instead of waiting out the missed beats
        if self._probe_due is not None:
            return
        wait = self._last_probe + self.PROBE_INTERVAL - self.loop.time()
        if wait > 0:
            self._probe_due = self.loop.call_later(wait, self._probe)
        else:
            self._probe()

    def _probe(self) -> None:
        self._probe_due = None
        self._last_probe = probe_start = self.loop.time()
        self._remove_exited_engines()
        # a killed process drops its connections a moment before it is gone: look again
        # (these looks replace those of an earlier probe, which would repeat them)
        for timer in self._rechecks:
            timer.cancel()
        self._rechecks = [self.loop.call_later(delay, self._remove_exited_engines)
                          for delay in self.PROCESS_RECHECKS]
        self._ping()
        self.loop.call_later(self.disconnect_grace, self._reap, probe_start)

    #: seconds after a dropped connection when the engines' processes are checked again
    PROCESS_RECHECKS = (0.01, 0.05, 0.2, 0.5)

    def _remove_exited_engines(self) -> None:
        alive: dict[tuple[int, float], bool] = {}  # one look per process, however many engines
        for eid, process in list(self._local_processes.items()):
            if process not in alive:
                alive[process] = process_alive(*process)
            if not alive[process]:
                self.remove_engine(eid, f"its process (pid {process[0]}) exited")

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
        self._local_processes.pop(eid, None)
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
            self.warn(frames[0].bytes, "bad identities", "dropped a mux request with unexpected "
                      "routing identities")
            return
        client, target = idents
        header = msg["header"]
        msg_id = header["msg_id"]
        target_uuid = target.decode(errors="replace")
        engine = self.hub.by_uuid(target_uuid)
        pending = self.pending[msg_id] = Pending(client, header, MUX, [], None)
        self.hub.submitted(msg_id, header, msg["metadata"], header.get("session", ""), "mux",
                           target_uuid, rest[5], rest[6:])
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
        self._to_engine(engine, [target, MUX, client, *rest], msg_id)

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
            self.warn(frames[0].bytes, "bad identities", "dropped a broadcast request with "
                      "unexpected routing identities")
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
            self.warn(client, "bad targets", "dropped %s request %s: metadata 'targets' must be a "
                      "non-empty list of engine ids, got %r",
                      "broadcast" if tag == BROADCAST else "direct", header["msg_id"], targets)
            return
        msg_id, session_id = header["msg_id"], header.get("session", "")
        queue = "broadcast" if tag == BROADCAST else "mux"
        work = header.get("msg_type") in WORK_TYPES
        tail = rest[3:]  # parent, metadata, content, *buffers: forwarded as they came
        signed_tail = [f.buffer for f in tail[:3]]
        # one copy per distinct engine: its header, and the engine (None if unknown)
        copies = {eid: ({**header, "msg_id": f"{msg_id}_{eid}"}, self.hub.engines.get(eid))
                  for eid in targets}
        sent: dict[int, Sent] = {}
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
                               engine.uuid if engine is not None else None, tail[2], tail[3:])
            self.pending[sub_id] = Pending(client, sub_header, tag, [], eid if eid in sent else None)
            if not work:
                self._fail(sub_id, "ValueError", f"Request rejected: only {' and '.join(WORK_TYPES)} "
                           f"can go to several engines at once, not {header.get('msg_type')!r}")
            elif eid not in sent:
                self._fail(sub_id, "EngineError", f"No engine with id {eid} is registered; "
                           "it may have died. Use rc.ids for the live engines.")
            elif self._engine_took(eid, sent[eid], sub_id):
                self.scheduler.note_pending(sub_id)

    def on_control(self, frames: list) -> None:
        parsed = self._parse(frames, content=True)
        if parsed is None:
            return
        idents, rest, msg = parsed
        if len(idents) == 2:
            client, target = idents
            if self._send(self.engine_control, [target, CONTROL, client, *rest]) is not Sent.SENT:
                self._reply(self.control, [client], reply_type(msg["header"]["msg_type"]),
                            _error_content("EngineError", f"engine {target!r} is not connected, "
                                           "or has not read its earlier control requests"),
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
            self._reply(self.control, idents, reply_type(msg_type),
                        _error_content("ValueError", f"the controller does not handle {msg_type!r}"),
                        parent=msg["header"])

    # ---- load-balanced tasks ---------------------------------------------------

    def on_task(self, frames: list) -> None:
        parsed = self._parse(frames)
        if parsed is None:
            return
        idents, rest, msg = parsed
        if len(idents) != 1:
            self.warn(frames[0].bytes, "bad identities", "dropped a task request with unexpected "
                      "routing identities")
            return
        md = msg["metadata"]
        if self.restored and isinstance(md, dict) and (md.get("after") or md.get("follow")):
            self._recall_dependencies(md)  # tasks finished before the restart
        self._submit_task(idents[0], rest, msg["header"], md)

    def _submit_task(self, client: bytes, rest: list, header: dict, md: dict) -> None:
        """Record a load-balanced task and hand it to the scheduler."""
        msg_id = header["msg_id"]
        self.pending[msg_id] = Pending(client, header, TASK, rest, None)
        self.hub.submitted(msg_id, header, md, header.get("session", ""), "task", None,
                           rest[5], rest[6:])
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
        self._to_engine(engine, [engine.ident, TASK, pending.client, *frames], msg_id)

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
        msg = self.session.msg(reply_type(pending.header.get("msg_type", "apply_request")), content, parent=pending.header, metadata=metadata)
        self.hub.finished(msg_id, msg["header"], metadata, content, [])
        self._to_client(pending.tag, pending.client, self.session.serialize(msg, ident=[pending.client]),
                        msg_id)


def _error_content(ename: str, evalue: str) -> dict:
    return {"status": "error", "ename": ename, "evalue": evalue, "traceback": [], "engine_info": {}}


def _bytes(value: Any) -> bytes:
    return value.bytes if isinstance(value, zmq.Frame) else bytes(value)


#: record keys holding times: a query's ISO strings for them are read as datetimes
DATE_KEYS = ("submitted", "started", "completed", "received", "resubmitted")


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
