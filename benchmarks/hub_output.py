"""What recording task output in the Hub costs: ``record_output`` on against off.

    python -m benchmarks.hub_output            # 7 turns per setting
    python -m benchmarks.hub_output --quick    # a smoke run in seconds

Two 2-engine clusters run side by side, one with ``IPController.record_output=True``
(the default: the controller reads every iopub message the engines publish and the Hub
records stdout, stderr, execute_input, execute_result and error) and one with it off
(iopub only relayed by libzmq, as before the Hub recorded output). They are measured
in turns, so both see the same machine load; each figure is the median of the turns:

- ``%px``-style execute with output: median latency of a blocking
  ``rc[:].execute("print(...); 42", silent=False)`` on both engines;
- load-balanced ``apply_async(noop)`` throughput (no output: the cost of the idle
  subscription and of the per-reply check).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import ExitStack

from benchmarks.hub_store import run_tasks, start_cluster
from benchmarks.timing import latency_ms

SETTINGS = {"off": ["--IPController.record_output=False"], "on": []}
#: a cell like a %px cell that prints a line and shows a value
CELL = "print('x' * 80)\n42"


def measure(turns: int, calls: int, tasks: int) -> dict[str, dict[str, list[float]]]:
    """Per setting, ``{"px_ms": [...], "tasks_per_s": [...]}``, one value per turn."""
    out: dict[str, dict[str, list[float]]] = {s: {"px_ms": [], "tasks_per_s": []} for s in SETTINGS}
    with ExitStack() as stack:
        clients = {name: start_cluster(stack, args)[1] for name, args in SETTINGS.items()}
        for rc in clients.values():
            run_tasks(rc, min(tasks, 1000), 500)  # warm-up
            latency_ms(lambda rc=rc: rc[:].execute(CELL, silent=False, block=True), 20, 5)
        for turn in range(turns):
            for name, rc in clients.items():
                view = rc[:]
                px = latency_ms(lambda view=view: view.execute(CELL, silent=False, block=True),
                                calls, 5)
                rate = run_tasks(rc, tasks, tasks)
                out[name]["px_ms"].append(px)
                out[name]["tasks_per_s"].append(rate)
                print(f"turn {turn + 1}/{turns} record_output={name}: %px {px:.2f} ms, "
                      f"{rate:,.0f} tasks/s", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--turns", type=int, default=7, help="turns per setting")
    parser.add_argument("--calls", type=int, default=200, help="%%px calls per turn")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per throughput turn")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.turns, opts.calls, opts.tasks = 1, 20, 300
    results = measure(opts.turns, opts.calls, opts.tasks)
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    print(f"medians of {opts.turns} alternating turns, 2 engines per cluster\n")
    print("| metric | record_output off | on | on / off |\n| --- | --- | --- | --- |")
    for key, label in (("px_ms", f"%px-style execute with output ({opts.calls} calls), ms"),
                       ("tasks_per_s", f"load-balanced no-op ({opts.tasks:,} tasks), tasks/s")):
        off, on = med["off"][key], med["on"][key]
        print(f"| {label} | {off:,.2f} | {on:,.2f} | {on / off:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
