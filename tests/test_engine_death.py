"""Engines that die: how fast the controller knows, what happens to their tasks, restarts.

Local engines are found dead by their process (at once, when their connection drops),
remote-like ones (alive but silent, here stopped with SIGSTOP) by the heartbeat window.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from conftest import wait_until

import ipyparallel_lite as ipp


def test_a_killed_local_engine_is_removed_within_a_second(own_cluster):
    cluster, rc = own_cluster(2)
    pid = rc[1].apply_sync(os.getpid)
    os.kill(pid, signal.SIGKILL)
    took = wait_until(lambda: 1 not in rc.ids, 10, "engine 1's removal")
    assert took < 1.0, f"a killed local engine was noticed only after {took:.3f}s"
    assert rc[:].apply_sync(lambda: 1) == [1]


def test_a_silent_engine_is_removed_within_the_configured_heartbeat_window(own_cluster):
    # a stopped process keeps its connections: only the missing heartbeats show it
    cluster, rc = own_cluster(2, controller_args=["--IPController.hb_period=0.2",
                                                  "--IPController.hb_max_misses=3"])
    pid = rc[1].apply_sync(os.getpid)
    os.kill(pid, signal.SIGSTOP)
    try:
        took = wait_until(lambda: 1 not in rc.ids, 10, "the silent engine's removal")
    finally:
        os.kill(pid, signal.SIGCONT)
    # 3 missed beats of 0.2 s (the default window is 5 s), plus one period of checking;
    # the last beat it answered may have come up to one period before the stop, so the
    # removal can come 0.4 s after it (0.41-0.49 s seen), never after one missed beat
    assert 0.35 < took < 2.5, f"silent engine removed after {took:.2f}s"
    # back, it is told it was removed and exits instead of living on unseen
    assert psutil.Process(pid).wait(20) is not None or not psutil.pid_exists(pid)


def test_a_late_answer_from_a_removed_engine_is_not_a_second_answer(own_cluster):
    # engine 1 stalls mid-task past its heartbeats: the task runs again on engine 0; when
    # engine 1 resumes, its answer is the second one and is dropped, and the scheduler's
    # books (one task in flight per engine) stay right
    cluster, rc = own_cluster(2, controller_args=["--IPController.hb_period=0.2",
                                                  "--IPController.hb_max_misses=3"])
    pids = rc[:].apply_sync(os.getpid)
    lview = rc.load_balanced_view()
    with lview.temp_flags(retries=1, targets=[0, 1], after=None):
        probes = [lview.apply_async(task, i, 0.5) for i in range(2)]
    wait_until(lambda: all(rc.queue_status(verbose=True)[e]["tasks"] for e in (0, 1)), 10,
               "a task running on each engine")
    os.kill(pids[1], signal.SIGSTOP)
    try:
        wait_until(lambda: 1 not in rc.ids, 10, "the stalled engine's removal")
        time.sleep(1.0)  # its task's sleep is over: it answers the moment it resumes
    finally:
        os.kill(pids[1], signal.SIGCONT)
    answers = [ar.get(timeout=30) for ar in probes]
    assert sorted(i for i, _ in answers) == [0, 1]
    assert all(pid == pids[0] for _, pid in answers)
    assert psutil.Process(pids[1]).wait(20) is not None or not psutil.pid_exists(pids[1])
    assert lview.map_sync(abs, [-1, -2, -3, -4]) == [1, 2, 3, 4]
    assert all(rc.get_result(ar.msg_ids[0]).get(timeout=10)[1] == pids[0] for ar in probes)


def task(i: int, pause: float) -> tuple[int, int]:
    import os
    import time

    time.sleep(pause)
    return i, os.getpid()


def test_kill_9_under_load_accounts_for_every_task(own_cluster):
    cluster, rc = own_cluster(3)
    pids = rc[:].apply_sync(os.getpid)
    lview = rc.load_balanced_view()
    results = []
    for i in range(200):
        with lview.temp_flags(retries=1 if i % 2 else 0):
            results.append(lview.apply_async(task, i, 0.03))
    wait_until(lambda: sum(ar.ready() for ar in results) >= 40, 60, "40 results")
    victim = pids[1]
    os.kill(victim, signal.SIGKILL)
    done, failed = {}, []
    for i, ar in enumerate(results):
        try:
            index, pid = ar.get(timeout=60)
        except ipp.EngineError as e:
            assert "Engine" in str(e)
            failed.append(i)
        else:
            assert index == i, f"task {i} got the result of task {index}"
            done[i] = pid
    # every task is accounted for, once: a result or EngineError
    assert len(done) + len(failed) == 200 and not set(done) & set(failed)
    # with one task in flight per engine, at most the one running on the victim is lost,
    # and only if it had no retries; retried tasks all end with a result
    assert len(failed) <= 1 and all(i % 2 == 0 for i in failed), failed
    assert all(i in done for i in range(1, 200, 2))
    # the survivors did the rest, and the controller holds nothing more
    assert any(p != victim for p in done.values())
    wait_until(lambda: 1 not in rc.ids, 10, "the victim's removal")
    status = rc.queue_status()
    assert status["unassigned"] == 0 and all(status[e]["queue"] == 0 for e in rc.ids), status
    assert not rc.outstanding


def test_auto_restart_brings_the_engine_count_back(own_cluster):
    cluster, rc = own_cluster(2, restart_engines=True, engine_restart_delay=0.1)
    assert cluster.auto_restart_engines
    pid = rc[1].apply_sync(os.getpid)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: 1 not in rc.ids, 10, "the killed engine's removal")
    wait_until(lambda: len(rc.ids) == 2, 60, "a restarted engine")
    assert cluster.engine_restarts == 1 and cluster.restart_stopped is None
    assert cluster.engine_count == 2
    new_pids = rc[:].apply_sync(os.getpid)
    assert pid not in new_pids and len(set(new_pids)) == 2
    # the cluster file records the new process, for `ipcluster-lite stop` and the panel
    again = ipp.Cluster.from_file(cluster.cluster_file)
    assert {e.pid for v in again.engines.values() for e in v} == set(new_pids)


def test_a_crash_loop_stops_with_a_report(own_cluster):
    cluster, rc = own_cluster(0, restart_engines=True, engine_restart_limit=2,
                              engine_restart_delay=0.1,
                              engine_args=["--IPEngine.startup_command=import os; os._exit(3)"])
    cluster.start_engines_sync(1)
    wait_until(lambda: cluster.restart_stopped is not None, 90, "the crash loop's report")
    report = cluster.restart_stopped
    assert "crash loop" in report and "code 3" in report and "2 restarts" in report, report
    assert cluster.engine_restarts == 2 and cluster.engine_count == 0
    time.sleep(1.0)  # and nothing is started any more
    assert cluster.engine_restarts == 2 and cluster.engine_count == 0
    assert rc.ids == []


def test_stopping_engines_on_purpose_is_no_crash(own_cluster):
    cluster, rc = own_cluster(1, restart_engines=True, engine_restart_delay=0.1)
    cluster.stop_engines_sync()
    wait_until(lambda: rc.ids == [], 10, "the stopped engine's removal")
    time.sleep(0.5)
    assert cluster.engine_restarts == 0 and cluster.engine_count == 0


@pytest.mark.parametrize("bad", [{"engine_restart_limit": -1}, {"engine_restart_delay": -1.0}])
def test_restart_settings_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ipp.Cluster(n=0, load_profile=False, **bad)
