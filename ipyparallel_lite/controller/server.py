"""The controller's I/O: zmq sockets on one asyncio loop, moving frames.

The thin layer around :class:`~.state.ControllerState`, which decides everything
(engines, records, scheduling, the work in flight, flow control). Here: read each
socket, verify the signature before anything is unpacked, read the header and
metadata a decision needs, feed the core one event, and carry out the actions it
returns (``_carry_out``, one executor per action type): send, re-sign a fan-out copy
or a rerun, answer with an error, notify, interrupt. Content and buffers are
forwarded as they came, never re-serialized. Each socket has one handler (``start``);
the registration and control sockets dispatch on msg_type through one table each.

Direct requests do not pass through Python. The ``mux`` channel is a C routing device
(pyzmq's ``MonitoredQueue``, in a thread of its own, without the GIL): a client's
``[engine_uuid, DELIM, ...]`` reaches that engine's ``mux`` socket as ``[client, DELIM,
...]``, and the engine's answer comes back the same way (so does the success of a
load-balanced task its engine held alone, tagged ``LONE_TASK``: the engine sends it
straight to our client). The device publishes a copy of
every message it routes on an inproc socket, and :meth:`Controller.on_mux_copy` feeds
those to the core: the Hub records them and the core tracks them like other work in
flight, but never sends them. What the controller itself answers on that path (an
unknown engine, an engine that died) it sends through the device as :data:`INJECTOR`.
The device routes by frames that no signature covers, and pyzmq's device does not
check message boundaries (a one-frame message leaves it inside the next one), so it
lets in only peers that prove they hold the key: :meth:`Controller.on_zap` checks each
connection's credentials (connection.py) before the peer can send a frame.

Routing frames (after the ROUTER's identity frame)::

    client -> mux      [engine_uuid, DELIM, sig, header, parent, metadata, content, *buffers]
                       (the device, not Python; a batch: [engine_uuid, MARKER, ...])
    client -> task     [DELIM, ...]
    client -> control  [engine_uuid, DELIM, ...]  to one engine, or [DELIM, ...] to the controller
    client -> broadcast  [DELIM, ...]  metadata["targets"] lists engine ids
    controller -> engine (shell or control)  [engine_uuid, tag, client_ident, DELIM, ...]

Engines answer with the identities they were given, so ``tag`` (``m`` mux, ``t`` task,
``T`` a task its engine holds alone, ``b`` broadcast, ``c`` control) tells which client
socket a reply returns through.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import threading
from collections.abc import Callable
from functools import partial
from typing import Any
from uuid import uuid4

import zmq
from jupyter_client.session import Session
from zmq.devices import ThreadDevice, ThreadMonitoredQueue

from ipyparallel_lite import batch, fastzmq
from ipyparallel_lite.connection import (
    CURVE_SERVERKEY,
    MAX_MESSAGE_BYTES,
    NOTIFICATION_HWM,
    connect_address,
    curve_server_options,
    mux_credentials,
    mux_server_options,
    reply_type,
    set_device_options,
    set_options,
    unpack_message,
)
from ipyparallel_lite.controller.awaited import Awaited
from ipyparallel_lite.controller.hub import OUTPUT_TYPES, Hub, RegistrationError, utcnow
from ipyparallel_lite.controller.outbox import Outbox, Sent
from ipyparallel_lite.controller.scheduler import TaskScheduler
from ipyparallel_lite.controller.state import (
    BROADCAST,
    CLIENT_WINDOW,
    LONE_TASK,
    MUX,
    ControllerState,
    Fail,
    Interrupt,
    Notify,
    ReplyToClient,
    SendToEngine,
    Steal,
    TellToExit,
)
from ipyparallel_lite.dask_bridge import ControllerDask
from ipyparallel_lite.fastzmq import frame_bytes
from ipyparallel_lite.memory import release_free_memory
from ipyparallel_lite.processes import process_alive, process_start_time

DELIM = b"<IDS|MSG>"
#: the routing tag of control requests relayed to engines (the others: state.MUX...)
CONTROL = b"c"
#: a steal request's tag, so that the engine's answer comes back to the scheduler
STEAL = b"s"
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
#: the identity the controller sends with through the mux device, for the answers it
#: gives on that path itself (no engine has it: engines' identities are uuids)
INJECTOR = b"controller"
#: the prefixes of the mux device's copies: a request routed in, a reply routed out
ROUTED_IN, ROUTED_OUT = b"in", b"out"
#: seconds a task naming msg_ids the controller does not know waits for the mux
#: device's copies to name them (see _when_dependencies_known)
DEVICE_GRACE = 1.0
#: messages handled per socket before other sockets get their turn: small enough that a
#: client flooding one socket delays others' requests by milliseconds (256 let a flood of
#: 40,000 requests delay them by up to 1.3 s on a loaded machine; 64: at most 71 ms)
BATCH = 64


class PortTaken(RuntimeError):
    """A restored controller cannot have the port its predecessor had."""


def _split(frames: list) -> tuple[list[bytes], list] | None:
    """Routing identities and the message frames from DELIM on, or None if malformed."""
    for i in range(min(len(frames), MAX_IDENTS + 1)):
        if frame_bytes(frames[i]) == DELIM:
            return [frame_bytes(f) for f in frames[:i]], frames[i:]
    return None


class Controller:
    """One controller process: the sockets and relays around a :class:`ControllerState`.

    ``ip`` is the interface every socket binds to (127.0.0.1 unless told otherwise);
    ``location`` the address the connection files give clients and engines (see
    :func:`~ipyparallel_lite.connection.connect_address`).
    ``curve_keypair`` (public, secret), from ``zmq.curve_keypair()``, makes every socket
    a CURVE server: all traffic encrypted, clients and engines need the public key.
    Call :meth:`bind` then :meth:`start` inside a running loop; :meth:`connection_info`
    gives what the connection files hold.
    """

    #: seconds a query waits for the requests its client sent before it and names as
    #: ``in_flight`` (they travel on other connections, and may arrive after it): the
    #: grace a task gets for the requests it depends on; past that it is answered with
    #: what the Hub knows (a request lost on its way)
    IN_FLIGHT_WAIT = DEVICE_GRACE
    #: most unrecorded requests a query waits for (each is an entry of the waiting
    #: work's table until it arrives); one naming more, such as a status query on a
    #: large map most of which the client's window still holds back, is answered at
    #: once with what the Hub knows
    IN_FLIGHT_MAX = 1000

    def __init__(
        self,
        session: Session,
        hub: Hub | None = None,
        scheduler: TaskScheduler | None = None,
        ip: str = "127.0.0.1",
        location: str = "",
        log: logging.Logger | None = None,
        disconnect_grace: float = 1.0,
        remember_finished: int = 10_000,
        peer_queue_bytes: int = 64 << 20,
        peer_queue_entries: int = 200_000,
        flush_interval: float = 0.2,
        restored: bool = False,
        curve_keypair: tuple[bytes, bytes] | None = None,
        record_output: bool = True,
        client_window: int = CLIENT_WINDOW,
        max_message_bytes: int = 1 << 30,
    ):
        self.session = session
        self.curve_keypair = curve_keypair
        #: options every bound socket gets before binding (none without CURVE)
        self._server_options = curve_server_options(curve_keypair[1]) if curve_keypair else {}
        #: the largest message part any peer may send: libzmq drops the connection of a
        #: peer sending more before buffering it, so nobody, signed or not, makes this
        #: process hold more per part (0: no limit)
        self.max_message_bytes = max_message_bytes
        if max_message_bytes:
            self._server_options[zmq.MAXMSGSIZE] = max_message_bytes
        self.ip = ip
        self.location = connect_address(ip, location)
        self.log = log or logging.getLogger("ipyparallel_lite.controller")
        #: every decision, and the work in flight: the pure core this layer feeds
        self.state = ControllerState(hub, scheduler, unpack=self._unpack,
                                     client_window=client_window,
                                     remember_finished=remember_finished, restored=restored,
                                     record_output=record_output, log=self.log)
        self.hub = self.state.hub
        self.scheduler = self.state.scheduler
        #: for what a peer can provoke at will (garbage, slow reading): bounded log volume
        self.warn = self.state.warn
        self.disconnect_grace = disconnect_grace
        #: seconds between writes of the Hub's store (batched, off the hot path)
        self.flush_interval = flush_interval
        #: subscribe to the iopub relay and record output in the Hub (off: faster %px)
        self.record_output = self.state.record_output
        self._iopub_record: zmq.Socket | None = None
        self._mux_context: zmq.Context | None = None  # (set by bind)
        self._mux_sockets: tuple[zmq.Socket, ...] = ()
        #: engine id -> (pid, start time) of engines running on this machine: when a
        #: connection drops, their processes say at once which one died
        self._local_processes: dict[int, tuple[int, float]] = {}
        #: per-peer bounds on what waits for a peer that does not read (see outbox.py)
        self.peer_queue_bytes = peer_queue_bytes
        self.peer_queue_entries = peer_queue_entries
        self.context = zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        self.ports: dict[str, int] = {}
        self.engine_ports: dict[str, int] = {}
        #: how each action of the core is carried out
        self._executors: dict[type, Callable[[Any], None]] = {
            SendToEngine: self._send_to_engine,
            ReplyToClient: self._reply_to_client,
            Fail: self._fail,
            Notify: self._notify_action,
            Interrupt: self._interrupt,
            TellToExit: self._tell_to_exit,
            Steal: self._steal,
        }
        #: msg_type -> handler(idents, msg, content), per socket that has several types
        self._registration_handlers: dict[str, Callable[[list, dict, dict], None]] = {
            "registration_request": self.handle_registration_request,
            "unregistration_request": self.handle_unregistration_request,
            "connection_request": self.handle_connection_request,
            "queue_request": self.handle_queue_request,
            "result_request": self.handle_result_request,
            "db_request": self.handle_db_request,
            "history_request": self.handle_history_request,
            "purge_request": self.handle_purge_request,
            "resubmit_request": self.handle_resubmit_request,
            "shutdown_request": self.handle_shutdown_request,
            "become_dask_request": self.handle_become_dask_request,
            "stop_distributed_request": self.handle_stop_distributed_request,
        }
        self._control_handlers: dict[str, Callable[[list, dict, dict], None]] = {
            "abort_request": self.handle_abort_request,
        }
        self._readers: list[fastzmq.Drainer] = []
        #: inside a reader's drain: sends note their socket's reader here, and deferred
        #: work waits, both for the end of the drain (see _drained)
        self._in_drain = False
        self._sent_on: set[fastzmq.Drainer] = set()
        self._at_drain_end: list[Callable[[], None]] = []
        #: the pending timer of each job that re-arms itself (store flush, heartbeat)
        self._timers: dict[Callable[[], None], asyncio.TimerHandle] = {}
        #: work that names requests not recorded yet (they may come on another
        #: connection): tasks depending on them, queries about them (see _hold)
        self._awaited = Awaited()
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_due = False  # the core acted during this drain: arm at its end
        self._hb_counter = 0
        self._last_heartbeat: float | None = None
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
        self._bind_mux_device(c, e)
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

    def _bind_mux_device(self, c: dict, e: dict) -> None:
        """The direct path: a C device between clients' and engines' ``mux`` sockets,
        with a copy of what it routes for the Hub, the injector (see the module), and the
        ZAP handler that lets in only peers holding the key, in a context of their own."""
        context = self._mux_context = zmq.Context()
        # bound before the device's sockets exist: every connection to them asks it first
        self._zap = fastzmq.socket(context, zmq.REP)
        self._zap.linger = 0
        self._zap.bind("inproc://zeromq.zap.01")
        self._mux_credentials = mux_credentials(self.session.key, bool(self.curve_keypair))
        device = self._mux_device = ThreadMonitoredQueue(zmq.ROUTER, zmq.ROUTER, zmq.PUB,
                                                         ROUTED_IN, ROUTED_OUT)
        device.context_factory = lambda: context
        for option, value in {zmq.LINGER: 0, zmq.BACKLOG: LISTEN_BACKLOG,
                              # a ROUTER drops what meets a full queue: the device must not
                              # lose a request or a reply (clients' windows bound them)
                              zmq.SNDHWM: 0, zmq.RCVHWM: 0,
                              **mux_server_options(self._server_options)}.items():
            device.setsockopt_in(option, value)
            device.setsockopt_out(option, value)
        device.setsockopt_mon(zmq.SNDHWM, 0)  # a PUB drops what its subscriber cannot take
        c["mux"] = self._bind_port("mux", c, lambda p: device.bind_in(f"tcp://{self.ip}:{p}"),
                                   lambda: device.bind_in_to_random_port(f"tcp://{self.ip}"))
        e["mux"] = self._bind_port("mux", e, lambda p: device.bind_out(f"tcp://{self.ip}:{p}"),
                                   lambda: device.bind_out_to_random_port(f"tcp://{self.ip}"))
        device.bind_mon("inproc://copies")
        device.bind_out("inproc://engines")  # (inproc connections skip ZAP)
        device.daemon = True
        device.start()
        self._mux_copies = fastzmq.socket(context, zmq.SUB)
        self._mux_copies.linger = 0
        self._mux_copies.rcvhwm = 0
        self._mux_copies.subscribe(b"")
        self._mux_injector = fastzmq.socket(context, zmq.DEALER)
        self._mux_injector.linger = 0
        self._mux_injector.sndhwm = 0
        self._mux_injector.identity = INJECTOR
        self._mux_sockets = (self._mux_copies, self._mux_injector, self._zap)
        # (libzmq lets inproc connect before the device's thread binds)
        self._mux_copies.connect("inproc://copies")
        self._mux_injector.connect("inproc://engines")

    def connection_info(self, kind: str) -> dict:
        ports = self.ports if kind == "client" else self.engine_ports
        info = {
            "interface": f"tcp://{self.location}",
            "location": self.location,
            "ports": dict(ports),
            "key": self.session.key.decode(),
            "signature_scheme": self.session.signature_scheme,
            "unpacker": self.session.unpacker,
            "pack": self.session.packer,
            "task_scheme": self.scheduler.scheme,
            "hwm": self.scheduler.hwm,
            "hb_period": self.hub.hb_period,
            "hb_max_misses": self.hub.max_misses,
            "controller_pid": os.getpid(),
            MAX_MESSAGE_BYTES: self.max_message_bytes,
        }
        if self.curve_keypair:
            info[CURVE_SERVERKEY] = self.curve_keypair[0].decode("ascii")
        return info

    def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        handlers = {
            self.registration: self.on_registration,
            self._mux_copies: self.on_mux_copy,
            self._mux_injector: self.on_injector,
            self._zap: self.on_zap,
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
                             after_send=self._after_send, defer=self._defer,
                             reads_batches=self._reads_batches, log=self.log)
        # sockets whose peers may send batches: everything but heartbeats and what the
        # controller reads from its own relays
        unbatched = {self.hb_pong, self._monitor, self._iopub_record, *self._mux_sockets}
        for sock, handler in handlers.items():
            guarded = self._guarded(handler)
            reader = fastzmq.Drainer(loop, sock, guarded if sock in unbatched else self._unbatching(guarded),
                                     BATCH, after=self._drained)
            self._readers.append(reader)
            self._reader_of[sock] = reader
        self._heartbeat()
        self._flush_store()
        self.log.info("controller ready: client ports %s", self.ports)

    def _guarded(self, handler: Callable[[list], None]) -> Callable[[list], None]:
        def handle(frames: list) -> None:
            self._in_drain = True
            try:
                handler(frames)
            except Exception:
                self.log.exception("error handling a message; the controller goes on")
        return handle

    def _unbatching(self, handler: Callable[[list], None]) -> Callable[[list], int]:
        """``handler`` for each message of a batch (see batch.py), the sender's identity in
        front as if it came alone; how many messages there were."""
        def handle(frames: list) -> int:
            if len(frames) < 3 or not batch.is_batch(frames[1]):
                handler(frames)
                return 1
            try:
                messages = batch.unpack_routed(frames, 1)
            except batch.BatchError as e:
                self.warn(frames[0].bytes, "bad batch", "dropped a malformed batch: %s", e)
                return 1
            for message in messages:
                handler(message)
            return len(messages)
        return handle

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        """``callback()`` in ``delay`` seconds, cancelled by :meth:`stop`; its timer
        replaces the one that called it."""
        self._timers[callback] = self.loop.call_later(delay, callback)

    def _flush_store(self) -> None:
        """Write the Hub's records that changed since the last time, then come back."""
        try:
            self.hub.store.flush()
        except Exception:
            self.log.exception("writing task records failed; they stay in memory for the next try")
        self._later(self.flush_interval, self._flush_store)

    def stop(self) -> None:
        if hasattr(self, "outbox"):
            self.outbox.close()
        for reader in self._readers:
            reader.close()
        for timer in self._timers.values():
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
        for sock in self._mux_sockets:
            sock.close(linger=0)
        # the device's thread closes its sockets when its context ends (ports freed for
        # a controller restored in this process); bounded, in case it is stuck
        if self._mux_context is not None:
            ending = threading.Thread(target=self._mux_context.term, daemon=True)
            ending.start()
            ending.join(2)
        if self._dask is not None:
            self._dask.close()
        try:
            self.hub.store.close()
        except Exception:
            self.log.exception("closing the task record store failed")
        self.stopped.set()

    # ---- carrying out the core's actions -------------------------------------------

    def _carry_out(self, actions: list) -> None:
        """Do what the core decided, in order."""
        executors = self._executors
        for action in actions:
            executors[type(action)](action)
        if self._in_drain:
            self._deadline_due = True  # once, when the drain ends (_drained)
        else:
            self._arm_deadline()

    def _send_to_engine(self, action: SendToEngine) -> None:
        frames = action.frames
        if action.header is not None:  # a fan-out copy: its own header, signed here
            packed = self.session.pack(action.header)
            signature = self.session.sign([packed, *frames[6:9]])
            frames = [*frames[:4], signature, packed, *frames[6:]]
        elif action.attempt:
            frames = [*frames[:3], *self._rerun_frames(frames[3:], action.attempt)]
        # with the engine's other requests of this turn, as one batch; an engine that is
        # gone meanwhile is removed (_peer_gone), which fails or reroutes its requests
        self.outbox.send_soon(self.engine_shell, frames,
                              refused=partial(self._engine_refused, action.engine_id, action.msg_id))

    def _engine_refused(self, engine_id: int, msg_id: str) -> None:
        """A request for an engine that already has ``peer_queue_bytes`` waiting for it."""
        self._carry_out(self.state.engine_refused(engine_id, msg_id, self.peer_queue_bytes))

    def _rerun_frames(self, frames: list, attempt: int) -> list:
        """The frames of a task sent again (retries, unmet dependency), freshly signed.

        Engines drop a signature they have seen (replay protection), so a rerun that
        lands on an engine the task already visited would vanish. The rerun carries
        ``metadata["attempt"]``, which changes its signature; the msg_id, content and
        buffers stay as they are.
        """
        delim, _sig, header, parent, metadata, content, *buffers = frames
        md = self.session.unpack(frame_bytes(metadata))
        md["attempt"] = attempt
        packed = self.session.pack(md)
        signature = self.session.sign([frame_bytes(header), frame_bytes(parent), packed, frame_bytes(content)])
        return [delim, signature, header, parent, packed, content, *buffers]

    def _reply_to_client(self, action: ReplyToClient) -> None:
        self._to_client(action.tag, action.client, action.frames, action.msg_id)

    def _fail(self, action: Fail) -> None:
        """Answer a request with an error the client raises as ``ename``."""
        eid = action.engine_id if action.engine_id is not None else -1
        content = _error_content(action.ename, action.evalue)
        content["engine_info"] = {"engine_id": eid}
        metadata = {
            "status": "error",
            "engine_id": eid,
            "dependencies_met": action.ename not in ("ImpossibleDependency", "InvalidDependency"),
            "started": None,
            "completed": utcnow(),
        }
        parent = action.parent
        msg = self.session.msg(reply_type(parent.get("msg_type", "apply_request")), content,
                               parent=parent, metadata=metadata)
        if action.record:
            self.hub.finished(action.msg_id, msg["header"], metadata, content, [])
        self._to_client(action.tag, action.client,
                        self.session.serialize(msg, ident=[action.client]), action.msg_id)

    def _notify_action(self, action: Notify) -> None:
        self._notify(action.msg_type, action.content)

    def _interrupt(self, action: Interrupt) -> None:
        msg = self.session.msg("signal_request", {"sig": "SIGINT", "msg_id": action.msg_id,
                                                  "reason": action.ename})
        self._send(self.engine_control,
                   [action.engine_ident, *self.session.serialize(msg, ident=[b"x", b"-"])])

    def _steal(self, action: Steal) -> None:
        """Ask an engine for tasks back; its answer comes to :meth:`on_engine_control`."""
        msg = self.session.msg("steal_request", {"msg_ids": list(action.msg_ids)})
        self._send(self.engine_control,
                   [action.engine_ident, *self.session.serialize(msg, ident=[STEAL, b"-"])])

    def _tell_to_exit(self, action: TellToExit) -> None:
        """Send an engine ``removal_notification`` (it logs the reason and exits)."""
        if action.delay:
            self.loop.call_later(action.delay, self._tell_to_exit,
                                 TellToExit(action.uuid, action.engine_id, action.reason, action.restart))
            return
        msg = self.session.msg("removal_notification", {"id": action.engine_id,
                                                        "reason": action.reason,
                                                        "rejoin": action.restart})
        sent = self._send(self.engine_control,
                          [action.uuid.encode(), *self.session.serialize(msg, ident=[b"x", b"-"])])
        if action.restart and sent in (Sent.SENT, Sent.QUEUED):
            self.state.told_to_restart(action.uuid)  # else its control channel is not back yet

    def _arm_deadline(self) -> None:
        deadline = self.state.next_deadline()
        if self._deadline is not None:
            if deadline is not None and self._deadline.when() <= deadline:
                return
            self._deadline.cancel()
            self._deadline = None
        if deadline is not None:
            self._deadline = self.loop.call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._deadline = None
        self._carry_out(self.state.tick(self.loop.time()))

    # ---- sending ---------------------------------------------------------------

    def _send(self, sock: zmq.Socket, frames: list,
              later: Callable[[], list | None] | None = None) -> Sent:
        """Send frames without blocking (behind the peer's backlog if it has one)."""
        return self.outbox.send(sock, frames, later)

    def _reads_batches(self, sock: zmq.Socket, peer: bytes) -> bool:
        # every registered engine reads batches (registration refuses other versions);
        # the mux device routes each message by its first frame, so none goes through it
        if sock is self._mux_injector:
            return False
        return sock is self.engine_shell or batch.reads_batches(peer)

    def _after_send(self, sock: zmq.Socket) -> None:
        # a send consumes the socket's edge-triggered FD events: its reader looks again,
        # once at the end of the drain that sent (a loop turn per send costs more)
        reader = self._reader_of.get(sock)
        if reader is None or reader.draining:  # its own drain looks again anyway
            return
        if self._in_drain:
            self._sent_on.add(reader)
        else:
            reader.kick()

    def _defer(self, callback: Callable[[], None]) -> None:
        """Call back at the end of this turn: the drain under way, else the next loop turn."""
        if self._in_drain:
            self._at_drain_end.append(callback)
        else:
            self.loop.call_soon(callback)

    def _drained(self) -> None:
        """A reader's drain ended: deferred work (this turn's reply batches) goes, the
        core's next deadline is armed, then every socket sent on meanwhile is looked at
        once."""
        if self.state.arrivals:
            self._release_arrived()
        while self._at_drain_end:
            callbacks, self._at_drain_end = self._at_drain_end, []
            for callback in callbacks:
                try:
                    callback()
                except Exception:
                    self.log.exception("error after a drain; the controller goes on")
        self._in_drain = False
        if self._deadline_due:
            self._deadline_due = False
            self._arm_deadline()
        if self._sent_on:
            sent_on, self._sent_on = self._sent_on, set()
            for reader in sent_on:
                reader.recheck()

    def _peer_gone(self, sock: zmq.Socket, peer: bytes) -> None:
        """A peer left while messages waited for it (they are dropped with its queue)."""
        if sock is self.engine_shell or sock is self.engine_control:
            engine = self.hub.by_uuid(peer.decode(errors="replace"))
            if engine is not None:
                self.remove_engine(engine.id, "unreachable")

    def _client_socket(self, tag: bytes) -> zmq.Socket:
        """The client-facing socket a reply with routing ``tag`` goes back through."""
        if tag == MUX:
            return self._mux_injector
        if tag == BROADCAST:
            return self.broadcast
        return self.task

    def _to_client(self, tag: bytes, client: bytes, frames: list, msg_id: str) -> None:
        """Send a reply to its client: one that cannot wait now waits in the Hub's records."""
        # with the other replies for this client in this loop turn, as one batch
        self.outbox.send_soon(self._client_socket(tag), frames, partial(self._replay, client, msg_id))

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
        body = frame_bytes(content) if isinstance(content, bytes | zmq.Frame) else self.session.pack(content)
        packed = [self.session.pack(header), self.session.pack(parent), self.session.pack(metadata), body]
        return [*idents, DELIM, self.session.sign(packed), *packed, *buffers]

    def _reply(self, sock: zmq.Socket, ident: list[bytes], msg_type: str, content: dict,
               parent: dict | None = None, metadata: dict | None = None,
               buffers: list | None = None) -> None:
        msg = self.session.msg(msg_type, content, parent=parent, metadata=metadata)
        frames = self.session.serialize(msg, ident=ident)
        self._send(sock, frames + buffers if buffers else frames)

    def _notify(self, msg_type: str, content: dict) -> None:
        msg = self.session.msg(msg_type, content)
        self.notification.send_multipart(self.session.serialize(msg, ident=[msg_type.encode()]))

    def _unpack(self, value: Any) -> Any:
        """A verified frame (stored request or reply content) as a dict."""
        return self.session.unpack(frame_bytes(value))

    # ---- parsing ---------------------------------------------------------------

    def _parse(self, frames: list, *, content: bool = False, parent: bool = False,
               peer: bytes | None = None) -> tuple[list[bytes], list, dict] | None:
        """Verify and unpack a message; None (and a log line) for anything malformed.

        Content and parent header stay bytes unless asked for (``content``, ``parent``):
        only replies are matched by their parent. ``peer``: who sent it, for the log
        (default: the first frame, a ROUTER's identity).
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
            msg = unpack_message(self.session, rest[1:], content=content, parent=parent)
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
        parsed = self._parse(frames, parent=True, peer=b"iopub")
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

    # ---- client requests: mux, broadcast, task, control ----------------------------

    def on_mux_copy(self, frames: list) -> None:
        """The mux device's copy of a message it routed: ``[ROUTED_IN, engine_uuid, client,
        DELIM, ...]`` or ``[ROUTED_OUT, client, engine_uuid, DELIM, ...]`` (or a batch in
        place of the message), for the core's records (the device delivered it already)."""
        routed_in = frame_bytes(frames[0]) == ROUTED_IN
        if len(frames) > 5 and batch.is_batch(frames[3]):
            try:
                messages = batch.unpack_routed(frames[1:], 2)
            except batch.BatchError as e:
                self.warn(frame_bytes(frames[2]), "bad batch", "the mux device routed a "
                          "malformed batch: %s", e)
                return
            for message in messages:
                self._routed(routed_in, message)
        else:
            self._routed(routed_in, frames[1:])

    def _routed(self, routed_in: bool, frames: list) -> None:
        if not routed_in and len(frames) > 1 and frame_bytes(frames[1]) == INJECTOR:
            return  # the controller's own answer, recorded when it was sent
        parsed = self._parse(frames, parent=not routed_in, peer=b"mux device")
        if parsed is None:
            return
        idents, rest, msg = parsed
        if len(idents) != 2:
            self.warn(idents[0] if idents else b"", "bad identities", "the mux device routed a "
                      "message with unexpected identities (%d)", len(idents))
            return
        if routed_in:
            target, client = idents
            self._carry_out(self.state.routed_request(client, target.decode(errors="replace"),
                                                      rest, msg["header"], msg["metadata"],
                                                      self.loop.time()))
            return
        client, engine = idents
        self._carry_out(self.state.routed_reply(engine.decode(errors="replace"), client,
                                                msg["parent_header"].get("msg_id"), rest,
                                                msg["header"], msg["metadata"], msg["msg_type"],
                                                self.loop.time()))

    def on_injector(self, frames: list) -> None:
        """A message a client addressed to :data:`INJECTOR` through the mux device."""
        self.warn(frames[0].bytes if frames else b"", "bad identities", "dropped a direct "
                  "request addressed to the controller itself")

    def on_zap(self, frames: list) -> None:
        """A ZAP request (ZMQ RFC 27) for a peer connecting to the mux device: let it in
        only with the credentials derived from the key (connection.py); others never
        reach the device, whose routing a malformed message could derail."""
        request = [frame_bytes(f) for f in frames]
        request += [b""] * (6 - len(request))  # (libzmq sends all six; a REP must answer)
        version, request_id, address = request[0], request[1], request[3]
        mechanism, credentials = self._mux_credentials
        given = request[6:]
        ok = (version == b"1.0" and request[5] == mechanism and len(given) == (2 if mechanism
              == b"PLAIN" else 1) and hmac.compare_digest(given[-1], credentials))
        if not ok:
            self.warn(address, "refused", "refused a connection to the mux channel from %s: "
                      "it did not show the cluster's key (a client or engine with another "
                      "cluster's connection file?)", address.decode(errors="replace"))
        self._zap.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                  b"OK" if ok else b"not this cluster's key", b"", b""])

    def _catch_up(self) -> None:
        """Take in the mux device's copies that wait, before a request that may name what
        they record (a query, an abort, a task depending on a direct request)."""
        sock, handle = self._mux_copies, self.on_mux_copy
        while fastzmq.readable(sock):
            handle(sock.recv_multipart(zmq.NOBLOCK, copy=False))

    def on_broadcast(self, frames: list) -> None:
        parsed = self._parse(frames)
        if parsed is None:
            return
        idents, rest, msg = parsed
        if len(idents) != 1:
            self.warn(frames[0].bytes, "bad identities", "dropped a broadcast request with "
                      "unexpected routing identities")
            return
        self._carry_out(self.state.fan_out(idents[0], rest, msg["header"],
                                           msg["metadata"]))

    def on_task(self, frames: list) -> None:
        parsed = self._parse(frames)
        if parsed is None:
            return
        idents, rest, msg = parsed
        if len(idents) != 1:
            self.warn(frames[0].bytes, "bad identities", "dropped a task request with unexpected "
                      "routing identities")
            return
        metadata = msg["metadata"]
        submit = partial(self.state.task, idents[0], rest, msg["header"], metadata)
        if isinstance(metadata, dict) and (metadata.get("after") or metadata.get("follow")):
            self._when_dependencies_known(metadata, submit)
        else:
            self._carry_out(submit(self.loop.time()))

    def _when_dependencies_known(self, metadata: dict, submit: Callable[[float], list]) -> None:
        """Submit a task once the core knows the msg_ids it depends on, or after
        :data:`DEVICE_GRACE` (then the scheduler names the unknown ones). A direct
        request sent just before the task, on the client's other connection, may reach
        the mux device, and its copy this loop, after the task did."""
        self._catch_up()
        unknown = self.state.unknown_dependencies(metadata)
        if unknown:
            self._hold(unknown, DEVICE_GRACE, lambda: self._carry_out(submit(self.loop.time())))
        else:
            self._carry_out(submit(self.loop.time()))

    # ---- work waiting for requests that may arrive after it ------------------------------

    def _hold(self, missing: list[str], grace: float, go: Callable[[], None]) -> None:
        """Do ``go`` once each of ``missing`` is recorded, or after ``grace`` seconds."""
        if self.state.arrivals is None:
            self.state.arrivals = []
        deadline = self.loop.time() + grace
        self._awaited.hold(missing, deadline, go)
        timer = self._timers.get(self._release_due)
        if timer is None or timer.when() > deadline:
            self._arm_release()

    def _arm_release(self) -> None:
        """One timer, for the earliest deadline of the held work (if any is held)."""
        timer = self._timers.pop(self._release_due, None)
        if timer is not None:
            timer.cancel()
        deadline = self._awaited.next_deadline()
        if deadline is not None:
            self._timers[self._release_due] = self.loop.call_at(deadline, self._release_due)

    def _release_arrived(self) -> None:
        """Do the held work whose last missing request was recorded since the last look."""
        arrivals, self.state.arrivals = self.state.arrivals, []
        awaited = self._awaited
        for msg_id in arrivals:
            for go in awaited.arrived(msg_id):
                self._go(go)
        self._collect_arrivals_while_held()

    def _release_due(self) -> None:
        """Past a deadline: take in the device's copies that wait, then do the held work
        they complete, and the work whose grace ran out (with what is known)."""
        self._timers.pop(self._release_due, None)  # (this timer has fired)
        self._catch_up()
        if self.state.arrivals:
            self._release_arrived()
        for go in self._awaited.due(self.loop.time()):
            self._go(go)
        self._collect_arrivals_while_held()
        self._arm_release()

    def _collect_arrivals_while_held(self) -> None:
        """The core notes the requests it records only while work is held: no need
        to collect them once nothing waits."""
        if not self._awaited.waiting():
            self.state.arrivals = None

    def _go(self, go: Callable[[], None]) -> None:
        try:  # (no handler guards this: one failure must not stop the rest)
            go()
        except Exception:
            self.log.exception("error doing work that waited for requests to arrive")

    def on_control(self, frames: list) -> None:
        parsed = self._parse(frames, content=True)
        if parsed is None:
            return
        idents, rest, msg = parsed
        header = msg["header"]
        if len(idents) == 2:  # for one engine: relayed as is
            client, target = idents
            if self._send(self.engine_control, [target, CONTROL, client, *rest]) is not Sent.SENT:
                self._reply(self.control, [client], reply_type(header["msg_type"]),
                            _error_content("EngineError", f"engine {target!r} is not connected, "
                                           "or has not read its earlier control requests"),
                            parent=header)
            return
        handler = self._control_handlers.get(header["msg_type"])
        content = msg["content"] if isinstance(msg["content"], dict) else {}
        if handler is None:
            self._reply(self.control, idents, reply_type(header["msg_type"]),
                        _error_content("ValueError", f"the controller does not handle "
                                       f"{header['msg_type']!r}"), parent=header)
            return
        handler(idents, msg, content)

    def handle_abort_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        self._catch_up()
        self._carry_out(self.state.abort(content.get("msg_ids") or [], self.loop.time()))
        self._reply(self.control, idents, "abort_reply", {"status": "ok"}, parent=msg["header"])

    # ---- registration and queries ----------------------------------------------

    def on_registration(self, frames: list) -> None:
        parsed = self._parse(frames, content=True)
        if parsed is None:
            return
        self._catch_up()  # queries see every direct request the device routed before
        idents, _, msg = parsed
        header = msg["header"]
        msg_type = header["msg_type"]
        handler = self._registration_handlers.get(msg_type)
        if handler is None:
            self.warn(idents[0] if idents else b"", "unknown type",
                      "unknown message type %r on the registration socket", msg_type)
            self._reply(self.registration, idents, reply_type(msg_type), _error_content(
                "ValueError", f"the controller does not know the message type {msg_type!r}"
            ), parent=header)
            return
        content = msg["content"] if isinstance(msg["content"], dict) else {}
        in_flight = content.get("in_flight")
        unrecorded = self.state.unrecorded(in_flight) if isinstance(in_flight, list) else None
        if unrecorded and len(unrecorded) <= self.IN_FLIGHT_MAX:
            # the query overtook requests its client sent before it (they travel on other
            # connections): it waits for them, a bounded time
            self._hold(unrecorded, self.IN_FLIGHT_WAIT, partial(self._answer, idents, msg, content, handler))
            return
        self._answer(idents, msg, content, handler)

    def _answer(self, idents: list[bytes], msg: dict, content: dict,
                handler: Callable[[list, dict, dict], None]) -> None:
        """Run a registration handler; its failure is the reply."""
        try:
            handler(idents, msg, content)
        except Exception as e:
            msg_type = msg["header"]["msg_type"]
            self.log.exception("%s failed", msg_type)
            self._reply(self.registration, idents, reply_type(msg_type),
                        _error_content(type(e).__name__, str(e)), parent=msg["header"])

    def handle_registration_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        try:
            engine = self.state.register(content.get("uuid"), content.get("id"),
                                         content.get("info", {}), self.loop.time())
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
        # controller_pid: a client reconnecting learns of a restart
        reply = {"status": "ok", **self.state.connection(), "controller_pid": os.getpid()}
        self._reply(self.registration, idents, "connection_reply", reply, parent=msg["header"])

    def handle_queue_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        reply = {"status": "ok", **self.state.queue_status(content.get("targets"),
                                                           bool(content.get("verbose")))}
        reply["backlog"] = self.outbox.backlog()
        self._reply(self.registration, idents, "queue_reply", reply, parent=msg["header"])

    def handle_result_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        reply, buffers = self.state.results(content.get("msg_ids"), bool(content.get("status_only")))
        self._reply(self.registration, idents, "result_reply", reply, parent=msg["header"], buffers=buffers)

    def handle_db_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        reply, buffers = self.state.db_records(content.get("query"), content.get("keys"))
        self._reply(self.registration, idents, "db_reply", reply, parent=msg["header"], buffers=buffers)

    def handle_history_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        self._reply(self.registration, idents, "history_reply",
                    {"status": "ok", "history": self.hub.store.get_history()}, parent=msg["header"])

    def handle_purge_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        self.state.purge(content.get("msg_ids"), content.get("engine_ids"))
        release_free_memory()  # purging is how users free big results: make it show in RSS
        self._reply(self.registration, idents, "purge_reply", {"status": "ok"}, parent=msg["header"])

    def handle_resubmit_request(self, idents: list[bytes], msg: dict, content: dict) -> None:
        """Run completed tasks again as new load-balanced tasks: same function, arguments,
        dependencies, targets and flags; a direct request keeps its engine. Replies to
        ``{"resubmitted": {old_id: new_id}}``; the results are fetched from the Hub."""
        resubmitted = {}
        for record in self.state.to_resubmit(content.get("msg_ids")):
            new_header = {**record["header"], "msg_id": str(uuid4()), "date": utcnow().isoformat()}
            md = self.state.resubmit_metadata(record)
            rest = self._signed([], new_header, {}, md, record["content"], record.get("buffers") or [])
            self._carry_out(self.state.recall_dependencies(md))
            # nobody waits on the task socket: the result is read from the Hub
            self._carry_out(self.state.task(b"", rest, new_header, md, self.loop.time()))
            self.hub.resubmitted(record["msg_id"], new_header["msg_id"])
            resubmitted[record["msg_id"]] = new_header["msg_id"]
        self._reply(self.registration, idents, "resubmit_reply",
                    {"status": "ok", "resubmitted": resubmitted}, parent=msg["header"])

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

    def on_engine_shell(self, frames: list) -> None:
        engine_ident = frames[0].bytes
        parsed = self._parse(frames[1:], parent=True, peer=engine_ident)
        if parsed is None:
            return
        idents, rest, msg = parsed
        if msg["header"]["msg_type"] == "engine_ready":
            self._carry_out(self.state.engine_ready(engine_ident.decode(), "shell", self.loop.time()))
            return
        if len(idents) != 2:
            self.warn(engine_ident, "no identities", "dropped an engine reply without its routing "
                      "identities")
            return
        tag, client = idents
        parent_id = msg["parent_header"].get("msg_id")
        if tag == LONE_TASK and parent_id not in self.state.pending:
            self._catch_up()  # a claimed task's error may overtake the device's copy of it
        self._carry_out(self.state.reply(engine_ident.decode(), tag, client, parent_id, rest,
                                         msg["header"], msg["metadata"], msg["msg_type"],
                                         self.loop.time()))

    def on_engine_control(self, frames: list) -> None:
        engine_ident = frames[0].bytes
        parsed = self._parse(frames[1:], peer=engine_ident)
        if parsed is None:
            return
        idents, rest, msg = parsed
        if msg["header"]["msg_type"] == "engine_ready":
            self._carry_out(self.state.engine_ready(engine_ident.decode(), "control",
                                                    self.loop.time()))
        elif len(idents) == 2 and idents[0] == STEAL:
            self._stolen(engine_ident, msg)
        elif len(idents) == 2 and idents[0] == CONTROL:  # a reply to a client's request
            if self._send(self.control, [idents[1], *rest]) is not Sent.SENT:
                self.log.info("a control reply for client %r waits or is dropped: it does not read",
                              idents[1])

    def _stolen(self, engine_ident: bytes, msg: dict) -> None:
        """An engine's answer to a steal request, checked, for the core."""
        try:
            content = self.session.unpack(frame_bytes(msg["content"]))
            stolen, kept = content["stolen"], content["kept"]
            if not all(isinstance(m, str) for m in (*stolen, *kept)):
                raise TypeError("msg_ids must be strings")
            begun, window = content.get("begun"), content.get("window")
            if not all(n is None or type(n) is int for n in (begun, window)):
                raise TypeError("begun and window must be ints")
        except Exception as e:
            self.warn(engine_ident, "bad steal reply", "dropped a malformed steal_reply: %s", e)
            return
        self._carry_out(self.state.stolen(engine_ident.decode(), stolen, kept, self.loop.time(),
                                          begun, window))

    def on_pong(self, frames: list) -> None:
        self._carry_out(self.state.pong(frames[0].bytes.decode(errors="replace"), self.loop.time()))

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
        now = self.loop.time()
        last, self._last_heartbeat = self._last_heartbeat, now
        # after the loop stalled (writing a 500 MB record to SQLite took 7 s), the
        # engines' answers wait unread: judged now, engines would be removed for the
        # controller's own silence. They are judged at the next beat, answers read
        if last is None or now - last < 2 * self.hub.hb_period:
            self._reap(None)
        self._ping()
        self._later(self.hub.hb_period, self._heartbeat)

    def _reap(self, since: float | None) -> None:
        """Remove engines that stopped answering (since ``since``, or for too long)."""
        for eid in self.state.dead_engines(self.loop.time(), since):
            self.remove_engine(eid, "stopped answering heartbeats")

    def remove_engine(self, eid: int, reason: str) -> None:
        self._local_processes.pop(eid, None)
        self._carry_out(self.state.engine_lost(eid, reason, self.loop.time()))


def _error_content(ename: str, evalue: str) -> dict:
    return {"status": "error", "ename": ename, "evalue": evalue, "traceback": [], "engine_info": {}}

