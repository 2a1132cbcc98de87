"""Slow and stalled peers: one client that stops reading must never stall the others.

Each test starts its own cluster: flooding the shared one would slow every other test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zmq
from conftest import channel_socket

from ipyparallel_lite.connection import load_connection_file, make_session

#: how long another client's task may take while a peer stalls (it takes ms when healthy)
SERVED_WITHIN = 1.0


def served_quickly(rc, n: int = 5) -> float:
    """The slowest of ``n`` rounds of another client's requests: a load-balanced task, a
    direct one on every engine, a Hub query, each timed on its own."""
    lview, dv = rc.load_balanced_view(), rc[:]
    calls = [lambda i: lview.apply_async(abs, -i).get(timeout=30) == i,
             lambda i: dv.apply_async(abs, -i).get(timeout=30) == [i] * len(rc.ids),
             lambda i: bool(rc.queue_status())]
    worst = 0.0
    for i in range(n):
        for call in calls:
            start = time.monotonic()
            assert call(i)
            worst = max(worst, time.monotonic() - start)
    return worst


def deaf_socket(ctx: zmq.Context, info: dict, channel: str) -> zmq.Socket:
    """A DEALER that will never read: the smallest buffers, so its backlog shows at once."""
    return channel_socket(ctx, info, channel, rcvhwm=1, rcvbuf=4096)


@pytest.mark.timeout(180)
def test_a_client_that_floods_and_never_reads_stalls_nobody(own_cluster):
    cluster, rc = own_cluster(2)
    info = load_connection_file(cluster.connection_file("client"))
    session = make_session(info["key"])
    ctx = zmq.Context()
    try:
        query, mux = deaf_socket(ctx, info, "registration"), deaf_socket(ctx, info, "mux")
        nobody = b"no-such-engine"
        for _ in range(20_000):
            session.send(query, "queue_request", {"verbose": True})
            session.send(mux, "apply_request", {}, ident=[nobody])  # answered with an error
        worst = served_quickly(rc)
        assert worst < SERVED_WITHIN, f"another client waited {worst:.2f}s behind a deaf one"
        stats = rc.queue_status()["backlog"]
        assert stats["peers"] >= 1 and stats["messages"] > 0, stats
    finally:
        ctx.destroy(linger=0)
    # the deaf client is gone: what was queued for it is released
    deadline = time.monotonic() + 10
    while rc.queue_status()["backlog"]["peers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rc.queue_status()["backlog"] == {"peers": 0, "messages": 0, "bytes": 0}
    assert served_quickly(rc) < SERVED_WITHIN


SUBMITTER = textwrap.dedent("""
    import sys
    import ipyparallel_lite as ipp
    rc = ipp.Client(url_file=sys.argv[1])
    rc.wait_for_engines(2, timeout=30)
    n = int(sys.argv[2])
    # 4 kB replies: tens of MB wait for this client, far more than zmq and TCP buffer
    ar = rc.load_balanced_view().map_async(lambda i: (i, bytes(4096)), range(n), chunksize=1)
    rc.queue_status()  # queued behind the tasks: once answered, they have left this process
    print("submitted", flush=True)
    results = ar.get(timeout=300)
    assert [i for i, _ in results] == list(range(n)), "wrong results"
    print("all", len(results), flush=True)
    rc.close()
""")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("then", ["resume", "kill"])
def test_a_suspended_client_stalls_nobody(own_cluster, then):
    """A real Client submits many tasks and is stopped (SIGSTOP) before reading replies."""
    cluster, rc = own_cluster(2)
    n = 10_000
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBMITTER, str(cluster.connection_file("client")), str(n)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "submitted"
        os.kill(proc.pid, signal.SIGSTOP)
        # wait until the engines ran everything: the replies now wait for the stopped client
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = rc.queue_status()
            if status["unassigned"] == 0 and all(status[e]["tasks"] == 0 for e in rc.ids):
                break
            time.sleep(0.2)
        worst = served_quickly(rc)
        assert worst < SERVED_WITHIN, f"another client waited {worst:.2f}s behind a stopped one"
        # what waits for it is bounded by its window: the rest of the 10,000 stayed in
        # its own (stopped) process, and the replies that wait fit in libzmq's queue or
        # in the controller's outbox
        window = rc.transport.window
        assert window and window < n
        assert rc.queue_status()["backlog"]["messages"] <= window
        if then == "resume":
            os.kill(proc.pid, signal.SIGCONT)
            out, _ = proc.communicate(timeout=120)
            assert f"all {n}" in out, out
            assert proc.returncode == 0
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        deadline = time.monotonic() + 10
        while rc.queue_status()["backlog"]["peers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rc.queue_status()["backlog"] == {"peers": 0, "messages": 0, "bytes": 0}
        assert served_quickly(rc) < SERVED_WITHIN
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
