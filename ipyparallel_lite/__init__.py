"""ipyparallel_lite: interactive parallel computing for Python and Jupyter.

Code written for IPython parallel's public API runs unchanged::

    import ipyparallel_lite as ipp
    with ipp.Cluster(n=4) as rc:
        print(rc[:].apply_sync(lambda: 42))
"""

from ipyparallel_lite._version import __version__
from ipyparallel_lite.client import (
    AsyncMapResult,
    AsyncResult,
    BroadcastView,
    Client,
    DirectView,
    LoadBalancedView,
    ViewExecutor,
)
from ipyparallel_lite.cluster import Cluster, ClusterError
from ipyparallel_lite.dependency import Dependency, depend, require
from ipyparallel_lite.error import (
    CompositeError,
    EngineError,
    ImpossibleDependency,
    InvalidDependency,
    NoEnginesRegistered,
    RemoteError,
    TaskAborted,
    TaskTimeout,
    TimeoutError,
    UnmetDependency,
)
from ipyparallel_lite.serialization import Reference

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
