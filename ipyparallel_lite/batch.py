"""Batches: several whole Jupyter messages carried by one zmq message, on every hop.

Every hop (client → controller, controller → client, controller → engine, engine →
controller) pays a fixed
price per zmq message: a wake-up, a Python call per frame to send and to receive, a
turn of the reader. When several messages to the same peer are ready at the same
moment, the sender packs them into one zmq message:

    [MARKER, counts, *frames of message 1, *frames of message 2, ...]

``MARKER`` is ``b"<IPP-BATCH>"``; ``counts`` holds one little-endian uint32 per inner
message, its number of frames. Each inner message is exactly what would have been
sent on its own (routing identities, ``<IDS|MSG>``, HMAC signature, header, parent,
metadata, content, buffers): the batch adds no trust, and the receiver verifies each
inner message as it would a lone one. A ROUTER puts the sender's identity in front of
the marker; the receiver puts it in front of each inner message again.

Senders batch only what is already waiting; a lone message goes as it is. The
controller and engines read batches from anyone. The controller sends batches to its
engines (every engine of this version reads them, and registration refuses engines of
another version) and to clients that said they read them, by the zmq identity their
sockets chose (:func:`reader_identity`): any other Jupyter-speaking client keeps
getting lone messages.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

MARKER = b"<IPP-BATCH>"
_MARKER_LEN = len(MARKER)
#: most messages one batch may carry: senders stop there, receivers refuse more
MAX_MESSAGES = 1024


#: the start of the zmq identity of a client socket that reads batches
READER_PREFIX = b"ipp-batch-reader:"


def reader_identity() -> bytes:
    """A new, unique zmq identity telling the controller this socket reads batches."""
    return READER_PREFIX + uuid.uuid4().hex.encode()


def reads_batches(identity: bytes) -> bool:
    """Whether the peer with this zmq identity reads batches."""
    return identity.startswith(READER_PREFIX)


class BatchError(ValueError):
    """A batch whose counts do not match its frames: dropped whole."""


def pack(messages: list[list]) -> list:
    """One zmq message's frames carrying ``messages`` (each a list of frames)."""
    counts = struct.pack(f"<{len(messages)}I", *map(len, messages))
    frames: list = [MARKER, counts]
    for message in messages:
        frames.extend(message)
    return frames


def is_batch(frame: Any) -> bool:
    """Whether ``frame`` (bytes or a ``zmq.Frame``) is the batch marker."""
    if len(frame) != _MARKER_LEN:
        return False
    return (frame if isinstance(frame, bytes) else frame.bytes) == MARKER


def unpack(frames: list, at: int = 0) -> list[list]:
    """The messages of the batch whose marker is ``frames[at]``; frames stay as they are
    (``zmq.Frame`` objects are not copied). :class:`BatchError` if it does not add up."""
    if len(frames) < at + 3:
        raise BatchError(f"a batch needs a marker, counts and frames; got {len(frames) - at} frames")
    counts_frame = frames[at + 1]
    raw = counts_frame if isinstance(counts_frame, bytes) else counts_frame.bytes
    if not raw or len(raw) % 4:
        raise BatchError(f"the counts frame has {len(raw)} bytes, not a positive multiple of 4")
    n = len(raw) // 4
    if n > MAX_MESSAGES:
        raise BatchError(f"{n} messages in one batch; at most {MAX_MESSAGES} are accepted")
    counts = struct.unpack(f"<{n}I", raw)
    body = len(frames) - at - 2
    if 0 in counts or sum(counts) != body:
        raise BatchError(f"counts {list(counts)[:8]}{'...' if n > 8 else ''} do not add up to "
                         f"the {body} frames that follow")
    messages = []
    start = at + 2
    for count in counts:
        messages.append(frames[start:start + count])
        start += count
    return messages
