"""A controller that dies (kill -9) or hangs (SIGSTOP) while a client waits on it.

The client fails what waits within its ``controller_timeout`` (by default the
controller's heartbeat window, ``hb_period * hb_max_misses``) with an error saying the
controller is gone; engines exit after their own ``controller_timeout`` unless the
controller comes back (restored with ``--restore``), in which case they rejoin it.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

import ipyparallel_lite as ipp

HB = ["--IPController.hb_period=0.3", "--IPController.hb_max_misses=5"]  # a 1.5 s window


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def raises_within(ar, window: float) -> tuple[float, str]:
    """Seconds until ``ar.get`` raised, and the error's text."""
    start = time.monotonic()
    with pytest.raises(ipp.EngineError) as info:
        ar.get(timeout=window + 30)
    return time.monotonic() - start, str(info.value)


@pytest.mark.timeout(120)
def test_a_client_waiting_on_a_killed_controller_raises_within_the_window(own_cluster):
    cluster, rc = own_cluster(1, controller_args=HB)
    assert rc.controller_timeout == pytest.approx(1.5)
    ar = rc.load_balanced_view().apply_async(nap, 60)
    time.sleep(0.3)
    os.kill(cluster.controller.pid, signal.SIGKILL)
    took, message = raises_within(ar, rc.controller_timeout)
    assert 1.5 <= took < 1.5 + 3, f"raised after {took:.1f}s, the window is 1.5s"
    assert "controller is gone" in message and "unreachable for 1.5s" in message
    # and a request made afterwards fails too, instead of waiting forever
    late = rc[0].apply_async(abs, -1)
    assert raises_within(late, rc.controller_timeout)[0] < 3


@pytest.mark.timeout(120)
def test_a_client_waiting_on_a_hung_controller_raises(own_cluster):
    cluster, rc = own_cluster(1, controller_args=HB)
    ar = rc[0].apply_async(nap, 60)
    time.sleep(0.3)
    os.kill(cluster.controller.pid, signal.SIGSTOP)  # alive, connections open, silent
    try:
        took, message = raises_within(ar, rc.controller_timeout)
    finally:
        os.kill(cluster.controller.pid, signal.SIGCONT)
    # the heartbeats drop the connection after the window, then the window runs
    assert took < 2 * 1.5 + 0.3 + 3, f"raised after {took:.1f}s"
    assert "controller is gone" in message


@pytest.mark.timeout(120)
def test_the_window_can_be_chosen(own_cluster):
    cluster, rc = own_cluster(1)
    quick = cluster.connect_client_sync(controller_timeout=0.5)
    try:
        ar = quick[0].apply_async(nap, 60)
        time.sleep(0.3)
        os.kill(cluster.controller.pid, signal.SIGKILL)
        took, _ = raises_within(ar, 0.5)
        assert took < 0.5 + 3
    finally:
        quick.close()


def exited(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.timeout(120)
def test_engines_exit_when_their_controller_hangs_past_their_timeout(own_cluster):
    cluster, rc = own_cluster(1, controller_args=HB,
                              engine_args=["--IPEngine.controller_timeout=1"])
    engine_pid = rc[0].apply_sync(os.getpid)
    os.kill(cluster.controller.pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        # the heartbeats drop the silent connection after the 1.5 s window, then 1 s more
        while not exited(engine_pid):
            assert time.monotonic() - start < 1.5 + 1 + 10, "the engine outlived its hung controller"
            time.sleep(0.1)
    finally:
        os.kill(cluster.controller.pid, signal.SIGCONT)
    assert time.monotonic() - start > 1.5 + 1 - 0.5  # it waited for the controller first
