"""The signing session of every process: jupyter_client's ``Session``, its chores lean.

Every message in a cluster is a Jupyter message (``[*idents, DELIM, signature, header,
parent, metadata, content, *buffers]``, HMAC over the four JSON parts), and what goes
on the wire is exactly what ``jupyter_client.session.Session`` writes and reads. Each
process pays the session's chores on every message, so they are done once here, for
the client, the controller and the engines alike:

- :func:`pack`: JSON with ``json_packer``'s options through one C encoder made once
  (``json.dumps`` with options makes an encoder, and that a C encoder, per call);
  whatever it refuses goes to ``json_packer``, which cleans it (and warns);
- :func:`unpack`: ``{}`` (most parts of an apply request) without the decoder, one JSON
  value through ``raw_decode`` without ``json.loads``' dispatch; anything else goes to
  ``json.loads``, for its answer or its error;
- :meth:`LeanSession.sign`: the same HMAC from copies of the key's inner and outer hash
  states (``hmac.HMAC.copy`` copies three hash contexts per message);
- :meth:`LeanSession.header`: a header's JSON from a template per message type, with
  ``Session.msg_header``'s keys, order and escaping;
- :attr:`LeanSession.msg_id`: ``Session``'s form, from a counter that threads may share;
- :meth:`LeanSession.verify`: ``Session.deserialize``'s signature and replay checks,
  with the replay window's traits read once, not per message;
- :meth:`LeanSession.feed_identities` and :meth:`LeanSession.deserialize` with
  ``copy=False`` take a message's parts as bytes or zmq Frames alike: a batch delivers
  its small parts as bytes and its large ones as frames (``batch.py``);
- :meth:`LeanSession._add_digest`: the replay window holds exactly the last
  ``digest_history_size`` signatures, forgetting the oldest one per new one (``Session``
  forgets a random tenth at a time, after sorting the whole history: about 4 µs per
  message, paid in bursts of tens of milliseconds every 6,554 messages).

These lean on jupyter_client's header layout and packer options; ``tests/test_session.py``
compares them with jupyter_client's own, so a change there fails a test, not the wire.
"""

from __future__ import annotations

import itertools
import json
import json.encoder
import os
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from hmac import compare_digest
from typing import Any

from jupyter_client import protocol_version
from jupyter_client.jsonutil import json_default
from jupyter_client.session import DELIM, Session, json_packer, json_unpacker
from traitlets import observe

from ipyparallel_lite.fastzmq import frame_bytes

#: the JSON of an empty dict: parent headers of requests, empty metadata and content
EMPTY = b"{}"


def _json_encoder() -> Any:
    make = json.encoder.c_make_encoder
    if make is None:  # a Python built without _json
        return json.JSONEncoder(default=json_default, ensure_ascii=False, allow_nan=False).encode
    # json_packer's options; no circular-reference markers: such a message fails either way
    encode = make(None, json_default, json.encoder.encode_basestring, None, ": ", ", ",
                  False, False, False)
    return lambda obj: "".join(encode(obj, 0))


_encode = _json_encoder()
_escape = json.encoder.encode_basestring  # a JSON string as json_packer writes it
_decode = json.JSONDecoder().raw_decode


def pack(obj: Any) -> bytes:
    """``obj`` as ``jupyter_client``'s ``json_packer`` writes it."""
    try:
        return _encode(obj).encode("utf8", "surrogateescape")
    except (TypeError, ValueError, RecursionError):
        return json_packer(obj)  # jupyter_client's fallback: cleans the object, warns


def unpack(raw: bytes) -> Any:
    """``raw`` as ``jupyter_client``'s ``json_unpacker`` reads it (the same errors too)."""
    if type(raw) is not bytes:
        raw = bytes(raw)
    if raw == EMPTY:
        return {}
    text = raw.decode("utf8", "replace")
    try:
        obj, end = _decode(text)
    except ValueError:
        return json_unpacker(raw)
    return obj if end == len(text) else json_unpacker(raw)


def json_date(date: datetime) -> str:
    """A UTC date as ``json_default`` writes it (``...Z``)."""
    return date.isoformat().replace("+00:00", "Z")


_second: tuple[int, str] = (-1, "")


def now_date() -> str:
    """Now in UTC as a header's date, always with microseconds: ``2026-12-01T09:07:39.885483Z``."""
    return date_text(time.time())


def date_text(now: float) -> str:
    """A ``time.time()`` as :func:`now_date` writes it, to the microsecond
    ``datetime.fromtimestamp`` gives (engines send both); the text of its second is kept,
    so that most calls only format the microseconds (``json_date`` costs twice as much)."""
    global _second
    second = int(now)
    micro = round((now - second) * 1e6)  # rounded as datetime.fromtimestamp rounds
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    cached = _second  # one tuple, read and replaced whole by any thread
    if cached[0] != second:
        cached = (second, datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S."))
        _second = cached
    return f"{cached[1]}{micro:06d}Z"


_INNER_PAD = bytes(x ^ 0x36 for x in range(256))
_OUTER_PAD = bytes(x ^ 0x5C for x in range(256))


class LeanSession(Session):
    """``Session`` with the lean chores above; what it writes and accepts is unchanged."""

    def __init__(self, **kwargs: Any):
        self._pads: tuple[Any, Any] | None = None
        self._templates: dict[str, str] = {}
        super().__init__(**kwargs)
        if self.pack is json_packer:
            self.pack = pack
        if self.unpack is json_unpacker:
            self.unpack = unpack
        self._numbers = itertools.count()  # next() is atomic
        #: digest_history's signatures, oldest first
        self._digest_order: deque[bytes] = deque()
        #: (digest_history, digest_history_size, unpack) as plain reads: every message
        #: read needs them, and each trait read costs about 0.5 µs
        self._window: tuple[set, int, Any] | None = None

    @observe("digest_history", "digest_history_size", "unpack")
    def _window_changed(self, change: Any) -> None:
        self._window = None

    def _read_window(self) -> tuple[set, int, Any]:
        self._window = window = (self.digest_history, self.digest_history_size, self.unpack)
        return window

    @observe("session", "username", "auth")
    def _identity_changed(self, change: Any) -> None:
        self._templates = {}  # they hold the session and username
        self._pads = None  # the key or its hash changed (Session makes a new auth then)

    @property
    def msg_id(self) -> str:
        """A new msg_id, in ``Session``'s form: ``{session}_{pid}_{n}``."""
        return self.new_msg_id(self.session, os.getpid())

    def new_msg_id(self, session: str, pid: int) -> str:
        """:attr:`msg_id` for a caller that has the session id and pid at hand (a trait
        read costs about 0.5 µs)."""
        return f"{session}_{pid}_{next(self._numbers)}"

    def header(self, msg_type: str, msg_id: str, date: str) -> bytes:
        """The JSON of the header ``Session.msg_header`` makes, with this msg_id and date
        (from :func:`now_date` or :func:`json_date`)."""
        template = self._templates.get(msg_type) or self._header_template(msg_type)
        return (template % (_escape(msg_id)[1:-1], date)).encode("utf8", "surrogateescape")

    def feed_identities(self, msg_list: list, copy: bool = True) -> tuple[list, list]:
        """``Session.feed_identities``; with ``copy=False`` the parts may be bytes or Frames."""
        if copy:
            return super().feed_identities(msg_list, copy)
        size = len(DELIM)
        for i, part in enumerate(msg_list):
            if len(part) == size and frame_bytes(part) == DELIM:
                return [frame_bytes(ident) for ident in msg_list[:i]], msg_list[i + 1:]
        raise ValueError("DELIM not in msg_list")

    def deserialize(self, msg_list: list, content: bool = True, copy: bool = True) -> dict:
        """``Session.deserialize``; with ``copy=False`` the parts may be bytes or Frames
        (the four signed parts are read as bytes, buffers stay as they came)."""
        if not copy:
            msg_list = [frame_bytes(part) for part in msg_list[:5]] + list(msg_list[5:])
        return super().deserialize(msg_list, content, True)

    def verify(self, parts: list[bytes]) -> Any:
        """Check ``[signature, header, parent, metadata, content]`` as
        ``Session.deserialize`` does: ValueError for an unsigned, replayed or forged
        message; the signature is remembered. Returns the session's unpacker, for the
        caller to read the parts with."""
        history, _, unpacker = self._window or self._read_window()
        if (self._pads or self._key_pads()) is not None:
            signature = parts[0]
            if not signature:
                raise ValueError("Unsigned Message")
            if signature in history:
                raise ValueError(f"Duplicate Signature: {signature!r}")
            if not compare_digest(signature, self.sign(parts[1:5])):
                raise ValueError(f"Invalid Signature: {signature!r}")
            self._add_digest(signature)
        return unpacker

    def _add_digest(self, signature: bytes) -> None:
        """Remember a verified signature (``Session.deserialize`` calls this), and forget
        the oldest one past ``digest_history_size``."""
        history, size, _ = self._window or self._read_window()
        if size == 0:
            return
        order = self._digest_order
        history.add(signature)
        order.append(signature)
        while len(order) > size:
            history.discard(order.popleft())

    def _header_template(self, msg_type: str) -> str:
        """The JSON header of ``msg_type`` as a %-template of its (escaped) msg_id and date."""
        template = self._templates.get(msg_type)
        if template is None:
            mark = uuid.uuid4().hex
            probe = {"msg_id": mark, "msg_type": msg_type, "username": self.username,
                     "session": self.session, "date": mark[::-1], "version": protocol_version}
            text = json_packer(probe).decode("utf8", "surrogateescape").replace("%", "%%")
            template = text.replace(mark, "%s").replace(mark[::-1], "%s")
            self._templates[msg_type] = template  # a race only computes it twice
        return template

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
        """``Session.sign``: the hex HMAC of the parts."""
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
