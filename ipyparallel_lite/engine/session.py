"""The engine's signing session, which also counts what a request published.

Contract: between :meth:`EngineSession.count_for` and :meth:`EngineSession.take_count`,
every message serialized with that request as parent (iopub output, status, display)
is counted, from any thread. Engines put the count in an execute reply's metadata
(``iopub_count``), so a client knows exactly how many iopub messages to wait for
before a cell's output is complete: iopub and replies travel different sockets, and
an engine's fast path publishes no busy/idle status to wait on.
"""

from __future__ import annotations

import threading
from typing import Any

from jupyter_client.session import Session


class EngineSession(Session):
    """``Session`` counting the messages sent for one request at a time."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._counted_id: str | None = None
        self._count = 0
        self._count_lock = threading.Lock()

    def count_for(self, msg_id: str) -> None:
        """Start counting the messages whose parent is ``msg_id`` (from zero)."""
        with self._count_lock:
            self._counted_id = msg_id
            self._count = 0

    def take_count(self, msg_id: str) -> int | None:
        """How many messages went out for ``msg_id``; counting stops. None if not counted."""
        with self._count_lock:
            if self._counted_id != msg_id:
                return None
            self._counted_id = None
            return self._count

    def serialize(self, msg: dict, ident: Any = None) -> list:
        if self._counted_id is not None:
            parent_id = msg["parent_header"].get("msg_id")
            with self._count_lock:
                if parent_id == self._counted_id:
                    self._count += 1
        return super().serialize(msg, ident)
