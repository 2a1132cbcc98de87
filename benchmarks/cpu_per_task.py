"""CPU per task of every process of a local cluster, for one workload (ipyparallel_lite).

    python -m benchmarks.cpu_per_task lb            # 5,000-task load-balanced bursts
    python -m benchmarks.cpu_per_task latency --seconds 4

Starts a 2-engine cluster, warms the workload up, then repeats it for ``--seconds`` and
prints the wall rate (or time per call) and, for the client, the controller and each
engine, the CPU time (user + system, from psutil) spent per task or call. Wall figures
move with the machine's load; CPU per task much less, which is what makes A/B runs of
two trees (``PYTHONPATH=<tree>``, alternating) comparable on a shared machine. Run them
from a directory outside both trees: ``python -m`` puts the current directory first on
``sys.path``, so inside a checkout every run imports that checkout, whatever
``PYTHONPATH`` says. The last line gives the time the host stole from this virtual
machine during the run; runs with very different steal do not compare.

Workloads: ``lb`` (``lview.apply_async(noop)`` × ``--n``, then wait), ``map``
(``lview.map_async(noop1, range(n))``), ``direct`` (``rc[:].apply_async(noop)`` ×
n/engines), ``latency`` (``rc[0].apply_sync(noop)``), ``lblatency``
(``lview.apply_sync(noop)``), ``execute`` (``rc[:].execute("a=1")``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import cloudpickle
import psutil

import benchmarks.tasks as tasks
import ipyparallel_lite as ipp

CALLS = 200  # blocking calls per round of the latency workloads
MODES = ("lb", "map", "direct", "latency", "lblatency", "execute")


def workload(rc: ipp.Client, mode: str, n: int, engines: int) -> Callable[[], int]:
    """One round of ``mode``; it returns how many tasks or calls it ran."""
    lview, dview = rc.load_balanced_view(), rc[:]

    def lb() -> int:
        rc.wait([lview.apply_async(tasks.noop) for _ in range(n)])
        return n

    def map_() -> int:
        lview.map_async(tasks.noop1, range(n)).get()
        return n

    def direct() -> int:
        rounds = n // engines
        rc.wait([dview.apply_async(tasks.noop) for _ in range(rounds)])
        return rounds * engines

    def calls(call: Callable[[], object]) -> Callable[[], int]:
        def run() -> int:
            for _ in range(CALLS):
                call()
            return CALLS
        return run

    return {
        "lb": lb, "map": map_, "direct": direct,
        "latency": calls(lambda: rc[0].apply_sync(tasks.noop)),
        "lblatency": calls(lambda: lview.apply_sync(tasks.noop)),
        "execute": calls(lambda: dview.execute("a=1", block=True)),
    }[mode]


def processes(rc_process: psutil.Process) -> dict[str, psutil.Process]:
    """The client (this process), the controller and the engines, by name."""
    found = {"client": rc_process}
    engines = 0
    for child in rc_process.children(recursive=True):
        command = " ".join(child.cmdline())
        if "ipyparallel_lite.controller" in command:
            found["controller"] = child
        elif "ipyparallel_lite.engine" in command:
            found[f"engine{engines}"] = child
            engines += 1
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--n", type=int, default=5000, help="tasks per round of lb, map, direct")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long to measure")
    parser.add_argument("--engines", type=int, default=2)
    opts = parser.parse_args(argv)
    cloudpickle.register_pickle_by_value(tasks)  # as a notebook's functions travel
    cluster = ipp.Cluster(n=opts.engines)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(opts.engines)
        run = workload(rc, opts.mode, opts.n, opts.engines)
        run()
        run()  # warm: imports, function caches, first records
        procs = processes(psutil.Process())
        steal_before = psutil.cpu_times()
        before = {name: p.cpu_times() for name, p in procs.items()}
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < opts.seconds:
            done += run()
        elapsed = time.perf_counter() - start
        after = {name: p.cpu_times() for name, p in procs.items()}
        steal_after = psutil.cpu_times()
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    if opts.mode in ("latency", "lblatency", "execute"):
        print(f"{opts.mode}: {elapsed / done * 1e3:.3f} ms per call ({done} calls)")
    else:
        print(f"{opts.mode}: {done / elapsed:,.0f} tasks/s ({done} tasks)")
    total = 0.0
    for name in procs:
        user = after[name].user - before[name].user
        system = after[name].system - before[name].system
        total += user + system
        # system time is the kernel's share: syscalls and wake-ups, what batching saves
        print(f"  {name:10s} {(user + system) / done * 1e6:7.1f} us CPU per task "
              f"(user {user / done * 1e6:.1f}, system {system / done * 1e6:.1f})")
    print(f"  {'all':10s} {total / done * 1e6:7.1f} us CPU per task")
    # a virtual machine's stolen time: the host ran something else on our cores, and
    # every figure above is inflated (caches lost, wake-ups late); compare runs alike
    stolen = getattr(steal_after, "steal", 0.0) - getattr(steal_before, "steal", 0.0)
    print(f"  steal: {stolen / (elapsed * psutil.cpu_count()) * 100:.0f}% of the machine's "
          f"CPU time during the run")


if __name__ == "__main__":
    main()
