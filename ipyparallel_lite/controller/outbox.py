"""Sending from the controller without ever blocking its loop: one queue per slow peer.

The controller's ROUTER sockets run with ``router_mandatory``, so a message for a peer
whose pipe is full is refused (EAGAIN) instead of dropped. Blocking there would stall
every client and engine behind the one peer that stopped reading (a suspended client,
an engine deep in a long task with thousands of requests waiting), so such a message
waits in that peer's queue instead, and so does everything after it for the same peer:
each peer still receives its messages in the order they were sent. Queues are retried
on a short timer until they drain, and released as soon as their peer is gone.

A queue is bounded by ``max_bytes``. Past that, a message that can be rebuilt later
(a reply whose result the Hub keeps) waits as a small callable that rebuilds it when
its turn comes; one that cannot is refused, and the caller answers for it. A peer that
reaches ``max_entries`` even so is cut off: its queue is dropped and logged (what it
would have received stays in the Hub), and its next message starts a new queue.

Replies to clients and requests to engines go through :meth:`Outbox.send_soon`: the
first for a peer in a turn leaves at once, the others of the same turn together, as one
:mod:`~ipyparallel_lite.batch`, at the end of the turn (``defer``: by default the next
loop turn; the controller ends a turn with each reader's drain). A batch that zmq
refuses waits in the peer's queue message by message, so the bounds, rebuilds and
refusals above hold for each; a message refused at the end of the turn is reported to
its ``refused`` callback, a peer gone by then to ``on_gone``.

This module knows sockets and bytes, nothing of messages: the controller decides what
a refusal means.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from ipyparallel_lite import batch

_NOBLOCK = int(zmq.NOBLOCK)

#: a message to send later: its frames, or a callable that builds them when it is due
Entry = list | Callable[[], list | None]


class Sent(enum.Enum):
    SENT = "sent"  # handed to zmq
    QUEUED = "queued"  # waits in its peer's queue; it will go out in order
    FULL = "full"  # refused: the peer's queue is at its bound and the message cannot wait
    GONE = "gone"  # the peer is not connected (router_mandatory's EHOSTUNREACH)


@dataclass(slots=True)
class _Queue:
    entries: collections.deque = field(default_factory=collections.deque)
    nbytes: int = 0


def _size(frames: list) -> int:
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def _peer(frames: list) -> bytes:
    first = frames[0]
    return first if isinstance(first, bytes) else bytes(first)


class Outbox:
    """Non-blocking sends on ROUTER sockets, with a bounded queue per peer that is behind.

    ``on_gone(sock, peer)`` is called when a peer whose messages waited (in its queue, or
    for the end of a turn) turns out to be gone; ``after_send(sock)`` after every batch
    of sends on a socket (sending consumes the socket's edge-triggered read events, so
    its reader must look again; a refused send as well); ``defer(callback)`` calls back
    at the end of the current turn (default: the loop's ``call_soon``);
    ``reads_batches(sock, peer)`` says which peers :meth:`send_soon` may send batches to
    (default: clients that said so, :func:`~ipyparallel_lite.batch.reads_batches`).
    """

    #: retry delays while a queue does not move: short at first, then backing off
    RETRY_MIN, RETRY_MAX = 0.001, 0.05

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        max_bytes: int = 64 << 20,
        max_entries: int = 200_000,
        on_gone: Callable[[zmq.Socket, bytes], None] | None = None,
        after_send: Callable[[zmq.Socket], None] | None = None,
        defer: Callable[[Callable[[], None]], None] | None = None,
        reads_batches: Callable[[zmq.Socket, bytes], bool] | None = None,
        log: logging.Logger | None = None,
    ):
        self.loop = loop
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.on_gone = on_gone or (lambda sock, peer: None)
        self.after_send = after_send or (lambda sock: None)
        #: runs a callback at the end of the current turn (send_soon's batches)
        self.defer = defer or loop.call_soon
        self.reads_batches = reads_batches or (lambda sock, peer: batch.reads_batches(peer))
        self.log = log or logging.getLogger("ipyparallel_lite.controller")
        self._queues: dict[tuple[zmq.Socket, bytes], _Queue] = {}
        #: messages of this turn for each peer, sent together at its end (send_soon), as
        #: (frames, later, refused)
        self._soon: dict[tuple[zmq.Socket, bytes], list] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._delay = self.RETRY_MIN

    # ---- the interface ---------------------------------------------------------------

    def send(self, sock: zmq.Socket, frames: list,
             later: Callable[[], list | None] | None = None) -> Sent:
        """Send ``frames`` (``frames[0]`` is the peer's identity) now, or queue them.

        ``later``, if given, rebuilds an equivalent message when called: it lets the
        message wait at almost no cost once the peer's queue is at its byte bound.
        Messages :meth:`send_soon` holds for the peer's end of turn go first, at once, so
        that this one keeps its place behind them and its answer is its own.
        """
        if self._soon:
            key = (sock, _peer(frames))
            soon = self._soon.get(key)
            if soon:
                self._soon[key] = []
                self._send_together(key, soon)
        if self._queues:
            key = (sock, _peer(frames))
            queue = self._queues.get(key)
            if queue is not None:
                return self._enqueue(key, queue, frames, later)
        try:
            self._send_now(sock, frames)
        except zmq.Again:
            key = (sock, _peer(frames))
            queue = self._queues[key] = _Queue()
            self._arm()
            return self._enqueue(key, queue, frames, later)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return Sent.GONE
            raise
        finally:
            self.after_send(sock)
        return Sent.SENT

    def send_soon(self, sock: zmq.Socket, frames: list, later: Callable[[], list | None] | None = None,
                  refused: Callable[[], None] | None = None) -> None:
        """Send ``frames`` now if it is the first message for its peer in this turn;
        later ones of the turn wait for its end and go as one batch (to peers that read
        batches; others get each at once). A lone message thus waits for nothing.

        ``later`` rebuilds the message (see :meth:`send`). A message that cannot wait
        (:attr:`Sent.FULL`), now or at the end of the turn, is reported to ``refused()``;
        a peer that is gone, to ``on_gone(sock, peer)``. A reply to a client always has
        its record to come back to (``later``), so it is only queued or, for a client
        that is gone, left in the Hub."""
        key = (sock, _peer(frames))
        soon = self._soon.get(key)
        if soon is None:
            sent = self.send(sock, frames, later)
            if sent is Sent.GONE:
                self.log.info("peer %r is gone: a message for it was not sent", key[1])
                self.on_gone(sock, key[1])
                return
            if sent is Sent.FULL and refused is not None:
                refused()
            if self.reads_batches(sock, key[1]):  # the rest of this turn's messages go together
                if not self._soon:
                    self.defer(self._send_turn)
                self._soon[key] = []
            return
        soon.append((frames, later, refused))
        if len(soon) >= batch.MAX_MESSAGES:
            self._send_together(key, soon)
            self._soon[key] = []

    def backlog(self) -> dict[str, int]:
        """What waits for slow peers now: peers, messages, bytes (rebuildable ones count 0)."""
        queues = self._queues.values()
        return {"peers": len(self._queues), "messages": sum(len(q.entries) for q in queues),
                "bytes": sum(q.nbytes for q in queues)}

    def close(self) -> None:
        self._soon.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queues.clear()

    # ---- batches of a turn --------------------------------------------------------------

    def _send_turn(self) -> None:
        soon, self._soon = self._soon, {}
        for key, messages in soon.items():
            if messages:
                self._send_together(key, messages)

    def _send_together(self, key: tuple, messages: list) -> None:
        """Send one peer's messages as one batch (a lone one as it is), or queue them."""
        sock, peer = key
        queue = self._queues.get(key)
        if queue is None:
            frames = messages[0][0] if len(messages) == 1 else \
                [peer, *batch.pack([m[0][1:] for m in messages])]
            try:
                self._send_now(sock, frames)
                return
            except zmq.Again:
                queue = self._queues[key] = _Queue()
                self._arm()
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                self.log.info("peer %r is gone: %d messages for it were not sent", peer, len(messages))
                self.on_gone(sock, peer)
                return
            finally:
                self.after_send(sock)
        for frames, later, refused in messages:  # one by one, each within the queue's bounds
            if queue is None or self._enqueue(key, queue, frames, later) is Sent.FULL:
                if refused is not None:
                    refused()
                if key not in self._queues:
                    queue = None  # cut off (logged): replies stay in the Hub as well

    # ---- queues ----------------------------------------------------------------------

    def _enqueue(self, key: tuple, queue: _Queue, frames: list,
                 later: Callable[[], list | None] | None) -> Sent:
        size = _size(frames)
        if queue.nbytes + size <= self.max_bytes:
            queue.entries.append(frames)
            queue.nbytes += size
        elif later is not None and len(queue.entries) < self.max_entries:
            queue.entries.append(later)
        else:
            if later is not None:
                self._cut_off(key, queue)
            return Sent.FULL
        return Sent.QUEUED

    def _cut_off(self, key: tuple, queue: _Queue) -> None:
        self.log.warning(
            "peer %r has not read its last %d messages (%d MB waiting): cut off; what it "
            "would have received stays in the Hub", key[1], len(queue.entries), queue.nbytes >> 20)
        self._queues.pop(key, None)

    def _arm(self) -> None:
        if self._timer is None and self._queues:
            self._timer = self.loop.call_later(self._delay, self._retry)

    def _retry(self) -> None:
        self._timer = None
        moved = False
        for key in list(self._queues):
            moved |= self._drain(key)
        self._delay = self.RETRY_MIN if moved else min(self._delay * 2, self.RETRY_MAX)
        self._arm()

    def _drain(self, key: tuple) -> bool:
        """Send what a peer's queue holds until zmq refuses; True if anything went out."""
        sock, peer = key
        queue = self._queues[key]
        entries = queue.entries
        sent = 0
        try:
            while entries:
                entry = entries[0]
                frames = entry if isinstance(entry, list) else entry()
                if frames is not None:
                    self._send_now(sock, frames)
                entries.popleft()
                if isinstance(entry, list):
                    queue.nbytes -= _size(entry)
                sent += 1
        except zmq.Again:
            if not isinstance(entry, list):
                entries[0] = frames  # built once; its bytes now count
                queue.nbytes += _size(frames)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.log.info("peer %r left with %d messages waiting for it: released",
                          peer, len(entries))
            del self._queues[key]
            self.on_gone(sock, peer)
            return True
        finally:
            # even a refused send processes the socket's pending events, which can consume
            # the edge its reader waits for: the reader must look again either way
            self.after_send(sock)
        if not entries:
            del self._queues[key]
        return sent > 0

    @staticmethod
    def _send_now(sock: zmq.Socket, frames: list) -> None:
        # libzmq admits a multipart message whole or refuses it at its first frame, so a
        # refusal (zmq.Again) never leaves half a message behind
        sock.send_multipart(frames, _NOBLOCK, copy=False)
