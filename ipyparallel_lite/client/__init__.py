"""The client side: Client, views and AsyncResults."""

from ipyparallel_lite.client.asyncresult import AsyncMapResult, AsyncResult
from ipyparallel_lite.client.client import Client
from ipyparallel_lite.client.view import BroadcastView, DirectView, LoadBalancedView, ViewExecutor

__all__ = [
    "AsyncMapResult",
    "AsyncResult",
    "BroadcastView",
    "Client",
    "DirectView",
    "LoadBalancedView",
    "ViewExecutor",
]
