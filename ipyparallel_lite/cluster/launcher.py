"""Launchers: how controller and engine processes get started and stopped.

A launcher is one small class per way of starting processes. This module has the
local one (child processes of this machine); MPI, SSH and batch launchers follow the
same interface: ``start()``, ``stop()``, ``signal(sig)``, ``running``, ``pids``,
``to_dict()`` / ``from_dict()`` so a cluster file can find them again.

Children started for a foreground owner watch it (``IPP_LITE_PARENT_PID``) and exit
when it is gone, so no engine outlives the notebook or script that started it, even
when that process is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

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


class LocalProcessLauncher:
    """One child process on this machine, its output in a log file."""

    def __init__(self, args: list[str], log_file: Path, *, env: dict | None = None,
                 daemonize: bool = False, pid: int | None = None, create_time: float | None = None):
        self.args = args
        self.log_file = Path(log_file)
        self.env = env or {}
        self.daemonize = daemonize
        self.process: subprocess.Popen | None = None
        self._pid = pid
        #: when the process started: a pid reused by another process has another start time
        self.create_time = create_time

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else self._pid

    def start(self) -> None:
        env = {**os.environ, **self.env}
        if not self.daemonize:
            env[PARENT_PID_ENV] = str(os.getpid())
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "wb") as log:  # a fresh log per run: its tail explains this run
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=self.daemonize, close_fds=True,
            )
        self.create_time = _create_time(self.process.pid)

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self._pid is None:
            return False
        return _is_alive(self._pid, self.create_time)

    def signal(self, sig: int) -> None:
        if self.running and self.pid is not None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.running:
            self.signal(signal.SIGKILL)
            if self.process is not None:
                self.process.wait(timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def to_dict(self) -> dict:
        return {"args": self.args, "log_file": str(self.log_file), "pid": self.pid,
                "daemonize": self.daemonize, "create_time": self.create_time}

    @classmethod
    def from_dict(cls, d: dict) -> LocalProcessLauncher:
        return cls(d["args"], Path(d["log_file"]), daemonize=d.get("daemonize", False), pid=d.get("pid"),
                   create_time=d.get("create_time"))


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _is_alive(pid: int, create_time: float | None) -> bool:
    """Whether ``pid`` is still the process we started: not a zombie, not a reused pid."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.01
    except psutil.Error:
        return False


def controller_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ipyparallel_lite.controller", *args]


def engine_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ipyparallel_lite.engine", *args]


def launcher_from_dict(d: dict) -> Any:
    return LocalProcessLauncher.from_dict(d)
