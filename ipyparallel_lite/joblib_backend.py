"""The joblib parallel backend registered by ``ipp.register_joblib_backend``.

Each batch joblib dispatches is one load-balanced task; joblib's auto-batching sizes
the batches so that short calls are grouped. Its callback runs on the client's I/O
thread when the task's reply arrives, and may dispatch the next batch from there
(sending never blocks). Importing this module imports joblib.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from joblib.parallel import AutoBatchingMixin, ParallelBackendBase

from ipyparallel_lite.client.asyncresult import AsyncResult
from ipyparallel_lite.client.view import LoadBalancedView


class ClusterBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib backend running batches on a view's engines, load-balanced.

    ``view``: a LoadBalancedView, or a DirectView whose engines are load-balanced over;
    None: a ``Client()`` of the default profile is connected for each ``Parallel`` call.
    """

    supports_retrieve_callback = True
    supports_timeout = True

    def __init__(self, view: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._given_view = view
        self._view: Any = None
        self._own_client: Any = None
        self._outstanding: set[AsyncResult] = set()
        self._lock = threading.Lock()

    @property
    def view(self) -> Any:
        """The load-balanced view tasks go through (connected on first use)."""
        if self._view is None:
            view = self._given_view
            if view is None:
                from ipyparallel_lite.client import Client

                self._own_client = Client()
                view = self._own_client.load_balanced_view()
            elif not isinstance(view, LoadBalancedView):  # a DirectView: balance over its engines
                view = view.client.load_balanced_view(view.targets)
            self._view = view
        return self._view

    def effective_n_jobs(self, n_jobs: int) -> int:
        """As many jobs as the view has engines (n_jobs only limits nothing here)."""
        return max(len(self.view), 1)

    def submit(self, func: Callable, callback: Callable | None = None) -> AsyncResult:
        ar = self.view.apply_async(func)
        with self._lock:
            self._outstanding.add(ar)
        ar.add_done_callback(self._forget)
        if callback is not None:
            ar.add_done_callback(callback)
        return ar

    def _forget(self, ar: AsyncResult) -> None:
        with self._lock:
            self._outstanding.discard(ar)

    def retrieve_result_callback(self, out: AsyncResult) -> Any:
        return out.get()

    def retrieve_result(self, out: AsyncResult, timeout: float | None = None) -> Any:
        return out.get(-1 if timeout is None else timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A batch failed: stop the batches of this backend still queued or running."""
        with self._lock:
            pending = [ar for ar in self._outstanding if not ar.done()]
        if pending:
            self.view.client.abort(pending, block=False)

    def terminate(self) -> None:
        """The ``Parallel`` call is over: close the client this backend connected, if any."""
        if self._own_client is not None:
            self._own_client.close()
            self._own_client = self._view = None
