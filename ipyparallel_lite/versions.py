"""What a process runs, and which differences between two processes break unpickling.

Clients pickle functions with cloudpickle (code objects included) at pickle protocol 5;
engines load them. A function pickled under one Python minor version does not load
under another (bytecode changes), cloudpickle's reducers change between its minor
versions, and our own wire format can change between our minor versions. Such skew
used to show up as an unpickling error deep in a task; the controller now checks it
once, when an engine registers, and clients warn when they connect.
"""

from __future__ import annotations

import pickle
import platform

from ipyparallel_lite._version import __version__

#: the pickle protocol clients and engines speak (out-of-band buffers need 5)
PICKLE_PROTOCOL = 5


def versions() -> dict:
    """This process's versions of everything pickled data depends on."""
    import cloudpickle

    return {
        "python": platform.python_version(),
        "ipyparallel_lite": __version__,
        "cloudpickle": cloudpickle.__version__,
        "pickle_protocol": pickle.HIGHEST_PROTOCOL,
    }


def _minor(version: object) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


def conflicts(mine: dict, theirs: dict) -> list[str]:
    """The differences between two processes' :func:`versions` that break unpickling.

    Each is a readable phrase naming both sides; an empty list means compatible.
    Patch releases differ freely; a field the other side does not report is not held
    against it (an older engine reports less).
    """
    found = []
    for key in ("python", "cloudpickle", "ipyparallel_lite"):
        if key in theirs and _minor(theirs[key]) != _minor(mine[key]):
            found.append(f"{key} {theirs[key]} there, {mine[key]} here")
    protocol = theirs.get("pickle_protocol")
    if protocol is not None and (not isinstance(protocol, int) or protocol < PICKLE_PROTOCOL):
        found.append(f"pickle protocol {protocol} there, {PICKLE_PROTOCOL} needed")
    return found
