"""The Client: a connection to a controller, the engines it knows, and the factory of views.

The sockets, the I/O thread and the requests waiting for replies are the
:class:`~ipyparallel_lite.client.transport.Transport`'s (``client.transport``); the
Client keeps the registry of engines (from the controller's notifications), makes
views, and asks the Hub and the engines' control channels.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ipyparallel_lite import error
from ipyparallel_lite.client import reprs
from ipyparallel_lite.client.asyncresult import AsyncResult
from ipyparallel_lite.client.hubresult import AsyncHubResult, msg_ids_of, parse_dates, results_of
from ipyparallel_lite.client.progress import Progress
from ipyparallel_lite.client.transport import Transport
from ipyparallel_lite.client.view import BroadcastView, DirectView, LoadBalancedView
from ipyparallel_lite.connection import (
    connection_file_path,
    load_connection_file,
)
from ipyparallel_lite.magics import activate_first_client
from ipyparallel_lite.versions import conflicts, versions


class Client:
    """A connection to an ipyparallel_lite cluster.

    Parameters follow IPython parallel: ``Client(url_file=None, profile=None,
    cluster_id=None, timeout=10)``; ``connection_info`` (a dict) skips the file.
    ``controller_timeout``: seconds the controller may be unreachable before requests
    waiting for it fail with an error saying it is gone (default: its heartbeat window,
    ``hb_period * hb_max_misses``, 5 s unless the controller is configured otherwise).
    """

    def __init__(
        self,
        url_file: str | os.PathLike | None = None,
        profile: str | None = None,
        *,
        cluster_id: str | None = None,
        ipython_dir: str | None = None,
        timeout: float = 10,
        connection_info: dict | None = None,
        cluster: Any = None,
        controller_timeout: float | None = None,
        **kwargs: Any,
    ):
        if connection_info is None:
            if url_file is None:
                url_file = connection_file_path("client", profile or "default", cluster_id or "", ipython_dir)
            connection_info = load_connection_file(url_file)
        self.connection_info = info = connection_info
        self.cluster = cluster
        self.profile = profile or "default"
        self._engines: dict[int, str] = {}
        self._engine_infos: dict[int, dict] = {}
        self._engines_changed = threading.Condition()
        #: default ``block`` of the control methods (``clear``, ``abort``, ``shutdown``...)
        self.block = False
        self._skew_warned: set[int] = set()
        #: the distributed.Client of become_dask, closed by stop_dask
        self._dask_client: Any = None
        #: the sockets, their I/O thread, and the requests waiting for replies
        self.transport = Transport(info, timeout, on_notification=self._on_notification,
                                   on_reconnect=self._resync_with_controller,
                                   controller_timeout=controller_timeout)
        self.session = self.transport.session
        self._take_engines(self.transport.first_reply)
        activate_first_client(self)  # in IPython, the first client binds %px, as in IPython parallel

    # ---- engines ----------------------------------------------------------------------

    def _take_engines(self, content: dict) -> None:
        """Add the engines of a ``connection_reply``.

        Engines are only added here; they leave on unregistration notifications, so a
        reply overtaken by the death of one of its engines cannot bring it back.
        """
        engines = {int(eid): uuid for eid, uuid in content.get("engines", {}).items()}
        infos = {int(eid): einfo for eid, einfo in content.get("engine_info", {}).items()}
        with self._engines_changed:
            self._engines.update(engines)
            self._engine_infos.update(infos)
            self._engines_changed.notify_all()
        self.transport.add_engines(engines.values())
        for eid, einfo in infos.items():
            self._check_skew(eid, einfo)

    def _check_skew(self, eid: int, einfo: dict) -> None:
        """Say plainly when an engine runs versions that break unpickling from here."""
        skew = conflicts(versions(), einfo)
        if skew and eid not in self._skew_warned:
            self._skew_warned.add(eid)
            warnings.warn(
                f"Engine {eid} on {einfo.get('hostname', '?')} runs other versions than this "
                f"client ({'; '.join(skew)}). Functions and objects pickled here may fail to "
                "load there; use the same environment on every machine.",
                RuntimeWarning,
                stacklevel=2,
            )

    def engine_info(self, targets: Any = None) -> dict[int, dict]:
        """What each engine said of itself at registration: versions, hostname, pid."""
        ids = self.ids if targets is None else self.resolve_targets(targets)
        with self._engines_changed:
            return {eid: dict(self._engine_infos.get(eid, {})) for eid in ids}

    def engine_ids_by_uuid(self) -> dict[str, int]:
        """``{uuid: id}`` of the engines registered now: names the engine of a Hub
        record (its ``engine_uuid``) that has no reply yet."""
        with self._engines_changed:
            return {uuid: eid for eid, uuid in self._engines.items()}

    def _on_notification(self, msg: dict) -> None:
        """A registration notification (on the transport's I/O thread)."""
        msg_type, content = msg["header"]["msg_type"], msg["content"]
        with self._engines_changed:
            if msg_type == "registration_notification":
                eid = content["id"]
                self._engines[eid] = content["uuid"]
                self._engine_infos[eid] = content.get("info", {})
                self._check_skew(eid, self._engine_infos[eid])
            elif msg_type == "unregistration_notification":
                self._engines.pop(content["id"], None)
            elif msg_type == "shutdown_notification":
                self._engines.clear()
                self.transport.fail_pending("The controller shut down before these requests finished.")
            self._engines_changed.notify_all()

    @property
    def ids(self) -> list[int]:
        """Ids of the engines registered now."""
        return sorted(self._engines)

    def __len__(self) -> int:
        return len(self._engines)

    def engine_uuid(self, eid: int) -> str:
        """The uuid (zmq identity) of engine ``eid``; EngineError if it is not registered."""
        try:
            return self._engines[eid]
        except KeyError:
            raise error.EngineError(
                f"No engine with id {eid}; registered engines are {self.ids}."
            ) from None

    def resolve_targets(self, targets: Any) -> list[int]:
        """Engine ids from an int, a list, a slice, 'all' or None (all)."""
        ids = self.ids
        if not ids:
            raise error.NoEnginesRegistered(
                "No engines are registered. Start some (cluster.start_engines_sync(n)) "
                "or wait for them (rc.wait_for_engines(n))."
            )
        if targets is None or (isinstance(targets, str) and targets == "all"):
            return ids
        if isinstance(targets, int):
            if targets < 0:
                targets = ids[targets] if -len(ids) <= targets else targets
            self.engine_uuid(targets)
            return [targets]
        if isinstance(targets, slice):
            return ids[targets]
        if isinstance(targets, range | list | tuple):
            targets = list(targets)
            for t in targets:
                if not isinstance(t, int):
                    raise TypeError(f"targets must be engine ids (ints), not {t!r}")
                self.engine_uuid(t)
            return targets
        raise TypeError(f"targets must be an int, a list of ints, a slice or 'all', not {targets!r}")

    def wait_for_engines(self, n: int | None = None, *, timeout: float = -1, block: bool = True,
                         interactive: bool | None = None) -> None:
        """Wait until ``n`` engines are registered (default: those of the cluster)."""
        if n is None:
            n = getattr(self.cluster, "n", None) or 1
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        with Progress(total=n, label="engines ready", enabled=interactive) as progress:
            while True:
                with self._engines_changed:
                    count = len(self._engines)
                    if count >= n:
                        break
                    progress.update(count)
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise error.TimeoutError(f"{count} of {n} engines registered after {timeout}s.")
                    changed = self._engines_changed.wait(0.5 if remaining is None else min(remaining, 0.5))
                if not changed:
                    # notifications are PUB/SUB: one published while this client's
                    # subscription was still joining is lost, so ask the controller
                    self._take_engines(self.transport.query("connection_request", {})["content"])
            progress.update(len(self._engines), force=True)

    # ---- views ----------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, int | slice | list | tuple | range):
            raise TypeError(f"key by int, slice or list of ints, not {type(key).__name__}")
        targets = self.resolve_targets(key)
        return DirectView(self, targets[0] if isinstance(key, int) else targets)

    def __iter__(self) -> Any:
        for eid in self.ids:
            yield self[eid]

    def direct_view(self, targets: Any = "all", **kwargs: Any) -> Any:
        if targets != "all":
            self.resolve_targets(targets)
        return DirectView(self, targets, **kwargs)

    def load_balanced_view(self, targets: Any = None, **kwargs: Any) -> Any:
        if targets is not None and targets != "all":
            targets = self.resolve_targets(targets)
        elif targets == "all":
            targets = None
        return LoadBalancedView(self, targets, **kwargs)

    def broadcast_view(self, targets: Any = "all", is_coalescing: bool = False, **kwargs: Any) -> Any:
        """A :class:`~ipyparallel_lite.client.view.BroadcastView` on ``targets``.

        Each call sends ONE message; the controller fans it out to every target engine.
        ``targets="all"`` means the engines registered at each call, as for
        :meth:`direct_view`. ``is_coalescing`` is accepted for compatibility: replies
        always travel one per engine, and the AsyncResult gathers them either way.
        """
        if targets != "all":
            self.resolve_targets(targets)
        return BroadcastView(self, targets, is_coalescing=is_coalescing, **kwargs)

    def executor(self, targets: Any = None) -> Any:
        """A ``concurrent.futures.Executor`` load-balancing over ``targets`` (default: all).

        Same as ``rc.load_balanced_view(targets).executor``.
        """
        return self.load_balanced_view(targets).executor

    def activate(self, targets: Any = "all", suffix: str = "") -> Any:
        """A blocking DirectView on ``targets``, bound to the magics ``%px{suffix}`` etc.

        ``rc.activate()`` makes ``%px`` run on every engine and wait for it;
        ``rc.activate(targets=0, suffix="0")`` adds ``%px0`` for engine 0 alone.
        """
        view = self.direct_view(targets)
        view.block = True
        view.activate(suffix)
        return view

    # ---- waiting and control -----------------------------------------------------------

    def _results_of(self, jobs: Any) -> list[AsyncResult]:
        if jobs is None:
            pending = list(self.transport.pending.values())  # one C-level copy: the I/O thread mutates it
            return list({id(a): a for a in pending}.values())
        if isinstance(jobs, AsyncResult | str):
            jobs = [jobs]
        found = []
        for job in jobs:
            if isinstance(job, AsyncResult):
                found.append(job)
            elif job in self.transport.pending:
                found.append(self.transport.pending[job])
        return found

    def wait(self, jobs: Any = None, timeout: float = -1) -> bool:
        """Wait for ``jobs`` (AsyncResults or msg_ids; default all outstanding). True if all done."""
        # one wake-up when the last finishes: waiting on each in turn woke this thread at
        # every completion, which cost the client's I/O thread a fifth of its time
        _, not_done = concurrent.futures.wait(
            self._results_of(jobs), None if timeout is None or timeout < 0 else timeout)
        return not not_done

    def wait_interactive(self, jobs: Any = None, interval: float = 1.0, timeout: float = -1) -> None:
        """:meth:`wait`, showing how many of the requests are done to a person; returns
        at ``timeout`` seconds even if not done."""
        results = self._results_of(jobs)
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        with Progress(total=sum(len(ar) for ar in results), label="tasks", unit="tasks") as bar:
            while True:
                step = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
                if self.wait(results, step):
                    break
                bar.update(sum(ar.progress for ar in results))
                if deadline is not None and time.monotonic() >= deadline:
                    break
            bar.update(sum(ar.progress for ar in results), force=True)

    @property
    def outstanding(self) -> set[str]:
        """msg_ids of the requests submitted and not answered yet."""
        return set(self.transport.pending)

    @property
    def results(self) -> ResultsByMsgId:
        """``{msg_id: result}`` of the answered requests whose AsyncResult is still alive
        (a failed request's value is its error)."""
        return ResultsByMsgId(self.transport.outputs, metadata=False)

    @property
    def metadata(self) -> ResultsByMsgId:
        """``{msg_id: Metadata}`` of the requests whose AsyncResult is still alive."""
        return ResultsByMsgId(self.transport.outputs, metadata=True)

    def purge_local_results(self, jobs: Any = (), targets: Any = ()) -> None:
        """Forget finished requests in :attr:`results` and :attr:`metadata` (their
        AsyncResults keep their values): ``jobs`` (AsyncResults or msg_ids, or ``"all"``)
        and/or every request that ran on ``targets``. Outstanding requests cannot be
        purged (RuntimeError)."""
        if not jobs and (targets is None or (not isinstance(targets, int) and not targets)):
            raise ValueError("purge_local_results needs jobs (AsyncResults, msg_ids or 'all') or targets")
        if isinstance(jobs, str) and jobs == "all":
            msg_ids = set(self.transport.outputs.keys())
        else:
            msg_ids = set(_ids_of([jobs] if isinstance(jobs, AsyncResult | str) else jobs))
        if targets is not None and (isinstance(targets, int) or targets):
            engines = set(self.resolve_targets(targets))
            msg_ids.update(m for m, md in self.metadata.items() if md["engine_id"] in engines)
        running = msg_ids & set(self.transport.pending)
        if running:
            raise RuntimeError(f"cannot purge outstanding requests {sorted(running)}; wait for them "
                               "or abort them first")
        for msg_id in msg_ids:
            self.transport.outputs.pop(msg_id, None)

    def spin(self) -> None:
        """Kept for IPython parallel code: this client's I/O thread receives all the time."""

    def spin_thread(self, interval: float = 1) -> None:
        """Kept for IPython parallel code: this client's I/O thread receives all the time."""

    def stop_spin_thread(self) -> None:
        """Kept for IPython parallel code (see :meth:`spin_thread`)."""

    #: how long a blocking control request (clear, abort, signal) waits for the engines:
    #: they answer on their control thread even while a task runs, so only an engine
    #: that is gone (or stuck in C code holding the GIL) takes longer
    CONTROL_TIMEOUT = 30.0

    def _control(self, msg_type: str, content: dict, targets: list[int], block: bool | None,
                 to_controller: bool = False) -> AsyncResult | None:
        """``msg_type`` to each engine of ``targets`` (and the controller): waits for the
        replies and raises their errors when blocking, else returns their AsyncResult."""
        messages = [self.transport.build(msg_type, content, ident=[self.engine_uuid(eid).encode()])
                    for eid in targets]
        if to_controller:
            messages.append(self.transport.build(msg_type, content))
        ar = AsyncResult(self, [m for m, _ in messages], msg_type.replace("_request", ""), targets)
        self.transport.submit("control", messages, ar, control=True)
        if not (self.block if block is None else block):
            return ar
        if not ar.wait(self.CONTROL_TIMEOUT):
            silent = [eid for eid, (msg_id, _) in zip(targets, messages) if msg_id not in ar._replies]
            raise error.TimeoutError(
                f"engines {silent} did not answer {msg_type} within {self.CONTROL_TIMEOUT:g}s; "
                "they may be gone (rc.ids lists those registered) or stuck in C code")
        ar.get()
        return None

    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = None) -> AsyncResult | None:
        """Drop queued requests and interrupt running ones (``jobs``: AsyncResults or
        msg_ids; default all outstanding) on ``targets`` (default all engines) and in the
        controller's queue. ``block``: wait until the engines confirmed."""
        if jobs is None:
            msg_ids = list(self.transport.pending)
        else:
            msg_ids = _ids_of([jobs] if isinstance(jobs, AsyncResult | str) else jobs)
        if not msg_ids:
            return None
        self.transport.abort_held(msg_ids)  # those the window holds here are never sent
        engines = self.resolve_targets(targets) if targets is not None else self.ids
        return self._control("abort_request", {"msg_ids": msg_ids}, engines, block, to_controller=True)

    def send_signal(self, sig: int | str, targets: Any = None, block: bool | None = None) -> AsyncResult | None:
        """Send a signal (``signal.SIGINT`` or its name) to engines' processes."""
        import signal as _signal

        try:
            name = _signal.Signals(sig).name if isinstance(sig, int) else _signal.Signals[str(sig)].name
        except (KeyError, ValueError):
            raise ValueError(f"unknown signal {sig!r}: pass a signal.Signals value or name such as 'SIGINT'") from None
        return self._control("signal_request", {"sig": name}, self.resolve_targets(targets), block)

    def clear(self, targets: Any = None, block: bool | None = None) -> AsyncResult | None:
        """Clear the namespace of the engines (default all)."""
        return self._control("clear_request", {}, self.resolve_targets(targets), block)

    def queue_status(self, targets: Any = None, verbose: bool = False) -> dict:
        ids = self.resolve_targets(targets) if targets is not None else None
        content = self.transport.query("queue_request", {"targets": ids, "verbose": verbose})["content"]
        status = {int(k) if k.isdigit() else k: v for k, v in content.items() if k != "status"}
        if isinstance(targets, int):
            return status[targets]
        return status

    def shutdown(self, targets: Any = "all", restart: bool = False, hub: bool = False,
                 block: bool | None = None) -> None:
        """Stop engines (default all); with ``hub=True`` the controller too.

        ``restart=True`` is refused: an engine cannot bring itself back; restart the
        engines of a cluster with ``cluster.restart_engines_sync()``. ``block``: wait
        until the engines are unregistered.
        """
        if restart:
            raise ValueError("shutdown(restart=True) is not supported: engines cannot restart "
                             "themselves; use cluster.restart_engines_sync() on their Cluster")
        ids = self.resolve_targets(targets) if self._engines else []
        for eid in ids:
            self.transport.send("control", "shutdown_request", {"restart": False},
                       ident=[self.engine_uuid(eid).encode()])
        if hub:
            self.transport.query("shutdown_request", {})
        if (self.block if block is None else block) and ids:
            with self._engines_changed:
                gone = self._engines_changed.wait_for(lambda: not set(ids) & set(self._engines),
                                                      self.CONTROL_TIMEOUT)
            if not gone:
                raise error.TimeoutError(
                    f"engines {sorted(set(ids) & set(self._engines))} still registered "
                    f"{self.CONTROL_TIMEOUT:g}s after shutdown_request")

    # ==== Hub queries ================================================================
    # What the Hub's records answer (queue_status, above, asks about queues): status,
    # results (also of tasks other clients submitted, or submitted before a controller
    # restart), queries, purge, resubmit. Each is one request on the query socket,
    # answered synchronously.

    def result_status(self, msg_ids: Any, status_only: bool = True) -> dict:
        """``{"pending": [...], "completed": [...]}`` of tasks (msg_ids, history indices or
        AsyncResults); with ``status_only=False`` also each completed task's result (its
        value, or the exception it raised) under its msg_id."""
        ids = msg_ids_of(self, msg_ids)
        reply = self.transport.query("result_request", {"msg_ids": ids, "status_only": status_only})
        content = reply["content"]
        status: dict[str, Any] = {"pending": content["pending"], "completed": content["completed"]}
        for msg_id, msg in results_of(reply).items():
            ar = AsyncHubResult(self, [msg_id], self.transport.query, single=True)
            ar._receive(msg_id, msg)
            status[msg_id] = _value_or_error(ar)
        return status

    def get_result(self, indices_or_msg_ids: Any = None, block: bool | None = None) -> Any:
        """An :class:`~.hubresult.AsyncHubResult` of earlier tasks (default: the last one
        submitted here), fetched from the Hub: works for tasks another client submitted,
        and after a controller restart. ``block=True`` returns the results instead."""
        if indices_or_msg_ids is None:
            indices_or_msg_ids = -1
        single = isinstance(indices_or_msg_ids, str | int)
        ids = msg_ids_of(self, indices_or_msg_ids)
        ar = AsyncHubResult(self, ids, self.transport.query, single=single and len(ids) == 1)
        ar.fetch()  # unknown msg_ids raise here
        ar.start_polling()
        return ar.get() if block else ar

    def resubmit(self, indices_or_msg_ids: Any = None, block: bool | None = None) -> Any:
        """Run finished tasks again (same function, arguments, dependencies, targets and
        flags) under new msg_ids; an AsyncHubResult of the reruns."""
        ids = msg_ids_of(self, -1 if indices_or_msg_ids is None else indices_or_msg_ids)
        mapping = self.transport.query("resubmit_request", {"msg_ids": ids})["content"]["resubmitted"]
        return self.get_result([mapping[m] for m in ids], block=block)

    def purge_results(self, jobs: Any = (), targets: Any = ()) -> None:
        """Forget the Hub's records of finished tasks: ``jobs`` (msg_ids, history indices,
        AsyncResults, or ``"all"``) and those that ran on ``targets`` (engine ids)."""
        if not jobs and not targets:
            raise ValueError("purge_results needs jobs (msg_ids or 'all') or targets (engine ids)")
        msg_ids = "all" if jobs == "all" else (msg_ids_of(self, jobs) if jobs else [])
        engine_ids = self.resolve_targets(targets) if targets else []
        self.transport.query("purge_request", {"msg_ids": msg_ids, "engine_ids": engine_ids})

    purge_hub_results = purge_results

    def purge_everything(self) -> None:
        """Forget every finished request, in the Hub and here: the Hub's records (and the
        buffers they hold, so the controller's memory comes back), :attr:`results`,
        :attr:`metadata` and :attr:`history`. Outstanding requests are kept."""
        self.purge_results("all")
        self.transport.forget_finished()

    def db_query(self, query: dict, keys: list[str] | None = None) -> list[dict]:
        """The Hub's task records matching a Mongo-style ``query`` (operators ``$lt $gt
        $lte $gte $eq $ne $in $nin $all $exists $glob``), each with only ``keys`` (and
        ``msg_id``) if given; buffers come back as bytes."""
        reply = self.transport.query("db_request", {"query": query, "keys": keys})
        content, buffers = reply["content"], list(reply.get("buffers") or [])
        at = 0
        records = content["records"]
        for record, nbuf, nres in zip(records, content["buffer_lens"], content["result_buffer_lens"]):
            for key, n in (("buffers", nbuf), ("result_buffers", nres)):
                if n is not None:
                    record[key] = [bytes(b) for b in buffers[at:at + n]]
                    at += n
            parse_dates(record)
        return records

    def hub_history(self) -> list[str]:
        """msg_ids of every task the Hub has a record of, oldest submitted first."""
        return self.transport.query("history_request", {})["content"]["history"]

    # ==== dask.distributed =============================================================
    # A dask scheduler in the controller's process, a worker in each engine: the same
    # engines then serve both APIs at once (see dask_bridge.py).

    def become_dask(self, targets: Any = "all", port: int = 0, nanny: bool = False,
                    scheduler_args: dict | None = None, **worker_args: Any) -> Any:
        """Turn the engines ``targets`` into the workers of a dask.distributed cluster;
        a ``distributed.Client`` connected to it.

        The scheduler runs in the controller's process, on its interface and ``port``
        (0: any free port), with ``scheduler_args`` passed to ``distributed.Scheduler``
        (JSON values only). Each engine runs a ``distributed.Worker`` (with
        ``nanny=True`` a ``Nanny`` and its worker process), given ``worker_args``
        (``nthreads`` defaults to 1). Calling it again reuses the running scheduler.
        Needs ``distributed`` in the client, controller and engines:
        ``pip install 'ipyparallel_lite[dask]'``.
        """
        from ipyparallel_lite import dask_bridge

        distributed = dask_bridge.require_distributed("in this client's environment")
        view = self.direct_view(targets)
        try:
            reply = self.transport.query("become_dask_request",
                                {"port": port, "scheduler_args": scheduler_args or {}},
                                timeout=dask_bridge.START_TIMEOUT)
        except error.RemoteError as e:
            if e.ename == "ImportError":
                raise ImportError(e.evalue) from None
            raise
        address = reply["content"]["address"]
        view.apply_sync(dask_bridge.start_worker, address, nanny=nanny, **worker_args)
        if self._dask_client is not None:
            self._dask_client.close()
        self._dask_client = distributed.Client(address)
        return self._dask_client

    become_distributed = become_dask

    def stop_dask(self, targets: Any = "all") -> None:
        """Stop the dask workers on the engines ``targets`` and the controller's dask
        scheduler, and close the ``distributed.Client`` that ``become_dask`` returned.
        The engines go on as before."""
        from ipyparallel_lite import dask_bridge

        if self._dask_client is not None:
            self._dask_client.close()
            self._dask_client = None
        self.direct_view(targets).apply_sync(dask_bridge.stop_worker)
        self.transport.query("stop_distributed_request", {}, timeout=dask_bridge.START_TIMEOUT)

    stop_distributed = stop_dask

    def _resync_with_controller(self) -> None:
        """After the controller came back (restarted with --restore): take its engine
        list as it is now, and the results of requests still waited on here, which it
        recorded as lost if it died before they finished."""
        try:
            engines = self.transport.query("connection_request", {})["content"]
            restarted = engines.get("controller_pid") != self.connection_info.get("controller_pid")
            self.connection_info["controller_pid"] = engines.get("controller_pid")
            with self._engines_changed:
                self._engines.clear()
                self._engine_infos.clear()
            self._take_engines(engines)
            waiting = [m for m in list(self.transport.pending) if isinstance(m, str)]
            if not waiting:
                return
            known = {r["msg_id"] for r in self.db_query({"msg_id": {"$in": waiting}}, ["msg_id"])}
            if known:
                reply = self.transport.query("result_request", {"msg_ids": sorted(known)})
                for msg_id, msg in results_of(reply).items():
                    ar = self.transport.pending.pop(msg_id, None)
                    if ar is not None:
                        ar._receive(msg_id, msg)
            if restarted:  # sent to the old controller, which died before recording them
                self.transport.fail_pending_ids(
                    [m for m in waiting if m not in known],
                    "The controller died before it recorded this request; its result is lost. "
                    "Resubmit it.")
        except Exception as e:  # the controller went away again: the usual grace applies
            if not self.closed:  # closed meanwhile: nobody is left to resynchronize
                warnings.warn(f"could not resynchronize with the controller: {e}", stacklevel=1)

    def close(self, linger: int | None = None) -> None:
        """Close the sockets and stop the I/O thread (what is queued goes first, for up to
        a second)."""
        self.transport.close(linger)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self.transport.closed

    @property
    def controller_timeout(self) -> float:
        """Seconds the controller may be unreachable before waiting requests fail."""
        return self.transport.controller_timeout

    @controller_timeout.setter
    def controller_timeout(self, seconds: float) -> None:
        self.transport.controller_timeout = seconds

    @property
    def history(self) -> list[str]:
        """msg_ids of every request submitted, oldest first."""
        return self.transport.history

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    __repr__ = reprs.client_repr
    _repr_html_ = reprs.client_html


class ResultsByMsgId(Mapping):
    """``rc.results`` and ``rc.metadata``: read-only, by msg_id, over live AsyncResults.

    IPython parallel keeps every result in a dict until purged; here a result lives
    as long as its AsyncResult, so memory does not grow with the tasks run.
    """

    def __init__(self, by_msg_id: weakref.WeakValueDictionary, metadata: bool):
        self._by_msg_id = by_msg_id
        self._metadata = metadata

    def __getitem__(self, msg_id: str) -> Any:
        ar = self._by_msg_id.get(msg_id)
        if ar is None or not (self._metadata or msg_id in ar._replies):
            raise KeyError(msg_id)
        return ar.metadata_by_id[msg_id] if self._metadata else ar._value_of(msg_id)

    def __iter__(self) -> Iterator[str]:
        for msg_id, ar in list(self._by_msg_id.items()):
            if self._metadata or msg_id in ar._replies:
                yield msg_id

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _ids_of(jobs: Iterable) -> list[str]:
    """The msg_ids of AsyncResults and msg_ids, flattened."""
    out = []
    for job in jobs:
        out.extend(job.msg_ids if isinstance(job, AsyncResult) else [job])
    return out


def _value_or_error(ar: AsyncResult) -> Any:
    """The value of a finished one-task result, or the exception it raised."""
    try:
        return ar.get()
    except Exception as e:
        return e
