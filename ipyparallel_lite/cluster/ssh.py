"""The SSH launcher: engines on other hosts, started over ``ssh`` (``Cluster(engines="ssh")``).

Configured under ipyparallel's names::

    c.SSHEngineSetLauncher.engines = {"node1": 2, "alice@node2": 4}   # host -> engines
    c.SSHLauncher.ssh_cmd = ["ssh"]
    c.SSHLauncher.ssh_args = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    c.SSHLauncher.user = "alice"              # for hosts named without "user@"
    c.SSHLauncher.remote_python = "python3"   # or the whole c.SSHEngineSetLauncher.engine_cmd

Each engine is one ``ssh`` child process of this machine, running on its host a small
POSIX ``sh`` script that prints its pid, reads one line from its stdin into
``IPP_LITE_CONNECTION_INFO`` and ``exec``\\ s the engine command. The launcher writes the
controller's engine connection info (the JSON of its engine connection file) into that
stdin as soon as the controller has written the file, so

- the remote hosts need no shared file system and no copy of any file;
- the key is never on a command line, where ``ps`` on either host would show it;
- the ssh handshakes overlap with the controller's start.

No orphans: the engine watches its ssh session (``IPP_LITE_SSH_SESSION``, see
:func:`ipyparallel_lite.cluster.launcher.watch_parent`) and exits when the session ends.
Started for a foreground owner, the launcher keeps the session's stdin open and the
engine exits at its end of file, so the engines go when the owner goes, even killed;
daemonized, the launcher closes the stdin and the engine exits when the ``ssh`` client
is gone. Signals (an interrupt, a stop) go to the remote pids with ``ssh host kill``, so
an engine stops cleanly; killing also kills the local ``ssh`` clients.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from traitlets import Dict, Float, Integer, List, Unicode, validate

from ipyparallel_lite.applog import log_file_name
from ipyparallel_lite.cluster.launcher import (
    SSH_SESSION_ENV,
    BaseLauncher,
    LaunchContext,
    LauncherError,
    LocalProcessLauncher,
)
from ipyparallel_lite.connection import CONNECTION_INFO_ENV, is_loopback

#: the line a remote process prints first: ssh connected, and this is its pid
REMOTE_PID_MARK = "ipp-lite-remote-pid"
#: a remote script's exit code when its stdin ended before the connection info came
NO_CONNECTION_INFO = 3


def is_this_host(host: str) -> bool:
    """Whether ssh's ``[user@]host`` names this machine (so it reaches our loopback)."""
    name = host.rpartition("@")[2]
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(name, None)}
    except OSError:  # an ssh_config alias, say: not known to be this host
        return False
    import psutil

    ours = {a.address for nic in psutil.net_if_addrs().values() for a in nic}
    return any(is_loopback(a) or a in ours for a in addresses)


class SSHProcess(LocalProcessLauncher):
    """One local ``ssh`` client whose remote command prints its pid first.

    Its stdin is a pipe: the connection info is written into it.
    """

    stdin = subprocess.PIPE

    def __init__(self, *args: Any, host: str = "", remote_pid: int | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.host = host
        self.remote_pid = remote_pid

    def find_remote_pid(self) -> int | None:
        """The remote pid once the remote script printed it (None before)."""
        if self.remote_pid is None:
            for line in self.output(lines=200).splitlines():
                if line.startswith(REMOTE_PID_MARK):
                    self.remote_pid = int(line.split()[1])
                    break
        return self.remote_pid

    def send(self, line: str, close: bool) -> None:
        """Write ``line`` into the ssh session's stdin; close it afterwards if asked."""
        if self.process is None or self.process.stdin is None:
            return
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
            if close:
                self.process.stdin.close()
        except (BrokenPipeError, ValueError):  # ssh is gone: its exit is reported
            pass

    def close_stdin(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass

    def to_dict(self) -> dict:
        return {**super().to_dict(), "host": self.host, "remote_pid": self.find_remote_pid()}

    @classmethod
    def from_dict(cls, d: dict, **kwargs: Any) -> SSHProcess:
        return cls(d["args"], Path(d["log_file"]), daemonize=d.get("daemonize", False),
                   pid=d.get("pid"), create_time=d.get("create_time"), n=d.get("n", 1),
                   host=d.get("host", ""), remote_pid=d.get("remote_pid"), **kwargs)


class SSHLauncher(BaseLauncher):
    """What every SSH launcher shares: how to reach a host, and remote signals."""

    ssh_cmd = List(Unicode(), default_value=["ssh"], help="The ssh command.").tag(config=True)
    ssh_args = List(Unicode(), default_value=["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"],
                    help="Arguments of every ssh command (options, -i key, -p port). Do not add "
                         "-t: a terminal would echo the connection info.").tag(config=True)
    user = Unicode("", help="User on the remote hosts, for hosts named without 'user@' "
                            "(default: ssh's own choice).").tag(config=True)
    remote_python = Unicode("python3", help="Python on the remote hosts (with ipyparallel_lite "
                                            "installed).").tag(config=True)
    remote_profile_dir = Unicode(
        "", help="Profile folder on the remote hosts (default: the local profile's path; "
                 "created there if absent).").tag(config=True)
    start_timeout = Float(
        30.0, help="Seconds an ssh session may take to start, and the controller to write "
                   "its connection file.").tag(config=True)

    def target(self, host: str) -> str:
        """``user@host`` as ssh takes it."""
        return host if "@" in host or not self.user else f"{self.user}@{host}"

    def ssh_command(self, host: str, remote: str) -> list[str]:
        """The local command that runs the shell command line ``remote`` on ``host``."""
        return [*self.ssh_cmd, *self.ssh_args, self.target(host), remote]

    def remote_kill(self, pids_by_host: dict[str, list[int]], sig: int,
                    timeout: float = 10.0) -> None:
        """``kill -<sig>`` the remote pids, one ssh per host, all hosts at once."""
        name = signal.Signals(sig).name.removeprefix("SIG")
        running = [subprocess.Popen(
            self.ssh_command(host, f"kill -{name} {' '.join(map(str, pids))} 2>/dev/null"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for host, pids in pids_by_host.items() if pids]
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:  # an unreachable host: its ssh client is killed
                proc.kill()
                proc.wait()


class SSHEngineSetLauncher(SSHLauncher):
    """n engines over ssh, placed on the hosts of ``engines``: one ssh session each."""

    name = "ssh"
    max_engines = None
    log_prefix = "ipengine"

    engines = Dict(
        value_trait=Integer(), key_trait=Unicode(),
        help="Hosts and how many engines each runs ({'node1': 2, 'alice@node2': 4}). "
             "A cluster of n engines fills them in this order, each up to its count, and "
             "goes round again if n is larger.").tag(config=True)
    engine_cmd = List(Unicode(), help="Command that starts an engine on a remote host "
                                      "(default: remote_python -m ipyparallel_lite.engine).").tag(
        config=True)
    engine_args = List(Unicode(), help="Arguments added to every engine's command line.").tag(
        config=True)

    @validate("engines")
    def _positive_counts(self, proposal: Any) -> Any:
        bad = {h: c for h, c in proposal["value"].items() if c < 1}
        if bad:
            raise ValueError(f"SSHEngineSetLauncher.engines: each host needs at least one "
                             f"engine, not {bad}")
        return proposal["value"]

    def __init__(self, processes: list[SSHProcess] | None = None,
                 context: LaunchContext | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.processes = processes or []
        self.context = context
        self.n = len(self.processes)
        self._feeder: threading.Thread | None = None
        #: why connection info was not sent to some hosts (shown with the output)
        self.refused = ""

    # ---- creating and starting -------------------------------------------------------

    def hosts_for(self, n: int) -> list[str]:
        """The host of each of ``n`` engines."""
        if not self.engines:
            raise LauncherError(
                f"{self.describe()} has no hosts: set c.SSHEngineSetLauncher.engines, "
                "e.g. {'node1': 2, 'alice@node2': 4}")
        slots = [host for host, count in self.engines.items() for _ in range(count)]
        return [slots[i % len(slots)] for i in range(n)]

    def remote_command(self, args: list[str]) -> str:
        """The shell command line each ssh session runs (a POSIX sh script)."""
        if self.remote_profile_dir:
            args = [f"--profile-dir={self.remote_profile_dir}" if a.startswith("--profile-dir=")
                    else a for a in args]
        engine = [*(self.engine_cmd or [self.remote_python, "-m", "ipyparallel_lite.engine"]),
                  *args, *self.engine_args]
        watch = "stdout" if self.context is not None and self.context.daemonize else "stdin"
        script = (f"echo {REMOTE_PID_MARK} $$ && IFS= read -r {CONNECTION_INFO_ENV} "
                  f"|| exit {NO_CONNECTION_INFO}; export {CONNECTION_INFO_ENV} "
                  f"{SSH_SESSION_ENV}={watch}; exec {shlex.join(engine)}")
        return f"sh -c {shlex.quote(script)}"

    @classmethod
    def create(cls, context: LaunchContext, n: int = 0, **kwargs: Any) -> SSHEngineSetLauncher:
        launcher = cls(context=context, **kwargs)
        remote = launcher.remote_command(list(context.args))
        log_file = context.log_dir / log_file_name(cls.log_prefix, context.cluster_id, "{pid}")
        launcher.processes = [
            SSHProcess(launcher.ssh_command(host, remote), log_file, daemonize=context.daemonize,
                       n=1, host=host, parent=launcher)
            for host in launcher.hosts_for(n)]
        launcher.n = n
        return launcher

    def start(self) -> None:
        """Start every ssh session; return once each runs its remote script.

        A session that fails (host unreachable, key refused) stops them all and raises
        LauncherError with its command and what ssh said.
        """
        started: list[SSHProcess] = []
        try:
            for proc in self.processes:
                proc.start()
                started.append(proc)
            self._wait_for_remote_pids()
        except BaseException:
            for proc in started:
                proc.kill()
            raise
        self._feeder = threading.Thread(target=self._send_connection_info,
                                        name="ipp-lite-ssh-connection-info")
        self._feeder.start()

    def _wait_for_remote_pids(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        waiting = list(self.processes)
        while waiting:
            for proc in list(waiting):
                if proc.find_remote_pid() is not None:
                    waiting.remove(proc)
                elif not proc.running:
                    raise LauncherError(
                        f"{self.describe()} could not start an engine on {proc.host}: "
                        f"`{shlex.join(proc.command)}` exited with code {proc.exit_code}. "
                        f"It said:\n{proc.output() or '(nothing)'}")
            if waiting and time.monotonic() > deadline:
                proc = waiting[0]
                raise LauncherError(
                    f"{self.describe()} could not start an engine on {proc.host}: "
                    f"`{shlex.join(proc.command)}` did not start its remote command within "
                    f"{self.start_timeout:g}s. It said:\n{proc.output() or '(nothing)'}")
            time.sleep(0.02)

    def _send_connection_info(self) -> None:
        """Thread: give each session the controller's engine connection info, once it is there.

        Foreground, the stdin stays open (the engines exit at its end: when we are gone);
        daemonized, it is closed. No connection file in time, or a loopback controller
        address for another host: the stdin is closed, and the remote script exits with
        NO_CONNECTION_INFO.
        """
        assert self.context is not None
        path = self.context.connection_file("engine")
        deadline = time.monotonic() + self.start_timeout
        info = None
        while info is None and time.monotonic() < deadline and self.running:
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):  # not there yet
                time.sleep(0.02)
        if info is None:
            self.refused = (f"the controller's connection file {path} did not appear within "
                            f"{self.start_timeout:g}s")
            for proc in self.processes:
                proc.close_stdin()
            return
        address = info["interface"].partition("://")[2]
        line = json.dumps(info, separators=(",", ":"))
        hosts = {p.host for p in self.processes}
        unreachable = {h for h in hosts if not is_this_host(h)} if is_loopback(address) else set()
        if unreachable:  # said before the remote scripts exit for it
            self.refused = (
                f"no engines started on {', '.join(sorted(unreachable))}: the controller "
                f"listens on {address}, a loopback address other hosts cannot reach. Start "
                "it on an address they reach: Cluster(controller_ip='0.0.0.0') or "
                "controller_location= (ipcluster-lite start --ip 0.0.0.0 or --location ADDR)")
        for proc in self.processes:
            if proc.host in unreachable:
                proc.close_stdin()
            else:
                proc.send(line, close=self.context.daemonize)

    # ---- watching and stopping --------------------------------------------------------

    @property
    def command(self) -> list[str]:
        ended = [p for p in self.processes if not p.running]
        return (ended or self.processes)[0].command if self.processes else []

    @property
    def running(self) -> bool:
        return any(p.running for p in self.processes)

    @property
    def exit_code(self) -> int | None:
        if self.running:
            return None
        codes = [p.exit_code for p in self.processes]
        return next((c for c in codes if c), codes[0] if codes else None)

    def output(self, lines: int = 20) -> str:
        said = [f"[{p.host}, log {p.log_file}]\n{p.output(lines)}" for p in self.processes
                if p.output(lines)]
        if self.refused:
            said.append(f"{self.describe()}: {self.refused}")
        return "\n".join(said)

    def _remote_pids(self) -> dict[str, list[int]]:
        by_host: dict[str, list[int]] = {}
        for proc in self.processes:
            pid = proc.find_remote_pid()
            if pid is not None and proc.running:
                by_host.setdefault(proc.host, []).append(pid)
        return by_host

    def signal(self, sig: int) -> None:
        self.remote_kill(self._remote_pids(), sig, timeout=self.stop_timeout)

    def kill(self) -> None:
        """SIGKILL the remote engines, and the ssh clients (their end ends the engines too)."""
        self.remote_kill(self._remote_pids(), signal.SIGKILL, timeout=self.stop_timeout)
        for proc in self.processes:
            proc.kill()

    def to_dict(self) -> dict:
        return {**super().to_dict(), "ssh_cmd": self.ssh_cmd, "ssh_args": self.ssh_args,
                "user": self.user, "processes": [p.to_dict() for p in self.processes]}

    @classmethod
    def from_dict(cls, d: dict, **kwargs: Any) -> SSHEngineSetLauncher:
        launcher = cls(**kwargs)
        # the ssh options it was started with, not this process's configuration
        launcher.ssh_cmd = d.get("ssh_cmd", launcher.ssh_cmd)
        launcher.ssh_args = d.get("ssh_args", launcher.ssh_args)
        launcher.user = d.get("user", "")
        launcher.processes = [SSHProcess.from_dict(p, parent=launcher)
                              for p in d.get("processes", [])]
        launcher.n = d.get("n", len(launcher.processes))
        return launcher

