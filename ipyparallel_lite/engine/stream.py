"""The engine's shell stream: requests read in one pass, replies sent at once.

pyzmq's ``ZMQStream`` handles one message per event-loop turn, re-checks the socket
in another turn after every message, and queues each send for a later turn. An engine
answering thousands of small requests spends more time in those turns than in the
requests. :class:`ShellStream` keeps the ``ZMQStream`` interface ipykernel uses
(``on_recv``, ``send_multipart``, ``flush``, ``close``, ``socket``, ``io_loop``) with
one asyncio reader that drains every waiting message, and sends that go straight to
the socket (a DEALER: libzmq queues what the controller has not read yet).

Contract: messages reach the ``on_recv`` callback one at a time, in arrival order;
a callback returning an awaitable has it scheduled, as ``ZMQStream`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
from zmq.eventloop.zmqstream import ZMQStream

from ipyparallel_lite import fastzmq

#: messages handled in one pass before other callbacks on the loop get a turn
BATCH = 64


class ShellStream(ZMQStream):
    """``ZMQStream`` for an engine's shell socket, without per-message loop turns."""

    def _init_io_state(self) -> None:
        self._loop = self.io_loop.asyncio_loop
        self._scheduled = False
        self._draining = False
        # the zmq FD is edge-triggered: it wakes us once for any number of messages
        self._loop.add_reader(self._fd, self._drain)

    def _update_handler(self, state: int) -> None:
        pass  # the reader is always registered; sends never wait for the loop

    def _kick(self) -> None:
        """Drain on the loop's next turn (after a send, which may consume the FD's edge)."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._handle_waiting(BATCH) == BATCH:
            self._kick()  # more may wait: come back after other callbacks had a turn

    def _handle_waiting(self, limit: int) -> int:
        """Pass up to ``limit`` waiting messages to the callback; how many there were."""
        count = 0
        was_draining, self._draining = self._draining, True  # flush() may run inside a callback
        try:
            while (count < limit and self.socket is not None and self._recv_callback is not None
                   and fastzmq.readable(self.socket)):
                msg = self.socket.recv_multipart(zmq.NOBLOCK, copy=self._recv_copy)
                count += 1
                try:
                    self._run_callback(self._recv_callback, msg)
                except Exception:
                    pass  # logged by _run_callback; the next message still gets its turn
        finally:
            self._draining = was_draining
        return count

    def send_multipart(self, msg: Sequence[Any], flags: int = 0, copy: bool = True,
                       track: bool = False, callback: Any = None, **kwargs: Any) -> None:
        self.socket.send_multipart(msg, flags, copy=copy, track=track, **kwargs)
        if callback is not None:
            callback(msg, None)
        if not self._draining:
            # a send may consume the FD's edge; inside a drain the loop looks again anyway
            self._kick()

    def flush(self, flag: int = zmq.POLLIN | zmq.POLLOUT, limit: int | None = None) -> int:
        """Handle the messages waiting now (sends never wait); how many there were."""
        self._check_closed()
        if not flag & zmq.POLLIN:
            return 0
        return self._handle_waiting(limit or 2**31)

    def close(self, linger: int | None = None) -> None:
        if self.socket is not None:
            self._loop.remove_reader(self._fd)
            self.socket.close(linger)
            self.socket = None  # type: ignore[assignment]
            if self._close_callback:
                self._run_callback(self._close_callback)
