"""The engine's signing session: a lean ``send``, and counting what a request published.

Lean send: an engine's every reply and output goes through ``Session.send``, which
builds the header through three calls, makes a new JSON encoder for each of the four
parts, turns dates into strings through a Python hook, and checks what an engine
never passes (trackers, version adaptation). :meth:`EngineSession.send` writes the
header from the session's template and the other parts with its one encoder (the
lean chores of :class:`~ipyparallel_lite.session.LeanSession`, which also signs and
reads what arrives); the frames on the wire are what ``Session.send`` makes, which
``tests/test_engine_session.py`` checks against jupyter_client's own.

Counting contract: between :meth:`EngineSession.count_for` and
:meth:`EngineSession.take_count`, every message serialized with that request as
parent (iopub output, status, display) is counted, from any thread. Engines put the
count in an execute reply's metadata (``iopub_count``), so a client knows exactly how
many iopub messages to wait for before a cell's output is complete: iopub and replies
travel different sockets, and an engine's fast path publishes no busy/idle status to
wait on.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, NamedTuple

import zmq.asyncio
from jupyter_client import protocol_version
from jupyter_client.session import DELIM, DONE, extract_header
from traitlets import observe

from ipyparallel_lite.session import LeanSession, date_text, pack


class _Settings(NamedTuple):
    """What the lean send reads of the session's traits (each trait read costs ~0.5 us)."""

    lean: bool  # the lean path writes what Session.send would
    session: str
    username: str
    metadata: dict
    pid: int | None  # the pid to send from, if checked
    copy_threshold: int


class EngineSession(LeanSession):
    """``Session`` with a lean ``send``, counting the messages sent for one request."""

    def __init__(self, **kwargs: Any):
        self._settings: _Settings | None = None
        super().__init__(**kwargs)
        self._counted_id: str | None = None
        self._count = 0
        self._count_lock = threading.Lock()

    @observe("session", "username", "metadata", "adapt_version", "debug", "pack", "check_pid",
             "pid", "copy_threshold", "auth")
    def _settings_changed(self, change: Any) -> None:
        self._settings = None

    def _read_settings(self) -> _Settings:
        self._settings = settings = _Settings(
            lean=not self.adapt_version and not self.debug and self.pack is pack,
            session=self.session, username=self.username, metadata=self.metadata,
            pid=self.pid if self.check_pid else None, copy_threshold=self.copy_threshold)
        return settings

    def send(self, stream: Any, msg_or_type: dict | str, content: dict | None = None,
             parent: dict | None = None, ident: bytes | list | None = None,
             buffers: list | None = None, track: bool = False, header: dict | None = None,
             metadata: dict | None = None) -> dict | None:
        """``Session.send``, with the header from a template and one encoder for the rest."""
        settings = self._settings or self._read_settings()
        pid = os.getpid()
        if (not settings.lean or not isinstance(msg_or_type, str) or track or header is not None
                or not (content is None or isinstance(content, dict))
                or isinstance(stream, zmq.asyncio.Socket)
                or (settings.pid is not None and pid != settings.pid)):  # stock warns
            return super().send(stream, msg_or_type, content, parent, ident, buffers, track,
                                header, metadata)
        msg_id = self.new_msg_id(settings.session, pid)
        now = time.time()
        date = datetime.fromtimestamp(now, timezone.utc)
        header = {"msg_id": msg_id, "msg_type": msg_or_type,
                  "username": settings.username, "session": settings.session, "date": date,
                  "version": protocol_version}
        parent_header = {} if parent is None else extract_header(parent)
        md = settings.metadata
        md = {**md, **metadata} if md and metadata else dict(metadata or md)
        if content is None:
            content = {}
        parts = [self.header(msg_or_type, msg_id, date_text(now)),
                 pack(parent_header), pack(md), pack(content)]
        self._counted(parent_header)
        to_send = list(ident) if isinstance(ident, list) else ([] if ident is None else [ident])
        to_send.append(DELIM)
        to_send.append(self.sign(parts))
        to_send.extend(parts)
        threshold = settings.copy_threshold
        copy = max(map(len, parts)) < threshold
        if buffers:
            for i, buf in enumerate(buffers):
                view = buf if isinstance(buf, memoryview) else memoryview(buf)
                if not view.contiguous:
                    raise ValueError(f"Buffer {i} ({buf!r}) is not contiguous")
                if view.nbytes >= threshold:
                    copy = False
            to_send.extend(buffers)
        if stream:
            stream.send_multipart(to_send, copy=copy)
        return {"header": header, "msg_id": header["msg_id"], "msg_type": msg_or_type,
                "parent_header": parent_header, "content": content, "metadata": md,
                "tracker": DONE}

    # ---- counting ----------------------------------------------------------------

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

    def _counted(self, parent_header: dict) -> None:
        if self._counted_id is not None:
            parent_id = parent_header.get("msg_id")
            with self._count_lock:
                if parent_id == self._counted_id:
                    self._count += 1

    def serialize(self, msg: dict, ident: Any = None) -> list:
        self._counted(msg["parent_header"])
        return super().serialize(msg, ident)
