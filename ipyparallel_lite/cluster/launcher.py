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
                 daemonize: bool = False, pid: int | None = None):
        self.args = args
        self.log_file = Path(log_file)
        self.env = env or {}
        self.daemonize = daemonize
        self.process: subprocess.Popen | None = None
        self._pid = pid

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else self._pid

    def start(self) -> None:
        env = {**os.environ, **self.env}
        if not self.daemonize:
            env[PARENT_PID_ENV] = str(os.getpid())
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=self.daemonize, close_fds=True,
            )

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self._pid is None:
            return False
        try:
            os.kill(self._pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return _is_alive(self._pid)

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
                "daemonize": self.daemonize}

    @classmethod
    def from_dict(cls, d: dict) -> LocalProcessLauncher:
        return cls(d["args"], Path(d["log_file"]), daemonize=d.get("daemonize", False), pid=d.get("pid"))


def _is_alive(pid: int) -> bool:
    """False for zombies too, which os.kill(pid, 0) reports as alive."""
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def controller_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ipyparallel_lite.controller", *args]


def engine_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ipyparallel_lite.engine", *args]


def launcher_from_dict(d: dict) -> Any:
    return LocalProcessLauncher.from_dict(d)
