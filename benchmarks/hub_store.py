"""The Hub's record stores under load: ipyparallel_lite alone, memory vs SQLite.

    python -m benchmarks.hub_store            # 5 x 5,000 tasks per store, RSS after 100,000
    python -m benchmarks.hub_store --quick    # a smoke run in seconds

Two numbers, each with a target this run enforces (exit status 1 when one is missed):

- **throughput**: load-balanced ``apply_async(noop)`` + ``rc.wait`` on a 2-engine
  cluster with ``--sqlitedb`` against one with the default memory store. The two
  clusters run side by side and are measured in turns, so both see the same machine
  load; the median SQLite rate must be at least ``MIN_SQLITE_RATIO`` (0.9) of the
  memory rate.
- **memory**: controller RSS after ``rss_tasks`` (100,000) completed tasks, with the
  memory store (records past its 1,024 spill to SQLite) and with the SQLite store:
  at most ``MAX_RSS_MB`` in all, and at most ``MAX_GROWTH_MB`` more than after a
  10,000-task warm-up. The warm-up runs the same 5,000-task batches, so it reaches the
  high-water mark of tasks in flight; what grows after it is what the controller
  keeps per finished task.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack

import ipyparallel_lite as ipp
from benchmarks.procs import tree_rss_mb
from benchmarks.tasks import noop

#: the SQLite store's throughput, as a fraction of the memory store's, at the least
MIN_SQLITE_RATIO = 0.9
#: controller RSS after rss_tasks completed tasks (MB, whole process)
MAX_RSS_MB = 130.0
#: controller RSS growth allowed over rss_tasks completed tasks after the warm-up (MB)
MAX_GROWTH_MB = 20.0

STORES = {"memory": [], "sqlite": ["--sqlitedb"]}


def run_tasks(rc: ipp.Client, count: int, batch: int) -> float:
    """Run ``count`` load-balanced no-ops, ``batch`` in flight at a time; tasks/s."""
    view = rc.load_balanced_view()
    start = time.perf_counter()
    done = 0
    while done < count:
        step = min(batch, count - done)
        ars = [view.apply_async(noop) for _ in range(step)]
        if not rc.wait(ars, timeout=600):
            raise TimeoutError(f"{step} tasks did not finish in 600 s")
        done += step
    return count / (time.perf_counter() - start)


def start_cluster(stack: ExitStack, args: list[str], engines: int = 2) -> tuple[ipp.Cluster, ipp.Client]:
    cluster = ipp.Cluster(n=engines, controller_args=args)
    rc = cluster.start_and_connect_sync()
    stack.callback(cluster.stop_cluster_sync)
    stack.callback(rc.close)
    rc.wait_for_engines(engines, timeout=120)
    return cluster, rc


def throughput(tasks: int, repeat: int, log: Callable[[str], None]) -> dict[str, list[float]]:
    """Tasks/s of each store, ``repeat`` turns each, measured alternately."""
    rates: dict[str, list[float]] = {name: [] for name in STORES}
    with ExitStack() as stack:
        clients = {name: start_cluster(stack, args)[1] for name, args in STORES.items()}
        for rc in clients.values():
            run_tasks(rc, min(tasks, 1000), 500)  # warm-up: imports, first records
        for turn in range(repeat):
            for name, rc in clients.items():
                rates[name].append(run_tasks(rc, tasks, tasks))
                log(f"turn {turn + 1}/{repeat} {name}: {rates[name][-1]:,.0f} tasks/s")
    return rates


def rss_growth(args: list[str], warmup: int, tasks: int, batch: int) -> tuple[float, float]:
    """Controller RSS (MB) after the warm-up and after ``tasks`` more."""
    with ExitStack() as stack:
        cluster, rc = start_cluster(stack, args)
        pid = cluster.controller.pid
        run_tasks(rc, warmup, batch)
        warm = tree_rss_mb(pid)
        run_tasks(rc, tasks, batch)
        return warm, tree_rss_mb(pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: a smoke run, whose numbers are not judged")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per throughput turn")
    parser.add_argument("--repeat", type=int, default=5, help="throughput turns per store")
    parser.add_argument("--rss-tasks", type=int, default=100_000, help="tasks for the RSS figure")
    opts = parser.parse_args(argv)
    warmup, batch = 10_000, 5000
    if opts.quick:
        opts.tasks, opts.repeat, opts.rss_tasks = 300, 1, 2000
        warmup, batch = 2000, 500

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rates = throughput(opts.tasks, opts.repeat, log)
    memory, sqlite = (statistics.median(rates[name]) for name in ("memory", "sqlite"))
    ratio = sqlite / memory
    rows = [
        ("memory store, tasks/s", f"{memory:,.0f}", ""),
        ("sqlite store, tasks/s", f"{sqlite:,.0f}", ""),
        ("sqlite / memory", f"{ratio:.2f}", f">= {MIN_SQLITE_RATIO}"),
    ]
    ok = ratio >= MIN_SQLITE_RATIO
    for name, args in STORES.items():
        warm, after = rss_growth(args, warmup, opts.rss_tasks, batch)
        log(f"{name}: controller RSS {warm:.1f} MB after {warmup:,} tasks, {after:.1f} MB "
            f"after {opts.rss_tasks:,} more")
        rows.append((f"{name} store: controller RSS after {warmup:,}-task warm-up, MB",
                     f"{warm:.1f}", ""))
        rows.append((f"{name} store: controller RSS after {opts.rss_tasks:,} more tasks, MB",
                     f"{after:.1f}", f"<= {MAX_RSS_MB:g}"))
        rows.append((f"{name} store: growth over those {opts.rss_tasks:,} tasks, MB",
                     f"{after - warm:.1f}", f"<= {MAX_GROWTH_MB:g}"))
        ok = ok and after <= MAX_RSS_MB and after - warm <= MAX_GROWTH_MB
    print(f"throughput: median of {opts.repeat} x {opts.tasks:,} load-balanced tasks, 2 engines\n")
    print("| metric | value | target |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if opts.quick:
        print("\n(--quick: sizes too small to judge the targets)")
        return 0
    if not ok:
        print("\nFAILED: a target was missed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
