"""Processes on this machine, named by pid *and* start time, so that a reused pid is never
taken for the process that had it before. Used by launchers (which start engines) and by
the controller (which checks whether a local engine whose connection dropped is gone).
"""

from __future__ import annotations

import psutil


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (None if there is none): with the pid, names one process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def pid_running(pid: int) -> bool:
    """Whether a process ``pid`` runs (a zombie does not)."""
    return process_alive(pid, None)


def process_alive(pid: int, create_time: float | None) -> bool:
    """Whether ``pid`` is still the process that started at ``create_time``: not a zombie,
    not a reused pid (``create_time`` None: any process with that pid)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.01
    except psutil.Error:
        return False
