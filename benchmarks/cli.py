"""Command line: ``python -m benchmarks [--quick] [--repeat N] [--only A,B] ...``."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from benchmarks import IMPLEMENTATIONS, tasks
from benchmarks.report import load_average, machine_lines, render
from benchmarks.runner import Cell, run_implementation
from benchmarks.workloads import FLOOR, FULL, QUICK, WORKLOADS, WORKLOADS_BY_NAME, Workload

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE, OURS = IMPLEMENTATIONS


def is_installed(name: str) -> bool:
    """Whether module ``name`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark ipyparallel_lite against ipyparallel; prints a markdown table.",
        epilog="workloads: " + ", ".join(WORKLOADS_BY_NAME),
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition")
    parser.add_argument("--repeat", type=int, default=5, metavar="N", help="repetitions (5)")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these workloads")
    parser.add_argument(
        "--impl",
        choices=[*IMPLEMENTATIONS, "both"],
        help="implementation(s) to run (default: both if ipyparallel is installed)",
    )
    parser.add_argument("--output", metavar="FILE.md", help="also write the report there")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.only:
        unknown = [n for n in args.only.split(",") if n.strip() not in WORKLOADS_BY_NAME]
        if unknown:
            parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS_BY_NAME)}")
    return args


def select_workloads(only: str | None) -> list[Workload]:
    """Workloads named in ``--only`` (in run order), or all of them; the floor joins
    any selection with a row to be read against it."""
    if not only:
        return list(WORKLOADS)
    names = {n.strip() for n in only.split(",")}
    if any(m.floor for w in WORKLOADS if w.name in names for m in w.metrics):
        names.add(FLOOR)
    return [w for w in WORKLOADS if w.name in names]


def select_impls(impl: str | None) -> tuple[list[str], list[str]]:
    """Implementations to run, plus report notes about the ones left out."""
    if impl is None:
        impl = "both" if is_installed(REFERENCE) else OURS
        if impl == OURS:
            return [OURS], [f"{REFERENCE}: not installed, not run"]
    if impl == "both":
        return [REFERENCE, OURS], []
    left_out = [name for name in IMPLEMENTATIONS if name != impl]
    return [impl], [f"{name}: not run (--impl {impl})" for name in left_out]


def prepare_environment() -> None:
    """Let engines (child processes) import :mod:`benchmarks.tasks`, and pickle it by value."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    try:
        import cloudpickle
    except ImportError:
        return
    register = getattr(cloudpickle, "register_pickle_by_value", None)
    if register is not None:
        register(tasks)


def configure_logging() -> None:
    """Progress messages of the harness (only) go to stderr; stdout holds the report."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log = logging.getLogger("benchmarks")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print the report and optionally write it to ``--output``."""
    args = parse_args(argv)
    configure_logging()
    prepare_environment()
    sizes = QUICK if args.quick else FULL
    repeat = 1 if args.quick else args.repeat
    workloads = select_workloads(args.only)
    impls, notes = select_impls(args.impl)
    machine = machine_lines()

    results: dict[str, dict[str, Cell]] = {}
    for name in impls:
        results[name] = run_implementation(name, workloads, sizes, repeat)

    notes.append(f"load average at end (1/5/15 min): {load_average()}")
    report = render(workloads, sizes, repeat, results, machine, notes)
    sys.stdout.write(report)
    sys.stdout.flush()
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report, encoding="utf-8")
        logging.getLogger("benchmarks").info("report written to %s", out)
    return 0
