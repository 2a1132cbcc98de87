"""Launchers: how controller and engine processes get started, watched and stopped.

:class:`BaseLauncher` is the seam every way of starting processes plugs into (in the
spirit of jupyter_client's ``KernelProvisionerBase``). Its unit is one *set* of
processes started together: a controller, one local engine, or one ``mpiexec -n 4``
running four engines. A launcher can ``start()``, ``stop()``, ``signal(sig)``, report
whether it is ``running`` (``poll()`` / ``exit_code``), show its recent ``output()``
(its ``log_file``), and write itself to a dict (``to_dict()`` / ``from_dict()``) so
that the cluster file lets ``ipcluster-lite stop`` or ``Cluster.from_file`` find it
again, whatever its kind.

Launchers are selected by name from the entry point groups
``ipyparallel_lite.engine_launchers`` and ``ipyparallel_lite.controller_launchers``
(:func:`find_launcher_class`); a ``"module:Class"`` path or a class works too.

This module also has the local ones (child processes of this machine):
``LocalControllerLauncher`` and ``LocalEngineLauncher``, configured under
ipyparallel's names (``c.LocalControllerLauncher.controller_cmd``,
``c.LocalEngineLauncher.engine_args``, ``c.LocalProcessLauncher.stop_timeout``).

A child's stdout and stderr go to its log file, ``log/<ipcontroller|ipengine>-<cluster
id>-<pid>.log`` in the profile: what it logs and whatever it prints before logging
works (an import error, say) end up in one file per process.

Children started for a foreground owner watch it (``IPP_LITE_PARENT_PID``) and exit
when it is gone, so no engine outlives the notebook or script that started it, even
when that process is killed.
"""

from __future__ import annotations

import importlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import psutil
from traitlets import Float, List, Unicode
from traitlets.config import LoggingConfigurable

from ipyparallel_lite.applog import log_file_name
from ipyparallel_lite.connection import connection_file_path
from ipyparallel_lite.processes import process_alive, process_start_time

PARENT_PID_ENV = "IPP_LITE_PARENT_PID"
#: set in a process started over ssh: which end of its ssh session it watches, "stdin"
#: (exit at its end of file: the launcher's owner is gone) or "stdout" (exit when it
#: hangs up: the ssh client is gone)
SSH_SESSION_ENV = "IPP_LITE_SSH_SESSION"
ENGINE_LAUNCHERS = "ipyparallel_lite.engine_launchers"
CONTROLLER_LAUNCHERS = "ipyparallel_lite.controller_launchers"

#: the launchers this package ships, by entry point group and name. pyproject.toml
#: declares the same entry points; listing them here too lets a source checkout (or an
#: install whose metadata predates a launcher) find them without reinstalling.
BUILTIN_LAUNCHERS: dict[str, dict[str, str]] = {
    ENGINE_LAUNCHERS: {
        "local": "ipyparallel_lite.cluster.launcher:LocalEngineLauncher",
        "mpi": "ipyparallel_lite.cluster.mpi:MPIEngineLauncher",
        "ssh": "ipyparallel_lite.cluster.ssh:SSHEngineSetLauncher",
        "slurm": "ipyparallel_lite.cluster.batch:SlurmEngineSetLauncher",
        "pbs": "ipyparallel_lite.cluster.batch:PBSEngineSetLauncher",
    },
    CONTROLLER_LAUNCHERS: {
        "local": "ipyparallel_lite.cluster.launcher:LocalControllerLauncher",
        "ssh": "ipyparallel_lite.cluster.ssh:SSHControllerLauncher",
    },
}


class ClusterError(RuntimeError):
    """A cluster that could not start, with what its processes said."""


class LauncherError(ClusterError):
    """A launcher whose command failed: names the launcher, the command and its output."""


def watch_parent() -> None:
    """In a child process: exit when the process that started us is gone.

    Started through a relay (``mpiexec``), our parent is the relay, not the owner:
    then the owner's pid and start time are watched instead. Started over ssh
    (``IPP_LITE_SSH_SESSION``), the ssh session is watched: see :func:`watch_ssh_session`.
    """
    session = os.environ.get(SSH_SESSION_ENV)
    if session:
        watch_ssh_session(session)
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return
    parent_pid = int(parent)
    if os.getppid() == parent_pid:
        def alive() -> bool:
            return os.getppid() == parent_pid
    else:
        started = process_start_time(parent_pid)

        def alive() -> bool:
            return started is not None and process_alive(parent_pid, started)

    def watch() -> None:
        while True:
            if not alive():
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, name="ipp-lite-parent-watch", daemon=True).start()


def watch_ssh_session(end: str) -> None:
    """In a process started over ssh: exit when its session ends.

    ``end`` is ``"stdin"`` (exit at end of file on stdin: the launcher keeps it open
    while its owner runs) or ``"stdout"`` (exit when stdout hangs up: sshd closes it
    when the ssh client is gone). Copies of the descriptors are watched, so the kernel
    may redirect its own stdin and stdout.
    """
    import select

    if end not in ("stdin", "stdout"):
        raise ValueError(f"{SSH_SESSION_ENV} must be 'stdin' or 'stdout', not {end!r}")
    fd = os.dup(0 if end == "stdin" else 1)
    poller = select.poll()
    poller.register(fd, select.POLLIN if end == "stdin" else 0)  # hang-ups are always reported

    def watch() -> None:
        while True:
            for _, events in poller.poll():
                if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    os._exit(0)
                if events & select.POLLIN and not os.read(fd, 65536):
                    os._exit(0)

    threading.Thread(target=watch, name="ipp-lite-ssh-session-watch", daemon=True).start()


@dataclass(frozen=True)
class LaunchContext:
    """What a launcher knows of the cluster it starts processes for."""

    profile_dir: Path
    cluster_id: str
    #: the cluster's command-line arguments for this kind of process (profile, cluster
    #: id, log level, ...); the launcher puts them on its command line
    args: tuple[str, ...] = ()
    #: let the processes outlive the Python process that starts them
    daemonize: bool = False

    @property
    def log_dir(self) -> Path:
        return self.profile_dir / "log"

    def connection_file(self, kind: str) -> Path:
        """The controller's ``client`` or ``engine`` connection file of this cluster."""
        return connection_file_path(kind, cluster_id=self.cluster_id,
                                    profile_dir_path=self.profile_dir)


class BaseLauncher(LoggingConfigurable):
    """One set of processes started together: the interface every launcher implements.

    A subclass implements ``create``, ``start``, ``signal``, ``running``, ``exit_code``,
    ``output``, ``to_dict`` and ``from_dict``; it may override ``begin_stop`` and
    ``kill`` when a signal is not how its processes stop (a batch job is cancelled).
    ``start`` raises :class:`LauncherError` when the launch itself fails.
    """

    #: the name it is selected by (its entry point's name); set by find_launcher_class
    name: ClassVar[str] = ""
    #: how many engines one launcher of this kind runs at most (None: any number, so
    #: ``Cluster.start_engines(n)`` makes one launcher for all n)
    max_engines: ClassVar[int | None] = None

    stop_timeout = Float(3.0, help="Seconds between asking to stop (SIGTERM) and killing.").tag(
        config=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        #: engines this launcher runs (0 for a controller)
        self.n = 0
        #: stopped on purpose: its exit is no crash, and it is not restarted
        self.stop_requested = False
        #: where its processes' output goes, if it has one file for it
        self.log_file: Path | None = None

    # ---- what each launcher implements -----------------------------------------------

    @classmethod
    def create(cls, context: LaunchContext, n: int = 0, **kwargs: Any) -> BaseLauncher:
        """A launcher, not started yet, for ``n`` engines (0: the controller)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the processes; raise LauncherError when that fails."""
        raise NotImplementedError

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the processes (nothing when they are gone)."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the processes run (for one read back from a file too)."""
        raise NotImplementedError

    @property
    def exit_code(self) -> int | None:
        """How it ended (negative: the signal that ended it); None while running or unknown."""
        raise NotImplementedError

    def output(self, lines: int = 20) -> str:
        """The last ``lines`` lines its processes wrote ("" when there is nothing)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """What the cluster file records; subclasses add their state to this."""
        return {"launcher": self.name, "class": f"{type(self).__module__}:{type(self).__name__}",
                "n": self.n}

    @classmethod
    def from_dict(cls, d: dict, **kwargs: Any) -> BaseLauncher:
        """The launcher ``to_dict()`` wrote, able to poll, signal and stop its processes."""
        raise NotImplementedError

    # ---- shared behaviour ------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The pid of its main local process, if it has one."""
        return None

    @property
    def command(self) -> list[str]:
        """The command it runs (``mpiexec -n 4 ...``, ``sbatch job.sh``), for error messages."""
        return []

    def poll(self) -> int | None:
        """None while running, else its exit code (as ``Popen.poll``)."""
        return None if self.running else self.exit_code

    def begin_stop(self) -> None:
        """Ask the processes to stop, without waiting (SIGTERM)."""
        self.stop_requested = True
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        """Stop the processes at once (SIGKILL)."""
        self.signal(signal.SIGKILL)

    def stop(self, timeout: float | None = None) -> None:
        """``begin_stop``, then ``kill`` after ``timeout`` seconds (default ``stop_timeout``)."""
        timeout = self.stop_timeout if timeout is None else timeout
        self.begin_stop()
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.running:
            self.kill()

    def describe(self) -> str:
        """How error messages name it: ``the mpi engine launcher``."""
        return f"the {self.name or type(self).__name__} launcher"


class LocalProcessLauncher(BaseLauncher):
    """One child process on this machine, its output in a log file.

    ``log_file`` may contain ``{pid}``: the file is renamed to carry the child's pid
    once it runs.
    """

    #: the start of the log file name of such a process
    log_prefix = "ipcluster"
    #: what the child reads: nothing (DEVNULL), or a pipe this process writes (PIPE)
    stdin: ClassVar[int] = subprocess.DEVNULL

    def __init__(self, args: list[str], log_file: str | Path, *, env: dict | None = None,
                 daemonize: bool = False, pid: int | None = None, create_time: float | None = None,
                 n: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.args = args
        self.log_file = Path(log_file)
        self.env = env or {}
        self.daemonize = daemonize
        self.n = n
        self.process: subprocess.Popen | None = None
        self._pid = pid
        #: when the process started: a pid reused by another process has another start time
        self.create_time = create_time

    def command_line(self, args: list[str]) -> list[str]:
        """The whole command line, given the cluster's arguments for this process."""
        return list(args)

    @classmethod
    def create(cls, context: LaunchContext, n: int = 0, **kwargs: Any) -> LocalProcessLauncher:
        """A launcher of ``command_line(context.args)``, logging to the profile's log/."""
        launcher = cls([], context.log_dir / log_file_name(cls.log_prefix, context.cluster_id, "{pid}"),
                       daemonize=context.daemonize, n=n, **kwargs)
        launcher.args = launcher.command_line(list(context.args))
        return launcher

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else self._pid

    @property
    def command(self) -> list[str]:
        return list(self.args)

    def start(self) -> None:
        env = {**os.environ, **self.env}
        if not self.daemonize:
            env[PARENT_PID_ENV] = str(os.getpid())
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        starting = self.log_file.with_name(f".starting-{secrets.token_hex(4)}.log")
        try:
            with open(starting, "wb") as log:
                self.process = subprocess.Popen(
                    self.args, stdout=log, stderr=subprocess.STDOUT, stdin=self.stdin,
                    env=env, start_new_session=self.daemonize, close_fds=True,
                )
        except OSError as e:  # no such program, not executable
            starting.unlink(missing_ok=True)
            raise LauncherError(f"{self.describe()} could not run `{' '.join(self.args)}`: {e}") from None
        # the child keeps writing to the renamed file: its descriptor follows the rename
        self.log_file = self.log_file.with_name(self.log_file.name.format(pid=self.process.pid))
        os.replace(starting, self.log_file)
        self.create_time = process_start_time(self.process.pid)
        self.log.debug("started pid %d: %s (log %s)", self.process.pid, " ".join(self.args),
                       self.log_file)

    @property
    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self._pid is None:
            return False
        # read back from a file: the pid must still run the command we started
        if not process_alive(self._pid, self.create_time):
            return False
        try:
            cmdline = psutil.Process(self._pid).cmdline()
        except psutil.Error:
            return False
        return cmdline[1:] == list(self.args)[1:]

    def signal(self, sig: int) -> None:
        if self.running and self.pid is not None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)  # a SIGKILLed child ends at once; reap it
            return
        # another's child (read back from a file): it is gone once it is a zombie
        deadline = time.monotonic() + 10
        while self.running and time.monotonic() < deadline:
            time.sleep(0.02)

    def output(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def to_dict(self) -> dict:
        return {**super().to_dict(), "args": self.args, "log_file": str(self.log_file),
                "pid": self.pid, "daemonize": self.daemonize, "create_time": self.create_time}

    @classmethod
    def from_dict(cls, d: dict, **kwargs: Any) -> LocalProcessLauncher:
        return cls(d["args"], Path(d["log_file"]), daemonize=d.get("daemonize", False), pid=d.get("pid"),
                   create_time=d.get("create_time"), n=d.get("n", 0), **kwargs)


class LocalControllerLauncher(LocalProcessLauncher):
    """The controller, as a child process."""

    name = "local"
    log_prefix = "ipcontroller"
    controller_cmd = List(Unicode(), default_value=[sys.executable, "-m", "ipyparallel_lite.controller"],
                          help="Command that starts a controller.").tag(config=True)
    controller_args = List(Unicode(), help="Arguments added to every controller's command line.").tag(
        config=True)

    def command_line(self, args: list[str]) -> list[str]:
        return [*self.controller_cmd, *args, *self.controller_args]


class LocalEngineLauncher(LocalProcessLauncher):
    """One engine, as a child process (n engines: n launchers, each stopped or restarted
    on its own)."""

    name = "local"
    log_prefix = "ipengine"
    max_engines = 1
    engine_cmd = List(Unicode(), default_value=[sys.executable, "-m", "ipyparallel_lite.engine"],
                      help="Command that starts an engine.").tag(config=True)
    engine_args = List(Unicode(), help="Arguments added to every engine's command line.").tag(
        config=True)

    def command_line(self, args: list[str]) -> list[str]:
        return [*self.engine_cmd, *args, *self.engine_args]


# ---- finding launchers by name ---------------------------------------------------------


def _kind(group: str) -> str:
    return "engine" if group == ENGINE_LAUNCHERS else "controller"


def launcher_names(group: str) -> dict[str, str]:
    """``name -> "module:Class"`` of every launcher of ``group``: ours and installed plugins."""
    names = dict(BUILTIN_LAUNCHERS.get(group, {}))
    names.update({ep.name: ep.value for ep in entry_points(group=group)})
    return names


def _import_class(path: str) -> type:
    """The object at ``"module:Class"``."""
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def find_launcher_class(group: str, name: str | type) -> type[BaseLauncher]:
    """The launcher class selected by ``name``: an entry point's name of ``group``
    (case-insensitive), a ``"module:Class"`` path, or the class itself.

    An unknown name raises ValueError listing the names there are.
    """
    if isinstance(name, type):
        if not issubclass(name, BaseLauncher):
            raise TypeError(f"a {_kind(group)} launcher must subclass BaseLauncher, not {name!r}")
        return name
    names = launcher_names(group)
    by_lower = {k.lower(): k for k in names}
    key = by_lower.get(str(name).lower())
    path = names[key] if key is not None else name
    if key is None and ":" not in str(name):
        raise ValueError(
            f"unknown {_kind(group)} launcher {name!r}; available: {', '.join(sorted(names))} "
            "(or a 'module:Class' path)")
    try:
        cls = _import_class(path)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{_kind(group)} launcher {name!r} ({path}) cannot be loaded: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, BaseLauncher)):
        raise TypeError(f"{_kind(group)} launcher {name!r} ({path}) is not a BaseLauncher subclass")
    if key is not None and "name" not in vars(cls):  # a plugin: known by its entry point
        cls.name = key
    return cls


def launcher_classes() -> list[type[BaseLauncher]]:
    """Every launcher class this package ships (to check config files against)."""
    found: list[type[BaseLauncher]] = [LocalProcessLauncher]
    for group, names in BUILTIN_LAUNCHERS.items():
        for name in names:
            cls = find_launcher_class(group, name)
            found.extend(c for c in cls.__mro__ if issubclass(c, BaseLauncher) and c not in found)
    return found


def launcher_from_dict(d: dict, **kwargs: Any) -> BaseLauncher:
    """The launcher recorded by ``to_dict()`` (in a cluster file)."""
    recorded = d.get("class", "")
    if ":" not in recorded:  # files written before launchers were plugins: a bare class name
        builtin = {path.rsplit(":", 1)[1]: path for names in BUILTIN_LAUNCHERS.values()
                   for path in names.values()}
        recorded = builtin.get(recorded, "ipyparallel_lite.cluster.launcher:LocalProcessLauncher")
    cls = _import_class(recorded)
    if d.get("launcher") and "name" not in vars(cls):
        cls.name = d["launcher"]
    return cls.from_dict(d, **kwargs)
