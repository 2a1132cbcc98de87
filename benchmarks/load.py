"""Sustained load: many clients at once on one cluster, ipyparallel_lite alone.

    python -m benchmarks.load                 # 10 clients x 10,000 tasks on 4 engines
    python -m benchmarks.load --quick         # 3 clients x 300 tasks on 2 engines

Each client is its own process: it connects, submits its share as load-balanced
``apply_async`` calls (``noop1(i)``, which returns ``i``), waits, and checks every
result. Meanwhile the controller's RSS is sampled. Prints one markdown table; exits 1
if any result is wrong or missing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time

import psutil

import ipyparallel_lite as ipp
from benchmarks.tasks import noop1


def client_job(url_file: str, first: int, count: int, out: multiprocessing.Queue) -> None:
    """One client: submit ``count`` tasks, check the results, report (ok, seconds)."""
    rc = ipp.Client(url_file=url_file)
    try:
        lview = rc.load_balanced_view()
        start = time.perf_counter()
        ars = [lview.apply_async(noop1, i) for i in range(first, first + count)]
        results = [ar.get(timeout=600) for ar in ars]
        out.put((results == list(range(first, first + count)), time.perf_counter() - start))
    except Exception as e:  # reported, not raised: the parent counts it as a failure
        out.put((False, repr(e)))
    finally:
        rc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--tasks", type=int, help="tasks per client")
    parser.add_argument("--engines", type=int)
    args = parser.parse_args(argv)
    clients = args.clients or (3 if args.quick else 10)
    per_client = args.tasks or (300 if args.quick else 10_000)
    engines = args.engines or (2 if args.quick else 4)

    with ipp.Cluster(n=engines) as rc:
        url_file = str(rc.cluster.connection_file("client"))
        controller = psutil.Process(rc.cluster.controller.pid)
        idle_mb = controller.memory_info().rss / 1e6
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                samples.append(controller.memory_info().rss / 1e6)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        ctx = multiprocessing.get_context("spawn")
        out: multiprocessing.Queue = ctx.Queue()
        procs = [ctx.Process(target=client_job, args=(url_file, i * per_client, per_client, out))
                 for i in range(clients)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        reports = [out.get(timeout=1200) for _ in procs]
        elapsed = time.perf_counter() - start
        for p in procs:
            p.join(30)
        done.set()
        sampler.join()
        end_mb = controller.memory_info().rss / 1e6

    ok = all(r[0] is True for r in reports)
    times = [r[1] for r in reports if isinstance(r[1], float)]
    total = clients * per_client
    print(f"| load: {clients} clients x {per_client:,} tasks on {engines} engines | value |")
    print("| --- | --- |")
    print(f"| all {total:,} results correct | {'yes' if ok else 'NO: ' + str([r for r in reports if not r[0]])} |")
    print(f"| wall time (client processes started to last result) | {elapsed:.1f} s |")
    print(f"| aggregate throughput | {total / elapsed:,.0f} tasks/s |")
    if times:
        print(f"| per-client time, median [min-max] | {statistics.median(times):.1f} s "
              f"[{min(times):.1f}-{max(times):.1f}] |")
    print(f"| controller RSS idle / peak / after | {idle_mb:.0f} / {max(samples, default=end_mb):.0f} "
          f"/ {end_mb:.0f} MB |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
