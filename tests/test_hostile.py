"""Hostile input at the controller: garbage floods, replays, unsigned pickles, fuzzing.

Each test starts its own cluster, so that its flood does not slow the shared one, and
then checks that a normal client is still served.
"""

from __future__ import annotations

import os
import pickle
import time

import psutil
import pytest
import zmq
from conftest import channel_socket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipyparallel_lite.connection import load_connection_file, make_session
from ipyparallel_lite.serialization import pack_apply_message

CLIENT_CHANNELS = ("registration", "mux", "task", "control", "broadcast")
ENGINE_CHANNELS = ("registration", "shell", "mux", "control", "hb_pong")


def connect(ctx: zmq.Context, info: dict, channel: str, keyed: bool = True) -> zmq.Socket:
    """A DEALER on ``channel`` that sends whatever it is given (no high-water mark: the
    test decides how much to send, not zmq)."""
    return channel_socket(ctx, info, channel, keyed=keyed, sndhwm=0)


def routable(frames: list) -> list:
    """What even a key holder's garbage to the mux device keeps: a destination frame and
    more. One frame alone derails pyzmq's device (docs/security.md); only peers with the
    key can reach it, and those may run any code on the engines anyway."""
    return frames if len(frames) > 1 else [*frames, b""]


def still_serves(rc) -> None:
    assert rc[:].apply_sync(abs, -3) == [3] * len(rc.ids)
    assert rc.load_balanced_view().apply_async(abs, -4).get(timeout=20) == 4


def log_size(cluster) -> int:
    return cluster.controller.log_file.stat().st_size


def test_a_flood_of_garbage_leaves_a_small_log(own_cluster):
    cluster, rc = own_cluster(2)
    info = load_connection_file(cluster.connection_file("client"))
    evil = make_session("not-the-key")
    before = log_size(cluster)
    ctx = zmq.Context()
    try:
        socks = [connect(ctx, info, ch) for ch in CLIENT_CHANNELS]
        for i in range(4000):
            for sock in socks:
                sock.send_multipart([os.urandom(16)])  # no delimiter
                sock.send_multipart([b"<IDS|MSG>", b"sig", b"{}"])  # truncated
                sock.send_multipart(evil.serialize(evil.msg("apply_request", {"i": i})))
        time.sleep(1)
        still_serves(rc)
    finally:
        ctx.destroy(linger=0)
    grown = log_size(cluster) - before
    # 60,000 bad messages: each kind logged a few times, then counted
    assert 0 < grown < 60_000, f"the log grew by {grown} bytes"
    assert "counted, not logged" in cluster.controller.log_file.read_text()


def test_a_replayed_signed_request_is_refused(own_cluster):
    cluster, rc = own_cluster(1)
    info = load_connection_file(cluster.connection_file("client"))
    session = make_session(info["key"])
    ctx = zmq.Context()
    try:
        mux = connect(ctx, info, "mux")
        msg = session.msg("apply_request", {})
        frames = session.serialize(msg, ident=[rc._engines[0].encode()])
        frames += pack_apply_message(abs, (-7,), {})
        mux.send_multipart(frames)
        assert mux.poll(10_000), "no reply to the original request"
        reply = session.deserialize(session.feed_identities(mux.recv_multipart())[1])
        assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
        assert reply["metadata"]["status"] == "ok"
        mux.send_multipart(frames)  # the very same signed frames, captured and sent again
        assert not mux.poll(1500), "a replayed request was answered"
        still_serves(rc)
    finally:
        ctx.destroy(linger=0)
    assert "Duplicate Signature" in cluster.controller.log_file.read_text()


class _Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_nothing_unsigned_is_unpickled(own_cluster, tmp_path):
    cluster, rc = own_cluster(2)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)))
    evil = make_session("not-the-key")
    client_info = load_connection_file(cluster.connection_file("client"))
    engine_info = load_connection_file(cluster.connection_file("engine"))
    ctx = zmq.Context()
    try:
        for info, channels in ((client_info, CLIENT_CHANNELS), (engine_info, ENGINE_CHANNELS)):
            for channel in channels:
                sock = connect(ctx, info, channel)
                target = [rc._engines[0].encode()] if channel in ("mux", "control") else []
                msg = evil.msg("apply_request", {}, metadata={"targets": [0, 1]})
                sock.send_multipart(evil.serialize(msg, ident=target) + [payload, payload])
                frames = evil.serialize(msg, ident=target)
                frames[len(target) + 1] = b""  # unsigned
                sock.send_multipart(frames + [payload, payload])
        time.sleep(1)
        still_serves(rc)
    finally:
        ctx.destroy(linger=0)
    assert not marker.exists()


frame = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"<IDS|MSG>", b"", b"{}", b"[]", b"null", b'{"msg_id": 1}']),
    st.builds(lambda n: bytes(n), st.integers(1 << 20, 8 << 20)),  # oversized
)
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner,
                                                                        max_size=4)),
    max_leaves=10,
)
header = st.fixed_dictionaries(
    {},
    optional={
        "msg_id": st.one_of(st.text(max_size=12), st.integers()),
        "msg_type": st.sampled_from(["apply_request", "execute_request", "queue_request",
                                     "result_request", "connection_request", "abort_request",
                                     "registration_request", "engine_ready", "apply_reply",
                                     "bogus"]),  # not shutdown_request: signed, it is obeyed
        "session": st.text(max_size=8),
        "date": st.one_of(st.text(max_size=30), st.integers()),
    },
)
metadata = st.fixed_dictionaries({}, optional={
    "targets": json_value, "after": json_value, "follow": json_value, "timeout": json_value,
    "retries": json_value, "label": json_value,
})


@pytest.mark.timeout(300)
def test_fuzzing_every_controller_socket_leaves_it_serving(own_cluster):
    """Random, truncated, oversized, wrongly signed and signed-but-absurd messages."""
    cluster, rc = own_cluster(2)
    client_info = load_connection_file(cluster.connection_file("client"))
    engine_info = load_connection_file(cluster.connection_file("engine"))
    session = make_session(client_info["key"])
    evil = make_session("not-the-key")
    controller = psutil.Process(cluster.controller.pid)
    ctx = zmq.Context()
    socks = {(kind, ch): connect(ctx, info, ch)
             for kind, info, channels in (("client", client_info, CLIENT_CHANNELS),
                                          ("engine", engine_info, ENGINE_CHANNELS))
             for ch in channels}
    # and peers without the key, which the mux device must not let in
    socks.update({(kind, "mux without the key"): connect(ctx, info, "mux", keyed=False)
                  for kind, info in (("client", client_info), ("engine", engine_info))})
    uuids = [u.encode() for u in rc._engines.values()]
    still_serves(rc)
    baseline = controller.memory_info().rss
    sent = {"n": 0}

    @settings(max_examples=int(os.environ.get("IPP_LITE_FUZZ_EXAMPLES", 400)), deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    @given(
        where=st.sampled_from(sorted(socks)),
        how=st.sampled_from(["random", "signed", "wrong key", "truncated"]),
        idents=st.lists(st.one_of(st.sampled_from(uuids), st.binary(max_size=8)), max_size=2),
        raw=st.lists(frame, max_size=8),
        hdr=header, md=metadata, content=json_value, buffers=st.lists(st.binary(max_size=32), max_size=3),
    )
    def throw(where, how, idents, raw, hdr, md, content, buffers):
        sock = socks[where]
        if how == "random":
            frames = raw or [b""]
        else:
            signer = session if how == "signed" else evil
            packed = [signer.pack(hdr), signer.pack({}), signer.pack(md), signer.pack(content)]
            frames = [*idents, b"<IDS|MSG>", signer.sign(packed), *packed, *buffers]
            if how == "truncated":
                frames = frames[: max(1, len(frames) - 3)]
        if where[1] == "mux without the key":
            try:  # refused at every handshake: most of the time there is nothing to send on
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                pass
        else:
            sock.send_multipart(routable(frames) if where[1] == "mux" else frames)
        sent["n"] += 1

    try:
        throw()
        time.sleep(1)
        still_serves(rc)
        assert rc.ids == [0, 1]
    finally:
        ctx.destroy(linger=0)
    # oversized frames were dropped, not kept: memory comes back near where it was
    time.sleep(1)
    grown = controller.memory_info().rss - baseline
    # (64 MB was exceeded by 2-7 MB in 2 of 14 runs: allocator slack after 8 MB frames)
    assert grown < 96 << 20, f"controller RSS grew by {grown >> 20} MB after {sent['n']} messages"


#: what the engine gets to handle signed in the engine fuzz: not the requests a key holder
#: uses to run code or stop the engine (execute, shutdown, signal, removal), which are obeyed
ENGINE_FUZZ_TYPES = ["apply_request", "kernel_info_request", "complete_request", "inspect_request",
                     "is_complete_request", "history_request", "comm_info_request",
                     "abort_request", "clear_request", "bogus"]


@pytest.mark.timeout(300)
def test_fuzzing_an_engines_sockets_leaves_it_serving(own_cluster, tmp_path):
    """An engine's own sockets (bound with ``bind_kernel``, reachable by any local user)
    and the controller's routes to it get random, truncated, wrongly signed, unsigned
    and signed-but-absurd messages; unsigned ones carry a pickle that would create a
    file. The engine stays the same process, serves the cluster and its kernel
    clients, and the file never appears."""
    import json

    import ipyparallel_lite as ipp

    cluster, rc = own_cluster(1)
    pid = rc[0].apply_sync(os.getpid)
    with open(rc[0].apply_sync(ipp.bind_kernel)) as f:
        kernel = json.load(f)
    info = load_connection_file(cluster.connection_file("client"))
    session = make_session(info["key"])
    evil = make_session("not-the-key")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)))
    engine = rc._engines[0].encode()
    ctx = zmq.Context()

    def dealer(address: str) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 0
        sock.connect(address)
        return sock

    # (socket, identities that route a message to the engine through it)
    socks = {f"kernel {ch}": (dealer(f"tcp://{kernel['ip']}:{kernel[f'{ch}_port']}"), [])
             for ch in ("shell", "control", "stdin")}
    socks.update({f"controller {ch}": (connect(ctx, info, ch), [engine]) for ch in ("mux", "control")})
    sent = {"n": 0}

    @settings(max_examples=int(os.environ.get("IPP_LITE_FUZZ_EXAMPLES", 400)), deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    @given(
        where=st.sampled_from(sorted(socks)),
        how=st.sampled_from(["random", "signed", "wrong key", "unsigned", "truncated"]),
        msg_type=st.sampled_from(ENGINE_FUZZ_TYPES),
        raw=st.lists(frame, max_size=8),
        md=metadata, content=json_value, buffers=st.lists(st.binary(max_size=32), max_size=3),
    )
    def throw(where, how, msg_type, raw, md, content, buffers):
        sock, idents = socks[where]
        if how == "random":
            frames = raw or [b""]
        else:
            signer = session if how == "signed" else evil
            msg = signer.msg(msg_type, content if isinstance(content, dict) else {}, metadata=md)
            frames = signer.serialize(msg, ident=idents)
            if how == "signed":
                frames += buffers  # garbage a key holder might send: no file-making pickle
            else:
                if how == "unsigned":
                    frames[len(idents) + 1] = b""
                frames += [payload, payload]
                if how == "truncated":
                    frames = frames[: max(1, len(frames) - 4)]
        sock.send_multipart(routable(frames) if where == "controller mux" else frames)
        sent["n"] += 1

    try:
        throw()
        time.sleep(1)
        assert rc[0].apply_sync(os.getpid) == pid, "the engine was restarted or replaced"
        still_serves(rc)
        assert rc.ids == [0]
        # and the kernel side still answers a well-formed request
        shell = dealer(f"tcp://{kernel['ip']}:{kernel['shell_port']}")
        request = session.msg("kernel_info_request", {})
        shell.send_multipart(session.serialize(request))
        deadline = time.monotonic() + 20
        while True:
            assert shell.poll(max(1, int((deadline - time.monotonic()) * 1000))), \
                "the bound kernel did not answer after the fuzz"
            reply = session.deserialize(session.feed_identities(shell.recv_multipart())[1])
            if reply["parent_header"].get("msg_id") == request["header"]["msg_id"]:
                break
        assert reply["content"]["status"] == "ok"
    finally:
        ctx.destroy(linger=0)
    assert not marker.exists(), f"an unsigned pickle was loaded ({sent['n']} messages sent)"
