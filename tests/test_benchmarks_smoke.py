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


@pytest.mark.timeout(300)
def test_registration_benchmark_runs():
    """``python -m benchmarks.registration --quick``: 50 engine stubs, all registered,
    kept alive by heartbeats and removed again."""
    proc = run_quick("benchmarks.registration")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    row = _table_rows(proc.stdout)["50"]
    assert row[1] == "yes", row
