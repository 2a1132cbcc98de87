"""Run the selected workloads against one implementation and collect the samples."""

from __future__ import annotations

import gc
import importlib
import logging
from contextlib import ExitStack
from types import ModuleType

from benchmarks.clusters import ClusterHandle, running_cluster
from benchmarks.timing import deadline
from benchmarks.workloads import Sizes, Workload

log = logging.getLogger("benchmarks")

Cell = list[float] | str
"""Samples of one metric for one implementation, or the reason there are none."""


def metric_id(workload: Workload, key: str) -> str:
    """Globally unique id of a workload's metric, e.g. ``push_pull.push``."""
    return f"{workload.name}.{key}"


def short_reason(exc: BaseException, limit: int = 120) -> str:
    """One-line, length-limited description of an exception for a table cell."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SharedCluster:
    """Keeps at most one shared cluster running, replacing it when the size changes.

    Only one cluster runs at a time so that idle processes of another cluster do
    not steal CPU from the measurement.
    """

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.handle: ClusterHandle | None = None
        self._stack = ExitStack()
        self._failed: dict[int, str] = {}

    def get(self, n: int) -> ClusterHandle:
        """Return a running cluster of ``n`` engines, starting it if needed."""
        if n in self._failed:
            raise RuntimeError(self._failed[n])
        if self.handle is not None and self.handle.n == n:
            return self.handle
        self.close()
        log.info("[%s] starting shared cluster of %d engines", self.module.__name__, n)
        try:
            self.handle = self._stack.enter_context(running_cluster(self.module, n))
        except Exception as exc:
            self._failed[n] = f"cluster of {n} failed to start: {short_reason(exc)}"
            raise
        return self.handle

    def close(self) -> None:
        """Stop the running shared cluster, if any."""
        if self.handle is not None:
            log.info("[%s] stopping shared cluster", self.module.__name__)
        self.handle = None
        self._stack.close()


def run_workload(
    module: ModuleType, workload: Workload, sizes: Sizes, repeat: int, shared: SharedCluster
) -> dict[str, list[float]]:
    """Run ``workload`` ``repeat`` times (once if ``single_run``); return samples per metric."""
    samples: dict[str, list[float]] = {m.key: [] for m in workload.metrics}
    reps = 1 if workload.single_run else repeat
    for rep in range(reps):
        if workload.engines is not None and not workload.fresh_cluster:
            handle = shared.get(workload.engines)
        else:
            shared.close()
            handle = None
        with deadline(workload.timeout), ExitStack() as stack:
            if workload.fresh_cluster and workload.engines is not None:
                handle = stack.enter_context(running_cluster(module, workload.engines))
            # Both packages run in this one process. What the earlier workloads left
            # (ipyparallel's run leaves about 1.5 million objects in reference cycles)
            # is collected here, so that the collector's full pass over it, 1.5 s at
            # a time, is not billed to whichever measurement it happens to land in.
            gc.collect()
            values = workload.func(module, handle, sizes)
        for key, value in values.items():
            samples[key].append(float(value))
        log.info(
            "[%s] %s %d/%d: %s",
            module.__name__,
            workload.name,
            rep + 1,
            reps,
            ", ".join(f"{k}={v:.4g}" for k, v in values.items()),
        )
    return samples


def run_implementation(
    name: str, workloads: list[Workload], sizes: Sizes, repeat: int
) -> dict[str, Cell]:
    """Run every workload against the module ``name``; failures become reason strings."""
    cells: dict[str, Cell] = {}
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        reason = f"n/a (import failed: {short_reason(exc)})"
        log.warning("[%s] %s", name, reason)
        return {metric_id(w, m.key): reason for w in workloads for m in w.metrics}

    shared = SharedCluster(module)
    try:
        for workload in workloads:
            cells.update(_run_one(module, workload, sizes, repeat, shared))
    finally:
        shared.close()
    return cells


def _run_one(
    module: ModuleType, workload: Workload, sizes: Sizes, repeat: int, shared: SharedCluster
) -> dict[str, Cell]:
    """Run one workload, turning a skip or an error into a cell text for each metric."""
    ids = [metric_id(workload, m.key) for m in workload.metrics]
    if sizes.quick and not workload.in_quick:
        return dict.fromkeys(ids, "skipped (--quick)")
    log.info("[%s] running %s", module.__name__, workload.name)
    try:
        samples = run_workload(module, workload, sizes, repeat, shared)
    except Exception as exc:
        reason = f"n/a ({short_reason(exc)})"
        log.warning("[%s] %s failed: %s", module.__name__, workload.name, reason)
        shared.close()  # a failed workload may leave the cluster in a bad state
        return dict.fromkeys(ids, reason)
    return {metric_id(workload, key): values for key, values in samples.items()}
