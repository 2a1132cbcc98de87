"""End to end: load-balanced tasks sent straight to engines (claims).

A client with nothing in flight sends a load-balanced task to the engine that answered
its last request (a lone claim); with requests in flight, it places each task on the
engine with the fewest of its own, as many there as the scheduler's prefetch rule allows
(prefetch.py), and holds the rest until replies make room (queued claims). Either way the task goes through the
controller's mux device and skips a hop through the controller's Python
(docs/wire.md). It stays a load-balanced task: the controller counts it on that engine,
an error goes through the scheduler, and a claim that would wait behind another client's
task or a long one is taken back and runs on a free engine.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import record_sends, wait_until

import ipyparallel_lite as ipp
from ipyparallel_lite.prefetch import PREFETCH_MAX


def nap(seconds: float) -> int:
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


def to_engines(sent: list[tuple[str, int]]) -> list[str]:
    """The channels of the batches of requests for engines, of :func:`record_sends`'s list."""
    return [channel for channel, _ in sent if channel in ("mux", "task", "claim")]


def wait_for_file(path: str) -> int:
    import os
    import time

    while not os.path.exists(path):
        time.sleep(0.01)
    return os.getpid()


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
    assert to_engines(sent) == ["task", "claim"]  # the second, alone, went through the mux device
    # the controller counts it as a task on that engine (a direct request is 'queue')
    status = wait_for_status(rc, lambda s: s[engine]["tasks"] == 1)
    assert status[engine]["tasks"] == 1 and status[engine]["queue"] == 0, status
    assert ar.get(timeout=30) == first.get()
    assert ar.metadata["engine_id"] == engine
    record = rc.db_query({"msg_id": ar.msg_ids[0]}, keys=["queue", "engine_uuid", "completed"])[0]
    assert record["queue"] == "task" and record["engine_uuid"] == rc.engine_uuid(engine)
    assert record["completed"] is not None
    assert wait_for_status(rc, lambda s: s[engine]["tasks"] == 0)[engine]["tasks"] == 0

    # while something is in flight, a queued claim: to the engine with the fewest of
    # this client's requests, the other one
    busy = lview.apply_async(nap, 0.5)
    assert lview.apply_async(os.getpid).get(timeout=30) != busy.get(timeout=30)
    # with constraints on where a task runs, through the scheduler
    with lview.temp_flags(retries=1):
        lview.apply_sync(os.getpid)
    with lview.temp_flags(targets=[engine]):
        lview.apply_sync(os.getpid)
    assert to_engines(sent)[2:] == ["claim", "claim", "task", "task"]


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
        assert to_engines(sent) == ["claim"]  # a claim of the busy engine
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
    assert to_engines(sent) == ["claim"]
    assert exc.value.ename == "ZeroDivisionError"
    assert rc.queue_status()["unassigned"] == 0
    assert lview.apply_sync(divmod, 7, 2) == (3, 1)


def test_a_burst_goes_as_queued_claims_to_every_engine(own_cluster, monkeypatch):
    _, rc = own_cluster(2)
    rc.wait_for_engines(2, timeout=60)
    lview = rc.load_balanced_view()
    pids = set(rc[:].apply_sync(os.getpid))
    lview.apply_sync(os.getpid)
    sent = record_sends(rc, monkeypatch)
    ars = [lview.apply_async(os.getpid) for _ in range(300)]
    assert {ar.get(timeout=30) for ar in ars} == pids
    assert to_engines(sent) == ["claim"] * 300  # the first alone, to the engine that answered
    ids = [ar.msg_ids[0] for ar in ars]
    records = rc.db_query({"msg_id": {"$in": ids}}, keys=["queue", "completed"])
    assert len(records) == 300
    assert all(r["queue"] == "task" and r["completed"] is not None for r in records)
    status = wait_for_status(rc, lambda s: all(s[e]["tasks"] == 0 for e in rc.ids))
    assert status["unassigned"] == 0


def test_map_chunks_and_imap_items_go_as_claims(own_cluster, monkeypatch):
    _, rc = own_cluster(2)
    rc.wait_for_engines(2, timeout=60)
    lview = rc.load_balanced_view()
    pids = set(rc[:].apply_sync(os.getpid))
    sent = record_sends(rc, monkeypatch)
    ar = lview.map_async(lambda x: (x * x, __import__("os").getpid()), range(90), chunksize=3)
    squares, ran_on = zip(*ar.get(timeout=30))
    assert list(squares) == [x * x for x in range(90)] and set(ran_on) == pids
    assert sent == [("claim", 30)]  # one submit of 30 chunks, which the client placed
    records = rc.db_query({"msg_id": {"$in": ar.msg_ids}}, keys=["queue", "completed"])
    assert len(records) == 30 and all(r["queue"] == "task" and r["completed"] for r in records)

    del sent[:]
    assert list(lview.imap(lambda x: -x, range(50))) == [-x for x in range(50)]
    assert set(to_engines(sent)) == {"claim"}
    # a map of one chunk with nothing in flight: a lone claim, to the engine that answered last
    del sent[:]
    assert lview.map_sync(lambda x: x + 1, [1, 2], chunksize=2) == [2, 3]
    assert to_engines(sent) == ["claim"]
    # what constrains where tasks run sends them through the scheduler, as before
    del sent[:]
    assert lview.map_sync(abs, [-1, -2], retries=1) == [1, 2]
    assert to_engines(sent) == ["task"]


def test_a_client_holds_what_its_engines_have_no_room_for(own_cluster, tmp_path):
    """At most hwm + PREFETCH_MAX claims of one client on an engine: the rest wait in the
    client, not in the controller, and go as replies come."""
    _, rc = own_cluster(2)
    rc.wait_for_engines(2, timeout=60)
    lview = rc.load_balanced_view()
    rc.wait([lview.apply_async(os.getpid) for _ in range(100)], timeout=30)  # measured fast
    most = 2 * (rc.transport.claim_hwm + PREFETCH_MAX)
    gate = str(tmp_path / "gate")
    ars = [lview.apply_async(wait_for_file, gate) for _ in range(most + 40)]
    ids = [ar.msg_ids[0] for ar in ars]

    def known() -> int:
        return len(rc.db_query({"msg_id": {"$in": ids}}, keys=["msg_id"]))

    time.sleep(1)
    assert 2 <= known() <= most  # the controller heard of these only
    open(gate, "w").close()
    assert len({ar.get(timeout=60) for ar in ars}) == 2
    assert known() == len(ars)


def test_queued_claims_do_not_wait_behind_a_long_task(own_cluster):
    _, rc = own_cluster(2)
    rc.wait_for_engines(2, timeout=60)
    lview = rc.load_balanced_view()
    rc.wait([lview.apply_async(os.getpid) for _ in range(50)], timeout=30)  # measured fast
    long = lview.apply_async(nap, 30)
    status = wait_for_status(rc, lambda s: sum(s[e]["tasks"] for e in rc.ids) == 1)
    [busy] = [e for e in rc.ids if status[e]["tasks"] == 1]
    start = time.monotonic()
    ars = [lview.apply_async(os.getpid) for _ in range(100)]
    rc.wait(ars, timeout=20)
    assert time.monotonic() - start < 10
    assert all(ar.metadata["engine_id"] != busy for ar in ars)
    assert not long.ready()
    long.abort()
    with pytest.raises(ipp.RemoteError) as exc:
        long.get(timeout=30)
    assert exc.value.ename == "TaskAborted"


def test_an_engine_dying_under_claims_loses_only_what_it_held(own_cluster, tmp_path):
    """Its claims end with an error; those still waiting in the client run elsewhere."""
    _, rc = own_cluster(2)
    rc.wait_for_engines(2, timeout=60)
    lview = rc.load_balanced_view()
    rc.wait([lview.apply_async(os.getpid) for _ in range(100)], timeout=30)
    survivor, doomed = rc[:].apply_sync(os.getpid)
    most = rc.transport.claim_hwm + PREFETCH_MAX
    gate = str(tmp_path / "gate")
    ars = [lview.apply_async(wait_for_file, gate) for _ in range(2 * most + 40)]
    time.sleep(1)
    os.kill(doomed, signal.SIGKILL)
    wait_until(lambda: 1 not in rc.ids, 10, "engine 1's removal")
    open(gate, "w").close()
    assert rc.wait(ars, timeout=60)
    survivors = {ar.get() for ar in ars if ar.successful()}
    lost = [ar for ar in ars if not ar.successful()]
    assert survivors == {survivor}
    assert 0 < len(lost) <= most
    for ar in lost:
        with pytest.raises(ipp.RemoteError) as exc:
            ar.get()
        assert exc.value.ename == "EngineError"


def test_claims_waiting_when_every_engine_is_gone_go_to_the_scheduler(own_cluster, tmp_path):
    """Held in the client for want of room, they are not lost with the last engine:
    the controller's scheduler gets them, and a new engine runs them."""
    cluster, rc = own_cluster(1)
    rc.wait_for_engines(1, timeout=60)
    lview = rc.load_balanced_view()
    rc.wait([lview.apply_async(os.getpid) for _ in range(100)], timeout=30)
    [doomed] = rc[:].apply_sync(os.getpid)
    gate = str(tmp_path / "gate")
    ars = [lview.apply_async(wait_for_file, gate) for _ in range(PREFETCH_MAX + 40)]
    time.sleep(0.5)
    os.kill(doomed, signal.SIGKILL)
    wait_until(lambda: not rc.ids, 10, "the engine's removal")
    ids = [ar.msg_ids[0] for ar in ars]
    # the controller has them all now, the ones the client held too
    wait_until(lambda: len(rc.db_query({"msg_id": {"$in": ids}}, keys=["msg_id"])) == len(ids),
               10, "the controller's records of every task")
    assert rc.queue_status()["unassigned"] >= 40
    open(gate, "w").close()
    cluster.start_engines_sync(1)
    assert rc.wait(ars, timeout=60)
    ran = [ar.get() for ar in ars if ar.successful()]
    assert len(ran) >= 40 and doomed not in ran


def test_claims_with_no_window(own_cluster):
    _, rc = own_cluster(2, controller_args=["--IPController.client_window=0"])
    rc.wait_for_engines(2, timeout=60)
    assert rc.transport.window is None and rc.transport.claims
    lview = rc.load_balanced_view()
    ars = [lview.apply_async(os.getpid) for _ in range(300)]
    assert len({ar.get(timeout=30) for ar in ars}) == 2


def test_aborting_claims_the_client_holds(own_cluster, tmp_path):
    _, rc = own_cluster(2)
    rc.wait_for_engines(2, timeout=60)
    lview = rc.load_balanced_view()
    rc.wait([lview.apply_async(os.getpid) for _ in range(100)], timeout=30)
    gate = str(tmp_path / "gate")
    ars = [lview.apply_async(wait_for_file, gate) for _ in range(2 * (1 + PREFETCH_MAX) + 40)]
    held = ars[-40:]
    assert not any(ar.sent for ar in held)
    rc.abort(held)
    for ar in held:
        with pytest.raises(ipp.RemoteError) as exc:
            ar.get(timeout=10)
        assert exc.value.ename == "TaskAborted" and "before it was sent" in str(exc.value)
    open(gate, "w").close()
    rc.wait(ars[:-40], timeout=60)
    assert all(ar.successful() for ar in ars[:-40])
