"""The SSH launcher against a real OpenSSH server on 127.0.0.1.

The module's set-up makes a host key and a user key in a temporary folder, writes an
``sshd_config`` (a free port, 127.0.0.1 only, keys from that folder) and runs Debian's
``/usr/sbin/sshd -D`` with it. Engines started through it are processes of the sshd's
sessions, not of the launcher; they do real work, stop with the cluster (also from
another process, through the cluster file), and exit when their owner is killed. An
unreachable host or a refused key is one clear error naming the launcher, the ssh command
and what ssh said, within seconds, with nothing left running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import free_port, ipcluster, wait_gone
from traitlets.config import Config

import ipyparallel_lite as ipp
from ipyparallel_lite.cluster.launcher import LauncherError
from ipyparallel_lite.cluster.ssh import SSHControllerLauncher, SSHEngineSetLauncher

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parent.parent
SSHD = "/usr/sbin/sshd"



def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE}
    except psutil.NoSuchProcess:
        return set()


class Sshd:
    """A running sshd and how to reach it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.key = _keygen(folder / "user_key")
        self.other_key = _keygen(folder / "not_authorized_key")
        host_key = _keygen(folder / "host_key")
        authorized = folder / "authorized_keys"
        shutil.copy(folder / "user_key.pub", authorized)
        authorized.chmod(0o600)
        root = os.geteuid() == 0
        config = folder / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"AuthorizedKeysFile {authorized}", f"PidFile {folder / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            *(["PermitRootLogin prohibit-password"] if root else []), ""]))
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation folder
        self.log = folder / "sshd.log"
        self.process = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(self.log)])
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {self.log.read_text()}") from None
                time.sleep(0.05)

    def ssh_args(self, key: Path | None = None, port: int | None = None) -> list[str]:
        return ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                "-i", str(key or self.key), "-p", str(port or self.port)]

    def config(self, ipython_dir: str, **ssh_args: Any) -> Config:
        """What a Cluster needs to start 2 engines on this host through this sshd."""
        c = Config()
        c.SSHLauncher.ssh_args = self.ssh_args(**ssh_args)
        c.SSHEngineSetLauncher.engines = {"127.0.0.1": 2}
        # a remote session starts with a clean environment: name the code under test
        env = ["env", f"PYTHONPATH={ROOT}", f"IPYTHONDIR={ipython_dir}", sys.executable, "-m"]
        c.SSHEngineSetLauncher.engine_cmd = [*env, "ipyparallel_lite.engine"]
        c.SSHControllerLauncher.controller_cmd = [*env, "ipyparallel_lite.controller"]
        c.SSHControllerLauncher.hostname = "127.0.0.1"
        return c

    def sessions(self) -> set[int]:
        """Processes the sshd runs for its sessions."""
        return _descendants(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        left = server.sessions()
        server.stop()
        for pid in wait_gone(left, timeout=5):  # none expected: the tests check it
            os.kill(pid, signal.SIGKILL)


def test_ssh_cluster_runs_engines_through_sshd(sshd, tmp_path, ipython_dir):
    cluster = ipp.Cluster(n=2, engines="ssh", profile_dir=tmp_path / "p", load_profile=False,
                          config=sshd.config(ipython_dir), engine_timeout=120)
    with cluster as rc:
        [[launcher]] = cluster.engines.values()
        assert isinstance(launcher, SSHEngineSetLauncher) and launcher.n == 2
        assert launcher.command[:1] == ["ssh"] and "127.0.0.1" in launcher.command
        pids = set(rc[:].apply_sync(os.getpid))
        assert len(pids) == 2
        # started by sshd's sessions: not by this process, nor by the launcher's ssh clients
        assert pids <= sshd.sessions()
        ssh_clients = {p.pid for p in launcher.processes}
        assert not pids & set().union(*(_descendants(c) for c in ssh_clients))
        assert pids == {p.remote_pid for p in launcher.processes}
        assert rc[:].apply_sync(lambda x: x * 2, 21) == [42, 42]
        # the key came through the ssh session's stdin: no command line shows it
        key = json.loads(cluster.connection_file("engine").read_text())["key"]
        for pid in pids | ssh_clients:
            assert key not in " ".join(psutil.Process(pid).cmdline())
    assert not wait_gone(pids | ssh_clients, timeout=20)


def test_controller_over_ssh_and_its_files_copied_back(sshd, tmp_path, ipython_dir):
    """Controller and engines over ssh; the controller's host keeps its files in another
    profile folder, so the client here works only with the copies the launcher made."""
    config = sshd.config(ipython_dir)
    remote_profile = tmp_path / "remote_profile"
    config.SSHLauncher.remote_profile_dir = str(remote_profile)
    cluster = ipp.Cluster(n=2, engines="ssh", controller="ssh", profile_dir=tmp_path / "p",
                          load_profile=False, config=config, engine_timeout=120)
    with cluster as rc:
        controller = cluster.controller
        assert isinstance(controller, SSHControllerLauncher)
        remote_pid = controller.processes[0].remote_pid
        assert remote_pid in sshd.sessions()
        for kind in ("client", "engine"):
            local = cluster.connection_file(kind)
            assert local.stat().st_mode & 0o777 == 0o600
            remote = remote_profile / "security" / local.name
            assert json.loads(local.read_text()) == json.loads(remote.read_text())
        assert not (tmp_path / "p" / "security" / f"ipcontroller-{cluster.cluster_id}-curve.json"
                    ).exists()
        pids = set(rc[:].apply_sync(os.getpid))
        assert len(pids) == 2 and pids <= sshd.sessions()
        assert rc[:].apply_sync(lambda x: x + 1, 1) == [2, 2]
        sessions = sshd.sessions()
    assert not wait_gone(sessions, timeout=20)
    assert not cluster.connection_file("client").exists()


def test_loopback_controller_on_another_host_is_refused(sshd, tmp_path, ipython_dir):
    config = sshd.config(ipython_dir)
    config.SSHLauncher.ssh_args = [*config.SSHLauncher.ssh_args, "-o", "HostName=127.0.0.1"]
    config.SSHControllerLauncher.hostname = "controller-elsewhere"
    config.SSHLauncher.remote_profile_dir = str(tmp_path / "remote_profile")
    cluster = ipp.Cluster(n=0, controller="ssh", profile_dir=tmp_path / "p", load_profile=False,
                          config=config)
    sessions_before = sshd.sessions()
    with pytest.raises(ipp.ClusterError) as e:
        cluster.start_cluster_sync()
    message = str(e.value)
    assert "the controller exited before it was ready" in message
    assert ("the ssh controller launcher: the controller on controller-elsewhere listens on "
            "127.0.0.1, a loopback address other hosts cannot reach") in message
    assert not wait_gone(sshd.sessions() - sessions_before, timeout=10)
    assert not cluster.connection_file("client").exists()


def test_interrupt_reaches_the_remote_engines(sshd, tmp_path, ipython_dir):
    cluster = ipp.Cluster(n=2, engines="ssh", profile_dir=tmp_path / "p", load_profile=False,
                          config=sshd.config(ipython_dir), engine_timeout=120)
    with cluster as rc:
        ar = rc[:].apply_async(time.sleep, 60)
        time.sleep(1.0)
        cluster.signal_engines_sync(signal.SIGINT)
        with pytest.raises(ipp.error.CompositeError, match="KeyboardInterrupt"):
            ar.get(30)
        assert rc[:].apply_sync(lambda: 1) == [1, 1]


def test_engines_exit_with_their_owner(sshd, tmp_path, ipython_dir):
    """kill -9 of the process that started the cluster: its ssh sessions' engines go too."""
    config = sshd.config(ipython_dir)
    script = (
        "import os, sys, ipyparallel_lite as ipp\n"
        "from traitlets.config import Config\n"
        f"config = Config({config!r})\n"
        f"c = ipp.Cluster(n=2, engines='ssh', profile_dir={str(tmp_path / 'p')!r}, "
        "load_profile=False, config=config, engine_timeout=120)\n"
        "rc = c.start_and_connect_sync()\n"
        "print(*rc[:].apply_sync(os.getpid), flush=True)\n"
        "sys.stdin.read()\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    pids: set[int] = set()
    try:
        pids = {int(p) for p in owner.stdout.readline().split()}
        assert len(pids) == 2 and pids <= sshd.sessions()
        owned = _descendants(owner.pid)
        owner.kill()
        owner.wait(10)
        assert not wait_gone(pids | owned, timeout=20)
    finally:
        owner.kill()
        owner.wait(10)
        for pid in wait_gone(pids, timeout=0.1):
            os.kill(pid, signal.SIGKILL)


def test_cli_daemonized_ssh_cluster_stops_from_the_cluster_file(sshd, tmp_path):
    """``ipcluster-lite start --engines ssh --daemonize``; ``engines -n 1`` puts one more on
    the host with a free place; ``stop`` from another process: the cluster file's
    launchers find the ssh sessions and their remote engines."""
    ipdir = tmp_path / "ipython"
    profile = ipdir / "profile_default"
    profile.mkdir(parents=True)
    config = sshd.config(str(ipdir))
    config.SSHEngineSetLauncher.engines = {"127.0.0.1": 2, "localhost": 1}  # both: our sshd
    (profile / "ipcluster_config.py").write_text(
        f"c.SSHLauncher.ssh_args = {config.SSHLauncher.ssh_args!r}\n"
        f"c.SSHEngineSetLauncher.engines = {config.SSHEngineSetLauncher.engines!r}\n"
        f"c.SSHEngineSetLauncher.engine_cmd = {config.SSHEngineSetLauncher.engine_cmd!r}\n")
    cli = partial(ipcluster, str(ipdir), timeout=150, env={"PYTHONPATH": str(ROOT)})

    before = sshd.sessions()
    out = cli("start", "--engines", "ssh", "-n", "2", "--daemonize")
    assert out.returncode == 0, out.stderr
    started: set[int] = set()
    try:
        out = cli("engines", "-n", "1")
        assert out.returncode == 0 and "3 engines now" in out.stdout, out.stderr
        [cluster_file] = (profile / "security").glob("cluster-*.json")
        sets = list(json.loads(cluster_file.read_text())["engines"].values())
        assert [[launcher["launcher"] for launcher in v] for v in sets] == [["ssh"], ["ssh"]]
        processes = [p for [launcher] in sets for p in launcher["processes"]]
        assert [p["host"] for p in processes] == ["127.0.0.1", "127.0.0.1", "localhost"]
        remote = {p["remote_pid"] for p in processes}
        clients = {p["pid"] for p in processes}
        started = sshd.sessions() - before
        assert len(remote) == 3 and remote <= started
        assert all(psutil.pid_exists(p) for p in clients)
        time.sleep(1.0)  # the daemonized engines outlive the commands that started them
        assert all(psutil.pid_exists(p) for p in remote)
        out = cli("stop")
        assert out.returncode == 0 and "3 engines and the controller" in out.stdout, out.stderr
        assert not wait_gone(remote | clients | started, timeout=20)
    finally:
        cli("stop")
        for pid in wait_gone(started, timeout=0.1):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("case", ["closed port", "refused key"])
def test_unreachable_host_or_refused_key_is_one_clear_error(sshd, tmp_path, ipython_dir, case):
    bad = {"port": free_port()} if case == "closed port" else {"key": sshd.other_key}
    cluster = ipp.Cluster(n=2, engines="ssh", profile_dir=tmp_path / "p", load_profile=False,
                          config=sshd.config(ipython_dir, **bad))
    me = psutil.Process().pid
    before, sessions_before = _descendants(me), sshd.sessions()
    t0 = time.monotonic()
    with pytest.raises(LauncherError) as e:
        cluster.start_and_connect_sync()
    assert time.monotonic() - t0 < 10
    message = str(e.value)
    assert message.startswith("the ssh launcher could not start an engine on 127.0.0.1: `ssh ")
    assert "exited with code 255" in message
    said = "Connection refused" if case == "closed port" else "Permission denied"
    assert said in message.split("It said:", 1)[1]
    assert not wait_gone((_descendants(me) - before) | (sshd.sessions() - sessions_before),
                          timeout=10)
    assert not cluster.cluster_file.exists()


def test_hosts_fill_in_order_and_none_is_an_error(tmp_path):
    launcher = SSHEngineSetLauncher(engines={"a": 2, "bob@b": 1})
    assert launcher.hosts_for(2) == ["a", "a"]
    assert launcher.hosts_for(5) == ["a", "a", "bob@b", "a", "a"]
    # engines already running on a host take its places first
    assert launcher.hosts_for(1, Counter(a=2)) == ["bob@b"]
    assert launcher.hosts_for(3, Counter(a=1)) == ["a", "bob@b", "a"]
    assert SSHEngineSetLauncher(user="al").target("a") == "al@a"
    with pytest.raises(LauncherError, match=r"ssh launcher has no hosts: set "
                                            r"c\.SSHEngineSetLauncher\.engines"):
        SSHEngineSetLauncher().hosts_for(1)
    with pytest.raises(ValueError, match="at least one engine"):
        SSHEngineSetLauncher(engines={"a": 0})


def test_loopback_controller_is_not_given_to_another_host(sshd, tmp_path, ipython_dir):
    """A host that is not this one (an ssh alias here, though it leads to our sshd) would
    connect to its own 127.0.0.1: its engines are not started, and the error says why."""
    config = sshd.config(ipython_dir)
    config.SSHLauncher.ssh_args = [*config.SSHLauncher.ssh_args, "-o", "HostName=127.0.0.1"]
    config.SSHEngineSetLauncher.engines = {"node-elsewhere": 2}
    cluster = ipp.Cluster(n=2, engines="ssh", profile_dir=tmp_path / "p", load_profile=False,
                          config=config)
    sessions_before = sshd.sessions()
    t0 = time.monotonic()
    with pytest.raises(ipp.ClusterError) as e:
        cluster.start_and_connect_sync()
    assert time.monotonic() - t0 < 30
    message = str(e.value)
    assert "the ssh launcher exited with code 3" in message
    assert ("no engines started on node-elsewhere: the controller listens on 127.0.0.1, a "
            "loopback address other hosts cannot reach") in message
    assert "controller_ip='0.0.0.0'" in message
    assert not wait_gone(sshd.sessions() - sessions_before, timeout=10)
