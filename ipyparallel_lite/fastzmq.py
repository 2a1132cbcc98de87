"""A zmq socket whose multipart calls cost a third of pyzmq's, and a reader for it.

pyzmq's ``send_multipart``/``recv_multipart`` combine ``zmq.SNDMORE`` and the caller's
flags as ``IntFlag`` enums for every frame, and enum arithmetic dominates the cost of
moving a 9-frame Jupyter message (about 27 us against 8 us measured on a 2-core
machine). :class:`FastSocket` does the same calls with plain ints. It is a drop-in
``zmq.Socket``: ZMQStream, Session and pollers use it unchanged.

Create sockets with :func:`socket`, or pass ``socket_class=FastSocket``; read them
from an asyncio loop with :class:`Drainer`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from zmq.backend import Socket as _BackendSocket

SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_send = _BackendSocket.send
_recv = _BackendSocket.recv
_get = _BackendSocket.get


class FastSocket(zmq.Socket):
    """``zmq.Socket`` with lean ``send_multipart`` and ``recv_multipart``."""

    def send_multipart(self, msg_parts: Sequence, flags: int = 0, copy: bool = True,
                       track: bool = False, **kwargs: Any) -> Any:
        if track or kwargs:
            return super().send_multipart(msg_parts, flags, copy=copy, track=track, **kwargs)
        flags = int(flags)
        more = flags | SNDMORE
        last = len(msg_parts) - 1
        for i, part in enumerate(msg_parts):
            _send(self, part, more if i < last else flags, copy)
        return None

    def recv_multipart(self, flags: int = 0, copy: bool = True, track: bool = False) -> list:
        if track:
            return super().recv_multipart(flags, copy=copy, track=track)
        first = _recv(self, int(flags), False)
        if copy:
            parts = [first.bytes]
            while first.more:
                first = _recv(self, 0, False)
                parts.append(first.bytes)
            return parts
        parts = [first]
        while first.more:
            first = _recv(self, 0, False)
            parts.append(first)
        return parts


#: part types whose len() is their size in bytes, which bytes.join takes as they are (a
#: shaped memoryview's len() counts items): batches, records and their blobs size parts by it
SIZED_BY_LEN = frozenset((bytes, bytearray, zmq.Frame))


def frame_bytes(value: Any) -> bytes:
    """A received part as bytes: a zmq Frame's cached copy, bytes as they are, any other
    buffer copied."""
    kind = type(value)
    if kind is bytes:
        return value
    return value.bytes if kind is zmq.Frame else bytes(value)


def readable(sock: zmq.Socket) -> bool:
    """Whether a message waits on ``sock``, without the cost of a failed non-blocking recv.

    (A recv that finds nothing raises ``zmq.Again``, which costs more than receiving a
    message.) Like any ``EVENTS`` read, it re-arms the edge-triggered FD.
    """
    return bool(_get(sock, _EVENTS) & _POLLIN)


class Drainer:
    """Reads a zmq socket from an asyncio loop: ``handler(frames)`` for each message.

    The socket's FD is edge-triggered: it signals once for any number of messages, so
    each signal drains the socket, ``batch`` messages at a time (then the loop's other
    callbacks get a turn before the next batch). A send on the socket may consume the
    signal: after sending outside :meth:`drain`, call :meth:`kick`. ``handler`` must not
    raise; it may return how many messages a zmq message carried (a batch), which counts
    against ``batch`` (None counts 1). A closed socket ends the drain. ``after()``, if
    given, is called when a drain ends (after a handler's own drain, only the outer one).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket,
                 handler: Callable[[list], Any], batch: int, after: Callable[[], None] | None = None):
        self.loop, self.sock, self.handler, self.batch = loop, sock, handler, batch
        self.after = after
        self.draining = False  # inside drain(), which looks at the socket again anyway
        self._scheduled = False
        self._fd = sock.FD
        loop.add_reader(self._fd, self.drain)
        self.kick()  # messages that arrived before the reader was registered

    def kick(self) -> None:
        """Drain on the loop's next turn."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.drain)

    def recheck(self) -> None:
        """After sends on the socket outside :meth:`drain`: drain on the next turn only if
        a message waits. One look at the socket now, where :meth:`kick` costs a loop turn
        (a send consumes the FD's signal, but reading ``EVENTS`` re-arms it for what
        arrives later)."""
        if not self.draining and not self._scheduled and readable(self.sock):
            self.kick()

    def drain(self, limit: int | None = None) -> int:
        """Handle up to ``limit`` (default: ``batch``) waiting messages; how many there were."""
        self._scheduled = False
        limit = self.batch if limit is None else limit
        sock, handler = self.sock, self.handler
        count = 0
        was_draining, self.draining = self.draining, True  # a handler may drain too
        try:
            while count < limit and not sock.closed and readable(sock):
                count += handler(sock.recv_multipart(_NOBLOCK, copy=False)) or 1
        except zmq.ZMQError:
            if not sock.closed:
                raise
        finally:
            self.draining = was_draining
            if self.after is not None and not was_draining:
                self.after()
        if count >= limit:
            self.kick()  # more may wait: come back after other callbacks had a turn
        return count

    def close(self) -> None:
        self.loop.remove_reader(self._fd)


def socket(ctx: zmq.Context, kind: int) -> FastSocket:
    """A new :class:`FastSocket` of ``kind`` in ``ctx``."""
    return ctx.socket(kind, socket_class=FastSocket)
