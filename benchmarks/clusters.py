"""Starting and (always) stopping local clusters through the public API."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from benchmarks.procs import child_pids, reap_new_children
from benchmarks.timing import deadline

log = logging.getLogger("benchmarks")

STOP_TIMEOUT = 60.0
"""Seconds allowed for ``stop_cluster_sync`` before leftovers are killed."""


@dataclass
class ClusterHandle:
    """A running cluster and a client connected to it."""

    module: ModuleType
    cluster: Any
    client: Any
    n: int


def start_timeout(n: int) -> float:
    """Seconds allowed to start a cluster of ``n`` engines on a small machine."""
    return 60.0 + 20.0 * n


def wait_for_engines(client: Any, n: int, timeout: float) -> None:
    """Poll ``client.ids`` until ``n`` engines are registered."""
    stop_at = time.monotonic() + timeout
    while len(client.ids) < n:
        if time.monotonic() > stop_at:
            raise TimeoutError(f"only {len(client.ids)} of {n} engines after {timeout:.0f}s")
        time.sleep(0.02)


def shutdown(cluster: Any, client: Any | None, before: set[int]) -> None:
    """Close ``client``, stop ``cluster`` and kill any process it left behind.

    Every step runs even if an earlier one fails; failures are logged, not raised,
    so that a cleanup never hides the error that caused it.
    """
    if client is not None:
        try:
            client.close()
        except Exception as exc:
            log.warning("client.close() failed: %r", exc)
    try:
        with deadline(STOP_TIMEOUT):
            cluster.stop_cluster_sync()
    except Exception as exc:
        log.warning("stop_cluster_sync() failed: %r", exc)
    reap_new_children(before)


@contextmanager
def running_cluster(module: ModuleType, n: int) -> Iterator[ClusterHandle]:
    """Start ``module.Cluster(n=n)``, connect, wait for ``n`` engines; always clean up.

    On exit (normal or not) the client is closed, ``stop_cluster_sync()`` is
    called, and any process started meanwhile that is still alive is killed.
    """
    before = child_pids()
    cluster = None
    client = None
    try:
        with deadline(start_timeout(n)):
            cluster = module.Cluster(n=n)
            client = cluster.start_and_connect_sync()
            wait_for_engines(client, n, start_timeout(n))
        yield ClusterHandle(module, cluster, client, n)
    finally:
        if cluster is not None:
            shutdown(cluster, client, before)
        else:
            reap_new_children(before)
