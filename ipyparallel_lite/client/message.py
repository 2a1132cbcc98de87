"""Building the client's signed requests: :class:`MessageBuilder`.

A request is a Jupyter message (``[*ident, DELIM, signature, header, parent, metadata,
content, *buffers]``, HMAC-SHA256 over the four JSON parts) exactly as
``jupyter_client.session.Session.serialize(Session.msg(...))`` makes it, with the
same header fields (``msg_id``, ``msg_type``, ``username``, ``session``, ``date``,
``version``). What ``Session`` does per message and this does once:

- the header is a JSON template per message type, into which only the msg_id and the
  date are formatted (``Session`` builds a dict and JSON-encodes it, its date through
  ``json_default``);
- the date string is cut from a per-second prefix plus the microseconds;
- the parent header is always empty, and empty content or metadata are ``{}``;
- content and metadata go through one prebuilt ``json.JSONEncoder`` with the options
  of ``jupyter_client``'s ``json_packer`` (which builds an encoder per call); what it
  refuses goes through the session's packer, which has the fallbacks;
- metadata may come already packed (bytes), so that a map packs it once for all chunks.

Msg_ids are ``f"{uuid}_{pid}_{n}"``, as ``Session`` makes them, but with a uuid of the
builder's own and a thread-safe counter (``Session.msg_id``'s is not), so they never
collide with the ids of messages the ``Session`` itself sends. ``tests/test_message.py``
checks that every built message is one ``Session.deserialize`` accepts, with the
header ``Session.msg`` would give.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from datetime import datetime, timezone

from jupyter_client.jsonutil import json_default
from jupyter_client.session import DELIM, Session, protocol_version

_EMPTY = b"{}"


class MessageBuilder:
    """Signed requests of one ``Session`` (its key, username and session id)."""

    def __init__(self, session: Session):
        if session.packer != "json":
            raise ValueError(f"MessageBuilder writes JSON; this session packs with {session.packer!r}")
        self._session = session
        self._encode = json.JSONEncoder(default=json_default, ensure_ascii=False, allow_nan=False).encode
        self._auth = session.auth  # None only for an unsigned session (make_session refuses those)
        self._default_metadata = session.metadata
        self._uuid = str(uuid.uuid4())
        self._count = itertools.count()  # next() is atomic: views may be used from several threads
        self._templates: dict[str, str] = {}
        self._second: tuple[int, str] = (-1, "")

    def _template(self, msg_type: str) -> str:
        """The header of ``msg_type`` as a %-template of its msg_id and date."""
        template = self._templates.get(msg_type)
        if template is None:
            s = self._session
            fixed = {"msg_type": msg_type, "username": s.username, "session": s.session}
            parts = ", ".join(f'"{k}": {json.dumps(v, ensure_ascii=False)}' for k, v in fixed.items())
            template = ('{"msg_id": "%s", ' + parts.replace("%", "%%")
                        + ', "date": "%s", "version": ' + json.dumps(protocol_version) + "}")
            self._templates[msg_type] = template  # a race only computes it twice
        return template

    def _date(self) -> str:
        """Now, in UTC, as ``2026-12-01T09:07:39.885483Z``."""
        now = time.time()
        second = int(now)
        cached = self._second  # one tuple: read and replaced whole by any thread
        if cached[0] != second:
            cached = (second, datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S."))
            self._second = cached
        return f"{cached[1]}{int((now - second) * 1e6):06d}Z"

    def _pack(self, obj: dict) -> bytes:
        """``obj`` as ``session.pack`` packs it."""
        try:
            return self._encode(obj).encode("utf8", "surrogateescape")
        except (TypeError, ValueError):  # not plain JSON: the session's packer cleans it
            return self._session.pack(obj)

    def pack_metadata(self, metadata: dict | None) -> bytes:
        """``metadata`` (merged over the session's own) as the message part; pass the
        result to :meth:`build` to reuse it across many messages."""
        if self._default_metadata:
            metadata = {**self._default_metadata, **(metadata or {})}
        return self._pack(metadata) if metadata else _EMPTY

    def build(self, msg_type: str, content: dict | None = None, *, ident: list[bytes] | None = None,
              metadata: dict | bytes | None = None) -> tuple[str, list]:
        """``(msg_id, frames)`` of a signed message without buffers; ``metadata`` is a
        dict, or bytes from :meth:`pack_metadata`."""
        msg_id = f"{self._uuid}_{os.getpid()}_{next(self._count)}"  # the pid, as Session: a fork differs
        header = (self._template(msg_type) % (msg_id, self._date())).encode("utf8", "surrogateescape")
        packed_metadata = metadata if type(metadata) is bytes else self.pack_metadata(metadata)
        packed_content = self._pack(content) if content else _EMPTY
        if self._auth is None:
            signature = b""
        else:
            h = self._auth.copy()
            h.update(header)
            h.update(_EMPTY)  # the parent header
            h.update(packed_metadata)
            h.update(packed_content)
            signature = h.hexdigest().encode()
        frames = [*ident, DELIM] if ident else [DELIM]
        frames += (signature, header, _EMPTY, packed_metadata, packed_content)
        return msg_id, frames
