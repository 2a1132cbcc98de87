"""Registration at scale: many engines register with one controller at once.

    python -m benchmarks.registration                  # 250 and 1,000 engines
    python -m benchmarks.registration --engines 2000   # sizes to run, comma-separated
    python -m benchmarks.registration --quick          # 50 engines, a short idle window

Engines are :class:`~benchmarks.engine_stubs.EngineStubs` (the real wire protocol and
signed messages, no kernels) in one child process, so thousands fit on a small machine. For each size, on a
fresh controller: every stub sends its ``registration_request`` at the same moment,
and the time runs until a connected ``Client`` sees them all registered (each one
ready: shell and control connected). The controller's CPU (user + system, from
``psutil``) and RSS are read before, after registration, and after an idle window in
which only heartbeats run; the controller's idle CPU without engines is measured over
the same window first and taken off. Last, every stub vanishes without unregistering (a
host lost): the time until the controller has removed them all, and its CPU for it.
Prints one markdown table; exits 1 if any engine
is missing or refused.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import psutil

import ipyparallel_lite as ipp
from benchmarks.engine_stubs import StubProcess
from ipyparallel_lite.connection import load_connection_file


@dataclass
class Registration:
    engines: int
    seconds: float
    cpu_per_engine_ms: float
    heartbeat_cpu_per_period_ms: float
    heartbeat_loop_share: float | None
    rss_per_engine_kb: float
    vanish_seconds: float
    vanish_cpu_s: float
    problems: str


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def loop_thread_cpu_seconds(proc: psutil.Process) -> float:
    """CPU of the controller's main thread, its asyncio loop (the rest is libzmq's I/O
    and the iopub relay threads, which hold no GIL)."""
    main = next(t for t in proc.threads() if t.id == proc.pid)
    return main.user_time + main.system_time


def measure(n: int, idle_window: float, timeout: float) -> Registration:
    """Register ``n`` stubs with a fresh controller and measure it."""
    cluster = ipp.Cluster(n=0)
    cluster.start_controller_sync()
    stubs = None
    rc = None
    try:
        rc = cluster.connect_client_sync()
        controller = psutil.Process(cluster.controller.pid)
        info = load_connection_file(cluster.connection_file("engine"))
        hb_period = float(info["hb_period"])
        cpu = cpu_seconds(controller)
        time.sleep(idle_window)
        idle_cpu_per_s = (cpu_seconds(controller) - cpu) / idle_window

        stubs = StubProcess(cluster.connection_file("engine"), n)
        rss = controller.memory_info().rss
        cpu = cpu_seconds(controller)
        start = time.perf_counter()
        stubs.start()
        problems = []
        try:
            rc.wait_for_engines(n, timeout=timeout)
        except ipp.error.TimeoutError as e:  # reported in the table, measured all the same
            problems.append(str(e))
        seconds = time.perf_counter() - start
        stubs.wait_registered(timeout)
        cpu_registration = cpu_seconds(controller) - cpu - idle_cpu_per_s * seconds
        rss_per_engine = (controller.memory_info().rss - rss) / n

        ready = sorted(k for k in rc.queue_status() if isinstance(k, int))
        if stubs.refused:
            problems.append(f"{len(stubs.refused)} refused ({stubs.refused[0]})")
        if not sorted(stubs.ids) == rc.ids == ready:
            problems.append(f"{len(stubs.ids)} registered, {len(rc.ids)} seen, {len(ready)} ready")

        cpu, loop_cpu = cpu_seconds(controller), loop_thread_cpu_seconds(controller)
        echoed = stubs.pings_echoed()
        time.sleep(idle_window)
        heartbeats = cpu_seconds(controller) - cpu - idle_cpu_per_s * idle_window
        # CPU times tick in 10 ms: below a few ticks a share says nothing
        loop_share = ((loop_thread_cpu_seconds(controller) - loop_cpu) / heartbeats
                      if heartbeats >= 0.05 else None)
        periods = idle_window / hb_period
        if len(rc.ids) != n:
            problems.append(f"{n - len(rc.ids)} removed while idle "
                            f"({(stubs.pings_echoed() - echoed) / n:.1f} pings echoed per stub)")

        # all engines vanish at once, unregistering none (a lost host, a killed job)
        cpu = cpu_seconds(controller)
        start = time.perf_counter()
        stubs.stop(unregister=False)
        stubs = None
        deadline = time.monotonic() + timeout
        while rc.ids and time.monotonic() < deadline:
            time.sleep(0.01)
        vanish = time.perf_counter() - start
        vanish_cpu = cpu_seconds(controller) - cpu - idle_cpu_per_s * vanish
        return Registration(n, seconds, 1000 * cpu_registration / n, 1000 * heartbeats / periods,
                            loop_share, rss_per_engine / 1000, vanish, vanish_cpu,
                            "; ".join(problems + ([f"{len(rc.ids)} not removed"] if rc.ids else [])))
    finally:
        if stubs is not None:
            stubs.stop(unregister=False)
        if rc is not None:
            rc.close()
        cluster.stop_cluster_sync()


def render(rows: list[Registration]) -> str:
    lines = [
        "| engines (stubs) | all registered and ready | time to all ready | controller CPU per "
        "registration | controller CPU per heartbeat period (its loop thread's share) | controller RSS per engine | "
        "all vanish unregistered: time until all removed, controller CPU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        share = "too little to split" if r.heartbeat_loop_share is None else f"{r.heartbeat_loop_share:.0%}"
        lines.append(
            f"| {r.engines:,} | {'NO: ' + r.problems if r.problems else 'yes'} | {r.seconds:.2f} s "
            f"({r.engines / r.seconds:,.0f}/s) | {r.cpu_per_engine_ms:.2f} ms | "
            f"{r.heartbeat_cpu_per_period_ms:.1f} ms ({share}) | {r.rss_per_engine_kb:.1f} kB | "
            f"{r.vanish_seconds:.2f} s, {r.vanish_cpu_s:.2f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.registration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 engines, 3 s idle window")
    parser.add_argument("--engines", help="engine counts to run, comma-separated (250,1000)")
    parser.add_argument("--idle", type=float, help="seconds of heartbeats measured (10)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.engines or ("50" if args.quick else "250,1000")).split(",")]
    idle = args.idle or (3.0 if args.quick else 10.0)
    rows = [measure(n, idle, timeout=60 + n / 10) for n in sizes]
    sys.stdout.write(render(rows))
    print("\n(the controller's idle CPU without engines is taken off both CPU figures)")
    return 1 if any(r.problems for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
