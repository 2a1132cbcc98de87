"""The workloads: small functions ``(module, cluster_handle, sizes) -> {metric: value}``.

Each function measures one repetition and only touches the public API shared
by ``ipyparallel`` and ``ipyparallel_lite``.  :data:`WORKLOADS` lists them in
run order, with the metrics each one reports and their targets.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from benchmarks.clusters import ClusterHandle, running_cluster
from benchmarks.floor import floor_pipeline
from benchmarks.procs import MB, controller_pid, launched_root, tree_rss_mb
from benchmarks.tasks import get_pid, noop, noop1
from benchmarks.timing import latency_ms, timed

log = logging.getLogger("benchmarks")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes; :data:`FULL` by default, :data:`QUICK` for ``--quick``."""

    quick: bool = False
    latency_calls: int = 200
    latency_warmup: int = 20
    lb_tasks: int = 5_000
    map_items: int = 5_000
    direct_rounds: int = 1_000
    cpu_calls: int = 2_000
    cpu_busy_s: float = 12.0
    array_mb: float = 100.0
    scatter_items: int = 10**7
    bcast_engines: int = 16
    bcast_calls: int = 50
    rss_warmup_tasks: int = 1_000
    rss_tasks: int = 100_000
    rss_batch: int = 5_000


FULL = Sizes()
QUICK = Sizes(
    quick=True,
    latency_calls=20,
    latency_warmup=3,
    lb_tasks=200,
    map_items=200,
    direct_rounds=100,
    cpu_calls=100,
    cpu_busy_s=3.0,
    array_mb=1.0,
    scatter_items=10**5,
    bcast_calls=5,
    rss_warmup_tasks=100,
    rss_tasks=1_000,
    rss_batch=500,
)


@dataclass(frozen=True)
class Metric:
    """One reported number of a workload.

    ``label`` may use ``{field}`` placeholders from :class:`Sizes`.  The ratio in
    the report is oriented so that > 1 means ipyparallel_lite is better:
    ``lite / reference`` when ``higher_is_better``, else ``reference / lite``.
    ``min_ratio`` is the target for that ratio; ``max_value`` is an absolute
    target for ipyparallel_lite's own value, below which it must stay (memory growth
    that must stay flat, the client's CPU per call). The ratio is reported for such a
    metric too when ``ratio_too``.
    ``floor`` names the metric of the :func:`floor` workload this one is also read
    against: ``"rtt"`` for a latency, ``"rate"`` for a throughput.
    """

    key: str
    label: str
    unit: str
    higher_is_better: bool
    min_ratio: float | None = None
    max_value: float | None = None
    floor: str | None = None
    ratio_too: bool = False

    def target_text(self) -> str:
        """Human-readable target, or an em dash when there is none."""
        if self.min_ratio is not None:
            return f"≥ {self.min_ratio:g}×"
        if self.max_value is not None:
            return f"{'' if self.ratio_too else 'flat '}(< {self.max_value:g} {self.unit})"
        return "—"


WorkloadFunc = Callable[[ModuleType, "ClusterHandle | None", Sizes], dict[str, float]]


@dataclass(frozen=True)
class Workload:
    """A named measurement and how the runner must set it up.

    ``engines`` is the size of the shared cluster the function receives (None:
    no cluster, the function manages its own processes); with ``fresh_cluster``
    a new cluster is started for every repetition instead.  ``single_run``
    workloads (memory, not timing) run once whatever ``--repeat`` says.
    ``timeout`` bounds one repetition, in seconds.
    """

    name: str
    func: WorkloadFunc
    metrics: tuple[Metric, ...]
    engines: int | None = 2
    fresh_cluster: bool = False
    in_quick: bool = True
    single_run: bool = False
    timeout: float = 600.0


# ----------------------------------------------------------------- helpers


def _require(handle: ClusterHandle | None) -> ClusterHandle:
    """Return the cluster handle, which the runner provides to cluster workloads."""
    if handle is None:
        raise RuntimeError("this workload needs a running cluster")
    return handle


#: seconds a workload waits for its tasks before it reports what is still missing
WAIT_S = 300.0


def _wait_all(client: Any, ars: list[Any]) -> None:
    """``client.wait`` for every AsyncResult, then re-raise any task error.

    Past ``WAIT_S`` it logs what still waits (the requests and the controller's queues)
    and raises, rather than leaving the workload to its deadline with no trace.
    """
    if not client.wait(ars, timeout=WAIT_S):
        missing = [msg_id for ar in ars if not ar.done() for msg_id in ar.msg_ids]
        log.error("%d requests still unanswered after %ss, first: %s; queue_status: %s",
                  len(missing), WAIT_S, missing[:5], client.queue_status(verbose=False))
        raise TimeoutError(f"{len(missing)} requests unanswered after {WAIT_S}s")
    for ar in ars:
        ar.get()


def _run_lb_tasks(client: Any, count: int, batch: int) -> None:
    """Run ``count`` load-balanced no-op tasks, ``batch`` in flight at a time."""
    view = client.load_balanced_view()
    done = 0
    while done < count:
        step = min(batch, count - done)
        _wait_all(client, [view.apply_async(noop) for _ in range(step)])
        done += step
        if done % (4 * batch) == 0 and done < count:
            log.info("  ... %d/%d tasks", done, count)


# --------------------------------------------------------------- workloads


def floor(module: ModuleType, handle: ClusterHandle | None, sizes: Sizes) -> dict[str, float]:
    """The bare per-message pipeline (:mod:`benchmarks.floor`): round trip and stream
    rate with one engine and one request in flight (as load balancing with default
    flags), and stream rate to two engines with no limit (as direct requests: with no
    limit a second engine adds what a second core allows, which it does not with one).

    It does not use ``module``: it runs beside each implementation's workloads, so each
    is read against a floor measured in its own stretch of the run.
    """
    n = sizes.lb_tasks
    with floor_pipeline() as client:
        rtt = latency_ms(client.round_trip, sizes.latency_calls, sizes.latency_warmup)
        rate = n / client.stream(n)
    with floor_pipeline(engines=2, hwm=0) as client:  # as direct_throughput: 2 engines
        rate_unbounded = n / client.stream(n)
    return {"rtt": rtt, "rate": rate, "rate_unbounded": rate_unbounded}


def cold_start(module: ModuleType, handle: ClusterHandle | None, sizes: Sizes) -> dict[str, float]:
    """Time ``Cluster(n=2).start_and_connect_sync()`` until 2 engines, then the stop."""
    t0 = time.perf_counter()
    with running_cluster(module, 2):
        t_ready = time.perf_counter()
    t_end = time.perf_counter()
    return {"start": t_ready - t0, "total": t_end - t0}


def engine_rss(module: ModuleType, handle: ClusterHandle | None, sizes: Sizes) -> dict[str, float]:
    """Mean RSS of one engine (its launched process tree) on an idle cluster."""
    h = _require(handle)
    pids = h.client[:].apply_sync(get_pid)
    return {"rss": statistics.mean(tree_rss_mb(launched_root(pid)) for pid in pids)}


def apply_latency(
    module: ModuleType, handle: ClusterHandle | None, sizes: Sizes
) -> dict[str, float]:
    """Median latency of ``rc[0].apply_sync(noop)``."""
    view = _require(handle).client[0]
    return {
        "ms": latency_ms(lambda: view.apply_sync(noop), sizes.latency_calls, sizes.latency_warmup)
    }


def lb_latency(module: ModuleType, handle: ClusterHandle | None, sizes: Sizes) -> dict[str, float]:
    """Median latency of ``load_balanced_view().apply_sync(noop)``."""
    view = _require(handle).client.load_balanced_view()
    return {
        "ms": latency_ms(lambda: view.apply_sync(noop), sizes.latency_calls, sizes.latency_warmup)
    }


def execute_latency(
    module: ModuleType, handle: ClusterHandle | None, sizes: Sizes
) -> dict[str, float]:
    """Median latency of ``rc[:].execute("a=1", block=True)``."""
    view = _require(handle).client[:]
    return {
        "ms": latency_ms(
            lambda: view.execute("a=1", block=True), sizes.latency_calls, sizes.latency_warmup
        )
    }


_SHELL: Any = None


def _ipython_shell() -> Any:
    """One in-process IPython shell for the magics, its history kept in memory."""
    global _SHELL
    if _SHELL is None:
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        config = Config()
        config.HistoryManager.hist_file = ":memory:"
        _SHELL = InteractiveShell.instance(config=config)
    return _SHELL


def px_latency(module: ModuleType, handle: ClusterHandle | None, sizes: Sizes) -> dict[str, float]:
    """Median latency of a blocking ``%px a=1`` in an IPython shell, on every engine."""
    shell = _ipython_shell()
    view = _require(handle).client[:]
    view.block = True
    view.activate()  # (re-)registers this package's %px in the shell
    return {
        "ms": latency_ms(
            lambda: shell.run_line_magic("px", "a=1"), sizes.latency_calls, sizes.latency_warmup
        )
    }


def lb_throughput(
    module: ModuleType, handle: ClusterHandle | None, sizes: Sizes
) -> dict[str, float]:
    """Submit ``lb_tasks`` load-balanced no-ops with ``apply_async``, then ``rc.wait``."""
    client = _require(handle).client
    view = client.load_balanced_view()
    n = sizes.lb_tasks

    def run() -> list[Any]:
        ars = [view.apply_async(noop) for _ in range(n)]
        if not client.wait(ars):
            raise TimeoutError("client.wait() returned False")
        return ars

    seconds, ars = timed(run)
    _wait_all(client, ars)
    return {"rate": n / seconds}


def map_throughput(
    module: ModuleType, handle: ClusterHandle | None, sizes: Sizes
) -> dict[str, float]:
    """``load_balanced_view().map_async(noop1, range(n)).get()`` with the default chunksize."""
    view = _require(handle).client.load_balanced_view()
    n = sizes.map_items
    seconds, result = timed(lambda: view.map_async(noop1, range(n)).get())
    if list(result) != list(range(n)):
        raise AssertionError("map returned wrong results")
    return {"rate": n / seconds}


def direct_throughput(
    module: ModuleType, handle: ClusterHandle | None, sizes: Sizes
) -> dict[str, float]:
    """``rc[:].apply_async(noop)`` ``direct_rounds`` times (one task per engine each)."""
    h = _require(handle)
    view = h.client[:]
    rounds = sizes.direct_rounds

    def run() -> list[Any]:
        ars = [view.apply_async(noop) for _ in range(rounds)]
        if not h.client.wait(ars):
            raise TimeoutError("client.wait() returned False")
        return ars

    seconds, ars = timed(run)
    _wait_all(h.client, ars)
    return {"rate": rounds * h.n / seconds}


def client_cpu(module: ModuleType, handle: ClusterHandle | None, sizes: Sizes) -> dict[str, float]:
    """CPU time of the calling thread per ``apply_async(noop)``, load-balanced and
    ``rc[0]``, in µs, while every engine runs a sleep: no reply comes in meanwhile, so
    this is what the call itself costs the user's thread (what the client's other
    threads spend on replies shows in the throughput rows)."""
    client = _require(handle).client
    n = sizes.cpu_calls
    busy = client[:].apply_async(time.sleep, sizes.cpu_busy_s)
    out, ars = {}, []
    for key, view in (("lb", client.load_balanced_view()), ("direct", client[0])):
        start = time.thread_time()
        ars += [view.apply_async(noop) for _ in range(n)]
        out[key] = (time.thread_time() - start) / n * 1e6
    if not busy.done():  # the calls all went in while the engines slept
        _wait_all(client, [busy, *ars])
        return out
    raise RuntimeError(f"the engines' {sizes.cpu_busy_s} s sleep ended before the "
                       f"{2 * n} calls were made: no measure")


def push_pull(module: ModuleType, handle: ClusterHandle | None, sizes: Sizes) -> dict[str, float]:
    """Push then pull an ``array_mb`` MB float64 array to/from ``rc[0]`` (after a tiny warm-up)."""
    import numpy as np

    view = _require(handle).client[0]
    arr = np.arange(int(sizes.array_mb * MB) // 8, dtype=np.float64)
    mb = arr.nbytes / MB
    view.push({"bench_array": arr[:1]}, block=True)  # untimed warm-up
    view.pull("bench_array", block=True)
    push_s, _ = timed(lambda: view.push({"bench_array": arr}, block=True))
    pull_s, back = timed(lambda: view.pull("bench_array", block=True))
    view.execute("del bench_array", block=True)
    if back.shape != arr.shape or back[-1] != arr[-1]:
        raise AssertionError("pulled array differs from the pushed one")
    return {"push": mb / push_s, "pull": mb / pull_s}


def scatter_gather(
    module: ModuleType, handle: ClusterHandle | None, sizes: Sizes
) -> dict[str, float]:
    """Scatter then gather ``scatter_items`` float64 over all engines (after a tiny warm-up)."""
    import numpy as np

    view = _require(handle).client[:]
    arr = np.arange(sizes.scatter_items, dtype=np.float64)
    mb = arr.nbytes / MB
    view.scatter("bench_x", arr[:100], block=True)  # untimed warm-up
    view.gather("bench_x", block=True)
    scatter_s, _ = timed(lambda: view.scatter("bench_x", arr, block=True))
    gather_s, back = timed(lambda: view.gather("bench_x", block=True))
    view.execute("del bench_x", block=True)
    if len(back) != len(arr) or back[-1] != arr[-1]:
        raise AssertionError("gathered array differs from the scattered one")
    return {"scatter": mb / scatter_s, "gather": mb / gather_s}


def broadcast(module: ModuleType, handle: ClusterHandle | None, sizes: Sizes) -> dict[str, float]:
    """``broadcast_view().apply_sync(noop)`` vs ``rc[:].apply_sync(noop)`` on many engines."""
    client = _require(handle).client
    bview, dview = client.broadcast_view(), client[:]
    calls, warmup = sizes.bcast_calls, max(1, sizes.bcast_calls // 10)
    return {
        "broadcast": latency_ms(lambda: bview.apply_sync(noop), calls, warmup),
        "direct": latency_ms(lambda: dview.apply_sync(noop), calls, warmup),
    }


def controller_rss(
    module: ModuleType, handle: ClusterHandle | None, sizes: Sizes
) -> dict[str, float]:
    """Controller RSS (process tree) idle, after a warm-up, and after ``rss_tasks`` tasks."""
    h = _require(handle)
    engine_pids = h.client[:].apply_sync(get_pid)
    pid = controller_pid(h.cluster, engine_pids)
    idle = tree_rss_mb(pid)
    _run_lb_tasks(h.client, sizes.rss_warmup_tasks, sizes.rss_batch)
    warm = tree_rss_mb(pid)
    _run_lb_tasks(h.client, sizes.rss_tasks, sizes.rss_batch)
    after = tree_rss_mb(pid)
    return {"idle": idle, "warm": warm, "after": after, "growth": after - warm}


_IMPORTTIME_LINE = re.compile(r"import time:\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\S+)\s*$")


def import_ms(name: str) -> float:
    """Cumulative ``python -X importtime`` ms of ``import name`` in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {name}"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"import {name} failed: {tail[0]}")
    for line in proc.stderr.splitlines():
        match = _IMPORTTIME_LINE.match(line)
        if match and match.group(3) == name:
            return int(match.group(2)) / 1000
    raise RuntimeError(f"no importtime line for {name}")


def import_time(module: ModuleType, handle: ClusterHandle | None, sizes: Sizes) -> dict[str, float]:
    """Time ``import <module>`` in a fresh subprocess (one untimed run first)."""
    import_ms(module.__name__)
    return {"ms": import_ms(module.__name__)}


# ---------------------------------------------------------------- registry

_LATENCY = 10.0
_THROUGHPUT = 20.0
_BANDWIDTH = 3.0
_CLIENT_CPU = 50.0  # µs of the calling thread per apply_async

FLOOR = "floor"
"""Name of the workload every latency and throughput row is also read against."""

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        FLOOR,
        floor,
        (
            Metric("rtt", "bare signed round trip client→relay→engine, one at a time", "ms", False),
            Metric("rate", "bare signed stream of {lb_tasks:,} requests, hwm=1", "tasks/s", True),
            Metric(
                "rate_unbounded",
                "bare signed stream of {lb_tasks:,} requests to 2 engines, no hwm",
                "tasks/s",
                True,
            ),
        ),
        engines=None,
        timeout=300,
    ),
    Workload(
        "import_time",
        import_time,
        (Metric("ms", "import in a fresh interpreter (-X importtime)", "ms", False, 2.0),),
        engines=None,
        timeout=300,
    ),
    Workload(
        "cold_start",
        cold_start,
        (
            Metric("start", "Cluster(n=2).start_and_connect_sync() → 2 engines", "s", False, 5.0),
            Metric("total", "cold start + stop_cluster_sync()", "s", False, 5.0),
        ),
        engines=None,
        timeout=300,
    ),
    Workload(
        "engine_rss",
        engine_rss,
        (Metric("rss", "per-engine RSS, idle (engine process tree)", "MB", False),),
    ),
    Workload(
        "apply_latency",
        apply_latency,
        (Metric("ms", "rc[0].apply_sync(noop) latency", "ms", False, _LATENCY, floor="rtt"),),
    ),
    Workload(
        "lb_latency",
        lb_latency,
        (
            Metric(
                "ms", "load_balanced_view().apply_sync(noop) latency", "ms", False, _LATENCY,
                floor="rtt",
            ),
        ),
    ),
    Workload(
        "execute_latency",
        execute_latency,
        (
            Metric(
                "ms", 'rc[:].execute("a=1", block=True) latency', "ms", False, _LATENCY,
                floor="rtt",
            ),
        ),
    ),
    Workload(
        "px_latency",
        px_latency,
        (Metric("ms", "4 engines: %px a=1 (blocking) latency", "ms", False, 5.0, floor="rtt"),),
        engines=4,
    ),
    Workload(
        "lb_throughput",
        lb_throughput,
        (
            Metric(
                "rate",
                "{lb_tasks:,} load-balanced apply_async(noop) + rc.wait",
                "tasks/s",
                True,
                _THROUGHPUT,
                floor="rate",
            ),
        ),
    ),
    Workload(
        "map_throughput",
        map_throughput,
        (
            Metric(
                "rate",
                "lview.map_async(noop1, range({map_items:,})).get()",
                "items/s",
                True,
                _THROUGHPUT,
                floor="rate",
            ),
        ),
    ),
    Workload(
        "direct_throughput",
        direct_throughput,
        (
            Metric(
                "rate",
                "rc[:].apply_async(noop) ×{direct_rounds:,} + rc.wait",
                "tasks/s",
                True,
                _THROUGHPUT,
                floor="rate_unbounded",
            ),
        ),
    ),
    Workload(
        "client_cpu",
        client_cpu,
        (
            Metric("lb", "client CPU per load-balanced apply_async(noop), engines busy", "µs",
                   False, max_value=_CLIENT_CPU, ratio_too=True),
            Metric("direct", "client CPU per rc[0].apply_async(noop), engines busy", "µs",
                   False, max_value=_CLIENT_CPU, ratio_too=True),
        ),
    ),
    Workload(
        "push_pull",
        push_pull,
        (
            Metric("push", "rc[0].push {array_mb:g} MB float64 array", "MB/s", True, _BANDWIDTH),
            Metric("pull", "rc[0].pull {array_mb:g} MB float64 array", "MB/s", True, _BANDWIDTH),
        ),
    ),
    Workload(
        "scatter_gather",
        scatter_gather,
        (
            Metric("scatter", "rc[:].scatter {scatter_items:,} float64", "MB/s", True, _BANDWIDTH),
            Metric("gather", "rc[:].gather {scatter_items:,} float64", "MB/s", True, _BANDWIDTH),
        ),
    ),
    Workload(
        "controller_rss",
        controller_rss,
        (
            Metric("idle", "controller RSS (process tree), idle", "MB", False),
            Metric("warm", "controller RSS after {rss_warmup_tasks:,}-task warm-up", "MB", False),
            Metric("after", "controller RSS after {rss_tasks:,} more tasks", "MB", False),
            Metric("growth", "controller RSS growth after warm-up", "MB", False, max_value=10.0),
        ),
        fresh_cluster=True,
        single_run=True,
        timeout=3600,
    ),
    Workload(
        "broadcast",
        broadcast,
        (
            Metric(
                "broadcast",
                "{bcast_engines} engines: broadcast_view().apply_sync(noop)",
                "ms",
                False,
                _LATENCY,
                floor="rtt",
            ),
            Metric(
                "direct",
                "{bcast_engines} engines: rc[:].apply_sync(noop)",
                "ms",
                False,
                _LATENCY,
                floor="rtt",
            ),
        ),
        engines=FULL.bcast_engines,
        in_quick=False,
    ),
)

WORKLOADS_BY_NAME: dict[str, Workload] = {w.name: w for w in WORKLOADS}
