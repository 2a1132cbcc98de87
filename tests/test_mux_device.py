"""Direct requests through the controller's mux device (a C ROUTER-ROUTER queue): what it
cannot deliver is answered by the controller, and the Hub sees all it routes."""

from __future__ import annotations

import os
import time

import zmq
from conftest import apply_request, next_reply

from ipyparallel_lite.connection import load_connection_file, make_session, shared_identity
from ipyparallel_lite.serialization import deserialize_object


def triple(x):
    return 3 * x


def fails(x):
    raise ValueError(x)


def test_what_the_device_cannot_deliver_is_answered_by_the_controller(cluster, rc, raw_socket):
    info = load_connection_file(cluster.connection_file("client"))
    session = make_session(info["key"])
    ctx = zmq.Context()
    try:
        sock = raw_socket(ctx, info, "mux")
        nobody = session.msg("apply_request", {})
        sock.send_multipart(session.serialize(nobody, ident=[b"no-such-engine"]))
        # an engine gets this one, and does not answer it: the controller does
        bogus = session.msg("bogus_request", {})
        sock.send_multipart(session.serialize(bogus, ident=[rc.engine_uuid(0).encode()]))
        to_controller = session.msg("apply_request", {})
        sock.send_multipart(session.serialize(to_controller, ident=[b"controller"]))
        replies = {}
        while len(replies) < 3:
            assert sock.poll(5000), f"{len(replies)} of 3 answers"
            frames = sock.recv_multipart()
            assert frames[0] == b"controller"  # sent by the controller, through the device
            reply = session.deserialize(session.feed_identities(frames)[1])
            replies[reply["parent_header"]["msg_id"]] = reply["content"]
        lost = replies[nobody["header"]["msg_id"]]
        assert lost["ename"] == "EngineError" and "no-such-engine" in lost["evalue"]
        refused = replies[bogus["header"]["msg_id"]]
        assert refused["ename"] == "ValueError" and "engines do not answer" in refused["evalue"]
        assert replies[to_controller["header"]["msg_id"]]["ename"] == "EngineError"
        assert not sock.poll(500), "a request was answered twice"
        assert rc[0].apply_sync(triple, 2) == 6
    finally:
        ctx.destroy(linger=0)
    log = cluster.controller.log_file.read_text(errors="replace")
    assert "addressed to the controller itself" in log


def test_a_task_after_a_direct_request_sent_just_before_it_waits_for_it(rc):
    # the task may reach the controller before the mux device routed the request (they
    # travel apart): the controller waits for the device's copy instead of refusing an
    # unknown dependency
    lview = rc.load_balanced_view()
    for i in range(20):
        first = rc[i % 2].apply_async(time.sleep, 0.01)
        with lview.temp_flags(after=first):
            then = lview.apply_async(triple, i)
        assert then.get(timeout=10) == 3 * i
        first.get(timeout=10)
        assert then.metadata["started"] >= first.metadata["completed"]
    (record,) = rc.db_query({"msg_id": first.msg_ids[0]},
                            keys=["queue", "engine_uuid", "completed", "result_content"])
    assert record["queue"] == "mux" and record["engine_uuid"] == rc.engine_uuid(1)
    assert record["completed"] is not None and record["result_content"]["status"] == "ok"
    assert rc.get_result(first.msg_ids[0]).get(timeout=5) is None


def test_a_peer_without_the_key_cannot_derail_the_mux_device(cluster, rc):
    # pyzmq's device reads [sender, destination] without checking that more follows: a
    # one-frame message would glue the next client's request to it and route it where
    # that peer chose (to another engine, its reply to that peer). Only key holders get
    # in: a peer with no credentials, or a wrong password, never completes a handshake
    client_info = load_connection_file(cluster.connection_file("client"))
    engine_info = load_connection_file(cluster.connection_file("engine"))
    pids = rc[:].apply_sync(os.getpid)
    other_engine = rc.engine_uuid(1).encode()
    ctx = zmq.Context()
    try:
        peers = []
        for info in (client_info, engine_info):
            for password in (None, b"guess"):
                peer = ctx.socket(zmq.DEALER)
                peer.linger = 0
                peer.identity = b"ATTACKER"
                if password:
                    peer.plain_username, peer.plain_password = b"ipp-lite", password
                peer.connect(f"{info['interface']}:{info['ports']['mux']}")
                peers.append(peer)
        for _ in range(5):
            for peer in peers:
                try:  # one frame alone, as if the start of a message
                    peer.send(other_engine, zmq.NOBLOCK)
                except zmq.Again:  # no handshake completed: nothing to send it on
                    pass
            time.sleep(0.05)
            assert rc[0].apply_sync(os.getpid) == pids[0], "a request ran on the wrong engine"
            assert rc[1].apply_sync(os.getpid) == pids[1]
        for peer in peers:
            assert not peer.poll(200), "a peer without the key received something"
    finally:
        ctx.destroy(linger=0)
    log = cluster.controller.log_file.read_text(errors="replace")
    assert "refused a connection to the mux channel" in log  # (the wrong password)


def test_a_lone_tasks_success_comes_straight_through_the_mux_device_and_the_rest_does_not(
        cluster, rc, raw_socket):
    # a client whose sockets share one identity (as ours do) gets the success of a task
    # its engine holds alone on its mux socket, without a turn of the controller's Python
    info = load_connection_file(cluster.connection_file("client"))
    session = make_session(info["key"])
    ctx = zmq.Context()
    try:
        identity = shared_identity()
        mux = raw_socket(ctx, info, "mux", identity=identity)
        task = raw_socket(ctx, info, "task", identity=identity)
        # a direct request answered on mux: the device knows this identity now
        _, frames = apply_request(session, triple, 1, ident=[rc.engine_uuid(0).encode()])
        mux.send_multipart(frames)
        assert next_reply(mux, session, timeout=10)["content"]["status"] == "ok"

        ok_id, frames = apply_request(session, triple, 5)
        task.send_multipart(frames)
        reply = next_reply(mux, session, timeout=10)
        assert reply["parent_header"]["msg_id"] == ok_id
        assert deserialize_object(reply["buffers"]) == 15
        assert not task.poll(300), "the controller sent the reply again"
        # the controller recorded it from the device's copy, and freed the engine
        assert rc.get_result(ok_id).get(timeout=10) == 15
        assert rc.queue_status()["unassigned"] == 0

        # an error may be retried or rerun: it goes through the controller, as before
        bad_id, frames = apply_request(session, fails, "no")
        task.send_multipart(frames)
        reply = next_reply(task, session, timeout=10)
        assert reply["parent_header"]["msg_id"] == bad_id
        assert reply["content"]["ename"] == "ValueError"
        assert not mux.poll(300)
    finally:
        ctx.destroy(linger=0)
    assert rc.load_balanced_view().apply_sync(triple, 4) == 12
