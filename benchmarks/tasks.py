"""Task functions shipped to the engines.

They live in an importable module (not ``__main__``) so that both packages can
serialize them: ipyparallel re-imports the defining module on the engine (the
harness puts the repository root on ``PYTHONPATH`` for that), and cloudpickle is
told to pickle this module by value.  Keep this module dependency-free.
"""

import os


def noop() -> None:
    """Do nothing: measures pure round-trip overhead."""
    return None


def noop1(x: object) -> object:
    """Return the argument unchanged (for ``map``)."""
    return x


def get_pid() -> int:
    """Return the engine's process id."""
    return os.getpid()
