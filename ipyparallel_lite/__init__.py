"""ipyparallel_lite: interactive parallel computing for Python and Jupyter.

Code written for IPython parallel's public API runs unchanged::

    import ipyparallel_lite as ipp
    with ipp.Cluster(n=4) as rc:
        print(rc[:].apply_sync(lambda: 42))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ipyparallel_lite._version import __version__

if TYPE_CHECKING:
    from typing import Any

#: public names and the modules that define them, imported on first use: an engine or
#: ``%load_ext`` needs none of the client, and ``import ipyparallel_lite`` stays cheap
_LAZY = {
    **dict.fromkeys(
        ("AsyncMapResult", "AsyncResult", "BroadcastView", "Client", "DirectView",
         "LoadBalancedView", "ViewExecutor"),
        "ipyparallel_lite.client",
    ),
    **dict.fromkeys(("Cluster", "ClusterError"), "ipyparallel_lite.cluster"),
    **dict.fromkeys(("Dependency", "depend", "require"), "ipyparallel_lite.dependency"),
    **dict.fromkeys(
        ("CompositeError", "EngineError", "ImpossibleDependency", "InvalidDependency",
         "NoEnginesRegistered", "RemoteError", "TaskAborted", "TaskTimeout", "TimeoutError",
         "UnmetDependency"),
        "ipyparallel_lite.error",
    ),
    "Reference": "ipyparallel_lite.serialization",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ipyparallel_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AsyncMapResult",
    "AsyncResult",
    "BroadcastView",
    "Client",
    "Cluster",
    "ClusterError",
    "CompositeError",
    "Dependency",
    "DirectView",
    "EngineError",
    "ImpossibleDependency",
    "InvalidDependency",
    "LoadBalancedView",
    "NoEnginesRegistered",
    "Reference",
    "RemoteError",
    "TaskAborted",
    "TaskTimeout",
    "TimeoutError",
    "UnmetDependency",
    "ViewExecutor",
    "__version__",
    "depend",
    "require",
]


def load_ipython_extension(ip: object) -> None:
    """``%load_ext ipyparallel_lite``: register %px, %%px, %autopx, %pxresult and %pxconfig.

    The magics run nowhere until a view is bound to them with ``rc.activate()``.
    """
    # imported here so that `import ipyparallel_lite` does not import the magics
    from ipyparallel_lite.magics import load_ipython_extension as load

    load(ip)
