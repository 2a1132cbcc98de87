"""Batches: several whole Jupyter messages carried by one zmq message, on every hop.

Every hop (client → controller, controller → client, controller → engine, engine →
controller) pays a fixed price per zmq message (a wake-up, a turn of the reader) and
another per zmq frame (a pyzmq and a libzmq call to send it, two to receive it: about
1 µs a side here, and a Jupyter message has nine or more frames). When several
messages to the same peer are ready at the same moment, the sender packs them into
one zmq message of three frames, plus one per large buffer:

    [MARKER, index, small, *large parts]

``MARKER`` is ``b"<IPP-BATCH2>"``. ``index`` is little-endian uint32 words: the number
of messages ``n``, then each message's number of parts, then each part's size in
order, ``LARGE`` (``0xFFFFFFFF``) for a part that travels as a frame of its own.
``small`` is the other parts, concatenated. A part goes in ``small`` when it is under
:data:`INLINE_BELOW` bytes (copying it costs less than a frame); larger ones (numpy
arrays, big pickles) stay frames of their own and are never copied. Each message's
parts are exactly what would have been sent on its own (routing identities,
``<IDS|MSG>``, HMAC signature, header, parent, metadata, content, buffers): the batch
adds no trust, and the receiver verifies each inner message as it would a lone one.
Receivers get the small parts as ``bytes`` and the large ones as the frames they
arrived as, so code reading a message's parts takes either (``fastzmq.frame_bytes``).
A ROUTER puts the sender's identity in front of the marker; the receiver puts it in
front of each inner message again (:func:`unpack_routed`). Through the controller's mux
device, which routes each zmq message by its first frame, a batch goes to one peer:
``[identity, MARKER, ...]`` with that identity taken off each inner message
(:func:`pack_routed`); the device swaps it for the sender's, and the receiver puts it
back.

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

from ipyparallel_lite.fastzmq import SIZED_BY_LEN, frame_bytes

MARKER = b"<IPP-BATCH2>"
_MARKER_LEN = len(MARKER)
#: most messages one batch may carry: senders stop there, receivers refuse more
MAX_MESSAGES = 1024
#: parts this size or larger travel as frames of their own (zero-copy); smaller ones are
#: copied into the batch's one frame of small parts, which costs less than a frame
INLINE_BELOW = 4096
#: the size word of a part that travels as a frame of its own
LARGE = 0xFFFFFFFF


#: the start of the zmq identity of a client socket that reads batches
READER_PREFIX = b"ipp-batch-reader:"


def reader_identity() -> bytes:
    """A new, unique zmq identity telling the controller this socket reads batches."""
    return READER_PREFIX + uuid.uuid4().hex.encode()


def reads_batches(identity: bytes) -> bool:
    """Whether the peer with this zmq identity reads batches."""
    return identity.startswith(READER_PREFIX)


class BatchError(ValueError):
    """A batch whose index does not match its frames: dropped whole."""


def pack(messages: list[list]) -> list:
    """One zmq message's frames carrying ``messages`` (each a list of parts: bytes,
    zmq Frames or other contiguous buffers)."""
    words = [len(messages)]
    words.extend(map(len, messages))
    small: list = []
    large: list = [MARKER, b"", b""]
    for message in messages:
        for part in message:
            size = len(part) if type(part) in SIZED_BY_LEN else memoryview(part).nbytes
            if size < INLINE_BELOW:
                words.append(size)
                small.append(part)
            else:
                words.append(LARGE)
                large.append(part)
    large[1] = struct.pack(f"<{len(words)}I", *words)
    large[2] = b"".join(small)
    return large


def is_batch(frame: Any) -> bool:
    """Whether ``frame`` (bytes or a ``zmq.Frame``) is the batch marker."""
    return len(frame) == _MARKER_LEN and frame_bytes(frame) == MARKER


def pack_routed(identity: Any, messages: list[list]) -> list:
    """One batch of ``messages`` that all start with ``identity`` (their peer's, for a
    device that routes by the first frame): the identity, then the batch of the
    messages without it."""
    return [identity, *pack([message[1:] for message in messages])]


def unpack_routed(frames: list, at: int) -> list[list]:
    """:func:`unpack` of the batch behind ``at`` routing identities, which go back in
    front of each message, as if it had come alone."""
    identities = frames[:at]
    return [[*identities, *message] for message in unpack(frames, at)]


def unpack(frames: list, at: int = 0) -> list[list]:
    """The messages of the batch whose marker is ``frames[at]``: small parts as bytes,
    large ones the frames they came as (not copied). :class:`BatchError` if it does not
    add up."""
    if len(frames) < at + 3:
        raise BatchError(f"a batch needs a marker, an index and a frame of small parts; "
                         f"got {len(frames) - at} frames")
    index = frame_bytes(frames[at + 1])
    if len(index) < 8 or len(index) % 4:
        raise BatchError(f"the index has {len(index)} bytes, not a multiple of 4 above 4")
    words = struct.unpack(f"<{len(index) // 4}I", index)
    n = words[0]
    if not 0 < n <= MAX_MESSAGES:
        raise BatchError(f"{n} messages in one batch; 1 to {MAX_MESSAGES} are accepted")
    counts = words[1:n + 1]
    sizes = words[n + 1:]
    if 0 in counts or sum(counts) != len(sizes):
        raise BatchError(f"part counts {list(counts)[:8]}{'...' if n > 8 else ''} do not add up "
                         f"to the {len(sizes)} sizes that follow")
    small = frame_bytes(frames[at + 2])
    large = iter(frames[at + 3:])
    parts: list = []
    pos = 0
    try:
        for size in sizes:
            if size == LARGE:
                parts.append(next(large))
            else:
                end = pos + size
                parts.append(small[pos:end])
                pos = end
    except StopIteration:
        raise BatchError(f"the index names more large parts than the "
                         f"{len(frames) - at - 3} that came") from None
    if pos != len(small) or next(large, None) is not None:
        raise BatchError(f"the index accounts for {pos} of {len(small)} bytes of small parts "
                         f"and not for every large part")
    messages = []
    start = 0
    for count in counts:
        end = start + count
        messages.append(parts[start:end])
        start = end
    return messages
