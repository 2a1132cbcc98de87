"""``IPController.max_message_bytes``: the largest message part the controller reads.

The controller's sockets drop a peer that sends a bigger part (zmq's MAXMSGSIZE), signed
or not, before buffering it; the controller keeps serving everyone else. Clients and
engines learn the limit from the connection info and refuse to send a bigger part with
an error naming both sizes, so a request or result is never dropped without an answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from ipyparallel_lite.connection import MessageTooLarge, load_connection_file, make_session
from ipyparallel_lite.error import RemoteError
from ipyparallel_lite.serialization import pack_apply_message

LIMIT = 1 << 20


@pytest.fixture
def limited(own_cluster):
    return own_cluster(1, controller_args=[f"--IPController.max_message_bytes={LIMIT}"])


def test_the_limit_is_in_the_connection_files(limited):
    cluster, rc = limited
    for kind in ("client", "engine"):
        assert load_connection_file(cluster.connection_file(kind))["max_message_bytes"] == LIMIT


def test_a_client_refuses_to_send_an_oversized_message_and_sends_nothing(limited):
    _, rc = limited
    view, lview = rc[0], rc.load_balanced_view()
    big = np.ones(2 * LIMIT // 8)  # 2 MB: one buffer over the limit
    history = list(rc.history)
    for send in (lambda: view.push({"big": big}), lambda: lview.apply_async(len, big),
                 lambda: view.execute("x = " + "1" * (2 * LIMIT))):
        with pytest.raises(MessageTooLarge, match=r"of 2\.0 MB exceeds the controller's "
                                                  rf"max_message_bytes={LIMIT} .*nothing was sent"):
            send()
    assert rc.history == history and not rc.outstanding
    assert rc.db_query({"msg_id": {"$ne": None}}, keys=["msg_id"]) == [
        {"msg_id": m} for m in history]
    # just under the limit goes through
    view.push({"fits": np.ones((LIMIT - 4096) // 8)}, block=True)
    assert view.apply_sync(lambda: len(fits)) == (LIMIT - 4096) // 8  # noqa: F821


def test_an_engine_answers_an_oversized_result_with_an_error(limited):
    _, rc = limited
    with pytest.raises(RemoteError) as info:
        rc[0].apply_sync(lambda: np.ones(2 * LIMIT // 8))
    assert info.value.ename == "MessageTooLarge"
    assert f"max_message_bytes={LIMIT}" in info.value.evalue
    assert rc[0].apply_sync(abs, -5) == 5  # the engine stays connected


@pytest.mark.timeout(120)
def test_a_peer_sending_an_oversized_part_is_dropped_and_others_are_served(limited, raw_socket):
    cluster, rc = limited
    client_info = load_connection_file(cluster.connection_file("client"))
    engine_info = load_connection_file(cluster.connection_file("engine"))
    session = make_session(client_info["key"])
    ctx = zmq.Context()
    try:
        # unsigned garbage at every socket a peer can write to
        for info, channels in ((client_info, ("registration", "mux", "task", "control", "broadcast")),
                               (engine_info, ("shell", "control", "hb_pong", "iopub"))):
            for channel in channels:
                kind = zmq.PUB if channel == "iopub" else zmq.DEALER
                sock = raw_socket(ctx, info, channel, kind)
                sock.send_multipart([b"<IDS|MSG>", bytes(2 * LIMIT)])
        # a signed request with an oversized buffer is never read, so never run
        mux = raw_socket(ctx, client_info, "mux")
        engine = rc._engines[0].encode()
        msg = session.msg("apply_request", {})
        big = session.serialize(msg, ident=[engine]) + pack_apply_message(len, (bytes(2 * LIMIT),), {})
        mux.send_multipart(big)
        assert not mux.poll(2000), "the controller answered a request over its limit"
        # the same peer, within the limit, is served again (zmq reconnects it)
        small = session.serialize(session.msg("apply_request", {}), ident=[engine])
        mux.send_multipart(small + pack_apply_message(abs, (-3,), {}))
        assert mux.poll(20_000), "no answer after the oversized message"
        reply = session.deserialize(session.feed_identities(mux.recv_multipart())[1])
        assert reply["metadata"]["status"] == "ok"
        assert rc[0].apply_sync(abs, -4) == 4
        assert rc.load_balanced_view().apply_async(abs, -6).get(timeout=20) == 6
    finally:
        ctx.destroy(linger=0)
