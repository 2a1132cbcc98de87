"""The controller under bad input and failures, and the cluster's security and life cycle."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import stat
import time
import uuid

import psutil
import pytest
import zmq

import ipyparallel_lite as ipp
from ipyparallel_lite.connection import load_connection_file, make_session, url


def client_info(cluster) -> dict:
    return load_connection_file(cluster.connection_file("client"))


def controller_log(cluster) -> str:
    return cluster.controller.log_file.read_text(errors="replace")


@pytest.mark.parametrize("channel", ["registration", "mux", "task", "control"])
def test_bad_messages_are_dropped_and_logged(cluster, rc, channel, raw_socket):
    """Wrong signature, truncated multipart, garbage, unknown msg_type: dropped, others served."""
    info = client_info(cluster)
    ctx = zmq.Context()
    try:
        sock = raw_socket(ctx, info, channel)
        evil = make_session("not-the-key")
        good = make_session(info["key"])
        target = [rc._engines[0].encode()] if channel in ("mux", "control") else []
        sock.send_multipart(evil.serialize(evil.msg("apply_request", {}), ident=target))
        sock.send_multipart([*target, b"<IDS|MSG>", b"sig", b"{}"])
        sock.send_multipart([os.urandom(64), os.urandom(3)])
        sock.send_multipart([b""])
        sock.send_multipart(good.serialize(good.msg("bogus_request", {}), ident=target))
        time.sleep(0.3)
        assert rc[:].apply_sync(abs, -3) == [3, 3]
        assert rc.load_balanced_view().apply_sync(abs, -4) == 4
        status = rc.queue_status()
        assert [(status[e]["queue"], status[e]["tasks"]) for e in (0, 1)] == [(0, 0), (0, 0)]
    finally:
        ctx.destroy(linger=0)
    log = controller_log(cluster)
    assert "failed verification" in log
    assert "truncated" in log or "no <IDS|MSG>" in log


@pytest.mark.parametrize("channel", ["shell", "control", "hb_pong"])
def test_bad_messages_on_engine_sockets_are_dropped(cluster, rc, channel, raw_socket):
    """The engine-facing sockets survive garbage from a peer that is no engine."""
    info = load_connection_file(cluster.connection_file("engine"))
    ctx = zmq.Context()
    try:
        sock = raw_socket(ctx, info, channel)
        evil = make_session("not-the-key")
        good = make_session(info["key"])
        sock.send_multipart(evil.serialize(evil.msg("engine_ready", {}), ident=[]))
        sock.send_multipart([os.urandom(32)])
        sock.send_multipart([b"t", b"client", b"<IDS|MSG>", b"sig"])
        sock.send_multipart(good.serialize(good.msg("apply_reply", {}), ident=[b"t", b"nobody"]))
        sock.send_multipart(good.serialize(good.msg("engine_ready", {}), ident=[]))  # not registered
        time.sleep(0.3)
        assert rc[:].apply_sync(abs, -3) == [3, 3]
        assert rc.ids == [0, 1]
    finally:
        ctx.destroy(linger=0)


def test_unknown_query_gets_an_error_reply(cluster, rc):
    with pytest.raises(ipp.RemoteError, match="does not know the message type"):
        rc.transport.query("frobnicate_request", {})
    with pytest.raises(ipp.RemoteError, match="no engine"):
        rc.transport.query("queue_request", {"targets": [99]})


def test_security_files_and_interface(cluster, ipython_dir):
    info = client_info(cluster)
    assert info["interface"] == "tcp://127.0.0.1"
    assert info["signature_scheme"] == "hmac-sha256" and len(info["key"]) >= 32
    security = cluster.profile_dir / "security"
    files = list(security.iterdir())
    assert files
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path.name} has mode {oct(mode)}"
    assert stat.S_IMODE(security.stat().st_mode) == 0o700
    controller = psutil.Process(info["controller_pid"])
    for conn in controller.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN:
            assert conn.laddr.ip == "127.0.0.1"


def thread_niceness(pid: int) -> dict[int, int]:
    """The niceness of each thread of process ``pid`` (Linux: field 19 of its stat)."""
    nice = {}
    for thread in psutil.Process(pid).threads():
        with open(f"/proc/{pid}/task/{thread.id}/stat") as f:
            nice[thread.id] = int(f.read().rpartition(")")[2].split()[16])
    return nice


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="per-thread niceness is Linux's")
def test_the_controllers_python_yields_to_its_devices(cluster, own_cluster):
    """The Hub's record-keeping waits for the engines and clients on a busy machine; the
    devices in C that relay their messages do not (app.python_nice)."""
    pid = client_info(cluster)["controller_pid"]
    nice = thread_niceness(pid)
    assert nice.pop(pid) == 10  # the main thread runs the controller's Python
    assert len(nice) >= 3 and set(nice.values()) == {0}, nice  # the devices, zmq's I/O threads

    kept, _ = own_cluster(1, controller_args=["--IPController.python_nice=0"])
    assert set(thread_niceness(kept.controller.pid).values()) == {0}


def test_version_skew_admitted_by_warn_is_reported_to_clients(own_cluster, raw_socket):
    """With version_check=warn the controller admits a skewed engine (the default refuses it:
    test_versions.py); clients connecting then name it plainly."""
    cluster, rc = own_cluster(2, controller_args=["--version-check=warn"])
    info = load_connection_file(cluster.connection_file("engine"))
    session = make_session(info["key"])
    ctx = zmq.Context()
    fake = str(uuid.uuid4())
    try:
        reg = raw_socket(ctx, info, "registration")
        session.send(reg, "registration_request",
                     {"uuid": fake, "info": {"python": "2.7.18", "ipyparallel_lite": "0.0.1", "hostname": "old-box"}})
        assert reg.poll(5000)
        reply = session.recv(reg, mode=0)[1]["content"]
        assert reply["status"] == "ok"
        conn = reply["connection_info"]
        sockets = []
        for channel in ("shell", "control"):
            s = ctx.socket(zmq.DEALER)
            s.identity = fake.encode()
            s.linger = 0
            s.connect(url(conn, channel))
            session.send(s, "engine_ready", {})
            sockets.append(s)
        with pytest.warns(RuntimeWarning, match=r"Engine \d+ on old-box runs other versions than "
                          r"this client \(python 2\.7\.18 there"):
            client = ipp.Client(cluster.connection_file("client"))
            client.close()
        session.send(reg, "unregistration_request", {"id": reply["id"]})
        assert reg.poll(5000)
    finally:
        ctx.destroy(linger=0)
    deadline = time.monotonic() + 5
    while reply["id"] in rc.ids and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rc.ids == [0, 1]


def test_engine_death_fails_its_tasks_fast(own_cluster):
    cluster, client = own_cluster(2)
    pid0 = client[0].apply_sync(os.getpid)
    direct = client[0].apply_async(time.sleep, 30)
    lview = client.load_balanced_view()
    with lview.temp_flags(targets=[0]):
        balanced = lview.apply_async(time.sleep, 30)
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(pid0, signal.SIGKILL)
    with pytest.raises(ipp.EngineError, match="Engine 0"):
        direct.get(timeout=15)
    with pytest.raises(ipp.EngineError):
        balanced.get(timeout=15)
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 5
    while 0 in client.ids and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.ids == [1]
    assert client.load_balanced_view().apply_sync(abs, -1) == 1
    with pytest.raises(ipp.EngineError, match="No engine with id 0"):
        client[0]


def test_retries_survive_engine_death(own_cluster):
    cluster, client = own_cluster(2)
    pids = client[:].apply_sync(os.getpid)
    lview = client.load_balanced_view()

    def sleep_and_pid(t):
        import os
        import time

        time.sleep(t)
        return os.getpid()

    with lview.temp_flags(retries=1, targets=None):
        ar = lview.apply_async(sleep_and_pid, 1.0)
    time.sleep(0.3)
    running_on = ar.metadata["engine_id"]
    if running_on is None:
        running_on = client.queue_status(verbose=True)
        running_on = next(e for e in (0, 1) if running_on[e]["tasks"])
    os.kill(pids[running_on], signal.SIGKILL)
    assert ar.get(timeout=20) == pids[1 - running_on]


def test_cluster_lifecycle_and_profile_lookup(ipython_dir):
    cluster = ipp.Cluster(n=0, profile="lifecycle", cluster_id="")
    cluster.start_cluster_sync()
    try:
        client = ipp.Client(profile="lifecycle")
        assert client.ids == []
        with pytest.raises(ipp.NoEnginesRegistered, match="No engines are registered"):
            client[:]
        with pytest.raises(ipp.TimeoutError, match="0 of 1 engines"):
            client.wait_for_engines(1, timeout=0.2)
        t0 = time.monotonic()
        cluster.start_engines_sync(1)
        client.wait_for_engines(1, timeout=30)
        ready = time.monotonic() - t0
        assert client[0].apply_sync(abs, -2) == 2
        cluster.stop_engines_sync()
        deadline = time.monotonic() + 10
        while client.ids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.ids == []
        client.close()
        assert ready < 30
    finally:
        cluster.stop_cluster_sync()
    assert not cluster.connection_file("client").exists()
    assert not cluster.cluster_file.exists()
    with pytest.raises(FileNotFoundError, match="Is a cluster running"):
        ipp.Client(profile="lifecycle")


def test_async_context_manager():
    async def main():
        async with ipp.Cluster(n=1) as client:
            return client.ids, client[0].apply_sync(platform.python_version)

    ids, version = asyncio.run(main())
    assert ids == [0] and version == platform.python_version()


def test_context_manager_and_hub_shutdown():
    cluster = ipp.Cluster(n=1)
    with cluster as client:
        assert client.ids == [0]
        pid = json.loads(cluster.connection_file("client").read_text())["controller_pid"]
        client.shutdown(hub=True)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the controller did not stop on shutdown_request"
            time.sleep(0.05)
    assert cluster.engine_count == 0


def test_engine_with_no_controller_fails_clearly(tmp_path):
    info = {"interface": "tcp://127.0.0.1", "key": "k", "ports": {"registration": 1}}
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(info))
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "ipyparallel_lite.engine", f"--file={path}",
         "--EngineApp.registration_timeout=0.5"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "No answer from the controller" in proc.stderr


def test_engine_removed_while_stalled_exits_when_it_wakes(own_cluster):
    # a stopped engine misses its heartbeats and is removed; once it runs again the
    # controller hears it and tells it, and it exits instead of living on unseen
    cluster, client = own_cluster(2, controller_args=["--hb-period=0.2", "--ControllerApp.hb_max_misses=3"])
    pid1 = client[1].apply_sync(os.getpid)
    os.kill(pid1, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while 1 in client.ids:
            assert time.monotonic() < deadline, "the stopped engine was not removed"
            time.sleep(0.05)
    finally:
        os.kill(pid1, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid1) and psutil.Process(pid1).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the removed engine lives on"
        time.sleep(0.1)
    assert client.ids == [0]
    assert client.load_balanced_view().apply_sync(abs, -2) == 2


def test_engines_exit_when_their_controller_is_gone(own_cluster):
    cluster, client = own_cluster(1, engine_args=["--EngineApp.controller_timeout=1"])
    engine_pid = client[0].apply_sync(os.getpid)
    os.kill(client.connection_info["controller_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while psutil.pid_exists(engine_pid) and psutil.Process(engine_pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the engine outlived its controller"
        time.sleep(0.1)


def test_waiting_client_gets_an_error_when_the_controller_dies(own_cluster):
    cluster, client = own_cluster(1)
    client.controller_timeout = 0.5
    ar = client[0].apply_async(time.sleep, 30)
    time.sleep(0.2)
    os.kill(client.connection_info["controller_pid"], signal.SIGKILL)
    with pytest.raises(ipp.EngineError, match="controller is gone"):
        ar.get(timeout=15)


class DeafClient(ipp.Client):
    """A client that never hears notifications, like one whose subscription was late."""

    def _connect(self, info, timeout):
        super()._connect(info, timeout)
        self._notification.unsubscribe(b"")


def test_waiting_for_engines_survives_lost_notifications():
    cluster = ipp.Cluster(n=0)
    cluster.start_cluster_sync()
    try:
        client = DeafClient(cluster.connection_file("client"))
        cluster.start_engines_sync(1)
        client.wait_for_engines(1, timeout=30)
        assert client.ids == [0]
        client.close()
    finally:
        cluster.stop_cluster_sync()


def test_timers_that_fired_are_not_kept():
    # the store's flush and the heartbeat re-arm themselves: a handle kept per firing
    # grew the controller by about five objects a second for its whole life
    from ipyparallel_lite.controller.server import Controller

    async def main() -> int:
        controller = Controller(make_session("timers"), flush_interval=0.002)
        controller.bind()
        controller.start()
        await asyncio.sleep(0.5)
        kept = len(controller._timers)
        controller.stop()
        return kept

    assert asyncio.run(main()) <= 3
