"""Benchmark harness comparing ``ipyparallel_lite`` with ``ipyparallel``.

Run ``python -m benchmarks --help`` from the repository root.  The harness only
uses the public API shared by both packages (``Cluster``, ``Client`` views,
``AsyncResult``), so the same workload code measures either implementation.

This package is imported by the engines too (to unpickle the no-op task
functions in :mod:`benchmarks.tasks`), so keep this module free of imports.
"""

IMPLEMENTATIONS = ("ipyparallel", "ipyparallel_lite")
"""Module names the harness knows how to compare, reference implementation first."""
