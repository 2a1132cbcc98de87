"""The Client: a connection to a controller, and the factory of views.

Threads: the user's thread builds and signs messages (the costly part) and puts them
in an outbox; one I/O thread owns every zmq socket, sends what is in the outbox,
and receives replies, notifications and output. A reply is verified, matched to its
:class:`AsyncResult` by the parent's ``msg_id`` and handed over as it is; results are
unpickled only when asked for.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from ipyparallel_lite import error, fastzmq
from ipyparallel_lite.client import reprs
from ipyparallel_lite.client.asyncresult import AsyncResult
from ipyparallel_lite.client.progress import Progress
from ipyparallel_lite.connection import (
    NOTIFICATION_HWM,
    connection_file_path,
    curve_client_options,
    load_connection_file,
    make_session,
    set_options,
    unpack_message,
    url,
)
from ipyparallel_lite.magics import activate_first_client
from ipyparallel_lite.versions import conflicts, versions

NOBLOCK = int(zmq.NOBLOCK)

#: sockets the I/O thread owns, by the channel name the views send on
SEND_CHANNELS = ("mux", "task", "control", "query", "broadcast")


class Client:
    """A connection to an ipyparallel_lite cluster.

    Parameters follow IPython parallel: ``Client(url_file=None, profile=None,
    cluster_id=None, timeout=10)``; ``connection_info`` (a dict) skips the file.
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
        **kwargs: Any,
    ):
        if connection_info is None:
            if url_file is None:
                url_file = connection_file_path("client", profile or "default", cluster_id or "", ipython_dir)
            connection_info = load_connection_file(url_file)
        self.connection_info = info = connection_info
        self.cluster = cluster
        self.profile = profile or "default"
        self.session = make_session(info["key"])
        #: CURVE options of every socket to the controller (empty if it does not encrypt)
        self._curve = curve_client_options(info)
        self._context = zmq.Context()
        self._closed = False
        self._engines: dict[int, str] = {}
        self._engine_infos: dict[int, dict] = {}
        self._engines_changed = threading.Condition()
        self._pending: dict[str, AsyncResult] = {}
        self._control_pending: dict[str, AsyncResult] = {}
        self._outputs: weakref.WeakValueDictionary[str, AsyncResult] = weakref.WeakValueDictionary()
        self._query_replies: dict[str, Any] = {}
        self._query_cond = threading.Condition()
        self._outbox: collections.deque = collections.deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._stalled_on: zmq.Socket | None = None
        self._queued = 0  # messages put in the outbox so far (under _wake_lock)
        self._sent = 0  # messages the I/O thread handed to zmq so far
        #: msg_ids of every request submitted, oldest first
        self.history: list[str] = []
        #: default ``block`` of the control methods (``clear``, ``abort``, ``shutdown``...)
        self.block = False
        self._output_deadlines: collections.deque = collections.deque()
        self._skew_warned: set[int] = set()
        #: the distributed.Client of become_dask, closed by stop_dask
        self._dask_client: Any = None
        self._connect(info, timeout)
        self._io_thread = threading.Thread(target=self._io_loop, name="ipp-lite-client-io", daemon=True)
        self._io_thread.start()
        activate_first_client(self)  # in IPython, the first client binds %px, as in IPython parallel

    # ---- connection ---------------------------------------------------------------

    def _socket(self, kind: int, channel: str, **options: Any) -> zmq.Socket:
        """A socket connected to ``channel``, with ``options`` (zmq socket options by
        attribute name) set before it connects."""
        sock = set_options(fastzmq.socket(self._context, kind), self._curve)
        sock.linger = 0
        for name, value in options.items():
            setattr(sock, name, value)
        sock.connect(url(self.connection_info, channel))
        return sock

    def _connect(self, info: dict, timeout: float) -> None:
        self._sockets = {
            "mux": self._socket(zmq.DEALER, "mux"),
            "task": self._socket(zmq.DEALER, "task"),
            "control": self._socket(zmq.DEALER, "control"),
            "query": self._socket(zmq.DEALER, "registration"),
        }
        if "broadcast" in info["ports"]:  # absent from connection files of older controllers
            self._sockets["broadcast"] = self._socket(zmq.DEALER, "broadcast")
        # as deep as the controller's side: engines leaving together must not be missed
        self._notification = self._socket(zmq.SUB, "notification", rcvhwm=NOTIFICATION_HWM)
        self._notification.subscribe(b"")
        self._iopub = self._socket(zmq.SUB, "iopub")
        self._iopub.subscribe(b"")
        wake_url = f"inproc://ipp-lite-wake-{id(self)}"
        self._wake_pull = self._context.socket(zmq.PULL)
        self._wake_pull.bind(wake_url)
        self._wake_push = self._context.socket(zmq.PUSH)
        self._wake_push.connect(wake_url)
        # the first exchange happens here, before the I/O thread owns the sockets
        query = self._sockets["query"]
        self._controller_link = query.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._controller_lost_since: float | None = None
        self._controller_was_lost = False
        self.session.send(query, "connection_request", {})
        if not query.poll(int(timeout * 1000)):
            self._context.destroy(linger=0)
            raise error.TimeoutError(
                f"No answer from the controller at {url(info, 'registration')} within {timeout}s. "
                "Is the cluster running, and is its connection file current?"
            )
        _, reply = self.session.recv(query, mode=0)
        self._take_engines(reply["content"])

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
        ids = self.ids if targets is None else self._build_targets(targets)
        with self._engines_changed:
            return {eid: dict(self._engine_infos.get(eid, {})) for eid in ids}

    def engine_ids_by_uuid(self) -> dict[str, int]:
        """``{uuid: id}`` of the engines registered now: names the engine of a Hub
        record (its ``engine_uuid``) that has no reply yet."""
        with self._engines_changed:
            return {uuid: eid for eid, uuid in self._engines.items()}

    # ---- the I/O thread -----------------------------------------------------------

    def _io_loop(self) -> None:
        poller = self._poller = zmq.Poller()
        handlers = {
            self._wake_pull: self._on_wake,
            self._notification: self._on_notification,
            self._iopub: self._on_iopub,
            self._sockets["query"]: self._on_query_reply,
            self._controller_link: self._on_controller_link,
        }
        for name in ("mux", "task", "control", "broadcast"):
            if name in self._sockets:
                handlers[self._sockets[name]] = self._on_reply
        for sock in handlers:
            poller.register(sock, zmq.POLLIN)
        while not self._closed:
            try:
                events = poller.poll(100)
            except zmq.ZMQError:
                break
            for sock, _ in events:
                handler = handlers[sock]
                for _ in range(512):
                    try:
                        if not fastzmq.readable(sock):
                            break
                        frames = sock.recv_multipart(NOBLOCK, copy=False)
                    except zmq.ZMQError:
                        return
                    try:
                        handler(frames)
                    except Exception as e:  # one bad message must not stop the client
                        warnings.warn(f"ipyparallel_lite client dropped a message: {e}", stacklevel=1)
            self._flush_outbox()
            self._expire_output_waits()
            self._check_controller()
        self._flush_outbox()

    #: how long the controller may be unreachable before waiting requests fail
    CONTROLLER_GRACE = 5.0

    def _on_controller_link(self, frames: list) -> None:
        event = parse_monitor_message([bytes(f.bytes) for f in frames])["event"]
        if event == zmq.EVENT_DISCONNECTED:
            self._controller_lost_since = self._controller_lost_since or time.monotonic()
            self._controller_was_lost = True
        elif event == zmq.EVENT_CONNECTED:
            self._controller_lost_since = None
            if self._controller_was_lost:  # back (a restart): the queries block, not this thread
                self._controller_was_lost = False
                threading.Thread(target=self._resync_with_controller, daemon=True).start()

    def _check_controller(self) -> None:
        lost = self._controller_lost_since
        if lost is not None and time.monotonic() - lost > self.CONTROLLER_GRACE:
            self._fail_pending(
                f"The controller has been unreachable for {self.CONTROLLER_GRACE:g}s; results of "
                "requests in flight cannot arrive. Restart the cluster and resubmit."
            )

    def _fail_pending(self, reason: str) -> None:
        """Answer every waiting request with an EngineError, so nobody waits forever."""
        pending, self._pending = self._pending, {}
        control, self._control_pending = self._control_pending, {}
        self._fail_requests({**pending, **control}, reason)

    def _fail_pending_ids(self, msg_ids: list[str], reason: str) -> None:
        """Answer the waiting requests ``msg_ids`` with an EngineError."""
        self._fail_requests({m: ar for m in msg_ids if (ar := self._pending.pop(m, None))}, reason)

    @staticmethod
    def _fail_requests(pending: dict[str, AsyncResult], reason: str) -> None:
        for msg_id, ar in pending.items():
            ar._receive(msg_id, {
                "header": {}, "parent_header": {"msg_id": msg_id}, "buffers": [],
                "metadata": {"status": "error", "engine_id": None},
                "content": {"status": "error", "ename": "EngineError", "evalue": reason,
                            "traceback": [], "engine_info": {}},
            })

    #: how long a replied execute request waits for iopub output its engine announced
    #: (``iopub_count``) but that has not arrived, before counting as complete: PUB/SUB
    #: drops messages when a subscriber falls far behind
    OUTPUT_GRACE = 2.0

    def _expect_output(self, ar: AsyncResult, msg_id: str) -> None:
        self._output_deadlines.append((time.monotonic() + self.OUTPUT_GRACE, ar, msg_id))

    def _expire_output_waits(self) -> None:
        waits = self._output_deadlines
        now = time.monotonic()
        while waits and waits[0][0] <= now:
            _, ar, msg_id = waits.popleft()
            ar._count(msg_id)

    def _on_wake(self, frames: list) -> None:
        with self._wake_lock:
            self._wake_pending = False

    def _flush_outbox(self) -> None:
        """Send what the outbox holds, never blocking: a blocked send here would stop this
        thread from reading replies, and the controller may be waiting for us to read."""
        outbox, sockets = self._outbox, self._sockets
        while outbox:
            entry = outbox[0]
            sock = sockets[entry[0]]
            try:
                if len(entry) == 2:
                    sock.send_multipart(entry[1], NOBLOCK, copy=False)
                else:  # (channel, frames, AsyncResult): a track=True send
                    entry[2]._tracked(sock.send_multipart(entry[1], NOBLOCK, copy=False, track=True))
            except zmq.Again:
                # the controller is not reading: wake when this socket can take more
                self._stalled_on = sock
                self._poller.modify(sock, zmq.POLLIN | zmq.POLLOUT)
                return
            outbox.popleft()
            self._sent += 1
        if self._stalled_on is not None:
            self._poller.modify(self._stalled_on, zmq.POLLIN)
            self._stalled_on = None

    def _sent_through(self, seq: int) -> bool:
        """Whether the first ``seq`` messages queued have been handed to zmq."""
        return self._sent >= seq

    def _deserialize(self, frames: list) -> dict:
        _, msg_frames = self.session.feed_identities(frames, copy=False)
        return unpack_message(self.session, msg_frames)

    def _on_reply(self, frames: list) -> None:
        msg = self._deserialize(frames)
        msg_id = msg["parent_header"].get("msg_id")
        ar = self._pending.pop(msg_id, None)
        if ar is None:
            ar = self._control_pending.pop(msg_id, None)
        if ar is not None:
            ar._receive(msg_id, msg)

    def _on_iopub(self, frames: list) -> None:
        msg = self._deserialize(frames)
        msg_id = msg["parent_header"].get("msg_id")
        ar = self._pending.get(msg_id) or self._outputs.get(msg_id)
        if ar is not None:
            ar._output(msg_id, msg)

    def _on_notification(self, frames: list) -> None:
        msg = self._deserialize(frames)
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
                self._fail_pending("The controller shut down before these requests finished.")
            self._engines_changed.notify_all()

    def _on_query_reply(self, frames: list) -> None:
        msg = self._deserialize(frames)
        with self._query_cond:
            self._query_replies[msg["parent_header"].get("msg_id")] = msg
            self._query_cond.notify_all()

    # ---- sending --------------------------------------------------------------------

    def _build(
        self,
        msg_type: str,
        content: dict | None = None,
        *,
        ident: list[bytes] | None = None,
        buffers: list | None = None,
        metadata: dict | None = None,
    ) -> tuple[str, list]:
        """A signed message ready to send: ``(msg_id, frames)``."""
        if self._closed:
            raise RuntimeError("this Client is closed; create a new one to keep working")
        msg = self.session.msg(msg_type, content or {}, metadata=metadata)
        frames = self.session.serialize(msg, ident=ident)
        if buffers:
            frames.extend(buffers)
        return msg["header"]["msg_id"], frames

    def _submit(self, channel: str, messages: list[tuple[str, list]], result: AsyncResult | None,
                *, reply_ids: list[str] | None = None, history: list[str] | None = None,
                track: bool = False, control: bool = False) -> None:
        """Queue built messages; ``result`` is registered first so no reply is missed.

        ``reply_ids``: the parent msg_ids the replies will carry, when they are not the
        messages' own (a broadcast's one message gets one reply per engine).
        ``history``: a view's history, which records the ids too (``self.history`` always
        does). ``track``: have zmq track the sends, for ``result.sent`` (needs ``result``).
        ``control``: requests to stop or clear engines, kept out of ``outstanding``,
        ``history`` and ``wait()``.
        """
        if control:
            for msg_id, _ in messages:
                self._control_pending[msg_id] = result
        elif result is not None:
            ids = [msg_id for msg_id, _ in messages] if reply_ids is None else reply_ids
            for msg_id in ids:
                self._pending[msg_id] = result
                self._outputs[msg_id] = result
            self.history.extend(ids)
            if history is not None:
                history.extend(ids)
        outbox = self._outbox
        with self._wake_lock:  # one lock for queueing, counting and waking: sends stay in order
            if track:
                for _, frames in messages:
                    outbox.append((channel, frames, result))
            else:
                for _, frames in messages:
                    outbox.append((channel, frames))
            self._queued += len(messages)
            if result is not None:
                result._send_seq = self._queued
            if not self._wake_pending:  # one wake-up of the I/O thread for any number of messages
                self._wake_pending = True
                self._wake_push.send(b"")

    def _send(self, channel: str, msg_type: str, content: dict | None = None, **kwargs: Any) -> str:
        """Build and queue one message whose reply nobody waits for; its msg_id."""
        message = self._build(msg_type, content, **kwargs)
        self._submit(channel, [message], None)
        return message[0]

    def _query(self, msg_type: str, content: dict, timeout: float = 10) -> dict:
        """A request to the Hub, answered synchronously; raises on an error reply."""
        msg_id = self._send("query", msg_type, content)
        deadline = time.monotonic() + timeout
        with self._query_cond:
            while msg_id not in self._query_replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise error.TimeoutError(f"the controller did not answer {msg_type} in {timeout}s")
                self._query_cond.wait(remaining)
            reply = self._query_replies.pop(msg_id)
        if reply["content"].get("status") != "ok":
            raise error.unwrap_exception(reply["content"])
        return reply

    # ---- engines --------------------------------------------------------------------

    @property
    def ids(self) -> list[int]:
        """Ids of the engines registered now."""
        return sorted(self._engines)

    def __len__(self) -> int:
        return len(self._engines)

    def _engine_uuid(self, eid: int) -> str:
        try:
            return self._engines[eid]
        except KeyError:
            raise error.EngineError(
                f"No engine with id {eid}; registered engines are {self.ids}."
            ) from None

    def _build_targets(self, targets: Any) -> list[int]:
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
            self._engine_uuid(targets)
            return [targets]
        if isinstance(targets, slice):
            return ids[targets]
        if isinstance(targets, range | list | tuple):
            targets = list(targets)
            for t in targets:
                if not isinstance(t, int):
                    raise TypeError(f"targets must be engine ids (ints), not {t!r}")
                self._engine_uuid(t)
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
                    self._take_engines(self._query("connection_request", {})["content"])
            progress.update(len(self._engines), force=True)

    # ---- views ----------------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        from ipyparallel_lite.client.view import DirectView

        if not isinstance(key, int | slice | list | tuple | range):
            raise TypeError(f"key by int, slice or list of ints, not {type(key).__name__}")
        targets = self._build_targets(key)
        return DirectView(self, targets[0] if isinstance(key, int) else targets)

    def __iter__(self) -> Any:
        for eid in self.ids:
            yield self[eid]

    def direct_view(self, targets: Any = "all", **kwargs: Any) -> Any:
        from ipyparallel_lite.client.view import DirectView

        if targets != "all":
            self._build_targets(targets)
        return DirectView(self, targets, **kwargs)

    def load_balanced_view(self, targets: Any = None, **kwargs: Any) -> Any:
        from ipyparallel_lite.client.view import LoadBalancedView

        if targets is not None and targets != "all":
            targets = self._build_targets(targets)
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
        from ipyparallel_lite.client.view import BroadcastView

        if targets != "all":
            self._build_targets(targets)
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
            pending = list(self._pending.values())  # one C-level copy: the I/O thread mutates it
            return list({id(a): a for a in pending}.values())
        if isinstance(jobs, AsyncResult | str):
            jobs = [jobs]
        found = []
        for job in jobs:
            if isinstance(job, AsyncResult):
                found.append(job)
            elif job in self._pending:
                found.append(self._pending[job])
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
        return set(self._pending)

    @property
    def results(self) -> ResultsByMsgId:
        """``{msg_id: result}`` of the answered requests whose AsyncResult is still alive
        (a failed request's value is its error)."""
        return ResultsByMsgId(self._outputs, metadata=False)

    @property
    def metadata(self) -> ResultsByMsgId:
        """``{msg_id: Metadata}`` of the requests whose AsyncResult is still alive."""
        return ResultsByMsgId(self._outputs, metadata=True)

    def purge_local_results(self, jobs: Any = (), targets: Any = ()) -> None:
        """Forget finished requests in :attr:`results` and :attr:`metadata` (their
        AsyncResults keep their values): ``jobs`` (AsyncResults or msg_ids, or ``"all"``)
        and/or every request that ran on ``targets``. Outstanding requests cannot be
        purged (RuntimeError)."""
        if not jobs and (targets is None or (not isinstance(targets, int) and not targets)):
            raise ValueError("purge_local_results needs jobs (AsyncResults, msg_ids or 'all') or targets")
        if isinstance(jobs, str) and jobs == "all":
            msg_ids = set(self._outputs.keys())
        else:
            msg_ids = set(_ids_of([jobs] if isinstance(jobs, AsyncResult | str) else jobs))
        if targets is not None and (isinstance(targets, int) or targets):
            engines = set(self._build_targets(targets))
            msg_ids.update(m for m, md in self.metadata.items() if md["engine_id"] in engines)
        running = msg_ids & set(self._pending)
        if running:
            raise RuntimeError(f"cannot purge outstanding requests {sorted(running)}; wait for them "
                               "or abort them first")
        for msg_id in msg_ids:
            self._outputs.pop(msg_id, None)

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
        messages = [self._build(msg_type, content, ident=[self._engine_uuid(eid).encode()])
                    for eid in targets]
        if to_controller:
            messages.append(self._build(msg_type, content))
        ar = AsyncResult(self, [m for m, _ in messages], msg_type.replace("_request", ""), targets)
        self._submit("control", messages, ar, control=True)
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
            msg_ids = list(self._pending)
        else:
            msg_ids = _ids_of([jobs] if isinstance(jobs, AsyncResult | str) else jobs)
        if not msg_ids:
            return None
        engines = self._build_targets(targets) if targets is not None else self.ids
        return self._control("abort_request", {"msg_ids": msg_ids}, engines, block, to_controller=True)

    def send_signal(self, sig: int | str, targets: Any = None, block: bool | None = None) -> AsyncResult | None:
        """Send a signal (``signal.SIGINT`` or its name) to engines' processes."""
        import signal as _signal

        try:
            name = _signal.Signals(sig).name if isinstance(sig, int) else _signal.Signals[str(sig)].name
        except (KeyError, ValueError):
            raise ValueError(f"unknown signal {sig!r}: pass a signal.Signals value or name such as 'SIGINT'") from None
        return self._control("signal_request", {"sig": name}, self._build_targets(targets), block)

    def clear(self, targets: Any = None, block: bool | None = None) -> AsyncResult | None:
        """Clear the namespace of the engines (default all)."""
        return self._control("clear_request", {}, self._build_targets(targets), block)

    def queue_status(self, targets: Any = None, verbose: bool = False) -> dict:
        ids = self._build_targets(targets) if targets is not None else None
        content = self._query("queue_request", {"targets": ids, "verbose": verbose})["content"]
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
        ids = self._build_targets(targets) if self._engines else []
        for eid in ids:
            self._send("control", "shutdown_request", {"restart": False},
                       ident=[self._engine_uuid(eid).encode()])
        if hub:
            self._query("shutdown_request", {})
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
        from ipyparallel_lite.client.hubresult import AsyncHubResult, msg_ids_of, results_of

        ids = msg_ids_of(self, msg_ids)
        reply = self._query("result_request", {"msg_ids": ids, "status_only": status_only})
        content = reply["content"]
        status: dict[str, Any] = {"pending": content["pending"], "completed": content["completed"]}
        for msg_id, msg in results_of(reply).items():
            ar = AsyncHubResult(self, [msg_id], self._query, single=True)
            ar._receive(msg_id, msg)
            status[msg_id] = _value_or_error(ar)
        return status

    def get_result(self, indices_or_msg_ids: Any = None, block: bool | None = None) -> Any:
        """An :class:`~.hubresult.AsyncHubResult` of earlier tasks (default: the last one
        submitted here), fetched from the Hub: works for tasks another client submitted,
        and after a controller restart. ``block=True`` returns the results instead."""
        from ipyparallel_lite.client.hubresult import AsyncHubResult, msg_ids_of

        if indices_or_msg_ids is None:
            indices_or_msg_ids = -1
        single = isinstance(indices_or_msg_ids, str | int)
        ids = msg_ids_of(self, indices_or_msg_ids)
        ar = AsyncHubResult(self, ids, self._query, single=single and len(ids) == 1)
        ar.fetch()  # unknown msg_ids raise here
        ar.start_polling()
        return ar.get() if block else ar

    def resubmit(self, indices_or_msg_ids: Any = None, block: bool | None = None) -> Any:
        """Run finished tasks again (same function, arguments, dependencies, targets and
        flags) under new msg_ids; an AsyncHubResult of the reruns."""
        from ipyparallel_lite.client.hubresult import msg_ids_of

        ids = msg_ids_of(self, -1 if indices_or_msg_ids is None else indices_or_msg_ids)
        mapping = self._query("resubmit_request", {"msg_ids": ids})["content"]["resubmitted"]
        return self.get_result([mapping[m] for m in ids], block=block)

    def purge_results(self, jobs: Any = (), targets: Any = ()) -> None:
        """Forget the Hub's records of finished tasks: ``jobs`` (msg_ids, history indices,
        AsyncResults, or ``"all"``) and those that ran on ``targets`` (engine ids)."""
        from ipyparallel_lite.client.hubresult import msg_ids_of

        if not jobs and not targets:
            raise ValueError("purge_results needs jobs (msg_ids or 'all') or targets (engine ids)")
        msg_ids = "all" if jobs == "all" else (msg_ids_of(self, jobs) if jobs else [])
        engine_ids = self._build_targets(targets) if targets else []
        self._query("purge_request", {"msg_ids": msg_ids, "engine_ids": engine_ids})

    purge_hub_results = purge_results

    def db_query(self, query: dict, keys: list[str] | None = None) -> list[dict]:
        """The Hub's task records matching a Mongo-style ``query`` (operators ``$lt $gt
        $lte $gte $eq $ne $in $nin $all $exists $glob``), each with only ``keys`` (and
        ``msg_id``) if given; buffers come back as bytes."""
        from ipyparallel_lite.client.hubresult import parse_dates

        reply = self._query("db_request", {"query": query, "keys": keys})
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
        return self._query("history_request", {})["content"]["history"]

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
            reply = self._query("become_dask_request",
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
        self._query("stop_distributed_request", {}, timeout=dask_bridge.START_TIMEOUT)

    stop_distributed = stop_dask

    def _resync_with_controller(self) -> None:
        """After the controller came back (restarted with --restore): take its engine
        list as it is now, and the results of requests still waited on here, which it
        recorded as lost if it died before they finished."""
        from ipyparallel_lite.client.hubresult import results_of

        try:
            engines = self._query("connection_request", {})["content"]
            restarted = engines.get("controller_pid") != self.connection_info.get("controller_pid")
            self.connection_info["controller_pid"] = engines.get("controller_pid")
            with self._engines_changed:
                self._engines.clear()
                self._engine_infos.clear()
            self._take_engines(engines)
            waiting = [m for m in list(self._pending) if isinstance(m, str)]
            if not waiting:
                return
            known = {r["msg_id"] for r in self.db_query({"msg_id": {"$in": waiting}}, ["msg_id"])}
            if known:
                reply = self._query("result_request", {"msg_ids": sorted(known)})
                for msg_id, msg in results_of(reply).items():
                    ar = self._pending.pop(msg_id, None)
                    if ar is not None:
                        ar._receive(msg_id, msg)
            if restarted:  # sent to the old controller, which died before recording them
                self._fail_pending_ids(
                    [m for m in waiting if m not in known],
                    "The controller died before it recorded this request; its result is lost. "
                    "Resubmit it.")
        except Exception as e:  # the controller went away again: the usual grace applies
            warnings.warn(f"could not resynchronize with the controller: {e}", stacklevel=1)

    def close(self, linger: int | None = None) -> None:
        """Close the sockets and stop the I/O thread."""
        if self._closed:
            return
        time.sleep(0)  # let a just-queued message reach the outbox
        deadline = time.monotonic() + 1
        while self._outbox and time.monotonic() < deadline:
            time.sleep(0.005)
        self._closed = True
        self._io_thread.join(2)
        self._context.destroy(linger=0 if linger is None else linger)

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
