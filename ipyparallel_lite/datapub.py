"""Publishing data from a running task to the client: ``ipp.datapub.publish_data``.

On an engine, ``publish_data({"step": i})`` sends the dict to the client that
submitted the running request, where it updates ``AsyncResult.data`` while the task
runs (progress, partial results). Anywhere else there is nobody to publish to, and
it says so.
"""

from __future__ import annotations

from typing import Any


def publish_data(data: dict[str, Any]) -> None:
    """Publish ``data`` (a dict; think of it as a namespace) to the running request's client.

    Later keys overwrite earlier ones in ``AsyncResult.data``. Values are pickled, so
    numpy arrays and other objects travel too.
    """
    if not isinstance(data, dict):
        raise TypeError(f"publish_data takes a dict of names to values, not {type(data).__name__}")
    from IPython import get_ipython

    publish = getattr(getattr(get_ipython(), "kernel", None), "publish_data", None)
    if publish is None:
        raise RuntimeError(
            "publish_data() only works inside a task running on an ipyparallel_lite engine "
            "(e.g. in a function sent with view.apply); here there is no client to publish to."
        )
    publish(data)
