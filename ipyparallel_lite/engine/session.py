"""The engine's signing session: a lean ``send``, and counting what a request published.

Lean send: an engine's every reply and output goes through ``Session.send``, which
builds the header through three calls, makes a new JSON encoder for each of the four
parts, turns dates into strings through a Python hook, and checks what an engine
never passes (trackers, version adaptation). :meth:`EngineSession.send` writes the
header from a template (same keys, order and formats) and encodes the other parts
with one reusable encoder; the frames on the wire are what ``Session.send`` makes,
which ``tests/test_engine_session.py`` checks against jupyter_client's own. Signatures
(of what is sent, and of what arrives: ``unpack_message`` asks ``sign``) are the same
HMAC-SHA256, computed from the key's two hash states rather than through ``hmac``.
Parts that are ``{}`` (most of an apply request) are read without the JSON decoder.

Counting contract: between :meth:`EngineSession.count_for` and
:meth:`EngineSession.take_count`, every message serialized with that request as
parent (iopub output, status, display) is counted, from any thread. Engines put the
count in an execute reply's metadata (``iopub_count``), so a client knows exactly how
many iopub messages to wait for before a cell's output is complete: iopub and replies
travel different sockets, and an engine's fast path publishes no busy/idle status to
wait on.
"""

from __future__ import annotations

import itertools
import json
import json.encoder
import os
import threading
import uuid
from datetime import datetime, timezone
from typing import Any, NamedTuple

import zmq.asyncio
from jupyter_client import protocol_version
from jupyter_client.jsonutil import json_default
from jupyter_client.session import DELIM, DONE, Session, extract_header, json_packer, json_unpacker
from traitlets import observe


def _json_encoder() -> Any:
    """A function writing an object as jupyter_client's ``json_packer`` does (same
    options), made once. ``json.dumps`` with options makes a ``JSONEncoder`` per call,
    whose ``encode`` makes a C encoder per call: on a cold cache, that setup costs more
    than writing a small dict. ``json.encoder.c_make_encoder`` is the stdlib's C encoder
    (None in a build without ``_json``); tests check it is there and writes the same."""
    make = json.encoder.c_make_encoder
    if make is None:
        return json.JSONEncoder(default=json_default, ensure_ascii=False, allow_nan=False).encode
    # no circular-reference markers: such a message fails either way (RecursionError)
    encode = make(None, json_default, json.encoder.encode_basestring, None, ": ", ", ",
                  False, False, False)
    return lambda obj: "".join(encode(obj, 0))


_encode = _json_encoder()


def _pack(obj: Any) -> bytes:
    try:
        return _encode(obj).encode("utf8", errors="surrogateescape")
    except (TypeError, ValueError, RecursionError):
        return json_packer(obj)  # jupyter_client's fallback: cleans the object, warns


def _unpack(raw: bytes) -> Any:
    """jupyter_client's ``json_unpacker``, answering the usual empty parts (an apply
    request's parent, metadata and content) without the JSON decoder's round trip."""
    if raw == b"{}":
        return {}
    return json_unpacker(raw)


_INNER_PAD = bytes(x ^ 0x36 for x in range(256))
_OUTER_PAD = bytes(x ^ 0x5C for x in range(256))


def json_date(date: datetime) -> str:
    """A date as jupyter_client's ``json_default`` writes it (UTC, ``Z``), for metadata
    written as text at once rather than through the encoder's hook."""
    return date.isoformat().replace("+00:00", "Z")


class _Settings(NamedTuple):
    """What the lean send reads of the session's traits (each trait read costs ~0.5 us)."""

    lean: bool  # the lean path writes what Session.send would
    session: str
    username: str
    metadata: dict
    pid: int | None  # the pid to send from, if checked
    copy_threshold: int


class EngineSession(Session):
    """``Session`` with a lean ``send``, counting the messages sent for one request."""

    def __init__(self, **kwargs: Any):
        self._settings: _Settings | None = None
        self._pads: tuple[Any, Any] | None = None
        self._templates: dict[str, tuple[str, str, str]] = {}
        super().__init__(**kwargs)
        if self.unpack is json_unpacker:
            self.unpack = _unpack
        self._counted_id: str | None = None
        self._count = 0
        self._count_lock = threading.Lock()
        self._numbers = itertools.count()  # next() is atomic: the iopub thread sends too

    @observe("session", "username", "metadata", "adapt_version", "debug", "pack", "check_pid",
             "pid", "copy_threshold", "auth")
    def _settings_changed(self, change: Any) -> None:
        self._settings = None
        self._templates = {}  # they hold the session and username
        self._pads = None  # the key or its hash changed (Session makes a new auth then)

    def _key_pads(self) -> tuple[Any, Any] | None:
        """The hash states after the key's inner and outer pads (RFC 2104); None: no key."""
        if self.auth is None:
            return None
        digest_mod = self.digest_mod
        key = self.key
        block = digest_mod().block_size
        if len(key) > block:
            key = digest_mod(key).digest()
        key = key.ljust(block, b"\0")
        self._pads = pads = (digest_mod(key.translate(_INNER_PAD)), digest_mod(key.translate(_OUTER_PAD)))
        return pads

    def sign(self, msg_list: list) -> bytes:
        """``Session.sign``: the HMAC of the parts, hex, from copies of the key's two hash
        states. ``hmac.HMAC.copy`` and its digest copy three OpenSSL contexts a message,
        which costs 15 us where the process wakes with a cold cache, against 10 us."""
        pads = self._pads or self._key_pads()
        if pads is None:
            return b""
        inner, outer = pads
        h = inner.copy()
        for part in msg_list:
            h.update(part)
        h_outer = outer.copy()
        h_outer.update(h.digest())
        return h_outer.hexdigest().encode()

    def _read_settings(self) -> _Settings:
        self._settings = settings = _Settings(
            lean=not self.adapt_version and not self.debug and self.pack is json_packer,
            session=self.session, username=self.username, metadata=self.metadata,
            pid=self.pid if self.check_pid else None, copy_threshold=self.copy_threshold)
        return settings

    @property
    def msg_id(self) -> str:
        return f"{self.session}_{os.getpid()}_{next(self._numbers)}"

    def _template(self, msg_type: str) -> tuple[str, str, str]:
        """The JSON of a ``msg_type`` header, cut where the msg_id's ``pid_number`` and
        the date go."""
        mark = uuid.uuid4().hex
        probe = {"msg_id": f"{self.session}_{mark}", "msg_type": msg_type,
                 "username": self.username, "session": self.session, "date": mark[::-1],
                 "version": protocol_version}
        head, rest = json_packer(probe).decode("utf8", errors="surrogateescape").split(mark)
        middle, tail = rest.split(mark[::-1])
        template = self._templates[msg_type] = (head, middle, tail)
        return template

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
        head, middle, tail = self._templates.get(msg_or_type) or self._template(msg_or_type)
        number = next(self._numbers)
        date = datetime.now(timezone.utc)
        session = settings.session
        header = {"msg_id": f"{session}_{pid}_{number}", "msg_type": msg_or_type,
                  "username": settings.username, "session": session, "date": date,
                  "version": protocol_version}
        parent_header = {} if parent is None else extract_header(parent)
        md = settings.metadata
        md = {**md, **metadata} if md and metadata else dict(metadata or md)
        if content is None:
            content = {}
        parts = [f"{head}{pid}_{number}{middle}{json_date(date)}{tail}".encode("utf8", errors="surrogateescape"),
                 _pack(parent_header), _pack(md), _pack(content)]
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
