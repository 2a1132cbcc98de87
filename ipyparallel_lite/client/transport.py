"""The client's transport: every socket to the controller, and the I/O thread that serves them.

Threads: the user's thread builds and signs messages (the costly part, kept lean by
:class:`~ipyparallel_lite.client.message.MessageBuilder`) and queues them with :meth:`Transport.submit`; one I/O thread
sends what is queued, packing the messages waiting for the same channel into one
:mod:`~ipyparallel_lite.batch` (never waiting to fill one; direct requests, which the
controller routes in C by their first frame, into one batch per engine), and receives replies,
notifications and output. A reply is verified, matched to its
:class:`~ipyparallel_lite.client.asyncresult.AsyncResult` by the parent's ``msg_id`` in
:attr:`Transport.pending` and handed over as it is; results are unpickled only when
asked for.

Sockets: zmq sockets are not thread-safe, so a socket is touched only by the thread
holding ``_io_lock``. The I/O thread waits without it, in ``select.poll`` on the
sockets' own FDs (edge-triggered: they signal a change, and after any send or receive
the socket must be looked at again) and on a pipe that wakes it for queued messages;
it takes the lock for one turn when something happened, reading only the sockets that
signalled. A lone request (nothing in flight) is sent by the submitting thread itself
when the lock is free, which saves the I/O thread a wake-up; if the send may have
consumed a signal, or stalled, it wakes the I/O thread.

Identity: all the DEALER sockets share one zmq identity (``connection.shared_identity``),
so an engine can send the success of a task it held alone straight to the ``mux``
socket, through the controller's device (docs/wire.md); replies are read alike on every
socket. The constructor returns once the ``mux`` handshake is done: the device drops
what it cannot route.

Claims: a load-balanced task with no constraint on where it runs goes straight to an
engine through the device, and the controller places it there from the device's copy
(:meth:`Transport.claim_engine`, connection.CLAIM, docs/wire.md). While nothing is in
flight, to the engine whose reply left nothing in flight (a lone claim); while something
is, the I/O thread places it (a queued claim) on the engine with the fewest of this
client's claims, as many there as the scheduler's prefetch rule allows by what this
client's replies showed of that engine (:mod:`~ipyparallel_lite.prefetch`), and holds
the rest until replies make room. The engines are those ready in the
``connection_reply`` and the registration notifications; they are dropped on
unregistration, and all of them when a link to the controller goes down (the Client
gives them again when it is back).

Flow control: when the controller announces a ``window`` in its ``connection_reply``,
at most that many requests are in flight (sent, not answered); the rest wait here, in
the user's process, and go out as replies come back. A ``view.map`` of any size then
costs the controller a bounded amount of memory.

What the transport knows of the rest of the client: the AsyncResults it feeds (their
``_receive``/``_output``/``_count``/``_tracked`` hooks), and two callbacks the Client
gives it (``on_notification``, ``on_reconnect``). It imports nothing of the views or
the Client.
"""

from __future__ import annotations

import _signal  # signal's C functions: signal.signal wraps handlers in enums, 10x the cost
import collections
import contextlib
import heapq
import os
import select
import signal
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable
from functools import partial
from operator import itemgetter
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from ipyparallel_lite import batch, error, fastzmq
from ipyparallel_lite.client.message import MessageBuilder
from ipyparallel_lite.connection import (
    MAX_MESSAGE_BYTES,
    NOTIFICATION_HWM,
    check_message_size,
    controller_window,
    curve_client_options,
    heartbeat_options,
    make_session,
    mux_client_options,
    set_options,
    shared_identity,
    unpack_message,
    url,
)
from ipyparallel_lite.prefetch import Estimate

NOBLOCK = int(zmq.NOBLOCK)
#: what the client watches on its links to the controller: back means a completed
#: handshake (a stopped process's kernel still accepts TCP)
_LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


#: the channel of claims: load-balanced tasks this transport sends straight to an engine
#: (_send_claims), a lone one to the engine it names, queued ones where there is room
CLAIMS = "claim"
#: the placeholder engine identity of a queued claim's message, set when it is placed
QUEUED = b""
#: what the client knows of an engine none of its claims came back from yet (``hwm``)
_UNMEASURED = Estimate()


def _link_event(frames: list) -> int:
    """The event of a socket monitor's message."""
    return parse_monitor_message([fastzmq.frame_bytes(f) for f in frames])["event"]

#: channels whose requests wait for replies, and so count against the window (claims
#: too: they wait in ``_claims`` for an engine with room, window or not)
WINDOWED = frozenset(("mux", "task", "broadcast"))
#: most messages the I/O thread packs into one batch
BATCH_MAX = 64
#: channels whose zmq messages the controller's mux device routes by their first frame,
#: the engine's identity: a batch there carries the messages for one engine
ROUTED = frozenset(("mux",))

# an outbox entry: (channel, frames, reply slots it takes in the window, the AsyncResult
# to give a zmq tracker or None, sequence number, the msg_ids its replies will carry)
_CHANNEL, _FRAMES, _SLOTS, _TRACK, _SEQ, _IDS = range(6)
#: a sequence number after every other
_NEVER = float("inf")


_SIGINT = int(signal.SIGINT)


class _SigintHeld:
    """Ctrl-C held while the main thread queues and sends a request, raised after.

    Python raises KeyboardInterrupt in the main thread between any two bytecodes. In
    :meth:`Transport.submit` that could land between the frames of a multipart send (the
    next send would continue the message: two requests garbled into one the controller
    drops, and their results never come), or after a result was registered and before
    its request was queued (``wait()`` would wait for it forever). Held, it is raised
    when the request is on its way, as if Ctrl-C came just after the call returned.
    A thread other than the main one, or a handler that raises nothing (SIG_IGN,
    SIG_DFL), is left alone.
    """

    __slots__ = ("previous", "held")

    def __init__(self) -> None:
        self.previous: Any = None
        self.held: tuple | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.held = (signum, frame)

    def __enter__(self) -> _SigintHeld:
        if threading.get_ident() == threading.main_thread().ident:
            previous = _signal.getsignal(_SIGINT)
            if callable(previous):
                self.previous = previous
                _signal.signal(_SIGINT, self)  # from here on, a Ctrl-C only sets held
        return self

    def __exit__(self, *exc: Any) -> None:
        previous = self.previous
        if previous is not None:
            _signal.signal(_SIGINT, previous)
            if self.held is not None:
                previous(*self.held)


def _warn_dropped(where: str, frames: list, e: Exception) -> None:
    """One warning for a message this client could not read, saying ``where`` it came
    ("on its iopub channel") and what was wrong with it; the client goes on without it."""
    warnings.warn(f"ipyparallel_lite client dropped a message of {len(frames)} frames {where} "
                  f"({type(e).__name__}: {e}); it goes on without it.", stacklevel=2)


class Transport:
    """The sockets of one Client, their I/O thread, and the requests waiting for replies.

    Connecting asks the controller for its engines (``connection_reply``, in
    :attr:`first_reply`) before the I/O thread starts. ``on_notification(msg)`` gets
    every registration notification, on the I/O thread; ``on_reconnect()`` is called on a
    thread of its own when the controller comes back after it was lost.
    ``controller_timeout``: seconds the controller may be unreachable before waiting
    requests fail (None: its heartbeat window, from the connection info).
    """

    #: how long a replied execute request waits for iopub output its engine announced
    #: (``iopub_count``) but that has not arrived, before counting as complete: PUB/SUB
    #: drops messages when a subscriber falls far behind
    OUTPUT_GRACE = 2.0

    def __init__(self, info: dict, timeout: float, *,
                 on_notification: Callable[[dict], None],
                 on_reconnect: Callable[[], None],
                 controller_timeout: float | None = None):
        self.connection_info = info
        self.session = make_session(info["key"])
        self._messages = MessageBuilder(self.session)
        self.on_notification = on_notification
        self.on_reconnect = on_reconnect
        #: CURVE options of every socket to the controller (empty if it does not encrypt)
        self._curve = curve_client_options(info)
        #: seconds without the controller before waiting requests fail
        self.controller_timeout = (controller_window(info) if controller_timeout is None
                                   else controller_timeout)
        #: the largest message part the controller reads (absent from older files: no limit)
        self._max_message_bytes = info.get(MAX_MESSAGE_BYTES)
        self._context = zmq.Context()
        #: the zmq identity of all this client's sockets: it reads batches, and takes a
        #: load-balanced task's reply on its mux socket (connection.shared_identity)
        self.identity = shared_identity()
        self.closed = False
        #: why the I/O thread stopped, if an internal error stopped it (_stopped_by)
        self.broken: str | None = None
        #: msg_id -> AsyncResult of every request waiting for its reply
        self.pending: dict[str, Any] = {}
        #: the same for control requests (clear, abort, signal), kept out of ``pending``
        self.control_pending: dict[str, Any] = {}
        #: msg_id -> AsyncResult of every request whose AsyncResult is alive (for output)
        self.outputs: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        #: msg_ids of every request submitted, oldest first
        self.history: list[str] = []
        self._query_replies: dict[str, Any] = {}
        self._query_cond = threading.Condition()
        self._outbox: collections.deque = collections.deque()
        #: requests held back by the window, in order
        self._held: collections.deque = collections.deque()
        #: claims to send (_send_claims), in order: queued ones wait here for an engine
        #: with room; they take window slots like _held's entries
        self._claims: collections.deque = collections.deque()
        self._held_slots = 0  # reply slots of the entries in _held (under _wake_lock)
        self._aborted: set[str] = set()  # msg_ids to take out of _held (under _wake_lock)
        self._wake_lock = threading.Lock()
        self._wake_pending = False  # a wake-up byte is in the pipe, not yet taken by the I/O thread
        #: held by whichever thread touches the sockets (zmq sockets are not thread-safe):
        #: the I/O thread for a turn, or a user's thread sending a lone request itself
        self._io_lock = threading.Lock()
        self._stalled_on: zmq.Socket | None = None
        #: sockets sent on since their FD was last looked at: a send may consume the FD's
        #: signal of a message that arrived meanwhile (under _io_lock)
        self._sent_on: set[zmq.Socket] = set()
        self._queued = 0  # messages queued so far (under _wake_lock): the sequence numbers
        #: zmq messages sent so far (a batch counts once)
        self.sends = 0
        self._output_deadlines: collections.deque = collections.deque()
        self.first_reply = self._connect(info, timeout)
        # the user's threads wake the I/O thread through a pipe: a byte costs one
        # syscall, and the I/O thread waits on it with the sockets' own FDs
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        #: most requests in flight at once (None: no limit), as the controller asks
        self.window: int | None = self.first_reply.get("window") or None
        #: the ``hwm`` of this client's claims (connection.CLAIM; 0: the controller takes
        #: none): how many requests of ours an engine may hold, plus the prefetch our
        #: estimate of its tasks allows (prefetch.Estimate)
        self.claim_hwm = int(self.first_reply.get("claims") or 0)
        self.claims = self.claim_hwm > 0
        #: the engine whose reply left nothing in flight (its zmq identity): a lone
        #: task's claim goes there
        self._idle_engine: bytes | None = None
        #: engines claims may go to (identities), as the Client learns of them
        self._engines: set[bytes] = set()
        #: this client's claims in flight on each engine (sent, not answered), the engine
        #: of each, when it was sent, whether it found the engine idle and whether it
        #: was queued, and what their replies showed of each engine: where queued
        #: claims go, and how many (under _io_lock)
        self._in_flight_on: dict[bytes, int] = {}
        self._engine_of: dict[str, tuple[bytes, float, bool, bool]] = {}
        self._estimates: dict[bytes, Estimate] = {}
        #: engines whose claims were answered by another engine (asked back by the
        #: controller: a long task there): one claim at a time until one of theirs comes
        #: back from them
        self._detoured: set[bytes] = set()
        # before the I/O thread starts: an unregistration it reads then takes them out
        # (the Client adds the same engines later, and re-adding is harmless only here)
        self.add_engines(self.first_reply.get("engines", {}).values())
        self._io_thread = threading.Thread(target=self._io_loop, name="ipp-lite-client-io", daemon=True)
        self._io_thread.start()

    # ---- connection ---------------------------------------------------------------

    def _socket(self, kind: int, channel: str, options: dict | None = None,
                watch: bool = False) -> zmq.Socket:
        """A socket connected to ``channel``; ``watch``: its link to the controller is
        watched (:meth:`_on_link`), from before it connects."""
        sock = set_options(fastzmq.socket(self._context, kind), {**self._curve, **(options or {})})
        sock.linger = 0
        if kind == zmq.DEALER:  # the controller (and engines, through the mux device) may
            sock.identity = self.identity  # send it replies, batched, on any of them
        if watch:
            self._links[channel] = sock.get_monitor_socket(_LINK_EVENTS)
        sock.connect(url(self.connection_info, channel))
        return sock

    def _connect(self, info: dict, timeout: float) -> dict:
        #: monitors of the links whose loss and return the client follows: control (its
        #: heartbeats notice a controller that hangs), mux (the device drops replies for a
        #: client whose mux link is down) and query (what resynchronizes goes there)
        self._links: dict[str, zmq.Socket] = {}
        #: watched links that went down and are not back yet
        self._links_down: set[str] = set()
        self._sockets = {
            "mux": self._socket(zmq.DEALER, "mux", mux_client_options(info), watch=True),
            "task": self._socket(zmq.DEALER, "task"),
            # ZMTP heartbeats, answered by the controller's libzmq thread (a busy
            # controller still answers): a controller that hangs without closing the
            # connection (stopped, or a cut network) drops it after the window. On the
            # control channel, which carries only small messages: a ping waits behind
            # a message being transferred, and a big one may take longer than the window
            "control": self._socket(zmq.DEALER, "control",
                                    heartbeat_options(info, self.controller_timeout), watch=True),
            "query": self._socket(zmq.DEALER, "registration", watch=True),
        }
        if "broadcast" in info["ports"]:  # absent from connection files of older controllers
            self._sockets["broadcast"] = self._socket(zmq.DEALER, "broadcast")
        # as deep as the controller's side: engines leaving together must not be missed
        self._notification = self._socket(zmq.SUB, "notification", {zmq.RCVHWM: NOTIFICATION_HWM})
        self._notification.subscribe(b"")
        self._iopub = self._socket(zmq.SUB, "iopub")
        self._iopub.subscribe(b"")
        # the first exchange happens here, before the I/O thread owns the sockets
        query = self._sockets["query"]
        self._controller_lost_since: float | None = None
        self._controller_was_lost = False
        self.session.send(query, "connection_request", {})
        deadline = time.monotonic() + timeout
        if not query.poll(int(timeout * 1000)):
            self._context.destroy(linger=0)
            raise error.TimeoutError(
                f"No answer from the controller at {url(info, 'registration')} within {timeout}s. "
                "Is the cluster running, and is its connection file current?"
            )
        _, reply = self.session.recv(query, mode=0)
        # engines answer lone tasks through the mux device, which drops what it cannot
        # route: the mux connection is up before a request goes (it came up meanwhile)
        mux_link = self._links["mux"]
        while True:
            if not mux_link.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                self._context.destroy(linger=0)
                raise error.TimeoutError(
                    f"The controller's mux channel at {url(info, 'mux')} did not accept this "
                    f"client within {timeout}s, though the controller answered. Is its "
                    "connection file current (the mux channel lets in only holders of the "
                    "cluster's key)?")
            if _link_event(mux_link.recv_multipart()) == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return reply["content"]

    def has_channel(self, channel: str) -> bool:
        """Whether the controller offers ``channel`` (older ones have no ``broadcast``)."""
        return channel in self._sockets

    # ---- the interface: building and queueing -------------------------------------------

    def build(self, msg_type: str, content: dict | None = None, *, ident: list[bytes] | None = None,
              buffers: list | None = None, metadata: dict | bytes | None = None) -> tuple[str, list]:
        """A signed message ready to send: ``(msg_id, frames)``; ``metadata`` may be
        packed already (:meth:`pack_metadata`)."""
        if self.closed or self.broken is not None:
            raise RuntimeError(self.broken or "this Client is closed; create a new one to keep working")
        msg_id, frames = self._messages.build(msg_type, content, ident=ident, metadata=metadata)
        if buffers:
            frames.extend(buffers)
        check_message_size(frames, self._max_message_bytes, f"{msg_type} message")
        return msg_id, frames

    def pack_metadata(self, metadata: dict | None) -> bytes:
        """``metadata`` packed once, for :meth:`build` to put in many messages."""
        return self._messages.pack_metadata(metadata)

    def submit(self, channel: str, messages: list[tuple[str, list]], result: Any,
               *, reply_ids: list[str] | None = None, history: list[str] | None = None,
               track: bool = False, control: bool = False) -> None:
        """Queue built messages; ``result`` (an AsyncResult) is registered first so no
        reply is missed.

        ``reply_ids``: the parent msg_ids the replies will carry, when they are not the
        messages' own (a broadcast's one message gets one reply per engine).
        ``history``: a view's history, which records the ids too (:attr:`history` always
        does). ``track``: have zmq track the sends, for ``result.sent`` (needs ``result``).
        ``control``: requests to stop or clear engines, kept out of ``pending``,
        ``history`` and ``wait()``. A Ctrl-C meanwhile is raised once the messages are
        queued (and sent, if this thread sends them): see :class:`_SigintHeld`.
        """
        if self.broken is not None:  # (built before it broke)
            raise RuntimeError(self.broken)
        with _SigintHeld():
            self._submit(channel, messages, result, reply_ids, history, track, control)

    def _submit(self, channel: str, messages: list[tuple[str, list]], result: Any,
                reply_ids: list[str] | None, history: list[str] | None, track: bool,
                control: bool) -> None:
        windowed = False
        # nothing in flight: the request goes alone, so this thread may send it itself
        alone = not self.pending and not self.control_pending
        if control:
            for msg_id, _ in messages:
                self.control_pending[msg_id] = result
        elif result is not None:
            ids = [msg_id for msg_id, _ in messages] if reply_ids is None else reply_ids
            for msg_id in ids:
                self.pending[msg_id] = result
                self.outputs[msg_id] = result
            self.history.extend(ids)
            if history is not None:
                history.extend(ids)
            windowed = channel == CLAIMS or (self.window is not None and channel in WINDOWED)
        tracked = result if track else None
        with self._wake_lock:  # one lock for queueing, counting and waking: sends stay in order
            seq = self._queued
            if windowed:
                # each message takes the slots of the replies it will get
                slots = max(1, len(ids) // len(messages)) if messages else 0
                queue = self._claims if channel == CLAIMS else self._held
                self._held_slots += slots * len(messages)
            else:
                slots, queue = 0, self._outbox
            fan_out = tuple(reply_ids) if reply_ids is not None and len(messages) == 1 else None
            for msg_id, frames in messages:
                seq += 1
                queue.append((channel, frames, slots, tracked, seq, fan_out or (msg_id,)))
            self._queued = seq
            if result is not None:
                result._send_seq = seq
            if self._wake_pending:  # the I/O thread is on its way: it sends this too
                return
            if not alone:  # one wake-up of the I/O thread for any number of messages
                self._wake_locked()
                return
        self._send_here()

    def _wake_locked(self) -> None:
        """Wake the I/O thread, once for any number of calls until it wakes (holding
        ``_wake_lock``)."""
        if not self._wake_pending and self._wake_write >= 0:
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError):  # a full pipe wakes it anyway
                os.write(self._wake_write, b"w")

    def _send_here(self) -> None:
        """Send what is queued from the calling thread, if the I/O thread is not using the
        sockets (it sleeps between replies); else wake it to send.

        A lone request saves the I/O thread's wake-up. A send may consume the signal of
        a message that arrived meanwhile (the sockets' FDs are edge-triggered): if one
        waits, or the send stalled, the I/O thread is woken to take over.
        """
        if self._io_lock.acquire(blocking=False):
            try:
                if self.closed:
                    return
                self._flush()
                done = self._stalled_on is None and not self._readable_sent_on()
            finally:
                self._io_lock.release()
            if done:
                return
        with self._wake_lock:
            self._wake_locked()

    def claim_engine(self, tasks: int = 1) -> bytes | None:
        """Where ``tasks`` load-balanced tasks submitted together, with no constraint on
        where they run, may go straight, through the mux device, as claims
        (connection.CLAIM), which saves each a hop through the controller's Python (the
        controller places it there from the device's copy, and settles it if that engine
        took other work meanwhile):

        - one task while nothing is in flight: the engine whose reply left nothing in
          flight, if there is one; the task goes there as a lone claim (on the ``claim``
          channel, with that identity);
        - else :data:`QUEUED` if engines are known: each task waits on the ``claim``
          channel for one with room, and goes there as a queued claim (_send_claims);
        - else None: they go through the controller's scheduler (``task``).
        """
        if not self.claims:
            return None
        if tasks == 1 and not self.pending and not self.control_pending:
            return self._idle_engine
        return QUEUED if self._engines else None

    def add_engines(self, uuids: Any) -> None:
        """Engines claims may go to (their uuids, which are their zmq identities)."""
        self._engines.update(uuid.encode() for uuid in uuids)

    def forget_engine(self, uuid: str) -> None:
        """Engine ``uuid`` left: no claims for it."""
        ident = uuid.encode()
        if self._idle_engine == ident:
            self._idle_engine = None
        self._engines.discard(ident)
        self._detoured.discard(ident)
        self._estimates.pop(ident, None)

    def send(self, channel: str, msg_type: str, content: dict | None = None, **kwargs: Any) -> str:
        """Build and queue one message whose reply nobody waits for; its msg_id."""
        message = self.build(msg_type, content, **kwargs)
        self.submit(channel, [message], None)
        return message[0]

    def query(self, msg_type: str, content: dict, timeout: float = 10) -> dict:
        """A request to the Hub, answered synchronously; raises on an error reply.

        A query naming requests of this client that are not answered yet names them as
        ``in_flight`` too: they travel to the controller on other connections than the
        query, which may overtake them, and the controller waits for them, a bounded
        time (one the window holds back here, or a claim waiting for room, may go later
        still: the query then waits out that bound)."""
        named = content.get("msg_ids")
        if isinstance(named, list):
            pending = self.pending
            in_flight = [m for m in named if m in pending]
            if in_flight:
                content = {**content, "in_flight": in_flight}
        msg_id = self.send("query", msg_type, content)
        deadline = time.monotonic() + timeout
        with self._query_cond:
            while msg_id not in self._query_replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise error.TimeoutError(f"the controller did not answer {msg_type} in {timeout}s")
                self._query_cond.wait(remaining)
            reply = self._query_replies.pop(msg_id)
        if reply["content"].get("status") != "ok":
            raise error.unwrap_exception(reply["content"])
        return reply

    def sent_through(self, seq: int) -> bool:
        """Whether the messages queued up to sequence number ``seq`` were handed to zmq."""
        for queue in (self._outbox, self._held, self._claims):
            try:
                if queue[0][_SEQ] <= seq:
                    return False
            except IndexError:  # empty, or emptied by the I/O thread meanwhile
                pass
        return True

    def abort_held(self, msg_ids: list[str]) -> None:
        """Requests among ``msg_ids`` that still wait here (for the window, or claims for
        an engine with room) are never sent: they end with ``TaskAborted`` (the I/O
        thread takes them out on its next turn)."""
        with self._wake_lock:
            if not self._held and not self._claims:
                return
            self._aborted.update(msg_ids)
            self._wake_locked()

    def expect_output(self, ar: Any, msg_id: str) -> None:
        """``ar``'s request ``msg_id`` is replied and waits for announced iopub output:
        it counts as complete after :attr:`OUTPUT_GRACE` seconds even without it."""
        self._output_deadlines.append((time.monotonic() + self.OUTPUT_GRACE, ar, msg_id))

    # ---- failing what waits ------------------------------------------------------------

    def forget_finished(self) -> None:
        """Drop what is kept of finished requests (their AsyncResults for output, their
        ids in :attr:`history`); outstanding ones stay."""
        outstanding = set(self.pending)
        for msg_id in [m for m in self.outputs.keys() if m not in outstanding]:
            self.outputs.pop(msg_id, None)
        self.history[:] = [m for m in self.history if m in outstanding]

    def fail_pending(self, reason: str, ename: str = "EngineError") -> None:
        """Answer every waiting request with an ``ename`` error, so nobody waits forever."""
        pending, self.pending = self.pending, {}
        control, self.control_pending = self.control_pending, {}
        with self._wake_lock:  # requests held back by the window will not be sent either
            self._held.clear()
            self._claims.clear()
            self._held_slots = 0
            self._aborted.clear()
        self._in_flight_on.clear()
        self._engine_of.clear()
        self._fail_requests({**pending, **control}, ename, reason)

    def fail_pending_ids(self, msg_ids: list[str], reason: str) -> None:
        """Answer the waiting requests ``msg_ids`` with an EngineError."""
        self._fail_requests({m: ar for m in msg_ids if (ar := self.pending.pop(m, None))},
                            "EngineError", reason)

    @staticmethod
    def _fail_requests(pending: dict[str, Any], ename: str, reason: str) -> None:
        for msg_id, ar in pending.items():
            ar._receive(msg_id, {
                "header": {}, "parent_header": {"msg_id": msg_id}, "buffers": [],
                "metadata": {"status": "error", "engine_id": None},
                "content": {"status": "error", "ename": ename, "evalue": reason,
                            "traceback": [], "engine_info": {}},
            })

    def _drop_aborted(self) -> None:
        """Take the requests :meth:`abort_held` named out of the window's queue, and
        answer them."""
        with self._wake_lock:
            aborted, self._aborted = self._aborted, set()
            dropped: list[str] = []
            self._held = self._without(self._held, aborted, dropped)
            self._claims = self._without(self._claims, aborted, dropped)
        self._fail_requests({m: ar for m in dropped if (ar := self.pending.pop(m, None))},
                            "TaskAborted", "Aborted before it was sent: it was waiting in this "
                            "client for room (in the controller's window, or on an engine)")

    def _without(self, queue: collections.deque, aborted: set[str], dropped: list[str]) -> collections.deque:
        """``queue`` without the entries of ``aborted`` requests, whose ids go to
        ``dropped`` (holding ``_wake_lock``)."""
        kept: collections.deque = collections.deque()
        for entry in queue:
            if aborted.isdisjoint(entry[_IDS]):
                kept.append(entry)
            else:
                dropped.extend(entry[_IDS])
                self._held_slots -= entry[_SLOTS]
        return kept

    # ---- the I/O thread -----------------------------------------------------------

    def _io_loop(self) -> None:
        # the sockets' own FDs (edge-triggered: readable when the socket's state changed)
        # and the wake pipe; the sockets are touched only under _io_lock
        self._handlers = {
            self._notification: self._on_notification,
            self._iopub: self._on_iopub,
            self._sockets["query"]: self._on_query_reply,
            **{link: partial(self._on_link, channel) for channel, link in self._links.items()},
        }
        for name in ("mux", "task", "control", "broadcast"):
            if name in self._sockets:
                self._handlers[self._sockets[name]] = self._on_replies
        self._channel_of = {self._notification: "notification", self._iopub: "iopub",
                            **{sock: name for name, sock in self._sockets.items()},
                            **{link: f"{name} link" for name, link in self._links.items()}}
        waiter = select.poll()
        waiter.register(self._wake_read, select.POLLIN)
        by_fd = {}
        for sock in self._handlers:
            by_fd[sock.FD] = sock
            waiter.register(sock.FD, select.POLLIN)
        again = list(self._handlers)  # sockets to read at once: first, what came before us
        try:
            while not self.closed:
                events = waiter.poll(0 if again else 100)
                look, woken = again, False
                for fd, _ in events:
                    sock = by_fd.get(fd)
                    if sock is None:
                        woken = True
                    elif sock not in look:
                        look.append(sock)
                if not events and not again:  # a quiet tick: every socket, for certain
                    look = list(self._handlers)
                with self._io_lock:
                    if self.closed:
                        break
                    again = self._turn(look, woken)
            with self._io_lock:
                self._flush()
        except Exception as e:
            # a zmq error while closing: the context was destroyed under us. Any other
            # error, a zmq one included, is a fault, and what waits must not wait for ever
            if not (self.closed and isinstance(e, zmq.ZMQError)):
                self._stopped_by(e)

    def _stopped_by(self, e: Exception) -> None:
        """The I/O thread stops on an unexpected error: no reply can reach this client
        now, so every request waiting for one fails, saying so, and no new one is taken."""
        self.broken = (f"this Client's I/O thread stopped on an internal error ({type(e).__name__}: "
                       f"{e}); connect a new Client, and please report this bug with the "
                       "traceback printed on stderr")
        traceback.print_exception(e)
        self.fail_pending(self.broken, ename="RuntimeError")

    def _turn(self, look: list, woken: bool) -> list:
        """One turn of the I/O thread (holding ``_io_lock``): read what waits on the
        sockets ``look`` (``woken``: the pipe woke us), send what is queued, expire
        waits; the sockets to read again at once."""
        if woken:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 4096)
            with self._wake_lock:  # after the read: a wake-up from now on leaves a byte
                self._wake_pending = False
        handlers = self._handlers
        again = [sock for sock in look if self._drain(sock, handlers[sock], self._channel_of[sock])]
        self._flush()
        self._expire_output_waits()
        self._check_controller()
        sent_on, self._sent_on = self._sent_on, set()
        again += [sock for sock in sent_on if sock not in again and fastzmq.readable(sock)]
        stalled = self._stalled_on
        if stalled is not None and stalled.getsockopt(zmq.EVENTS) & zmq.POLLOUT and stalled not in again:
            again.append(stalled)  # room again: the next turn sends
        return again

    @staticmethod
    def _drain(sock: zmq.Socket, handler: Callable[[list], None], channel: str) -> bool:
        """Hand up to 512 waiting messages of ``sock`` to ``handler``; True if more wait."""
        for _ in range(512):
            if not fastzmq.readable(sock):
                return False
            frames = sock.recv_multipart(NOBLOCK, copy=False)
            try:
                handler(frames)
            except Exception as e:  # one bad message must not stop the client
                _warn_dropped(f"on its {channel} channel", frames, e)
        return True

    def _readable_sent_on(self) -> bool:
        """Whether a message waits on a socket sent on since the I/O thread's last turn
        (holding ``_io_lock``; looking re-arms their FDs)."""
        readable = fastzmq.readable
        if any([readable(sock) for sock in self._sent_on]):  # a list: every FD re-armed
            return True  # the I/O thread reads them on its next turn
        self._sent_on.clear()
        return False

    def _on_link(self, channel: str, frames: list) -> None:
        """A watched link to the controller went down or came back. The controller is
        back once every link that went down is back: then ``on_reconnect`` runs (the
        Client asks the Hub for the results it may have missed meanwhile)."""
        event = _link_event(frames)
        if event == zmq.EVENT_DISCONNECTED:
            self._links_down.add(channel)
            self._idle_engine = None  # engines may come back under other ids: no claims
            self._engines.clear()  # until the Client learns them again (on_reconnect)
            self._in_flight_on.clear()  # replies may be lost: the Hub will tell
            self._engine_of.clear()
            self._controller_lost_since = self._controller_lost_since or time.monotonic()
            self._controller_was_lost = True
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._links_down.discard(channel)
            if self._links_down:
                return
            self._controller_lost_since = None
            if self._controller_was_lost:  # back (a restart): the queries block, not this thread
                self._controller_was_lost = False
                threading.Thread(target=self.on_reconnect, daemon=True).start()

    def _check_controller(self) -> None:
        lost = self._controller_lost_since
        if lost is not None and time.monotonic() - lost > self.controller_timeout and (
                self.pending or self.control_pending):
            self.fail_pending(
                f"The controller is gone: unreachable for {self.controller_timeout:g}s (its "
                f"process died or hangs, or the network to {self.connection_info['interface']} "
                "failed), so the results of requests in flight cannot arrive. Restart the "
                "cluster (ipcontroller-lite --sqlitedb --restore keeps its task records) and "
                "resubmit."
            )

    def _expire_output_waits(self) -> None:
        waits = self._output_deadlines
        now = time.monotonic()
        while waits and waits[0][0] <= now:
            _, ar, msg_id = waits.popleft()
            ar._count(msg_id)

    def _flush(self) -> None:
        """Send what is queued, in the order it was queued, never blocking: a blocked send
        here would stop this thread from reading replies, and the controller may be
        waiting for us to read. Requests the window holds wait; what follows them on
        other channels (a query, an abort) does not."""
        if self._aborted:
            self._drop_aborted()
        outbox, held = self._outbox, self._held
        while outbox or held:
            budget = self.window - (len(self.pending) - self._held_slots) if held else 0
            next_out = outbox[0][_SEQ] if outbox else _NEVER
            next_held = held[0][_SEQ] if held and budget > 0 else _NEVER
            if next_out == next_held:  # both _NEVER: nothing may go now
                break
            if next_out < next_held:
                sent = self._send_from(outbox, None, next_held)
            else:
                sent = self._send_from(held, budget, next_out)
            if not sent:
                return
        if self._claims and not self._send_claims():
            return
        self._stalled_on = None

    def _send_from(self, queue: collections.deque, budget: int | None, before: float) -> bool:
        """Send ``queue``'s entries queued before sequence number ``before``, in order,
        those for one channel packed into batches (on a routed channel, one batch per
        engine), until ``budget`` reply slots are used; False if zmq refused."""
        sockets = self._sockets
        while queue and queue[0][_SEQ] < before and (budget is None or budget > 0):
            first = queue[0]
            channel = first[_CHANNEL]
            sock = sockets[channel]
            count, slots = 1, first[_SLOTS]
            if first[_TRACK] is None:  # a tracked send goes alone, so that its tracker is its own
                limit = min(len(queue), BATCH_MAX)
                while count < limit:
                    entry = queue[count]
                    if entry[_CHANNEL] != channel or entry[_TRACK] is not None or entry[_SEQ] >= before:
                        break
                    if budget is not None and slots + entry[_SLOTS] > budget:
                        break
                    slots += entry[_SLOTS]
                    count += 1
            sends = 1
            try:
                if count == 1:
                    if first[_TRACK] is None:
                        sock.send_multipart(first[_FRAMES], NOBLOCK, copy=False)
                    else:
                        first[_TRACK]._tracked(sock.send_multipart(first[_FRAMES], NOBLOCK, copy=False,
                                                                   track=True))
                    queue.popleft()
                elif channel in ROUTED:
                    sends = self._send_routed(sock, queue, count)
                else:
                    sock.send_multipart(batch.pack([queue[i][_FRAMES] for i in range(count)]),
                                        NOBLOCK, copy=False)
                    for _ in range(count):
                        queue.popleft()
            except zmq.Again:
                # the controller is not reading: the I/O thread retries when this socket
                # can take more (its FD signals that too)
                self._stalled_on = sock
                return False
            if budget is not None:
                budget -= slots
            self._release_slots(slots)
            self.sends += sends
            self._sent_on.add(sock)
        return True

    def _send_routed(self, sock: zmq.Socket, queue: collections.deque, count: int) -> int:
        """Send the first ``count`` entries of ``queue`` as one batch per engine, each
        engine's in order, and take them off it; how many zmq messages that took. If zmq
        refuses one (zmq.Again), what was sent is accounted for and the rest goes back
        to the front of ``queue``, in order."""
        taken = [queue.popleft() for _ in range(count)]
        groups: dict[bytes, list] = {}
        for entry in taken:
            groups.setdefault(bytes(entry[_FRAMES][0]), []).append(entry)
        sent: set[int] = set()
        sends = 0
        try:
            for entries in groups.values():
                frames = [entry[_FRAMES] for entry in entries]
                sock.send_multipart(frames[0] if len(frames) == 1 else
                                    batch.pack_routed(frames[0][0], frames), NOBLOCK, copy=False)
                sent.update(map(id, entries))
                sends += 1
        except zmq.Again:
            if sent:
                self._release_slots(sum(entry[_SLOTS] for entry in taken if id(entry) in sent))
                self.sends += sends
                self._sent_on.add(sock)
            queue.extendleft(reversed([entry for entry in taken if id(entry) not in sent]))
            raise
        return sends

    def _send_claims(self) -> bool:
        """Send the claims on the ``claim`` channel, in order, one batch per engine: a lone
        one to the engine it names; a queued one to the engine with the fewest of this
        client's claims in flight, while one has room (its prefetch limit over
        ``claim_hwm``, as the scheduler would reckon it; 1 for an engine whose claims
        another engine answered) and the window has room too. With no engine known
        (none ready yet, or the link to the controller went down) they go through the
        controller's scheduler instead. False if zmq refused."""
        queue = self._claims
        engines = tuple(self._engines)  # (the Client's thread may add engines meanwhile)
        if not engines:
            self._send_claims_as_tasks()
            return True
        in_flight = self._in_flight_on
        limits: dict[bytes, int] = {}
        room: list | None = None  # reckoned at the first queued claim (below)
        budget = _NEVER if self.window is None else self.window - (len(self.pending) - self._held_slots)
        taken = slots = 0
        now = time.monotonic()
        # by index, never an iterator: a submitting thread may append claims meanwhile
        # (a deque's iterator then raises); only the holder of _io_lock takes them off
        waiting = len(queue)
        while taken < waiting:
            entry = queue[taken]
            if slots + entry[_SLOTS] > budget:
                break
            frames = entry[_FRAMES]
            queued = frames[0] == QUEUED
            if queued:
                if room is None:  # after the lone claim this pass may start with: it counts
                    room = self._claim_room(engines, limits)
                if not room:
                    break
                count, engine = room[0]
                frames[0] = engine
                count += 1
                if count < limits[engine]:
                    heapq.heapreplace(room, (count, engine))
                else:
                    heapq.heappop(room)
            self._placed(entry, now, queued)
            slots += entry[_SLOTS]
            taken += 1
        if not taken:
            return True
        sock = self._sockets["mux"]
        try:
            sends = self._send_routed(sock, queue, taken)
        except zmq.Again:  # what was not sent is back at the front of the queue: unplaced
            for i in range(taken):
                entry = queue[i]
                placed = self._engine_of.pop(entry[_IDS][0], None)
                if placed is None:
                    break
                in_flight[placed[0]] -= 1
                if placed[3]:
                    entry[_FRAMES][0] = QUEUED
            self._stalled_on = sock
            return False
        self._release_slots(slots)
        self.sends += sends
        self._sent_on.add(sock)
        return True

    def _claim_room(self, engines: tuple, limits: dict[bytes, int]) -> list[tuple[int, bytes]]:
        """A heap of ``(claims in flight, engine)`` of the engines with room for more,
        each engine's limit put in ``limits`` (holding ``_io_lock``)."""
        in_flight, detoured, estimates, hwm = self._in_flight_on, self._detoured, self._estimates, self.claim_hwm
        room = []
        for engine in engines:
            limit = limits[engine] = (1 if engine in detoured
                                      else estimates.get(engine, _UNMEASURED).limit(hwm))
            count = in_flight.get(engine, 0)
            if count < limit:
                room.append((count, engine))
        heapq.heapify(room)
        return room

    def _send_claims_as_tasks(self) -> None:
        """Move the queued claims to the window's queue, in sequence order, as tasks
        for the controller's scheduler (without their placeholder engine identity)."""
        with self._wake_lock:
            claims, self._claims = self._claims, collections.deque()
            tasks = [("task", entry[_FRAMES][1:], *entry[2:]) for entry in claims]
            if self.window is None:  # no window: they go with what the outbox holds
                self._held_slots -= sum(entry[_SLOTS] for entry in tasks)
                self._outbox = collections.deque(heapq.merge(self._outbox, tasks, key=itemgetter(_SEQ)))
            else:
                self._held = collections.deque(heapq.merge(self._held, tasks, key=itemgetter(_SEQ)))

    def _placed(self, entry: tuple, now: float, queued: bool) -> None:
        """A claim goes, at ``now``, to the engine its first frame names (holding
        ``_io_lock``). Its reply measures that engine if it was ``queued`` (a lone one
        does not stack)."""
        engine = entry[_FRAMES][0]
        count = self._in_flight_on.get(engine, 0)
        self._engine_of[entry[_IDS][0]] = (engine, now, not count, queued)
        self._in_flight_on[engine] = count + 1

    def _answered(self, placed: tuple[bytes, float, bool, bool], metadata: dict) -> None:
        """A claim got its reply, with ``metadata``: from its engine, from another one
        (the controller asked it back from there), or from the controller (no
        ``engine``)."""
        engine, sent, alone, measured = placed
        left = self._in_flight_on.get(engine, 0) - 1
        if left > 0:
            self._in_flight_on[engine] = left
        else:
            self._in_flight_on.pop(engine, None)
        answered_by = metadata.get("engine")
        if not isinstance(answered_by, str):
            return
        if answered_by.encode() == engine:
            self._detoured.discard(engine)
            if not measured:
                return
            estimate = self._estimates.get(engine)
            if estimate is None:
                estimate = self._estimates[engine] = Estimate()
            estimate.measure(metadata.get("run_time"), time.monotonic() - sent if alone else None)
        elif engine in self._engines:
            # asked back: a long task there, or another engine was idle
            self._detoured.add(engine)

    def _release_slots(self, slots: int) -> None:
        """Sent requests held by the window no longer wait here (only they take slots)."""
        if slots:
            with self._wake_lock:
                self._held_slots -= slots

    # ---- receiving --------------------------------------------------------------------

    def deserialize(self, frames: list) -> dict:
        """A received message verified and unpacked (content and buffers left packed)."""
        _, msg_frames = self.session.feed_identities(frames, copy=False)
        return unpack_message(self.session, msg_frames)

    def _on_replies(self, frames: list) -> None:
        # a batch comes behind the engine's identity on a routed channel (mux)
        at = 0 if batch.is_batch(frames[0]) else 1 if len(frames) > 3 and batch.is_batch(frames[1]) else -1
        if at >= 0:
            for message in batch.unpack(frames, at):
                try:
                    self._on_reply(message)
                except Exception as e:  # the batch's other replies still count
                    _warn_dropped("in a batch of replies", message, e)
        else:
            self._on_reply(frames)

    def _on_reply(self, frames: list) -> None:
        msg = self.deserialize(frames)
        msg_id = msg["parent_header"].get("msg_id")
        ar = self.pending.pop(msg_id, None)
        if self.claims:
            placed = self._engine_of.pop(msg_id, None)
            if placed is not None:
                self._answered(placed, msg["metadata"])
            if ar is not None and not self.pending:
                engine = msg["metadata"].get("engine")  # its uuid (absent: the controller's answer)
                self._idle_engine = engine.encode() if isinstance(engine, str) else None
        if ar is None:
            ar = self.control_pending.pop(msg_id, None)
        if ar is not None:
            ar._receive(msg_id, msg)

    def _on_iopub(self, frames: list) -> None:
        msg = self.deserialize(frames)
        msg_id = msg["parent_header"].get("msg_id")
        ar = self.pending.get(msg_id) or self.outputs.get(msg_id)
        if ar is not None:
            ar._output(msg_id, msg)

    def _on_notification(self, frames: list) -> None:
        msg = self.deserialize(frames)
        msg_type, content = msg["header"].get("msg_type"), msg["content"]
        uuid = content.get("uuid") if isinstance(content, dict) else None
        if isinstance(uuid, str):  # where claims may go (before the Client hears of it)
            if msg_type == "registration_notification":
                self.add_engines([uuid])
            elif msg_type == "unregistration_notification":
                self.forget_engine(uuid)
        self.on_notification(msg)

    def _on_query_reply(self, frames: list) -> None:
        msg = self.deserialize(frames)
        with self._query_cond:
            self._query_replies[msg["parent_header"].get("msg_id")] = msg
            self._query_cond.notify_all()

    # ---- closing ------------------------------------------------------------------------

    def close(self, linger: int | None = None) -> None:
        """Send what is queued (for up to a second), then close the sockets and stop the
        I/O thread."""
        if self.closed:
            return
        time.sleep(0)  # let a just-queued message reach the outbox
        deadline = time.monotonic() + 1
        while (self._outbox or self._held) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.closed = True
        with self._wake_lock:
            self._wake_locked()
        self._io_thread.join(2)
        # not under a sending thread's feet (bounded: a stuck done-callback must not hang us)
        locked = self._io_lock.acquire(timeout=2)
        try:
            self._context.destroy(linger=0 if linger is None else linger)
        finally:
            if locked:
                self._io_lock.release()
        with self._wake_lock:  # no wake-up writes to a closed (or reused) descriptor
            if not self._io_thread.is_alive():
                os.close(self._wake_read)
                os.close(self._wake_write)
                self._wake_write = -1
