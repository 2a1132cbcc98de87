"""Process bookkeeping: memory of process trees and cleanup of leftover children.

Only processes started by this benchmark process (its descendants) are ever
inspected or signalled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import psutil

log = logging.getLogger("benchmarks")

MB = 1_000_000
"""Bytes per MB: every size and rate in the report is decimal."""


def child_pids() -> set[int]:
    """Return the pids of all live descendants of this process."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def tree_rss_mb(pid: int) -> float:
    """Return the summed RSS in MB of process ``pid`` and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / MB


def launched_root(pid: int) -> int:
    """Return the ancestor of ``pid`` that this process launched directly.

    ipyparallel engines, for example, are direct children of the client process
    but run a "nanny" child of their own; measuring from the launched root counts
    everything that makes up one engine.  If ``pid`` is not our descendant it is
    returned unchanged.
    """
    me = os.getpid()
    proc = psutil.Process(pid)
    chain = [proc]
    while (parent := chain[-1].parent()) is not None:
        if parent.pid == me:
            return chain[-1].pid
        chain.append(parent)
    return pid


def _attr_path(obj: object, path: str) -> object | None:
    """Follow a dotted attribute path, returning None if any step is missing."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def controller_pid(cluster: object, engine_pids: Iterable[int]) -> int:
    """Find the controller's process id for a locally started cluster.

    Uses ``cluster.controller.process.pid`` when the cluster object exposes it
    (ipyparallel does), otherwise the only direct child of this process whose
    process tree contains none of the engines.
    """
    pid = _attr_path(cluster, "controller.process.pid")
    if isinstance(pid, int) and psutil.pid_exists(pid):
        return pid
    engine_roots = {launched_root(p) for p in engine_pids}
    candidates = [child for child in psutil.Process().children() if child.pid not in engine_roots]
    if len(candidates) > 1:
        named = [c for c in candidates if "controller" in " ".join(c.cmdline())]
        candidates = named or candidates
    if len(candidates) != 1:
        raise RuntimeError(f"cannot identify the controller among {len(candidates)} children")
    return candidates[0].pid


def reap_new_children(before: set[int], grace: float = 5.0) -> list[int]:
    """Wait for, then terminate and kill, descendants not present in ``before``.

    Returns the pids that were still alive after ``grace`` seconds and had to
    be signalled (an empty list means the cluster cleaned up after itself).
    """
    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    if not procs:
        return []
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    leftovers = [p.pid for p in alive]
    for sig in ("terminate", "kill"):
        if not alive:
            break
        for proc in alive:
            try:
                getattr(proc, sig)()
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(alive, timeout=grace)
    if leftovers:
        log.warning("had to signal %d leftover cluster process(es): %s", len(leftovers), leftovers)
    return leftovers
