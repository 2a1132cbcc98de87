"""ipyparallel_lite: interactive parallel computing for Python and Jupyter.

Code written for IPython parallel's public API runs unchanged::

    import ipyparallel_lite as ipp
    with ipp.Cluster(n=4) as rc:
        print(rc[:].apply_sync(lambda: 42))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ipyparallel_lite._version import __version__ as __version__

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
    **dict.fromkeys(("ParallelFunction", "RemoteFunction", "parallel", "remote"),
                    "ipyparallel_lite.client.remotefunction"),
    **dict.fromkeys(("Cluster", "ClusterError"), "ipyparallel_lite.cluster"),
    **dict.fromkeys(("Dependency", "depend", "dependent", "require"), "ipyparallel_lite.dependency"),
    **dict.fromkeys(
        ("AlreadyDisplayedError", "CompositeError", "DependencyTimeout", "EngineError",
         "IPythonError", "ImpossibleDependency", "InvalidDependency", "KernelError",
         "NoEnginesRegistered", "RemoteError", "TaskAborted", "TaskRejectError", "TaskTimeout",
         "TimeoutError", "UnmetDependency"),
        "ipyparallel_lite.error",
    ),
    **dict.fromkeys(("Reference", "interactive"), "ipyparallel_lite.serialization"),
    # what AsyncResult.wait(return_when=...) takes, as concurrent.futures.wait does
    **dict.fromkeys(("ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"), "concurrent.futures"),
    "register_joblib_backend": "ipyparallel_lite.joblib",
}

#: submodules reachable as attributes (``ipp.error.RemoteError``) without importing them first
_SUBMODULES = frozenset({"client", "cluster", "datapub", "dependency", "error", "joblib",
                         "magics", "serialization"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"ipyparallel_lite.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ipyparallel_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


__all__ = sorted([*_LAZY, "__version__", "bind_kernel"])


def bind_kernel(**kwargs: Any) -> str | None:
    """Make this engine usable as a regular Jupyter kernel, in addition to serving the cluster.

    Call it on an engine (``rc[0].apply_sync(ipp.bind_kernel)`` or ``%px ipp.bind_kernel()``):
    the engine binds kernel sockets on 127.0.0.1 (``ip=`` to choose another interface),
    writes a connection file ``kernel-<pid>.json`` in Jupyter's runtime directory and
    returns its path, so that ``jupyter console --existing kernel-<pid>.json`` works on
    the engine's namespace. Calling it again returns the same file. In a regular kernel
    it does nothing (that kernel is bound already); anywhere else it raises RuntimeError.
    """
    import sys

    # the engine app is imported only in engine processes: looking it up costs nothing here
    engine_app = sys.modules.get("ipyparallel_lite.engine.app")
    if engine_app is not None and engine_app.EngineApp.initialized():
        return engine_app.EngineApp.instance().bind_kernel(**kwargs)
    kernelapp = sys.modules.get("ipykernel.kernelapp")
    if kernelapp is not None and kernelapp.IPKernelApp.initialized():
        return None  # a regular kernel: frontends can connect to it already
    raise RuntimeError(
        "bind_kernel() only works on an engine, e.g. rc[0].apply_sync(ipp.bind_kernel) or "
        "%px ipp.bind_kernel(); this process is no ipyparallel_lite engine."
    )


def load_ipython_extension(ip: object) -> None:
    """``%load_ext ipyparallel_lite``: register %px, %%px, %autopx, %pxresult and %pxconfig.

    The magics run nowhere until a view is bound to them with ``rc.activate()``.
    """
    # imported here so that `import ipyparallel_lite` does not import the magics
    from ipyparallel_lite.magics import load_ipython_extension as load

    load(ip)
