"""Smoke test of the benchmark harness: ``python -m benchmarks --quick`` runs end to end.

Only checks that every workload produced a row with a value for the
implementation under test; it makes no timing assertions.  Set
``BENCHMARKS_SMOKE_IMPL=ipyparallel`` to validate the harness itself against
the reference package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
IMPL = os.environ.get("BENCHMARKS_SMOKE_IMPL", "ipyparallel_lite")
IMPL_COLUMN = {"ipyparallel": 2, "ipyparallel_lite": 3}[IMPL]


def _workloads() -> tuple:
    """The harness's workload registry (the repository root may not be on sys.path)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.workloads import WORKLOADS

    return WORKLOADS


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """Map each table row's first cell (the metric label) to all its cells."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| metric |"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


@pytest.mark.timeout(120)
def test_quick_benchmark_prints_a_row_per_workload() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--impl", IMPL],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    for workload in _workloads():
        labels = [label for label in rows if label.startswith(f"{workload.name}: ")]
        assert len(labels) == len(workload.metrics), (workload.name, proc.stdout)
        for label in labels:
            value = rows[label][IMPL_COLUMN]
            if workload.in_quick:
                assert not value.startswith(("n/a", "—")), (label, value, proc.stderr[-3000:])
            else:
                assert value.startswith("skipped"), (label, value)


def run_quick(module: str) -> subprocess.CompletedProcess:
    """``python -m MODULE --quick`` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=280,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


@pytest.mark.timeout(300)
def test_hub_store_benchmark_runs():
    """``python -m benchmarks.hub_store --quick``: both stores measured, every row there."""
    proc = run_quick("benchmarks.hub_store")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    for label in ("memory store, tasks/s", "sqlite store, tasks/s", "sqlite / memory"):
        assert float(rows[label][1].replace(",", "")) > 0
    assert sum("controller RSS after" in label for label in rows) == 4


@pytest.mark.timeout(300)
def test_load_benchmark_runs():
    """``python -m benchmarks.load --quick``: several client processes, every result checked."""
    proc = run_quick("benchmarks.load")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "| all 900 results correct | yes |" in proc.stdout
    assert "tasks/s" in proc.stdout and "controller RSS" in proc.stdout


@pytest.mark.timeout(300)
def test_hub_output_benchmark_runs():
    """``python -m benchmarks.hub_output --quick``: both settings measured, both rows there."""
    proc = run_quick("benchmarks.hub_output")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    measured = [cells for label, cells in rows.items() if label.startswith(("%px", "load-balanced"))]
    assert len(measured) == 2
    for cells in measured:
        off, on = (float(cell.replace(",", "")) for cell in cells[1:3])
        assert off > 0 and on > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["lb", "latency"])
def test_cpu_per_task_benchmark_runs(mode):
    """``python -m benchmarks.cpu_per_task``: a rate and every process's CPU per task."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpu_per_task", mode, "--n", "200", "--seconds", "0.5"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=100,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{mode}: ") and ("tasks/s" in lines[0] or "ms per call" in lines[0])
    assert lines[-1].startswith("  steal: ") and lines[-1].endswith("during the run")
    spent = {line.split()[0]: float(line.split()[1]) for line in lines[1:-1]}
    assert set(spent) == {"client", "controller", "engine0", "engine1", "all"}
    assert spent["client"] > 0 and spent["controller"] > 0
    assert spent["all"] >= spent["client"] + spent["controller"]


def _number(cell: str) -> float:
    """The leading number of a cell such as ``"2,400"`` or ``"2.85×"``."""
    return float(cell.split()[0].rstrip("×").replace(",", ""))


@pytest.mark.timeout(180)
def test_floor_runs_with_any_row_read_against_it():
    """``--only`` a latency and two throughputs: the floor joins the run, and each row
    gets its multiple of it (latency / bare round trip, load-balanced rate / bare
    ``hwm=1`` stream rate, direct rate / bare unbounded stream rate)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--impl", "ipyparallel_lite",
         "--only", "apply_latency,lb_throughput,direct_throughput"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    def row(prefix: str, words: str = "") -> list[str]:
        return next(cells for label, cells in rows.items()
                    if label.startswith(prefix) and words in label)

    rtt, rate, unbounded = (_number(row("floor: ", words)[IMPL_COLUMN])
                            for words in ("round trip", "hwm=1", "no hwm"))
    assert rtt > 0 and rate > 0 and unbounded > 0
    for prefix, base in (("apply_latency: ", rtt), ("lb_throughput: ", rate),
                         ("direct_throughput: ", unbounded)):
        cells = row(prefix)
        multiple = _number(cells[-1].split(" / ")[1])
        assert multiple == pytest.approx(_number(cells[IMPL_COLUMN]) / base, rel=0.02), cells


@pytest.mark.timeout(60)
def test_floor_pipeline_round_trips_and_stops_its_processes():
    import psutil

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.floor import floor_pipeline

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with floor_pipeline(engines=2) as client:
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert len(started) == 3  # the relay and two engines
        client.round_trip()
        assert client.stream(50) > 0
        header = (client.send(), client.receive())[1]
        assert header["msg_type"] == "apply_reply"
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.timeout(300)
def test_registration_benchmark_runs():
    """``python -m benchmarks.registration --quick``: 50 engine stubs, all registered,
    kept alive by heartbeats and removed again."""
    proc = run_quick("benchmarks.registration")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    row = _table_rows(proc.stdout)["50"]
    assert row[1] == "yes", row


@pytest.mark.timeout(30)
def test_a_repetition_starts_with_the_earlier_garbage_collected():
    """Garbage that earlier workloads left in reference cycles is collected before the
    next repetition runs, not in the middle of its measurement."""
    import gc
    import types
    import weakref

    _workloads()
    from benchmarks.runner import SharedCluster, run_workload
    from benchmarks.workloads import QUICK, Metric, Workload

    class Node:
        pass

    seen = []

    def leave_a_cycle_and_look_for_the_last(module, handle, sizes):
        if seen:
            seen.append(seen[-1]() is None)
        node = Node()
        node.me = node  # only the collector frees it
        seen.append(weakref.ref(node))
        return {"x": 1.0}

    workload = Workload("cycles", leave_a_cycle_and_look_for_the_last, (Metric("x", "n", "x", True),),
                        engines=None)
    threshold = gc.get_threshold()
    gc.set_threshold(0)  # no automatic pass: only the runner's can free the cycle
    try:
        module = types.ModuleType("no_cluster")  # names the log lines only
        run_workload(module, workload, QUICK, 3, SharedCluster(module))
    finally:
        gc.set_threshold(*threshold)
    assert [s for s in seen if isinstance(s, bool)] == [True, True]
