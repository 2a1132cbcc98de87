"""joblib on the cluster: ``ipp.register_joblib_backend()`` and ``view.register_joblib_backend()``.

Registering makes a joblib parallel backend named ``"ipyparallel_lite"`` (or the name
given) that runs each batch of a ``joblib.Parallel`` call as a load-balanced task::

    rc = ipp.Client()
    rc.load_balanced_view().register_joblib_backend()
    with joblib.parallel_config(backend="ipyparallel_lite"):
        joblib.Parallel()(joblib.delayed(f)(x) for x in range(100))

joblib is optional: this module imports it only when a backend is registered, and
says how to install it when it is missing. The backend itself is in
:mod:`ipyparallel_lite.joblib_backend`, which needs joblib to be imported.
"""

from __future__ import annotations

import functools
from typing import Any

#: the backend name joblib knows us by, unless another is given
DEFAULT_NAME = "ipyparallel_lite"


def register_joblib_backend(name: str = DEFAULT_NAME, make_default: bool = False,
                            view: Any = None) -> None:
    """Register a joblib backend ``name`` running ``joblib.Parallel`` batches on the cluster.

    ``view``: the view the tasks go through; a DirectView's engines are load-balanced
    over. Without one, the backend connects a ``Client()`` to the default profile's
    cluster (``ipcluster-lite start``) when a ``Parallel`` call starts, and closes it
    when the call ends. ``make_default``: use it for every ``Parallel`` call without a
    ``parallel_config``.
    """
    try:
        import joblib
    except ImportError as e:
        raise ImportError(
            "register_joblib_backend needs joblib, which is not installed here: "
            "pip install joblib"
        ) from e
    from ipyparallel_lite.joblib_backend import ClusterBackend

    factory = ClusterBackend if view is None else functools.partial(ClusterBackend, view=view)
    joblib.register_parallel_backend(name, factory, make_default=make_default)
