"""Big transfers through the controller: its memory comes back afterwards.

The controller relays buffers without copying them, and the Hub keeps a task's
argument and result buffers in its records (counted against ``size_limit``) until they
are purged. So after a 500 MB push and pull the controller holds those two records, and
after ``rc.purge_everything()`` its RSS is back within 10% of where it was.
"""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest

MB = 1 << 20
TOTAL = 500 * MB


def rss(proc: psutil.Process) -> int:
    return proc.memory_info().rss


def settled_rss(proc: psutil.Process, at_most: float, timeout: float = 20) -> int:
    """The RSS of ``proc`` once it is at most ``at_most`` bytes (or the last one seen)."""
    deadline = time.monotonic() + timeout
    while (now := rss(proc)) > at_most and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


@pytest.mark.timeout(300)
@pytest.mark.parametrize("chunk", [TOTAL, 1 * MB], ids=["one 500 MB array", "500 arrays of 1 MB"])
def test_memory_comes_back_after_a_500_mb_round_trip(own_cluster, chunk):
    cluster, rc = own_cluster(1)
    controller = psutil.Process(cluster.controller.pid)
    view = rc[0]
    view.block = True
    view.apply_sync(abs, -1)
    before = rss(controller)
    names = [f"a{i}" for i in range(TOTAL // chunk)]
    ns = {name: np.full(chunk // 8, i, dtype=np.float64) for i, name in enumerate(names)}

    view.push(ns)
    back = view.pull(names)
    assert [float(a[-1]) for a in back] == [float(i) for i in range(len(ns))]
    assert sum(a.nbytes for a in back) == TOTAL
    del back
    # the Hub keeps the push's and the pull's buffers, no more: the relay made no copy
    held = rss(controller) - before
    assert TOTAL * 0.9 < held < TOTAL * 2.2, f"controller holds {held / MB:.0f} MB after the round trip"

    rc.purge_everything()
    after = settled_rss(controller, before * 1.1)
    assert after <= before * 1.1, (
        f"controller RSS {after / MB:.0f} MB after purging, {before / MB:.0f} MB before the round trip")
    assert rc.history == [] and rc.db_query({"msg_id": {"$ne": None}}, keys=["msg_id"]) == []
    assert view.apply_sync(abs, -2) == 2  # and it still serves


@pytest.mark.timeout(300)
def test_a_controller_without_records_keeps_nothing_of_a_big_transfer(own_cluster):
    cluster, rc = own_cluster(1, controller_args=["--nodb"])
    controller = psutil.Process(cluster.controller.pid)
    view = rc[0]
    view.block = True
    view.apply_sync(abs, -1)
    before = rss(controller)
    view.push({"a": np.ones(TOTAL // 8)})
    assert view.pull("a").nbytes == TOTAL
    after = settled_rss(controller, before * 1.1)
    assert after <= before * 1.1, (
        f"controller RSS {after / MB:.0f} MB after the round trip, {before / MB:.0f} MB before")


@pytest.mark.timeout(300)
def test_records_past_the_size_limit_spill_and_leave_memory(own_cluster):
    cluster, rc = own_cluster(1, controller_args=[f"--IPController.size_limit={50 * MB}"])
    controller = psutil.Process(cluster.controller.pid)
    view = rc[0]
    view.block = True
    view.apply_sync(abs, -1)
    before = rss(controller)
    ar = view.push({"a": np.ones(200 * MB // 8)}, block=False)
    ar.get(timeout=60)
    # over the 50 MB bound, the record goes to the spill file, and its buffers with it:
    # what stays is at most a tenth of the transfer (SQLite's page cache and the heap's
    # fragments are a few MB: 5 MB over a 41 MB baseline here)
    bound = before + 20 * MB
    after = settled_rss(controller, bound, timeout=60)
    assert after <= bound, (
        f"controller RSS {after / MB:.0f} MB with the record spilled, {before / MB:.0f} MB before")
    # nothing is lost: the spilled record still holds the pushed buffers
    record, = rc.db_query({"msg_id": ar.msg_ids[0]}, keys=["buffers"])
    assert sum(len(b) for b in record["buffers"]) > 200 * MB


@pytest.mark.timeout(300)
def test_a_controller_stalled_by_a_big_write_keeps_its_engines(own_cluster, tmp_path):
    # writing a big record to SQLite holds the controller's loop for longer than the
    # heartbeat window (0.6 s here): the engines' answers wait unread meanwhile, and
    # must not be taken for silence
    db = tmp_path / "big-records.db"
    cluster, rc = own_cluster(1, controller_args=["--sqlitedb", f"--IPController.sqlite_path={db}",
                                                  "--IPController.hb_period=0.2",
                                                  "--IPController.hb_max_misses=3"])
    try:
        view = rc[0]
        view.block = True
        for _ in range(3):
            view.push({"a": np.ones(200 * MB // 8)})
            assert view.apply_sync(lambda: a.nbytes) == 200 * MB  # noqa: F821
        assert rc.ids == [0]
        assert "removed" not in cluster.controller.log_file.read_text()
    finally:
        # 800 MB with its write-ahead log: freed now (when the controller stops), not
        # carried through the rest of the suite
        for path in tmp_path.glob("big-records.db*"):
            path.unlink()
