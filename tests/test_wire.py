"""Batches on every hop, the client transport, and the client's window, on real clusters.

Raw sockets speak to a real controller here (as a client that is not ours would);
the framing itself is also checked on its own.
"""

from __future__ import annotations

import ast
import pickle
import struct
import time
from pathlib import Path

import pytest
import zmq
from conftest import apply_request

import ipyparallel_lite
from ipyparallel_lite import batch, error
from ipyparallel_lite.connection import load_connection_file, make_session, unpack_message, url
from ipyparallel_lite.serialization import deserialize_object


def connect(ctx: zmq.Context, info: dict, channel: str, identity: bytes | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if identity is not None:
        sock.identity = identity
    sock.connect(url(info, channel))
    return sock


def to_engine_0(session, f, *args) -> tuple[str, list]:
    """A broadcast for engine 0 alone, and the msg_id its reply answers: copies the
    controller sends an engine in one turn travel to it as one batch."""
    msg_id, frames = apply_request(session, f, *args, metadata={"targets": [0]})
    return f"{msg_id}_0", frames


def receive(sock: zmq.Socket, session, n: int, timeout: float = 30) -> tuple[dict, int]:
    """``{parent msg_id: reply}`` of ``n`` replies, and how many zmq messages carried them."""
    replies, zmq_messages = {}, 0
    deadline = time.monotonic() + timeout
    while len(replies) < n:
        assert sock.poll(max(0, int((deadline - time.monotonic()) * 1000))), \
            f"{len(replies)} of {n} replies after {timeout}s"
        frames = sock.recv_multipart()
        zmq_messages += 1
        for message in batch.unpack(frames) if batch.is_batch(frames[0]) else [frames]:
            reply = session.deserialize(session.feed_identities(message)[1])
            replies[reply["parent_header"]["msg_id"]] = reply
    return replies, zmq_messages


def still_serves(rc) -> None:
    assert rc.load_balanced_view().apply_sync(abs, -3) == 3


# ---- the framing ------------------------------------------------------------------


def test_unpack_refuses_forged_and_replayed_messages_and_leaves_parts_not_asked_for():
    """Parts not asked for (the controller never reads a request's parent header) stay
    the verified bytes; forged and replayed messages are refused all the same."""
    session = make_session("k" * 64)
    msg = session.msg("apply_request", {"a": 1}, parent={"msg_id": "p"}, metadata={"m": 2})
    frames = session.serialize(msg)[1:]  # from the signature on
    reader = make_session("k" * 64)
    got = unpack_message(reader, frames, parent=False, content=False)
    assert got["parent_header"] == frames[2] and got["content"] == frames[4]
    assert got["metadata"] == {"m": 2} and got["header"]["msg_id"] == msg["header"]["msg_id"]
    with pytest.raises(ValueError, match="Duplicate"):
        unpack_message(reader, frames)
    forged = [frames[0], frames[1], frames[2], frames[3], b'{"a": 2}']
    with pytest.raises(ValueError, match="Invalid"):
        unpack_message(make_session("k" * 64), forged)


def test_pack_and_unpack_keep_every_part_of_every_message():
    messages = [[b"a"], [b"<IDS|MSG>", b"sig", b"h", b"p", b"m", b"c", b"buf"], [b"x", b""]]
    frames = batch.pack(messages)
    assert frames[0] == batch.MARKER and batch.is_batch(frames[0])
    assert len(frames) == 3, "small parts travel in one frame"
    assert batch.unpack(frames) == messages
    assert batch.unpack([b"ident", *frames], 1) == messages
    assert not batch.is_batch(b"<IDS|MSG>") and not batch.is_batch(b"x" * len(batch.MARKER))


def test_a_routed_batch_carries_its_peer_once_and_gives_it_back_to_each_message():
    # through the mux device, which routes by the first frame: [peer, MARKER, ...]
    messages = [[b"engine-0", b"<IDS|MSG>", b"sig", b"h"], [b"engine-0", b"<IDS|MSG>", b"s2"]]
    frames = batch.pack_routed(b"engine-0", messages)
    assert frames[0] == b"engine-0" and batch.is_batch(frames[1])
    assert batch.unpack(frames, 1) == [m[1:] for m in messages]
    # the device swaps the first frame for the sender's; the receiver puts it back
    assert batch.unpack_routed([b"client", *frames[1:]], 1) == [[b"client", *m[1:]] for m in messages]
    assert batch.unpack_routed([b"a", b"b", *frames[1:]], 2)[1] == [b"a", b"b", b"<IDS|MSG>", b"s2"]


def test_large_parts_travel_as_frames_of_their_own_and_are_not_copied():
    big = b"B" * batch.INLINE_BELOW
    frame = zmq.Frame(b"F" * 100_000)
    shaped = memoryview(bytearray(batch.INLINE_BELOW)).cast("B", (batch.INLINE_BELOW // 8, 8))
    small_shaped = memoryview(bytearray(b"s" * 64)).cast("B", (8, 8))
    messages = [[b"<IDS|MSG>", b"sig", big, b"c", frame], [small_shaped, shaped, b"z" * 10]]
    frames = batch.pack(messages)
    assert frames[3:] == [big, frame, shaped]
    got = batch.unpack(frames)
    assert got[0][2] is big and got[0][4] is frame and got[1][1] is shaped
    assert got[0][:2] == [b"<IDS|MSG>", b"sig"] and got[1][0] == b"s" * 64 and got[1][2] == b"z" * 10
    # as received: every frame a zmq Frame, small parts come out as bytes
    received = batch.unpack([zmq.Frame(bytes(memoryview(f).cast("B"))) for f in frames])
    assert [bytes(memoryview(p).cast("B")) for m in received for p in m] == \
        [bytes(memoryview(p).cast("B")) for m in messages for p in m]
    assert all(type(p) is bytes for p in received[0][:2] + received[1][:1])


def _index(*words: int) -> bytes:
    return struct.pack(f"<{len(words)}I", *words)


@pytest.mark.parametrize("frames, reason", [
    ([batch.MARKER, _index(1, 1, 1)], "needs a marker, an index"),
    ([batch.MARKER, b"\x01\x00\x00", b"a"], "not a multiple of 4"),
    ([batch.MARKER, _index(1), b""], "not a multiple of 4 above 4"),
    ([batch.MARKER, _index(0, 1), b"a"], "0 messages"),
    ([batch.MARKER, _index(batch.MAX_MESSAGES + 1, 1), b"a"], "1 to 1024"),
    ([batch.MARKER, _index(2, 1, 1, 1), b"a"], "do not add up"),
    ([batch.MARKER, _index(1, 0, 1), b"a"], "do not add up"),
    ([batch.MARKER, _index(1, 2, 1, 1), b"a"], "accounts for 2 of 1 bytes"),
    ([batch.MARKER, _index(1, 1, 1), b"ab"], "accounts for 1 of 2 bytes"),
    ([batch.MARKER, _index(1, 1, batch.LARGE), b""], "more large parts"),
    ([batch.MARKER, _index(1, 1, 1), b"a", b"extra"], "not for every large part"),
])
def test_a_batch_that_does_not_add_up_is_refused_whole(frames, reason):
    with pytest.raises(batch.BatchError, match=reason):
        batch.unpack(frames)


def test_client_view_and_asyncresult_import_no_cycle():
    """client.py imports the views and the transport; nothing imports client.py back."""
    package = Path(ipyparallel_lite.__file__).parent / "client"
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports too
            if isinstance(node, ast.ImportFrom) and node.module:
                name = node.module
                if name == "ipyparallel_lite.client":
                    imported.update(f"{name}.{alias.name}" for alias in node.names)
                else:
                    imported.add(name)
        graph[f"ipyparallel_lite.client.{path.stem}"] = {m for m in imported if m.startswith("ipyparallel_lite.client.")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    cyclic = sorted(m for m in graph if reaches(m, m, set()))
    assert not cyclic, f"import cycle through {cyclic}"
    assert "ipyparallel_lite.client.transport" in graph["ipyparallel_lite.client.client"]


# ---- client → controller → client -------------------------------------------------------


def test_a_burst_leaves_as_few_batches_and_a_lone_request_at_once(rc, lview):
    transport = rc.transport
    before = transport.sends
    assert lview.apply_sync(abs, -1) == 1
    assert transport.sends == before + 1  # alone: one zmq message, sent at once
    before = transport.sends
    ars = [lview.apply_async(abs, -i) for i in range(300)]
    assert [ar.get(timeout=60) for ar in ars] == list(range(300))
    assert transport.sends - before < 300


@pytest.mark.parametrize("reader", [True, False])
def test_controller_unpacks_batches_and_batches_replies_only_for_readers(cluster, rc, reader):
    info = load_connection_file(cluster.connection_file("client"))
    session = make_session(info["key"])
    ctx = zmq.Context()
    try:
        # requests queue on one engine: its replies, and the controller's, batch
        sock = connect(ctx, info, "broadcast", batch.reader_identity() if reader else None)
        requests = [to_engine_0(session, abs, -i) for i in range(40)]
        sock.send_multipart(batch.pack([frames for _, frames in requests]))
        replies, zmq_messages = receive(sock, session, 40)
        assert set(replies) == {msg_id for msg_id, _ in requests}
        assert all(r["metadata"]["status"] == "ok" for r in replies.values())
        if reader:
            assert zmq_messages < 40
        else:  # a client that did not say it reads batches gets lone replies
            assert zmq_messages == 40
    finally:
        ctx.destroy(linger=0)


class _Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unsigned_or_malformed_batches_are_refused_and_the_rest_is_served(cluster, rc, tmp_path):
    info = load_connection_file(cluster.connection_file("client"))
    good, evil = make_session(info["key"]), make_session("not-the-key")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)))
    ctx = zmq.Context()
    try:
        sock = connect(ctx, info, "task", batch.reader_identity())
        forged = evil.serialize(evil.msg("apply_request", {})) + [payload, payload]
        unsigned = good.serialize(good.msg("apply_request", {})) + [payload, payload]
        unsigned[1] = b""
        msg_id, request = apply_request(good, abs, -5)
        # wrongly signed, unsigned and garbage messages inside a batch are dropped one by
        # one; the signed request beside them is served
        sock.send_multipart(batch.pack([forged, unsigned, [b"garbage"], request]))
        # batches whose index does not add up are dropped whole, with a warning
        sock.send_multipart([batch.MARKER, _index(1, 5, 1, 1, 1, 1, 1), b"abcd", *forged])
        sock.send_multipart([batch.MARKER, b"xyz", *forged])
        sock.send_multipart([batch.MARKER])
        replies, _ = receive(sock, good, 1)
        assert list(replies) == [msg_id]
        assert not sock.poll(1000), "something besides the signed request was answered"
        still_serves(rc)
    finally:
        ctx.destroy(linger=0)
    assert not marker.exists(), "an unsigned message was unpickled"
    assert "dropped a malformed batch" in cluster.controller.log_file.read_text()


def test_replies_ready_together_on_an_engine_come_back_batched_and_in_order(rc):
    # requests queued on one engine run back to back: their replies leave it together
    view = rc[0]
    ars = [view.apply_async(abs, -i) for i in range(500)]
    assert [ar.get(timeout=60) for ar in ars] == list(range(500))
    completed = [ar.metadata["completed"] for ar in ars]
    assert completed == sorted(completed)


def test_a_burst_of_small_and_large_arguments_comes_back_whole(rc, lview):
    # small parts travel packed in a batch, parts of 4 KiB and more as frames of their
    # own: on every hop, both kinds (and arrays) must reach the engine and come back
    import numpy as np

    def args(i: int) -> tuple:
        return b"s" * (i % 7), b"L" * (batch.INLINE_BELOW - 3 + i), np.arange(i, i + 3_000, dtype="f8")

    views = [lview, rc[0], rc[1]] * 30
    ars = [view.apply_async(lambda a, b, c: (a, b, c * 2), *args(i)) for i, view in enumerate(views)]
    for i, ar in enumerate(ars):
        a, b, c = ar.get(timeout=60)
        small, large, array = args(i)
        assert (a, b) == (small, large) and np.array_equal(c, array * 2)


def requests_behind() -> int:
    """How many requests wait behind this one in the engine's stream (the rest of a batch)."""
    from IPython import get_ipython
    return get_ipython().kernel.shell_stream.waiting


def test_a_burst_reaches_an_engine_as_batches_and_comes_back_in_order(cluster, rc):
    info = load_connection_file(cluster.connection_file("client"))
    session = make_session(info["key"])
    ctx = zmq.Context()
    try:
        # one batch of requests for one engine: the controller decides them in one turn,
        # and the engine gets all but the first as one batch, each verified and run in order
        sock = connect(ctx, info, "broadcast", batch.reader_identity())
        requests = [to_engine_0(session, requests_behind) for _ in range(40)]
        sock.send_multipart(batch.pack([frames for _, frames in requests]))
        replies, _ = receive(sock, session, 40)
        sent = [msg_id for msg_id, _ in requests]
        assert set(replies) == set(sent)
        assert all(r["metadata"]["status"] == "ok" for r in replies.values())
        behind = [deserialize_object(replies[m]["buffers"]) for m in sent]
        # the first went at once; the 39 others came as one batch, or a few
        assert max(behind) > 1, f"no batch reached the engine: {behind}"
        completed = [replies[m]["metadata"]["completed"] for m in sent]
        assert completed == sorted(completed)
    finally:
        ctx.destroy(linger=0)


# ---- the client's window ------------------------------------------------------------------


def test_the_window_bounds_what_waits_in_the_controller(own_cluster):
    window = 16
    cluster, rc = own_cluster(2, controller_args=[f"--IPController.client_window={window}"])
    assert rc.transport.window == window
    lview = rc.load_balanced_view()
    ar = lview.map_async(time.sleep, [0.002] * 600, chunksize=1)
    in_controller = []
    while not ar.done():
        status = rc.queue_status()
        in_controller.append(status["unassigned"] + sum(status[e]["tasks"] for e in rc.ids))
        time.sleep(0.02)
    assert ar.get(timeout=60) == [None] * 600
    assert max(in_controller) <= window
    assert max(in_controller) > 0


def test_requests_the_window_holds_are_aborted_without_being_sent(own_cluster):
    cluster, rc = own_cluster(1, controller_args=["--IPController.client_window=2"])
    lview = rc.load_balanced_view()
    ars = [lview.apply_async(time.sleep, 0.2) for _ in range(20)]
    time.sleep(0.1)
    rc.abort(ars)
    outcomes = []
    for ar in ars:
        try:
            outcomes.append(ar.get(timeout=30))
        except error.TaskAborted:
            outcomes.append("aborted")
    assert outcomes.count("aborted") >= 17
    ran = sum(1 for r in rc.db_query({"msg_id": {"$in": [ar.msg_ids[0] for ar in ars]}}, ["msg_id"]))
    assert ran <= 3  # the controller never heard of the others
    still_serves(rc)
