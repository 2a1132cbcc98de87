"""Registration at scale: 1,200 engines register with one real controller at once and are
all reported ready; then all of them vanish together and are all removed, cheaply, and a
client hears of every removal (more notifications at once than zmq's default queue of
1,000 holds).

The engines are :class:`benchmarks.engine_stubs.EngineStubs`, in a child process: each
speaks the engines' real protocol (signed registration, shell and control
``engine_ready``, heartbeat echo) over its own connections; only the kernel behind it is
missing.
"""

from __future__ import annotations

import resource
import time

import psutil
import pytest

import ipyparallel_lite as ipp
from benchmarks.engine_stubs import StubProcess
from benchmarks.registration import cpu_seconds
from ipyparallel_lite.connection import load_connection_file

N = 1200
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def controller():
    cluster = ipp.Cluster(n=0)
    cluster.start_controller_sync()
    rc = cluster.connect_client_sync()
    yield cluster, rc
    rc.close()
    cluster.stop_cluster_sync()


def test_1200_engines_register_at_once_and_are_all_ready(controller):
    cluster, rc = controller
    info = load_connection_file(cluster.connection_file("engine"))
    proc = psutil.Process(cluster.controller.pid)
    stubs = StubProcess(cluster.connection_file("engine"), N)
    try:
        cpu = cpu_seconds(proc)
        start = time.monotonic()
        stubs.start()
        stubs.wait_registered(120)  # every stub has its id (or the stubs say what failed)
        rc.wait_for_engines(N, timeout=120)
        elapsed = time.monotonic() - start
        cpu_per_registration = (cpu_seconds(proc) - cpu) / N
        assert not stubs.refused
        assert sorted(stubs.ids) == rc.ids == list(range(N))
        # ready in the Hub's own words (a queue per ready engine), and to a new client
        status = rc.queue_status()
        assert sorted(k for k in status if isinstance(k, int)) == list(range(N))
        with ipp.Client(cluster.connection_file("client")) as other:
            assert other.ids == list(range(N))
        # generous bounds for a loaded 2-core machine (measured: 0.3-1.7 s, 0.6-0.9 ms)
        assert elapsed < 60, f"{N} registrations took {elapsed:.1f}s"
        assert cpu_per_registration < 0.01, f"{cpu_per_registration * 1000:.2f} ms CPU per registration"
        # heartbeats keep all of them alive past the missed-heartbeat limit (5 periods)
        time.sleep(info["hb_period"] * 6)
        assert len(rc.ids) == N
        cpu = cpu_seconds(proc)
    finally:
        stubs.stop(unregister=False)
    # all vanish at once without unregistering: found by the probe a dropped connection
    # starts, within the disconnect grace (1 s). A probe per dropped connection (1,000
    # probes of 1,000 engines each) took 6 s of controller CPU; a probe per 50 ms, 0.2 s
    deadline = time.monotonic() + 60
    while rc.ids and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not rc.ids, f"{len(rc.ids)} vanished engines still registered after 60 s"
    removal_cpu = cpu_seconds(proc) - cpu
    assert removal_cpu < 1.5, f"removing {N} vanished engines took {removal_cpu:.2f} s of CPU"


def test_engines_that_unregister_leave_at_once(controller):
    cluster, rc = controller
    stubs = StubProcess(cluster.connection_file("engine"), 50)
    try:
        stubs.start()
        rc.wait_for_engines(50, timeout=60)
    finally:
        stubs.stop(unregister=True)
    deadline = time.monotonic() + 30
    while rc.ids and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rc.ids == []


def test_a_controller_started_with_1024_open_files_takes_300_engines():
    """The usual soft limit of 1,024 open files is room for ~200 engines (5 connections
    each); the controller raises it to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cluster = ipp.Cluster(n=0)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # inherited by the controller
    try:
        cluster.start_controller_sync()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    stubs = None
    try:
        controller = psutil.Process(cluster.controller.pid)
        assert controller.rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
        rc = cluster.connect_client_sync()
        stubs = StubProcess(cluster.connection_file("engine"), 300)
        stubs.start()
        rc.wait_for_engines(300, timeout=120)
        assert controller.num_fds() > 1024
        rc.close()
    finally:
        if stubs is not None:
            stubs.stop()
        cluster.stop_cluster_sync()
