"""Building the client's signed requests: :class:`MessageBuilder`.

A request is a Jupyter message (``[*ident, DELIM, signature, header, parent, metadata,
content, *buffers]``, HMAC-SHA256 over the four JSON parts) exactly as
``jupyter_client.session.Session.serialize(Session.msg(...))`` makes it, with the
same header fields. What ``Session`` does per message and this does once:

- the header is written from the session's template for the message type (see
  :class:`~ipyparallel_lite.session.LeanSession`), into which only the msg_id and the
  date are formatted (``Session`` builds a dict and JSON-encodes it, its date through
  ``json_default``);
- the parent header is always empty, and empty content or metadata are ``{}``;
- metadata may come already packed (bytes), so that a map packs it once for all chunks.

``tests/test_message.py`` checks that every built message is one ``Session.deserialize``
accepts, with the header ``Session.msg`` would give.
"""

from __future__ import annotations

from jupyter_client.session import DELIM

from ipyparallel_lite.session import EMPTY, LeanSession, now_date, pack


class MessageBuilder:
    """Signed requests of one :class:`~ipyparallel_lite.session.LeanSession`."""

    def __init__(self, session: LeanSession):
        if not isinstance(session, LeanSession) or session.pack is not pack:
            raise ValueError("MessageBuilder writes JSON through a LeanSession; this session "
                             f"is a {type(session).__name__} packing with {session.packer!r}")
        self._session = session
        self._default_metadata = session.metadata

    def pack_metadata(self, metadata: dict | None) -> bytes:
        """``metadata`` (merged over the session's own) as the message part; pass the
        result to :meth:`build` to reuse it across many messages."""
        if self._default_metadata:
            metadata = {**self._default_metadata, **(metadata or {})}
        return pack(metadata) if metadata else EMPTY

    def build(self, msg_type: str, content: dict | None = None, *, ident: list[bytes] | None = None,
              metadata: dict | bytes | None = None) -> tuple[str, list]:
        """``(msg_id, frames)`` of a signed message without buffers; ``metadata`` is a
        dict, or bytes from :meth:`pack_metadata`."""
        session = self._session
        msg_id = session.msg_id
        header = session.header(msg_type, msg_id, now_date())
        packed_metadata = metadata if type(metadata) is bytes else self.pack_metadata(metadata)
        packed_content = pack(content) if content else EMPTY
        signature = session.sign((header, EMPTY, packed_metadata, packed_content))
        frames = [*ident, DELIM] if ident else [DELIM]
        frames += (signature, header, EMPTY, packed_metadata, packed_content)
        return msg_id, frames
