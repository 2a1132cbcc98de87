"""The dask.distributed bridge: ``rc.become_dask()`` and ``rc.stop_distributed()``.

Three places take part, each with its piece here:

- the controller runs one ``distributed.Scheduler`` (:class:`SchedulerThread`) in a
  thread of its own with its own event loop, so that dask's scheduling never delays the
  controller's routing loop and importing ``distributed`` (about a second) happens off
  that loop too;
- each engine runs one ``distributed.Worker`` (or ``Nanny``) in a thread of its own
  (:func:`start_worker`, sent to the engines by ``apply``), so that a long task run by
  the engine's kernel does not stall the worker's heartbeats to the scheduler;
- the client asks the controller for the scheduler, starts the workers and returns a
  connected ``distributed.Client``.

``distributed`` is optional (the ``[dask]`` extra); :func:`require_distributed` says
how to install it wherever it is missing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

#: how long starting or stopping the scheduler or a worker may take
START_TIMEOUT = 60.0


def require_distributed(where: str) -> Any:
    """``import distributed``, or an ImportError that says how to get it."""
    try:
        import distributed
    except ImportError as e:
        raise ImportError(
            f"become_dask needs the 'distributed' package {where}, and it is not installed "
            f"({e}). Install it with: pip install 'ipyparallel_lite[dask]'"
        ) from None
    return distributed


class LoopThread:
    """A daemon thread running one asyncio loop with one dask server (scheduler or worker).

    ``make_server`` is called on that loop and returns an awaitable server (a
    ``Scheduler``, ``Worker`` or ``Nanny``); :meth:`start` waits until it listens and
    :meth:`stop` closes it and ends the thread.
    """

    def __init__(self, name: str, make_server: Callable[[], Any]):
        self._make_server = make_server
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self.server: Any = None
        #: the scheduler a worker serves (None for the scheduler itself)
        self.scheduler_address: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout: float = START_TIMEOUT) -> Any:
        """Start the thread and the server; the server, once it listens."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self._thread.name} did not start within {timeout:g}s")
        if self._error is not None:
            raise self._error
        return self.server

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        try:
            self.server = await self._make_server()
        except BaseException as e:  # reported to the thread that called start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        await self._stop_requested.wait()
        await self.server.close()

    def stop(self, timeout: float = START_TIMEOUT) -> None:
        """Close the server and wait for the thread to end."""
        if self._loop is not None and self._stop_requested is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()


class SchedulerThread(LoopThread):
    """The controller's ``distributed.Scheduler``: listens on the controller's interface
    (``ip``) unless ``scheduler_args`` say otherwise, dashboard included."""

    def __init__(self, ip: str, port: int = 0, scheduler_args: dict | None = None):
        distributed = require_distributed("in the controller's environment")
        args = {"host": ip, "port": port, "dashboard_address": f"{ip}:0", **(scheduler_args or {})}
        super().__init__("ipp-lite-dask-scheduler", lambda: distributed.Scheduler(**args))

    @property
    def address(self) -> str:
        return self.server.address


class ControllerDask:
    """The controller's side: at most one scheduler, started and stopped one request at a
    time in a thread of their own, each answered on the controller's loop by ``answer``
    with the reply's content (an error's content if it failed)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ip: str,
                 error_content: Callable[[str, str], dict]):
        self._loop = loop
        self._ip = ip
        self._error_content = error_content
        self._scheduler: SchedulerThread | None = None
        self._runner = concurrent.futures.ThreadPoolExecutor(1, "ipp-lite-dask-control")

    def become(self, content: dict, answer: Callable[[dict], None]) -> None:
        """Start the scheduler (``content``: ``port``, ``scheduler_args``) unless it runs."""
        def start() -> dict:
            if self._scheduler is None or not self._scheduler.is_alive():
                scheduler = SchedulerThread(self._ip, int(content.get("port") or 0),
                                            content.get("scheduler_args"))
                scheduler.start()
                self._scheduler = scheduler
            return {"status": "ok", "address": self._scheduler.address}

        self._run(start, answer)

    def stop(self, answer: Callable[[dict], None]) -> None:
        """Stop the scheduler if one runs."""
        def stop() -> dict:
            running = self._scheduler is not None
            self.close()
            return {"status": "ok", "stopped": running}

        self._run(stop, answer)

    def _run(self, job: Callable[[], dict], answer: Callable[[dict], None]) -> None:
        def done(future: concurrent.futures.Future) -> None:
            error = future.exception()
            reply = (self._error_content(type(error).__name__, str(error)) if error is not None
                     else future.result())
            try:
                self._loop.call_soon_threadsafe(answer, reply)
            except RuntimeError:  # the controller stopped meanwhile: nobody to answer
                pass

        self._runner.submit(job).add_done_callback(done)

    def close(self) -> None:
        """Stop the scheduler, if any (also when the controller stops)."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.stop()


# ---- on the engines (called through apply, so module-level and importable) ----------

#: the engine's worker thread, if it became a dask worker
_worker: LoopThread | None = None


def start_worker(address: str, nanny: bool = False, **worker_args: Any) -> str:
    """Make this engine a dask worker of the scheduler at ``address``; its address.

    Runs on an engine. The worker (a ``Nanny`` and its worker process with
    ``nanny=True``) lives in a thread of its own; a second call keeps the running one
    if it serves the same scheduler.
    IPython parallel's name for it in the engine's namespace, ``dask_worker`` (and
    ``distributed_worker``), is set too.
    """
    global _worker
    if _worker is not None and _worker.is_alive():
        if _worker.scheduler_address == address:
            return _worker.server.address
        stop_worker()  # of a scheduler that is gone: serve the new one
    distributed = require_distributed("on the engines")
    server_class = distributed.Nanny if nanny else distributed.Worker
    worker_args.setdefault("nthreads", 1)  # an engine is one process for one task at a time
    _worker = LoopThread("ipp-lite-dask-worker", lambda: server_class(address, **worker_args))
    _worker.scheduler_address = address
    server = _worker.start()
    _publish_in_namespace(server)
    return server.address


def stop_worker() -> bool:
    """Stop this engine's dask worker; False if it had none. Runs on an engine."""
    global _worker
    if _worker is None:
        return False
    _worker.stop()
    _worker = None
    _publish_in_namespace(None)
    return True


def _publish_in_namespace(server: Any) -> None:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return
    for name in ("dask_worker", "distributed_worker"):
        if server is None:
            shell.user_ns.pop(name, None)
        else:
            shell.user_ns[name] = server
