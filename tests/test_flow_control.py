"""End to end: the per-client window of requests waiting in the controller, and the
result of an engine that answered after it was declared dead."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import zmq
from conftest import next_reply

import ipyparallel_lite as ipp
from ipyparallel_lite.connection import load_connection_file, make_session

WINDOW = 3


def test_requests_beyond_the_client_window_are_refused_at_once(own_cluster, raw_socket):
    cluster, client = own_cluster(2, controller_args=[f"--IPController.client_window={WINDOW}"])
    info = load_connection_file(cluster.connection_file("client"))
    session = make_session(info["key"])
    ctx = zmq.Context()
    try:
        registration = raw_socket(ctx, info, "registration")
        registration.send_multipart(session.serialize(session.msg("connection_request", {})))
        assert next_reply(registration, session)["content"]["window"] == WINDOW

        task = raw_socket(ctx, info, "task")
        sent = []
        for _ in range(WINDOW + 2):  # 2 run, 1 waits for an engine, 2 are over the window
            msg = session.msg("execute_request", {"code": "import time; time.sleep(3)",
                                                  "silent": False, "store_history": False})
            sent.append(msg["header"]["msg_id"])
            task.send_multipart(session.serialize(msg))
        start = time.monotonic()
        refused = [next_reply(task, session, timeout=10) for _ in range(2)]
        assert time.monotonic() - start < 2.5, "refusals waited for the running tasks"
        assert sorted(r["parent_header"]["msg_id"] for r in refused) == sorted(sent[WINDOW:])
        for r in refused:
            assert r["content"]["ename"] == "TooManyPendingTasks"
            assert f"already has {WINDOW} requests waiting" in r["content"]["evalue"]
            assert f"client_window = {WINDOW}" in r["content"]["evalue"]
        # another client is not limited by this one's window
        assert client.load_balanced_view().apply_async(abs, -7).get(timeout=30) == 7
        done = [next_reply(task, session) for _ in range(WINDOW)]
        assert sorted(d["parent_header"]["msg_id"] for d in done) == sorted(sent[:WINDOW])
        assert all(d["content"]["status"] == "ok" for d in done)
        # answered: the window is free again
        msg = session.msg("execute_request", {"code": "b = 2", "silent": False, "store_history": False})
        task.send_multipart(session.serialize(msg))
        assert next_reply(task, session)["content"]["status"] == "ok"
        assert client.queue_status()["unassigned"] == 0
    finally:
        ctx.destroy(linger=0)


def test_late_result_of_an_engine_declared_dead_is_kept_in_the_hub(own_cluster):
    cluster, client = own_cluster(2, controller_args=["--hb-period=0.2", "--ControllerApp.hb_max_misses=3"])
    pid1 = client[1].apply_sync(os.getpid)
    ar = client[1].apply_async(lambda: (__import__("time").sleep(0.5), "computed")[1])
    time.sleep(0.1)  # it runs
    os.kill(pid1, signal.SIGSTOP)
    try:
        with pytest.raises(ipp.EngineError):
            ar.get(timeout=20)  # declared dead: the client has its answer
    finally:
        os.kill(pid1, signal.SIGCONT)  # it finishes the task and answers, late
    msg_id = ar.msg_ids[0]
    deadline = time.monotonic() + 20
    while True:
        (record,) = client.db_query({"msg_id": msg_id}, ["result_metadata", "engine_uuid"])
        if record["result_metadata"]["status"] == "ok":
            break
        assert time.monotonic() < deadline, "the late result was not stored in the Hub"
        time.sleep(0.1)
    assert client.get_result(msg_id, block=True) == "computed"
    with pytest.raises(ipp.EngineError):  # not delivered a second time
        ar.get(timeout=1)
    log = cluster.controller.log_file.read_text(errors="replace")
    assert f"stored the late result of {msg_id}" in log
    deadline = time.monotonic() + 10  # and the removed engine still exits
    while psutil.pid_exists(pid1) and psutil.Process(pid1).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the removed engine lives on"
        time.sleep(0.1)
