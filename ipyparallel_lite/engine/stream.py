"""The engine's shell stream: requests read in one pass, replies sent at once.

pyzmq's ``ZMQStream`` handles one message per event-loop turn, re-checks the socket
in another turn after every message, and queues each send for a later turn. An engine
answering thousands of small requests spends more time in those turns than in the
requests. :class:`ShellStream` keeps the ``ZMQStream`` interface ipykernel uses
(``on_recv``, ``send_multipart``, ``flush``, ``close``, ``socket``, ``io_loop``) with
a :class:`~ipyparallel_lite.fastzmq.Drainer` that hands over every waiting message
from the FD event itself, and sends that go straight to the socket (a DEALER: libzmq
queues what the controller has not read yet).

Contract: messages reach the ``on_recv`` callback one at a time, in arrival order,
and stay queued in libzmq while no callback is set; a callback returning an
awaitable has it scheduled, as ``ZMQStream`` does. With ``copy=False`` a message's
parts are zmq Frames, or bytes for the small parts of a batch (read either with
``fastzmq.frame_bytes``; the engine's session takes both).

Requests may come as one :mod:`~ipyparallel_lite.batch` (the controller sends an
engine's requests of one turn together): each inner message reaches the callback on
its own, in order, exactly as it would have come alone (the kernel verifies each). A
batch that does not add up is dropped whole and logged; the next message is served.
Inner messages not handled yet wait in the stream, so a request that drains the
stream while it runs (``flush``, as ipykernel's abort does) gets the rest of its batch
first, then what it read.

Replies that are ready together leave together: while one pass handles requests that
each take under :data:`HOLD_BELOW` with more requests waiting behind them (in the
socket, or in the rest of a batch: a burst of small tasks), their replies wait and go
out as one batch when the pass ends, when a request takes longer, or at
:data:`~ipyparallel_lite.batch.MAX_MESSAGES`. A request that arrives alone is answered
at once. The one wait this can add: a reply held behind a quick request waits for the
next request of the same pass, if that one runs long.

A ``routed`` stream is the engine's ``mux`` socket, behind the controller's C device,
which routes each zmq message by its first frame: requests come as ``[client, ...]``
(a batch as ``[client, MARKER, ...]``, each request put back behind its client), and
replies held together go as one batch only while they are for the same client.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from typing import Any

import zmq
from zmq.eventloop.zmqstream import ZMQStream

from ipyparallel_lite import batch
from ipyparallel_lite.fastzmq import Drainer, frame_bytes, readable

#: messages handled in one pass before other callbacks on the loop get a turn
BATCH = 64
#: a request handled faster than this (seconds) lets its reply wait for the next ones
#: of the same pass (a no-op apply takes about 0.2 ms here)
HOLD_BELOW = 0.001

log = logging.getLogger("ipyparallel_lite.engine")


class ShellStream(ZMQStream):
    """``ZMQStream`` for an engine's shell socket, without per-message loop turns."""

    _drainer: Drainer | None = None
    #: replies waiting to leave with the next ones (see the module's docstring)
    _held: list | None = None
    #: the last request handled took under HOLD_BELOW: its successor's replies may wait
    _quick = True

    def __init__(self, *args: Any, routed: bool = False, **kwargs: Any) -> None:
        #: requests read, not handed to the callback yet: the rest of a batch
        self._waiting: collections.deque = collections.deque()
        #: routing identities in front of a batch's marker (see the module)
        self._routed = int(routed)
        super().__init__(*args, **kwargs)

    def _init_io_state(self) -> None:
        pass  # the drainer comes with a receive callback (_update_handler)

    @property
    def waiting(self) -> int:
        """Requests read and not handed to the callback yet (the rest of a batch)."""
        return len(self._waiting)

    def _update_handler(self, state: int) -> None:
        """ZMQStream's hook for what to watch: a drainer while there is a callback."""
        if state & zmq.POLLIN and self._drainer is None:
            self._drainer = Drainer(self.io_loop.asyncio_loop, self.socket, self._handle, BATCH,
                                    after=self._after_pass)
        elif not state & zmq.POLLIN and self._drainer is not None:
            self._drainer.close()
            self._drainer = None

    def _handle(self, msg: list) -> int:
        """Serve one zmq message, a lone request or a batch; how many requests it held."""
        at = self._routed
        if len(msg) > at + 2 and batch.is_batch(msg[at]):
            try:
                messages = batch.unpack_routed(msg, at)
            except batch.BatchError as e:
                log.warning("dropped a malformed batch of requests: %s", e)
                return 1
        else:
            messages = [msg]
        self._waiting.extend(messages)
        self._serve()
        return len(messages)

    def _serve(self) -> None:
        """Hand the requests waiting in the stream to the callback, one by one (a request
        that drains the stream while it runs serves the rest of its batch first: they
        share the queue)."""
        waiting = self._waiting
        try:
            while waiting:
                msg = waiting.popleft()
                if self._recv_copy:
                    msg = [frame_bytes(frame) for frame in msg]
                start = time.perf_counter()
                try:
                    self._run_callback(self._recv_callback, msg)
                except Exception:
                    pass  # logged by _run_callback; the next message still gets its turn
                self._quick = time.perf_counter() - start < HOLD_BELOW
                if not self._quick:
                    self._send_held()
        finally:
            if waiting:  # interrupted (KeyboardInterrupt): the rest gets the next turn
                self.io_loop.asyncio_loop.call_soon(self._serve)

    def _after_pass(self) -> None:
        if self._held:
            self._send_held()
            if readable(self.socket):  # the send may have taken the FD's signal for these
                self._drainer.kick()

    def _send_held(self) -> None:
        held = self._held
        if held:
            self._held = None
            if len(held) == 1:
                frames = held[0]
            elif self._routed:
                frames = batch.pack_routed(held[0][0], held)
            else:
                frames = batch.pack(held)
            self.socket.send_multipart(frames, copy=False)

    def send_multipart(self, msg: Sequence[Any], flags: int = 0, copy: bool = True,
                       track: bool = False, callback: Any = None, **kwargs: Any) -> None:
        drainer = self._drainer
        if (drainer is not None and drainer.draining and self._quick and not track
                and callback is None and not flags and not kwargs
                and (self._held or self._waiting or readable(self.socket))):  # else alone
            held = self._held
            if held and self._routed and frame_bytes(held[0][0]) != frame_bytes(msg[0]):
                self._send_held()  # a routed batch goes to one client
                held = None
            if held is None:
                held = self._held = []
            held.append(list(msg))
            if len(held) >= batch.MAX_MESSAGES:
                self._send_held()
            return
        self._send_held()  # what waits goes first: replies keep their order
        self.socket.send_multipart(msg, flags, copy=copy, track=track, **kwargs)
        if callback is not None:
            callback(msg, None)
        if drainer is not None and not drainer.draining:
            drainer.recheck()  # a send may consume the FD's signal: one look now, no loop turn

    def flush(self, flag: int = zmq.POLLIN | zmq.POLLOUT, limit: int | None = None) -> int:
        """Handle the messages waiting now (sends never wait); how many there were."""
        self._check_closed()
        if not flag & zmq.POLLIN or self._drainer is None:
            return 0
        return self._drainer.drain(limit or 2**31)

    def close(self, linger: int | None = None) -> None:
        if self.socket is not None:
            self._update_handler(0)
            self.socket.close(linger)
            self.socket = None  # type: ignore[assignment]
            if self._close_callback:
                self._run_callback(self._close_callback)
