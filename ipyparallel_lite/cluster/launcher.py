"""Launchers: how controller and engine processes get started and stopped.

A launcher is one small ``Configurable`` class per way of starting processes. This
module has the local ones (child processes of this machine): ``LocalControllerLauncher``
and ``LocalEngineLauncher``, configured under ipyparallel's names
(``c.LocalControllerLauncher.controller_cmd``, ``c.LocalEngineLauncher.engine_args``,
``c.LocalProcessLauncher.stop_timeout``). MPI, SSH and batch launchers follow the same
interface: ``start()``, ``stop()``, ``signal(sig)``, ``running``, ``pid``,
``to_dict()`` / ``from_dict()`` so a cluster file can find them again.

A child's stdout and stderr go to its log file, ``log/<ipcontroller|ipengine>-<cluster
id>-<pid>.log`` in the profile: what it logs and whatever it prints before logging
works (an import error, say) end up in one file per process.

Children started for a foreground owner watch it (``IPP_LITE_PARENT_PID``) and exit
when it is gone, so no engine outlives the notebook or script that started it, even
when that process is killed.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from traitlets import Float, List, Unicode
from traitlets.config import LoggingConfigurable

from ipyparallel_lite.applog import log_file_name
from ipyparallel_lite.processes import process_alive, process_start_time

PARENT_PID_ENV = "IPP_LITE_PARENT_PID"


def watch_parent() -> None:
    """In a child process: exit when the process that started us is gone."""
    import threading

    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return
    parent_pid = int(parent)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="ipp-lite-parent-watch", daemon=True).start()


class LocalProcessLauncher(LoggingConfigurable):
    """One child process on this machine, its output in a log file.

    ``log_file`` may contain ``{pid}``: the file is renamed to carry the child's pid
    once it runs.
    """

    stop_timeout = Float(3.0, help="Seconds between SIGTERM and SIGKILL when stopping.").tag(
        config=True)

    def __init__(self, args: list[str], log_file: str | Path, *, env: dict | None = None,
                 daemonize: bool = False, pid: int | None = None, create_time: float | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.args = args
        self.log_file = Path(log_file)
        self.env = env or {}
        self.daemonize = daemonize
        self.process: subprocess.Popen | None = None
        self._pid = pid
        #: when the process started: a pid reused by another process has another start time
        self.create_time = create_time
        #: stopped on purpose: its exit is no crash, and it is not restarted
        self.stop_requested = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else self._pid

    def start(self) -> None:
        env = {**os.environ, **self.env}
        if not self.daemonize:
            env[PARENT_PID_ENV] = str(os.getpid())
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        starting = self.log_file.with_name(f".starting-{secrets.token_hex(4)}.log")
        with open(starting, "wb") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=self.daemonize, close_fds=True,
            )
        # the child keeps writing to the renamed file: its descriptor follows the rename
        self.log_file = self.log_file.with_name(self.log_file.name.format(pid=self.process.pid))
        os.replace(starting, self.log_file)
        self.create_time = process_start_time(self.process.pid)
        self.log.debug("started pid %d: %s (log %s)", self.process.pid, " ".join(self.args),
                       self.log_file)

    @property
    def exit_code(self) -> int | None:
        """The exit code of a child that ended (negative: the signal that ended it)."""
        return self.process.poll() if self.process is not None else None

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self._pid is None:
            return False
        return process_alive(self._pid, self.create_time)

    def signal(self, sig: int) -> None:
        if self.running and self.pid is not None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds (default ``stop_timeout``)."""
        timeout = self.stop_timeout if timeout is None else timeout
        self.stop_requested = True
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.running:
            self.signal(signal.SIGKILL)
            if self.process is not None:
                self.process.wait(10)  # a SIGKILLed child ends at once; reap it

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def to_dict(self) -> dict:
        return {"class": type(self).__name__, "args": self.args, "log_file": str(self.log_file),
                "pid": self.pid, "daemonize": self.daemonize, "create_time": self.create_time}

    @classmethod
    def from_dict(cls, d: dict, **kwargs: Any) -> LocalProcessLauncher:
        return cls(d["args"], Path(d["log_file"]), daemonize=d.get("daemonize", False), pid=d.get("pid"),
                   create_time=d.get("create_time"), **kwargs)


    #: the start of the log file name of such a process
    log_prefix = "ipcluster"

    def command_line(self, args: list[str]) -> list[str]:
        """The whole command line, given the cluster's arguments for this process."""
        return list(args)

    @classmethod
    def for_cluster(cls, args: list[str], log_dir: Path, cluster_id: str, **kwargs: Any
                    ) -> LocalProcessLauncher:
        """A launcher of ``command_line(args)``, logging to ``log_dir``."""
        launcher = cls([], log_dir / log_file_name(cls.log_prefix, cluster_id, "{pid}"), **kwargs)
        launcher.args = launcher.command_line(args)
        return launcher


class LocalControllerLauncher(LocalProcessLauncher):
    """The controller, as a child process."""

    log_prefix = "ipcontroller"
    controller_cmd = List(Unicode(), default_value=[sys.executable, "-m", "ipyparallel_lite.controller"],
                          help="Command that starts a controller.").tag(config=True)
    controller_args = List(Unicode(), help="Arguments added to every controller's command line.").tag(
        config=True)

    def command_line(self, args: list[str]) -> list[str]:
        return [*self.controller_cmd, *args, *self.controller_args]


class LocalEngineLauncher(LocalProcessLauncher):
    """One engine, as a child process."""

    log_prefix = "ipengine"
    engine_cmd = List(Unicode(), default_value=[sys.executable, "-m", "ipyparallel_lite.engine"],
                      help="Command that starts an engine.").tag(config=True)
    engine_args = List(Unicode(), help="Arguments added to every engine's command line.").tag(
        config=True)

    def command_line(self, args: list[str]) -> list[str]:
        return [*self.engine_cmd, *args, *self.engine_args]


LAUNCHERS = {c.__name__: c for c in (LocalProcessLauncher, LocalControllerLauncher, LocalEngineLauncher)}


def launcher_from_dict(d: dict, **kwargs: Any) -> LocalProcessLauncher:
    """The launcher recorded by ``to_dict()`` (in a cluster file)."""
    return LAUNCHERS.get(d.get("class", ""), LocalProcessLauncher).from_dict(d, **kwargs)
