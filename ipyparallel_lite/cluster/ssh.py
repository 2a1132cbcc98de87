"""The SSH launchers: engines (``Cluster(engines="ssh")``) and the controller
(``Cluster(controller="ssh")``) on other hosts, started over ``ssh``.

Configured under ipyparallel's names::

    c.SSHEngineSetLauncher.engines = {"node1": 2, "alice@node2": 4}   # host -> engines
    c.SSHControllerLauncher.hostname = "head"
    c.SSHLauncher.ssh_cmd = ["ssh"]
    c.SSHLauncher.ssh_args = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    c.SSHLauncher.user = "alice"              # for hosts named without "user@"
    c.SSHLauncher.remote_python = "python3"   # or the whole engine_cmd / controller_cmd

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

A controller over ssh runs the same way (without the connection info: it makes it); one
more ssh session waits on its host for the client and engine connection files it writes
and copies them here, so clients and engines here find them as if it ran locally.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import psutil
from traitlets import Dict, Float, Integer, List, Unicode, validate

from ipyparallel_lite.applog import log_file_name
from ipyparallel_lite.cluster.launcher import (
    SSH_SESSION_ENV,
    BaseLauncher,
    LaunchContext,
    LauncherError,
    LocalProcessLauncher,
)
from ipyparallel_lite.connection import (
    CONNECTION_INFO_ENV,
    connection_file_path,
    is_loopback,
    write_connection_file,
)

#: the line a remote process prints first: ssh connected, and this is its pid
REMOTE_PID_MARK = "ipp-lite-remote-pid"
#: a remote script's exit code when its stdin ended before the connection info came
NO_CONNECTION_INFO = 3
#: what a loopback controller address means for another host, and what to do
LOOPBACK_ADVICE = ("a loopback address other hosts cannot reach. Start the controller on an "
                   "address they reach: Cluster(controller_ip='0.0.0.0') or controller_location= "
                   "(ipcluster-lite start --ip 0.0.0.0 or --location ADDR)")


def is_this_host(host: str) -> bool:
    """Whether ssh's ``[user@]host`` names this machine (so it reaches our loopback)."""
    name = host.rpartition("@")[2]
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(name, None)}
    except OSError:  # an ssh_config alias, say: not known to be this host
        return False
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
        """The remote pid once the remote script printed it (None before).

        It is among the first lines of the session's log (after what the remote login
        shell may print), whatever the process logs later.
        """
        if self.remote_pid is None and self.log_file is not None:
            try:
                with open(self.log_file, errors="replace") as log:
                    for line in islice(log, 50):
                        if line.startswith(REMOTE_PID_MARK):
                            self.remote_pid = int(line.split()[1])
                            break
            except OSError:  # not renamed to its pid yet
                pass
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
    """What every SSH launcher shares: how to reach a host, its ssh sessions (one per
    remote process), their remote pids, signals and stop, and the cluster file's record."""

    #: the start of its sessions' log file names
    log_prefix = "ipcluster"
    #: what one session starts, for error messages
    starts = "a process"

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
                   "its connection files.").tag(config=True)

    def __init__(self, processes: list[SSHProcess] | None = None,
                 context: LaunchContext | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.processes = processes or []
        self.context = context
        #: why it held something back or gave up (shown with its output)
        self.problem = ""

    # ---- commands ----------------------------------------------------------------------

    def target(self, host: str) -> str:
        """``user@host`` as ssh takes it."""
        return host if "@" in host or not self.user else f"{self.user}@{host}"

    def ssh_command(self, host: str, remote: str) -> list[str]:
        """The local command that runs the shell command line ``remote`` on ``host``."""
        return [*self.ssh_cmd, *self.ssh_args, self.target(host), remote]

    @property
    def profile_dir(self) -> Path:
        """The profile folder on the remote hosts."""
        assert self.context is not None
        return Path(self.remote_profile_dir or self.context.profile_dir)

    def remote_args(self) -> list[str]:
        """The cluster's arguments for the remote process, with the remote profile folder."""
        assert self.context is not None
        return [f"--profile-dir={self.profile_dir}" if a.startswith("--profile-dir=") else a
                for a in self.context.args]

    def remote_script(self, command: list[str], before: str = "") -> str:
        """The shell command line of a session: a POSIX sh script that prints its pid, runs
        ``before``, and becomes ``command``, watching its session as ``context`` wants."""
        assert self.context is not None
        end = "stdout" if self.context.daemonize else "stdin"
        script = (f"echo {REMOTE_PID_MARK} $$ && {before}"
                  f"export {SSH_SESSION_ENV}={end}; exec {shlex.join(command)}")
        return f"sh -c {shlex.quote(script)}"

    def open_sessions(self, hosts: list[str], remote: str) -> None:
        """One (not yet started) ssh session per host, each running ``remote``."""
        assert self.context is not None
        log_file = self.context.log_dir / log_file_name(self.log_prefix, self.context.cluster_id,
                                                        "{pid}")
        self.processes = [SSHProcess(self.ssh_command(host, remote), log_file,
                                     daemonize=self.context.daemonize, n=1, host=host,
                                     parent=self) for host in hosts]

    # ---- starting ----------------------------------------------------------------------

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
        self.started()

    def started(self) -> None:
        """What follows once every session runs its remote script."""

    def _wait_for_remote_pids(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        waiting = list(self.processes)
        while waiting:
            for proc in list(waiting):
                if proc.find_remote_pid() is not None:
                    waiting.remove(proc)
                elif not proc.running:
                    raise LauncherError(
                        f"{self.describe()} could not start {self.starts} on {proc.host}: "
                        f"`{shlex.join(proc.command)}` exited with code {proc.exit_code}. "
                        f"It said:\n{proc.output() or '(nothing)'}")
            if waiting and time.monotonic() > deadline:
                proc = waiting[0]
                raise LauncherError(
                    f"{self.describe()} could not start {self.starts} on {proc.host}: "
                    f"`{shlex.join(proc.command)}` did not start its remote command within "
                    f"{self.start_timeout:g}s. It said:\n{proc.output() or '(nothing)'}")
            time.sleep(0.02)

    def in_thread(self, target: Any) -> None:
        """Run ``target`` in a thread that the interpreter waits for at exit: a daemonizing
        ``ipcluster-lite start`` must not exit before its sessions are served."""
        threading.Thread(target=target, name=f"ipp-lite-{self.name}-{target.__name__}").start()

    # ---- watching and stopping --------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The local pid of its first ssh client."""
        return self.processes[0].pid if self.processes else None

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
        if self.problem:
            said.append(f"{self.describe()}: {self.problem}")
        return "\n".join(said)

    def remote_kill(self, pids_by_host: dict[str, list[int]], sig: int) -> None:
        """``kill -<sig>`` the remote pids, one ssh per host, all hosts at once."""
        name = signal.Signals(sig).name.removeprefix("SIG")
        running = [subprocess.Popen(
            self.ssh_command(host, f"kill -{name} {' '.join(map(str, pids))} 2>/dev/null"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for host, pids in pids_by_host.items() if pids]
        deadline = time.monotonic() + self.stop_timeout
        for proc in running:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:  # an unreachable host: its ssh client is killed
                proc.kill()
                proc.wait()

    def _remote_pids(self) -> dict[str, list[int]]:
        by_host: dict[str, list[int]] = {}
        for proc in self.processes:
            pid = proc.find_remote_pid()
            if pid is not None and proc.running:
                by_host.setdefault(proc.host, []).append(pid)
        return by_host

    def signal(self, sig: int) -> None:
        self.remote_kill(self._remote_pids(), sig)

    def kill(self) -> None:
        """SIGKILL the remote processes, and the ssh clients (whose end ends them too)."""
        self.remote_kill(self._remote_pids(), signal.SIGKILL)
        for proc in self.processes:
            proc.kill()

    def to_dict(self) -> dict:
        return {**super().to_dict(), "ssh_cmd": self.ssh_cmd, "ssh_args": self.ssh_args,
                "user": self.user, "processes": [p.to_dict() for p in self.processes]}

    @classmethod
    def from_dict(cls, d: dict, **kwargs: Any) -> SSHLauncher:
        launcher = cls(**kwargs)
        # the ssh options it was started with, not this process's configuration
        launcher.ssh_cmd = d.get("ssh_cmd", launcher.ssh_cmd)
        launcher.ssh_args = d.get("ssh_args", launcher.ssh_args)
        launcher.user = d.get("user", "")
        launcher.processes = [SSHProcess.from_dict(p, parent=launcher)
                              for p in d.get("processes", [])]
        launcher.n = d.get("n", 0)
        return launcher


class SSHEngineSetLauncher(SSHLauncher):
    """n engines over ssh, placed on the hosts of ``engines``: one ssh session each."""

    name = "ssh"
    max_engines = None
    log_prefix = "ipengine"
    starts = "an engine"

    engines = Dict(
        value_trait=Integer(), key_trait=Unicode(),
        help="Hosts and how many engines each runs ({'node1': 2, 'alice@node2': 4}). "
             "Engines fill the free places in this order (each host up to its count, "
             "counting the engines of the cluster's other SSH engine sets), then go round "
             "again.").tag(config=True)
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

    def hosts_for(self, n: int, busy: Counter[str] | None = None) -> list[str]:
        """The host of each of ``n`` engines, given how many run on each host already.

        Free places first, in the order of ``engines``; then round again over all.
        """
        if not self.engines:
            raise LauncherError(
                f"{self.describe()} has no hosts: set c.SSHEngineSetLauncher.engines, "
                "e.g. {'node1': 2, 'alice@node2': 4}")
        busy = busy or Counter()
        free = [h for h, count in self.engines.items() for _ in range(count - busy[h])]
        slots = [h for h, count in self.engines.items() for _ in range(count)]
        return [*free, *(slots[i % len(slots)] for i in range(max(n - len(free), 0)))][:n]

    @staticmethod
    def running_engines(cluster: Any) -> Counter[str]:
        """How many engines a cluster's SSH engine sets run on each host."""
        busy: Counter[str] = Counter()
        for launcher in (e for sets in getattr(cluster, "engines", {}).values() for e in sets):
            if isinstance(launcher, SSHEngineSetLauncher):
                busy.update(p.host for p in launcher.processes if p.running)
        return busy

    @classmethod
    def create(cls, context: LaunchContext, n: int = 0, **kwargs: Any) -> SSHEngineSetLauncher:
        launcher = cls(context=context, **kwargs)
        engine = [*(launcher.engine_cmd or [launcher.remote_python, "-m",
                                            "ipyparallel_lite.engine"]),
                  *launcher.remote_args(), *launcher.engine_args]
        # the connection info comes as the session's first line, into the environment
        read_info = (f"IFS= read -r {CONNECTION_INFO_ENV} || exit {NO_CONNECTION_INFO}; "
                     f"export {CONNECTION_INFO_ENV}; ")
        hosts = launcher.hosts_for(n, cls.running_engines(kwargs.get("parent")))
        launcher.open_sessions(hosts, launcher.remote_script(engine, read_info))
        launcher.n = n
        return launcher

    def started(self) -> None:
        self.in_thread(self._send_connection_info)

    def _send_connection_info(self) -> None:
        """Give each session the controller's engine connection info, once it is there.

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
            self.problem = (f"the controller's connection file {path} did not appear within "
                            f"{self.start_timeout:g}s")
            for proc in self.processes:
                proc.close_stdin()
            return
        address = info["interface"].partition("://")[2]
        line = json.dumps(info, separators=(",", ":"))
        hosts = {p.host for p in self.processes}
        unreachable = {h for h in hosts if not is_this_host(h)} if is_loopback(address) else set()
        if unreachable:  # said before the remote scripts exit for it
            self.problem = (f"no engines started on {', '.join(sorted(unreachable))}: the "
                            f"controller listens on {address}, {LOOPBACK_ADVICE}")
        for proc in self.processes:
            if proc.host in unreachable:
                proc.close_stdin()
            else:
                proc.send(line, close=self.context.daemonize)


class SSHControllerLauncher(SSHLauncher):
    """The controller on another host, over ssh; its connection files are copied back.

    The client and engine connection files the controller writes on its host are read
    there with one more ssh session and written here (mode 0600), so that clients here
    and engines (also ones started by ``SSHEngineSetLauncher``) find them.
    """

    name = "ssh"
    log_prefix = "ipcontroller"
    starts = "the controller"

    hostname = Unicode("", help="Host the controller runs on ('host' or 'user@host').").tag(
        config=True)
    controller_cmd = List(Unicode(), help="Command that starts the controller on its host "
                                          "(default: remote_python -m "
                                          "ipyparallel_lite.controller).").tag(config=True)
    controller_args = List(Unicode(), help="Arguments added to the controller's command line.").tag(
        config=True)

    #: the files copied back: those for clients and engines, never its own keypair
    copied = ("engine", "client")

    def remote_file(self, kind: str) -> Path:
        assert self.context is not None
        return connection_file_path(kind, cluster_id=self.context.cluster_id,
                                    profile_dir_path=self.profile_dir)

    @classmethod
    def create(cls, context: LaunchContext, n: int = 0, **kwargs: Any) -> SSHControllerLauncher:
        launcher = cls(context=context, **kwargs)
        if not launcher.hostname:
            raise LauncherError(f"{launcher.describe()} has no host: set "
                                "c.SSHControllerLauncher.hostname")
        controller = [*(launcher.controller_cmd or [launcher.remote_python, "-m",
                                                    "ipyparallel_lite.controller"]),
                      *launcher.remote_args(), *launcher.controller_args]
        # files of an earlier controller of this cluster id must not be copied back
        stale = " ".join(shlex.quote(str(launcher.remote_file(k))) for k in launcher.copied)
        launcher.open_sessions([launcher.hostname],
                               launcher.remote_script(controller, f"rm -f {stale}; "))
        return launcher

    def started(self) -> None:
        if self.context is not None and self.context.daemonize:
            self.processes[0].close_stdin()
        self.in_thread(self._copy_connection_files)

    def describe(self) -> str:
        return "the ssh controller launcher"

    def _copy_connection_files(self) -> None:
        """Wait on the controller's host for its files, and write them here.

        One session waits there (a loop bounded by start_timeout and by the controller's
        life) and prints both; if that fails, or the
        controller's address is loopback on another host, the controller is stopped and
        ``problem`` says why, which the cluster reports.
        """
        assert self.context is not None
        files = [shlex.quote(str(self.remote_file(k))) for k in self.copied]
        rounds = max(int(self.start_timeout / 0.05), 1)
        pid = self.processes[0].find_remote_pid()
        wait = (f"i=0; while [ ! -f {files[0]} ] || [ ! -f {files[1]} ]; do i=$((i+1)); "
                f"[ $i -gt {rounds} ] && exit 4; kill -0 {pid} || exit 5; sleep 0.05; done; "
                f"cat {files[0]}; echo; echo {REMOTE_PID_MARK}-next-file; cat {files[1]}")
        command = self.ssh_command(self.hostname, f"sh -c {shlex.quote(wait)}")
        try:
            out = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=self.start_timeout + 30)
            parts = out.stdout.split(f"{REMOTE_PID_MARK}-next-file")
            infos = [json.loads(part) for part in parts] if out.returncode == 0 else []
        except (subprocess.TimeoutExpired, ValueError) as e:
            out, infos = None, []
            self.problem = f"reading its connection files failed: {e}"
        if len(infos) != len(self.copied):
            said = out.stderr.strip() if out is not None else ""
            self.problem = self.problem or (
                f"its connection files {', '.join(files)} could not be read on "
                f"{self.hostname}: `{shlex.join(command)}` exited with code "
                f"{out.returncode if out else None}" + (f": {said}" if said else ""))
        else:
            address = infos[0]["interface"].partition("://")[2]
            if is_loopback(address) and not is_this_host(self.hostname):
                self.problem = (f"the controller on {self.hostname} listens on {address}, "
                                f"{LOOPBACK_ADVICE}")
        if self.problem:
            self.stop()
            return
        for kind, info in zip(self.copied, infos, strict=True):  # the client's file last
            write_connection_file(self.context.connection_file(kind), info)
