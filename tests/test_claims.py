"""End to end: a lone load-balanced task sent straight to an idle engine (a claim).

A client with nothing in flight sends a load-balanced task to the engine that answered
its last request, through the controller's mux device, and skips a hop through the
controller's Python (docs/wire.md). It stays a load-balanced task: the controller counts
it on that engine, an error goes through the scheduler, and if that engine took
another client's task meanwhile, the claim is taken back and runs on a free engine.
"""

from __future__ import annotations

import os
import time

import pytest
from conftest import record_sends

import ipyparallel_lite as ipp


def nap(seconds: float) -> int:
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


def to_engines(sent: list[tuple[str, int]]) -> list[str]:
    """The channels of the batches of requests for engines, of :func:`record_sends`'s list."""
    return [channel for channel, _ in sent if channel in ("mux", "task")]


def wait_for_status(rc: ipp.Client, ok, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    status = rc.queue_status()
    while not ok(status) and time.monotonic() < deadline:
        time.sleep(0.02)
        status = rc.queue_status()
    return status


def test_a_lone_task_goes_straight_to_the_engine_that_answered_last(own_cluster, monkeypatch):
    _, rc = own_cluster(2)
    rc.wait_for_engines(2, timeout=60)
    lview = rc.load_balanced_view()
    sent = record_sends(rc, monkeypatch)
    first = lview.apply_async(os.getpid)
    first.get(timeout=30)
    engine = first.metadata["engine_id"]

    ar = lview.apply_async(nap, 1)
    assert to_engines(sent) == ["task", "mux"]  # the second, alone, went through the mux device
    # the controller counts it as a task on that engine (a direct request is 'queue')
    status = wait_for_status(rc, lambda s: s[engine]["tasks"] == 1)
    assert status[engine]["tasks"] == 1 and status[engine]["queue"] == 0, status
    assert ar.get(timeout=30) == first.get()
    assert ar.metadata["engine_id"] == engine
    record = rc.db_query({"msg_id": ar.msg_ids[0]}, keys=["queue", "engine_uuid", "completed"])[0]
    assert record["queue"] == "task" and record["engine_uuid"] == rc.engine_uuid(engine)
    assert record["completed"] is not None
    assert wait_for_status(rc, lambda s: s[engine]["tasks"] == 0)[engine]["tasks"] == 0

    # not while anything is in flight, nor with constraints on where a task runs
    busy = lview.apply_async(nap, 0.5)
    lview.apply_async(os.getpid).get(timeout=30)
    busy.get(timeout=30)
    with lview.temp_flags(retries=1):
        lview.apply_sync(os.getpid)
    with lview.temp_flags(targets=[engine]):
        lview.apply_sync(os.getpid)
    assert to_engines(sent)[2:] == ["mux", "task", "task", "task"]


def test_a_claim_of_an_engine_another_client_took_meanwhile_runs_elsewhere(own_cluster, monkeypatch):
    """Client A's hint is stale: client B's long task took that engine. A's claim is
    asked back (the engine had not begun it) and runs on the free engine at once."""
    cluster, rc = own_cluster(2)
    rc.wait_for_engines(2, timeout=60)
    other = cluster.connect_client_sync()
    try:
        lview = rc.load_balanced_view()
        first = lview.apply_async(os.getpid)
        first.get(timeout=30)
        claimed = first.metadata["engine_id"]
        # B's task goes to the lowest idle engine (least load): the one A last used
        assert claimed == min(rc.ids)
        long = other.load_balanced_view().apply_async(nap, 30)
        status = wait_for_status(rc, lambda s: s[claimed]["tasks"] == 1)
        assert status[claimed]["tasks"] == 1, status

        sent = record_sends(rc, monkeypatch)
        start = time.monotonic()
        ar = lview.apply_async(nap, 0)
        assert to_engines(sent) == ["mux"]  # a claim of the busy engine
        assert ar.get(timeout=20) != first.get()  # not on the busy engine
        assert time.monotonic() - start < 10
        assert ar.metadata["engine_id"] != claimed
        assert not long.ready()
        long.abort()
        with pytest.raises(ipp.RemoteError) as exc:
            long.get(timeout=30)
        assert exc.value.ename == "TaskAborted"
    finally:
        other.close()


def test_a_claimed_task_that_fails_is_answered_once(own_cluster, monkeypatch):
    """Its engine sends the error through the controller (the scheduler may rerun it)."""
    _, rc = own_cluster(2)
    rc.wait_for_engines(2, timeout=60)
    lview = rc.load_balanced_view()
    lview.apply_sync(os.getpid)
    sent = record_sends(rc, monkeypatch)
    with pytest.raises(ipp.RemoteError) as exc:
        lview.apply_sync(divmod, 1, 0)
    assert to_engines(sent) == ["mux"]
    assert exc.value.ename == "ZeroDivisionError"
    assert rc.queue_status()["unassigned"] == 0
    assert lview.apply_sync(divmod, 7, 2) == (3, 1)
