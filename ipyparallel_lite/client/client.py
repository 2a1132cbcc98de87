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
import platform
import threading
import time
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from ipyparallel_lite import error, fastzmq
from ipyparallel_lite._version import __version__
from ipyparallel_lite.client.asyncresult import AsyncResult
from ipyparallel_lite.client.progress import Progress
from ipyparallel_lite.connection import (
    connection_file_path,
    load_connection_file,
    make_session,
    unpack_message,
    url,
)

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
        self._context = zmq.Context()
        self._closed = False
        self._engines: dict[int, str] = {}
        self._engine_infos: dict[int, dict] = {}
        self._engines_changed = threading.Condition()
        self._pending: dict[str, AsyncResult] = {}
        self._outputs: weakref.WeakValueDictionary[str, AsyncResult] = weakref.WeakValueDictionary()
        self._query_replies: dict[str, Any] = {}
        self._query_cond = threading.Condition()
        self._outbox: collections.deque = collections.deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self.history: list[str] = []
        self._output_deadlines: collections.deque = collections.deque()
        self._skew_warned: set[int] = set()
        self._connect(info, timeout)
        self._io_thread = threading.Thread(target=self._io_loop, name="ipp-lite-client-io", daemon=True)
        self._io_thread.start()

    # ---- connection ---------------------------------------------------------------

    def _socket(self, kind: int, channel: str) -> zmq.Socket:
        sock = fastzmq.socket(self._context, kind)
        sock.linger = 0
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
        self._notification = self._socket(zmq.SUB, "notification")
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
        """Say plainly when an engine runs other versions than this client."""
        mine = {"python": platform.python_version(), "ipyparallel_lite": __version__}
        diffs = [f"{k} {einfo[k]} (here {v})" for k, v in mine.items() if einfo.get(k, v) != v]
        if diffs and eid not in self._skew_warned:
            self._skew_warned.add(eid)
            warnings.warn(
                f"Engine {eid} on {einfo.get('hostname', '?')} runs {', '.join(diffs)}. "
                "Functions and objects pickled here may fail to load there; use the same "
                "environment on every machine.",
                RuntimeWarning,
                stacklevel=2,
            )

    # ---- the I/O thread -----------------------------------------------------------

    def _io_loop(self) -> None:
        poller = zmq.Poller()
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
        elif event == zmq.EVENT_CONNECTED:
            self._controller_lost_since = None

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
        outbox, sockets = self._outbox, self._sockets
        while outbox:
            channel, frames = outbox.popleft()
            sockets[channel].send_multipart(frames, copy=False)

    def _wake(self) -> None:
        """Have the I/O thread look at the outbox (one wake-up for any number of messages)."""
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
            self._wake_push.send(b"")

    def _deserialize(self, frames: list) -> dict:
        _, msg_frames = self.session.feed_identities(frames, copy=False)
        return unpack_message(self.session, msg_frames)

    def _on_reply(self, frames: list) -> None:
        msg = self._deserialize(frames)
        msg_id = msg["parent_header"].get("msg_id")
        ar = self._pending.pop(msg_id, None)
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
                *, reply_ids: list[str] | None = None) -> None:
        """Queue built messages; ``result`` is registered first so no reply is missed.

        ``reply_ids``: the parent msg_ids the replies will carry, when they are not the
        messages' own (a broadcast's one message gets one reply per engine).
        """
        if result is not None:
            ids = [msg_id for msg_id, _ in messages] if reply_ids is None else reply_ids
            for msg_id in ids:
                self._pending[msg_id] = result
                self._outputs[msg_id] = result
            self.history.extend(ids)
        for _, frames in messages:
            self._outbox.append((channel, frames))
        self._wake()

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

    @property
    def engine_info(self) -> dict[int, dict]:
        """What each registered engine said of itself when it registered:
        ``hostname``, ``pid``, and its Python and package versions."""
        with self._engines_changed:
            return {eid: dict(self._engine_infos.get(eid, {})) for eid in sorted(self._engines)}

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

    @property
    def outstanding(self) -> set[str]:
        return set(self._pending)

    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = None) -> None:
        """Drop queued requests and interrupt running ones (``jobs`` default: all outstanding)."""
        if jobs is None:
            msg_ids = list(self._pending)
        else:
            msg_ids = _ids_of([jobs] if isinstance(jobs, AsyncResult | str) else jobs)
        if not msg_ids:
            return
        content = {"msg_ids": msg_ids}
        self._send("control", "abort_request", content)  # queued load-balanced tasks
        for eid in self._build_targets(targets) if targets is not None else self.ids:
            if eid in self._engines:
                self._send("control", "abort_request", content, ident=[self._engines[eid].encode()])

    def send_signal(self, sig: int | str, targets: Any = None, block: bool | None = None) -> None:
        """Send a signal (e.g. ``signal.SIGINT``) to engines' processes."""
        import signal as _signal

        name = _signal.Signals(sig).name if isinstance(sig, int) else str(sig)
        for eid in self._build_targets(targets):
            self._send("control", "signal_request", {"sig": name}, ident=[self._engine_uuid(eid).encode()])

    def clear(self, targets: Any = None, block: bool | None = None) -> None:
        """Clear the namespace of the engines."""
        for eid in self._build_targets(targets):
            self._send("control", "clear_request", {}, ident=[self._engine_uuid(eid).encode()])

    def queue_status(self, targets: Any = None, verbose: bool = False) -> dict:
        ids = self._build_targets(targets) if targets is not None else None
        content = self._query("queue_request", {"targets": ids, "verbose": verbose})["content"]
        status = {int(k) if k.isdigit() else k: v for k, v in content.items() if k != "status"}
        if isinstance(targets, int):
            return status[targets]
        return status

    def shutdown(self, targets: Any = "all", hub: bool = False, block: bool | None = None) -> None:
        """Stop engines (default all); with ``hub=True`` the controller too."""
        ids = self._build_targets(targets) if self._engines else []
        for eid in ids:
            self._send("control", "shutdown_request", {"restart": False},
                       ident=[self._engine_uuid(eid).encode()])
        if hub:
            self._query("shutdown_request", {})

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

    def __repr__(self) -> str:
        return f"<Client {self.profile}: {len(self._engines)} engines>"


def _ids_of(jobs: Iterable) -> list[str]:
    """The msg_ids of AsyncResults and msg_ids, flattened."""
    out = []
    for job in jobs:
        out.extend(job.msg_ids if isinstance(job, AsyncResult) else [job])
    return out
