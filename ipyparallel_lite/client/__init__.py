"""The client side: Client, views and AsyncResults."""

from ipyparallel_lite.client.asyncresult import AsyncMapResult, AsyncResult
from ipyparallel_lite.client.client import Client
from ipyparallel_lite.client.view import DirectView, LoadBalancedView

__all__ = ["AsyncMapResult", "AsyncResult", "Client", "DirectView", "LoadBalancedView"]
