"""--ip / location: where the controller listens, and the address its connection files give
clients and engines (never a loopback address when it listens on every interface)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time

import psutil
import pytest

import ipyparallel_lite as ipp
from ipyparallel_lite.connection import connect_address, load_connection_file, reachable_address

pytestmark = pytest.mark.timeout(120)


def listening_ips(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def run_cluster(tmp_path, **kwargs) -> tuple[ipp.Cluster, dict, set[str]]:
    """Start a 1-engine cluster, run a task on it; its connection file and listening ips."""
    cluster = ipp.Cluster(n=1, profile_dir=tmp_path / "p", load_profile=False, **kwargs)
    with cluster as rc:
        assert rc[:].apply_sync(os.getpid) == [e.pid for v in cluster.engines.values() for e in v]
        files = [load_connection_file(cluster.connection_file(k)) for k in ("client", "engine")]
        assert files[0]["interface"] == files[1]["interface"]
        ips = listening_ips(cluster.controller.pid)
    return cluster, files[0], ips


def test_reachable_address_is_not_loopback():
    address = reachable_address()
    assert not ipaddress.ip_address(address).is_loopback
    assert connect_address("0.0.0.0") == connect_address("*") == address
    assert connect_address("127.0.0.1") == "127.0.0.1"
    assert connect_address("0.0.0.0", "head.example.org") == "head.example.org"


def test_default_listens_on_loopback_only(tmp_path):
    _, info, ips = run_cluster(tmp_path)
    assert info["interface"] == "tcp://127.0.0.1" and ips == {"127.0.0.1"}


def test_every_interface_gives_engines_the_hosts_address(tmp_path):
    _, info, ips = run_cluster(tmp_path, controller_ip="0.0.0.0")
    assert ips == {"0.0.0.0"}
    assert info["interface"] == f"tcp://{reachable_address()}" == f"tcp://{info['location']}"
    assert not ipaddress.ip_address(info["location"]).is_loopback


def test_one_chosen_interface(tmp_path):
    address = reachable_address()
    _, info, ips = run_cluster(tmp_path, controller_ip=address)
    assert ips == {address} and info["interface"] == f"tcp://{address}"


def test_location_names_the_address_outright(tmp_path):
    _, info, ips = run_cluster(tmp_path, controller_ip="0.0.0.0", controller_location="localhost")
    assert ips == {"0.0.0.0"} and info["interface"] == "tcp://localhost"


def test_ipcontroller_cli_ip_and_location(tmp_path):
    """``ipcontroller-lite --ip --location`` by itself: the file says where to connect."""
    profile = tmp_path / "p"
    proc = subprocess.Popen([sys.executable, "-m", "ipyparallel_lite.controller",
                             f"--profile-dir={profile}", "--ip=*", "--location=127.0.0.2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client_file = profile / "security" / "ipcontroller-client.json"
        deadline = time.monotonic() + 30
        while not client_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client_file.exists(), proc.stderr.read() if proc.poll() is not None else "no file"
        info = load_connection_file(client_file)
        assert info["interface"] == "tcp://127.0.0.2" and listening_ips(proc.pid) == {"0.0.0.0"}
        rc = ipp.Client(client_file)  # 127.0.0.2 reaches the wildcard bind
        try:
            assert rc.ids == [] and rc.queue_status()["unassigned"] == 0
        finally:
            rc.close()
    finally:
        proc.terminate()
        proc.wait(30)
