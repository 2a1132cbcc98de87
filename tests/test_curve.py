"""CurveZMQ: an encrypted cluster works end to end, and nothing unencrypted reaches it.

The cluster is started with ``controller_args=["--curve"]`` and a short heartbeat period,
so the heartbeat test proves that encrypted heartbeats keep engines registered.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import sys
import time

import psutil
import pytest
import zmq

import ipyparallel_lite as ipp
from ipyparallel_lite import error
from ipyparallel_lite.cluster.launcher import LocalProcessLauncher
from ipyparallel_lite.connection import (
    CURVE_SERVERKEY,
    load_connection_file,
    make_session,
    require_curve,
)

HB_PERIOD = 0.5  # engines missing 5 beats (2.5 s) would be removed


@pytest.fixture(scope="module")
def curve_cluster():
    c = ipp.Cluster(n=2, controller_args=["--curve", f"--hb-period={HB_PERIOD}"])
    rc = c.start_and_connect_sync()
    try:
        rc.wait_for_engines(2, timeout=60)
        yield c, rc
    finally:
        rc.close()
        c.stop_cluster_sync()


def test_encrypted_cluster_runs_direct_load_balanced_and_execute(curve_cluster):
    _, rc = curve_cluster
    assert rc.connection_info[CURVE_SERVERKEY]
    dv = rc[:]
    assert dv.apply_sync(lambda x: x * 2, 21) == [42, 42]
    lview = rc.load_balanced_view()
    assert lview.map_sync(lambda x: x + 1, range(20)) == list(range(1, 21))
    # what %px does: execute on every engine, stdout comes back through the iopub relay
    ar = dv.execute("print('secret', 6 * 7)", silent=False, block=True)
    deadline = time.monotonic() + 10
    while ar.stdout != ["secret 42\n"] * 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ar.stdout == ["secret 42\n"] * 2


def test_encrypted_heartbeats_keep_engines_registered(curve_cluster):
    _, rc = curve_cluster
    ids = list(rc.ids)
    time.sleep(HB_PERIOD * 5 * 2.5)  # well past the window in which a silent engine is removed
    assert rc.ids == ids
    assert len(set(rc[:].apply_sync(os.getpid))) == 2


def test_a_plain_peer_gets_no_answer_and_the_controller_keeps_serving(curve_cluster, raw_socket):
    cluster, rc = curve_cluster
    info = load_connection_file(cluster.connection_file("client"))
    session = make_session(info["key"])  # it even knows the HMAC key, but not CURVE
    ctx = zmq.Context()
    try:
        # a send may block: each failed handshake drops the socket's only pipe, until
        # the reconnection makes another; a send zmq keeps is no answer either
        socks = {ch: raw_socket(ctx, info, ch, keyed=False, sndtimeo=2000)
                 for ch in ("registration", "mux", "task", "control")}
        with contextlib.suppress(zmq.Again):
            session.send(socks["registration"], "connection_request", {})
        for ch in ("mux", "task", "control"):
            with contextlib.suppress(zmq.Again):
                session.send(socks[ch], "apply_request", {}, ident=[] if ch == "task" else None)
        poller = zmq.Poller()
        for sock in socks.values():
            poller.register(sock, zmq.POLLIN)
        assert poller.poll(2000) == []
    finally:
        ctx.destroy(linger=0)
    assert rc[:].apply_sync(lambda: "still serving") == ["still serving"] * 2


def test_a_client_with_the_wrong_server_key_times_out_with_a_clear_error(curve_cluster):
    cluster, _ = curve_cluster
    info = load_connection_file(cluster.connection_file("client"))
    info[CURVE_SERVERKEY] = zmq.curve_keypair()[0].decode()
    with pytest.raises(error.TimeoutError, match="No answer from the controller"):
        ipp.Client(connection_info=info, timeout=2)


def test_connection_files_are_private_and_carry_only_the_public_key(curve_cluster):
    cluster, _ = curve_cluster
    keys = set()
    for kind in ("client", "engine"):
        path = cluster.connection_file(kind)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        info = load_connection_file(path)
        assert len(info[CURVE_SERVERKEY]) == 40  # Z85 text of a 32-byte public key
        assert not [k for k in info if "secret" in k]
        keys.add(info[CURVE_SERVERKEY])
    assert len(keys) == 1
    # the controller's own keypair, for --restore: private as well
    own = cluster.connection_file("curve")
    assert stat.S_IMODE(own.stat().st_mode) == 0o600
    assert {json.loads(own.read_text())["public"]} == keys


def test_the_encrypted_controller_listens_on_127_0_0_1_only(curve_cluster):
    cluster, rc = curve_cluster
    controller = psutil.Process(rc.connection_info["controller_pid"])
    listening = [c for c in controller.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    ports = set(rc.connection_info["ports"].values())
    ports |= set(load_connection_file(cluster.connection_file("engine"))["ports"].values())
    assert {c.laddr.port for c in listening} == ports
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_the_cluster_trait_starts_an_encrypted_controller():
    c = ipp.Cluster(n=0, enable_curve=True)
    try:
        c.start_controller_sync()
        assert "--curve" in psutil.Process(c.controller.pid).cmdline()
        assert load_connection_file(c.connection_file("client"))[CURVE_SERVERKEY]
    finally:
        c.stop_cluster_sync()


def square(x):
    return x * x


@pytest.mark.timeout(180)
def test_a_restored_encrypted_controller_keeps_its_keypair(ipython_dir):
    """Killed and restarted with --restore, the controller takes back its keypair: the
    client connected before the kill gets its results from the new controller, and the
    old engine registers again (both need the same server key to reach it)."""
    cluster = ipp.Cluster(n=1, cluster_id=f"curve-restore-{os.getpid()}",
                          controller_args=["--curve", "--sqlitedb"])
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(1, timeout=60)
        old_engine = next(la for ls in cluster.engines.values() for la in ls)
        done = rc.load_balanced_view().apply_async(square, 12)
        assert done.get(30) == 144
        time.sleep(1.0)  # the store writes on a timer (0.2 s)
        before = load_connection_file(cluster.connection_file("client"))

        os.kill(cluster.controller.pid, signal.SIGKILL)
        cluster.controller.process.wait(10)
        restored = LocalProcessLauncher(
            [sys.executable, "-m", "ipyparallel_lite.controller", *cluster._common_args(),
             "--curve", "--sqlitedb", "--restore"],
            cluster.profile_dir / "log" / f"restored-{cluster.cluster_id}.log",
        )
        restored.start()
        cluster.controller = restored  # stop_cluster_sync stops this one

        deadline = time.monotonic() + 30
        while (not cluster.connection_file("client").exists()
               or load_connection_file(cluster.connection_file("client"))["controller_pid"]
               != restored.pid):
            assert time.monotonic() < deadline, "the restored controller wrote no connection file"
            time.sleep(0.05)
        after = load_connection_file(cluster.connection_file("client"))
        assert after[CURVE_SERVERKEY] == before[CURVE_SERVERKEY]
        assert rc.result_status(done.msg_ids)["completed"] == done.msg_ids  # a Hub query
        deadline = time.monotonic() + 60
        while True:  # the old engine is told that the controller was restarted, and rejoins
            try:
                assert rc[0].apply_sync(os.getpid) == old_engine.pid
                break
            except (error.EngineError, error.NoEnginesRegistered):  # not back yet
                assert time.monotonic() < deadline, "the old engine did not rejoin"
                time.sleep(0.2)
        # direct requests reach the engine through the mux device as soon as its socket
        # reconnects, which may be before it has registered again: wait for that too
        while "registered again" not in old_engine.log_file.read_text():
            assert time.monotonic() < deadline, "the old engine did not register again"
            time.sleep(0.2)
    finally:
        rc.close()
        cluster.stop_cluster_sync()


def test_libzmq_without_curve_is_named_in_one_error(monkeypatch):
    monkeypatch.setattr(zmq, "has", lambda capability: capability != "curve")
    with pytest.raises(RuntimeError, match="built without CURVE"):
        require_curve()
