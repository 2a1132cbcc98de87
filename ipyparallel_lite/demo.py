"""``make demo``: a local cluster doing real parallel work, with timings.

Runs on the embedded defaults: 127.0.0.1, one engine per CPU (at least 2), a fresh
cluster id, and everything stopped at the end.
"""

from __future__ import annotations

import os
import time


def estimate_pi(samples: int, seed: int) -> int:
    """Monte Carlo: how many random points of the unit square fall in the quarter circle."""
    import random

    rng = random.Random(seed)
    inside = 0
    for _ in range(samples):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    return inside


def main() -> None:
    import ipyparallel_lite as ipp

    n = max(2, os.cpu_count() or 1)
    t0 = time.perf_counter()
    with ipp.Cluster(n=n) as rc:
        print(f"{len(rc.ids)} engines ready in {time.perf_counter() - t0:.2f}s")

        dv = rc[:]
        dv.execute("import os, socket", block=True)
        pids = dv.apply_sync(os.getpid)
        print(f"engine pids: {pids}")

        lv = rc.load_balanced_view()
        tasks, samples = 64, 200_000
        t1 = time.perf_counter()
        counts = lv.map_sync(estimate_pi, [samples] * tasks, range(tasks))
        parallel = time.perf_counter() - t1
        pi = 4 * sum(counts) / (tasks * samples)
        print(f"pi ~ {pi:.5f} from {tasks * samples:,} samples in {parallel:.2f}s on {n} engines")

        t2 = time.perf_counter()
        estimate_pi(samples * tasks // n, 0)
        serial = (time.perf_counter() - t2) * n
        print(f"the same work on one core would take ~{serial:.2f}s: speed-up x{serial / parallel:.1f}")

        t3 = time.perf_counter()
        ars = [lv.apply_async(abs, -i) for i in range(2000)]
        rc.wait(ars)
        print(f"2000 tiny load-balanced tasks: {2000 / (time.perf_counter() - t3):,.0f} tasks/s")
    print(f"cluster stopped; total {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
