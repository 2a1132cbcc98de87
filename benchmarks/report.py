"""Machine description and the markdown results table."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from importlib import metadata

import psutil

from benchmarks import IMPLEMENTATIONS
from benchmarks.runner import Cell, metric_id
from benchmarks.workloads import FLOOR, Metric, Sizes, Workload

REFERENCE, OURS = IMPLEMENTATIONS
PACKAGES = ("ipyparallel", "ipyparallel_lite", "pyzmq", "numpy", "cloudpickle", "psutil")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, falling back to :mod:`platform`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    """Installed version of distribution ``name``, or "not installed"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    """The 1/5/15-minute load averages (the machine may be shared: a noise hint)."""
    if not hasattr(os, "getloadavg"):
        return "?"
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_lines() -> list[str]:
    """Markdown bullet lines describing the machine and software versions."""
    logical = os.cpu_count()
    physical = psutil.cpu_count(logical=False)
    mem_gib = psutil.virtual_memory().total / 2**30
    versions = ", ".join(f"{p} {package_version(p)}" for p in PACKAGES)
    return [
        f"- machine: {cpu_model()}; {logical} logical cores ({physical} physical); "
        f"{mem_gib:.1f} GiB RAM; {platform.platform()}",
        f"- python: {platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        f"- packages: {versions}",
        f"- load average at start (1/5/15 min): {load_average()}",
    ]


def _num(value: float) -> str:
    """Format a number with about three significant digits, no exponent."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _escape(text: str) -> str:
    """Make ``text`` safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def format_cell(cell: Cell | None) -> str:
    """``median [min–max]`` of the samples, or the reason text, or a dash."""
    if cell is None:
        return "—"
    if isinstance(cell, str):
        return _escape(cell)
    if not cell:
        return "n/a (no samples)"
    med = statistics.median(cell)
    if len(cell) == 1:
        return _num(med)
    return f"{_num(med)} [{_num(min(cell))}–{_num(max(cell))}]"


def _median(cell: Cell | None) -> float | None:
    """Median of a sample list, None for a missing or failed cell."""
    if isinstance(cell, list) and cell:
        return statistics.median(cell)
    return None


def ratio(metric: Metric, reference: Cell | None, ours: Cell | None) -> float | None:
    """Improvement factor, > 1 meaning ipyparallel_lite is better; None if undefined."""
    ref, new = _median(reference), _median(ours)
    if ref is None or new is None or ref <= 0 or new <= 0 or (
            metric.max_value is not None and not metric.ratio_too):
        return None
    return new / ref if metric.higher_is_better else ref / new


def target_cell(metric: Metric, factor: float | None, ours: Cell | None) -> str:
    """Target text, with ✓/✗ when ipyparallel_lite's result can be judged against it."""
    text = metric.target_text()
    if metric.min_ratio is not None and factor is not None:
        return f"{text} {'✓' if factor >= metric.min_ratio else '✗'}"
    value = _median(ours)
    if metric.max_value is not None and value is not None:
        return f"{text} {'✓' if value < metric.max_value else '✗'}"
    return text


def floor_multiple(mid: str, metric: Metric, cells: dict[str, Cell]) -> float | None:
    """Metric ``mid``'s median as a multiple of the floor measured in the same
    implementation's run: for a latency, how many bare round trips it takes; for a
    throughput, what fraction of the bare stream's rate it reaches. None without a
    floor or a value."""
    if metric.floor is None:
        return None
    value, base = _median(cells.get(mid)), _median(cells.get(f"{FLOOR}.{metric.floor}"))
    if value is None or base is None or base <= 0:
        return None
    return value / base


def floor_cell(mid: str, metric: Metric, ref_cells: dict[str, Cell],
               our_cells: dict[str, Cell]) -> str:
    """``reference / lite`` multiples of the floor, or a dash for a metric without one."""
    if metric.floor is None:
        return "—"
    multiples = (floor_multiple(mid, metric, cells) for cells in (ref_cells, our_cells))
    return " / ".join("—" if m is None else f"{_num(m)}×" for m in multiples)


def table_lines(
    workloads: list[Workload], sizes: Sizes, results: dict[str, dict[str, Cell]]
) -> list[str]:
    """The markdown table: one row per metric of every selected workload."""
    lines = [
        f"| metric | unit | {REFERENCE} (median [min–max]) | {OURS} (median [min–max]) "
        f"| ratio (>1: lite better) | target | × floor ({REFERENCE} / {OURS}) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    ref_cells, our_cells = results.get(REFERENCE, {}), results.get(OURS, {})
    for workload in workloads:
        for metric in workload.metrics:
            mid = metric_id(workload, metric.key)
            ref, ours = ref_cells.get(mid), our_cells.get(mid)
            # the floor does not depend on the implementation: its two columns show noise
            factor = None if workload.name == FLOOR else ratio(metric, ref, ours)
            label = _escape(f"{workload.name}: {metric.label.format(**vars(sizes))}")
            cells = [
                label,
                metric.unit,
                format_cell(ref),
                format_cell(ours),
                f"{factor:.2f}×" if factor is not None else "—",
                target_cell(metric, factor, ours),
                floor_cell(mid, metric, ref_cells, our_cells),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(
    workloads: list[Workload],
    sizes: Sizes,
    repeat: int,
    results: dict[str, dict[str, Cell]],
    machine: list[str],
    notes: list[str],
) -> str:
    """The whole markdown report: heading, ``machine`` and ``notes`` bullets, the table."""
    mode = "quick (tiny sizes, 1 repetition)" if sizes.quick else f"{repeat} repetitions"
    header = [
        f"## Benchmarks: {REFERENCE} vs {OURS} ({time.strftime('%Y-%m-%d %H:%M %Z')})",
        "",
        *machine,
        f"- run: {mode}; workloads: {', '.join(w.name for w in workloads)}",
        *(f"- {note}" for note in notes),
        "- cells: median [min–max] over the repetitions; controller_rss runs once; "
        "MB = 10^6 bytes; RSS includes child processes. Ratio = lite/reference for "
        "rates, reference/lite for times and sizes. × floor: the median over the floor's "
        "median in the same implementation's run (round trip for latencies: how many bare "
        "round trips; stream rate for throughputs: what fraction of the bare rate).",
        "",
    ]
    return "\n".join([*header, *table_lines(workloads, sizes, results)]) + "\n"
