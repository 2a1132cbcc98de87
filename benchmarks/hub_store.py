"""The Hub's record stores under load: ipyparallel_lite alone, memory vs SQLite.

    python -m benchmarks.hub_store            # 5 x 5,000 tasks per store, RSS after 100,000
    python -m benchmarks.hub_store --quick    # a smoke run in seconds
    python -m benchmarks.hub_store --records  # only what a record costs, in-process

``--records``: CPU per task of the Hub's record calls with the default store and no
cluster: ``submitted`` + ``assigned`` + ``finished`` for 40,000 tasks with the headers,
metadata and frames a load-balanced no-op carries (the header and metadata frames too,
read already, as the controller passes them), 500 in flight, and the store's ``flush``
after each 500 as the controller's timer does (every record spills).

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
import gc
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


def record_cost(tasks: int = 40_000, in_flight: int = 500) -> dict[str, float]:
    """CPU us per task of each record call of a Hub with the default store."""
    import uuid
    from datetime import datetime, timezone

    import zmq

    from ipyparallel_lite.controller.hub import Hub
    from ipyparallel_lite.session import pack

    def now() -> str:
        return datetime.now(timezone.utc).isoformat()

    def frame(part: dict) -> zmq.Frame:
        packed = zmq.Frame(pack(part))
        packed.bytes  # noqa: B018 -- read, as the controller's verification reads it
        return packed

    session, engines = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(2)]
    content, buffers, result = zmq.Frame(b"{}"), [zmq.Frame(b"f" * 120), zmq.Frame(b"a" * 40)], [zmq.Frame(b"r" * 60)]
    made = []  # built first: making messages is not the Hub's cost
    for i in range(tasks):
        engine = engines[i % 2]
        header = {"msg_id": str(uuid.uuid4()), "msg_type": "apply_request", "username": "u",
                  "session": session, "date": now(), "version": "5.3"}
        metadata = {"after": [], "follow": [], "timeout": None, "retries": 0, "targets": None}
        reply = {"msg_id": str(uuid.uuid4()), "msg_type": "apply_reply", "username": "u",
                 "session": engine, "date": now(), "version": "5.3"}
        reply_md = {"started": now(), "dependencies_met": True, "engine": engine, "engine_id": i % 2,
                    "status": "ok", "completed": now(), "run_time": 0.0001}
        made.append((header, metadata, reply, reply_md, engine,
                     [frame(part) for part in (header, metadata, reply, reply_md)]))
    # the messages are alive here all at once, in a controller one at a time: out of the
    # collector's sight, or every collection would walk all of them
    gc.freeze()
    hub = Hub()
    spent = dict.fromkeys(("submitted", "assigned", "finished", "flush"), 0.0)
    clock = time.process_time
    for start in range(0, tasks, in_flight):
        batch = made[start:start + in_flight]
        t = clock()
        for header, metadata, _, _, _, texts in batch:
            hub.submitted(header["msg_id"], header, metadata, session, "task", None, content, buffers,
                          texts[0], texts[1])
        spent["submitted"] += clock() - t
        t = clock()
        for header, _, _, _, engine, _ in batch:
            hub.assigned(header["msg_id"], engine)
        spent["assigned"] += clock() - t
        t = clock()
        for header, _, reply, reply_md, _, texts in batch:
            hub.finished(header["msg_id"], reply, reply_md, content, result, texts[2], texts[3])
        spent["finished"] += clock() - t
        t = clock()
        hub.store.flush()
        spent["flush"] += clock() - t
    assert len(hub.store) == tasks
    hub.store.close()
    gc.unfreeze()
    return {name: seconds / tasks * 1e6 for name, seconds in spent.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: a smoke run, whose numbers are not judged")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per throughput turn")
    parser.add_argument("--repeat", type=int, default=5, help="throughput turns per store")
    parser.add_argument("--rss-tasks", type=int, default=100_000, help="tasks for the RSS figure")
    parser.add_argument("--records", action="store_true",
                        help="only the CPU per task of the Hub's record calls, in-process")
    opts = parser.parse_args(argv)
    if opts.records:
        cost = record_cost()
        print(" ".join(f"{name} {us:.1f}" for name, us in cost.items()),
              f"total {sum(cost.values()):.1f} us of CPU per task")
        return 0
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
