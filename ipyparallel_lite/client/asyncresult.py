"""AsyncResult: the future of one or many requests.

An :class:`AsyncResult` is a ``concurrent.futures.Future`` covering the ``msg_ids``
of one call (one per engine for a direct view, one per chunk for a map). The client's
I/O thread hands it each reply with :meth:`_receive`; the reply's buffers stay
unpickled until someone asks for the value, so results nobody reads cost nothing.
One Future per call, not one per message: the client's per-task cost stays small.

As in IPython parallel, results and metadata read by index and name: ``ar[i]`` is the
result of request ``i``, ``ar["stdout"]`` (or ``ar.stdout``) the metadata key of every
request; ``wait``/``wait_interactive`` take ``return_when`` (``concurrent.futures``'
constants); ``split()`` gives one AsyncResult per request; ``sent``/``wait_for_send``
say when the messages left (for ``track=True`` sends: when zmq released their buffers).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures._base import PENDING
from datetime import datetime, timedelta
from typing import Any

from ipyparallel_lite import error
from ipyparallel_lite.client import reprs
from ipyparallel_lite.serialization import deserialize_object

_DONE = object()
#: the ``return_when`` values ``wait`` and ``wait_interactive`` accept
RETURN_WHEN = (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION)
#: iopub messages that are output of a cell: a pending clear_output(wait=True) clears first
_OUTPUT_TYPES = frozenset({"stream", "display_data", "execute_result", "error"})


class Metadata(dict):
    """Per-request metadata: the reply's metadata plus collected output.

    Keys read as attributes too (``ar.metadata.engine_id``), as in IPython parallel.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(
            msg_id=None, engine_id=None, engine_uuid=None, status=None, started=None,
            completed=None, received=None, submitted=None, stdout="", stderr="", outputs=[],
            execute_input=None, execute_result=None, error=None, data={}, after=None, follow=None,
        )
        self["outputs"] = []
        self.update(kwargs)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def check_return_when(return_when: Any) -> None:
    """Raise one readable error for a ``return_when`` that is none of :data:`RETURN_WHEN`."""
    if return_when is not None and not (isinstance(return_when, str) and return_when in RETURN_WHEN):
        raise ValueError(
            f"return_when must be ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION (the "
            f"constants of concurrent.futures, also ipyparallel_lite.ALL_COMPLETED...), "
            f"not {return_when!r}"
        )


def _seconds(timeout: float | None) -> float | None:
    """IPython parallel's timeouts: None or negative wait forever."""
    return None if timeout is None or timeout < 0 else timeout


def _clear_outputs(md: Metadata) -> None:
    """An engine's ``clear_output``: what its cell printed and displayed so far goes."""
    md["stdout"] = md["stderr"] = ""
    md["outputs"] = []


class _FutureCondition:
    """The condition of one :class:`AsyncResult`'s Future: a lock, with the
    ``threading.Condition`` over it made only when a thread first waits.

    ``Future`` makes a Condition per instance: with its RLock, deque and five bound
    methods, eight objects and about 1.2 kB for the garbage collector to track. A burst
    of 10,000 ``apply_async`` keeps as many alive, and the collector's passes over them
    cost more client CPU than any step of the call. Most results are never waited on
    one by one (``rc.wait()``, ``gather``, a map), so most never need the Condition.
    ``Future``'s code uses its condition only as this class allows;
    ``tests/test_waiting.py`` fails if that changes.
    """

    __slots__ = ("lock", "_waitable")

    def __init__(self) -> None:
        #: reentrant, as Future's: the AsyncResult's own state uses it too
        self.lock = threading.RLock()
        self._waitable: threading.Condition | None = None

    def __enter__(self) -> bool:
        return self.lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self.lock.acquire(blocking, timeout)

    def release(self) -> None:
        self.lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """As ``Condition.wait``; call holding the lock."""
        if self._waitable is None:
            self._waitable = threading.Condition(self.lock)
        return self._waitable.wait(timeout)

    def notify_all(self) -> None:
        """As ``Condition.notify_all``; call holding the lock."""
        if self._waitable is not None:
            self._waitable.notify_all()


class AsyncResult(Future):
    """The result of an asynchronous call, as in IPython parallel.

    A ``concurrent.futures.Future`` (so ``done()``, ``add_done_callback()``,
    ``concurrent.futures.wait`` and ``await ar`` work) over the requests ``msg_ids``.
    """

    #: called on the client's I/O thread with ``(msg_id, msg)`` for each iopub message
    #: (not status) of the request, in arrival order; it must be quick and never raise
    _output_listener: Callable[[str, dict], None] | None = None
    #: set by :meth:`split`: msg_id -> the one-request AsyncResult it was split into
    _parts: dict[str, AsyncResult] | None = None
    #: created by the first thread that waits for part of the results (FIRST_COMPLETED...)
    _progress_cond: threading.Condition | None = None
    #: the position of this call's last message in the client's send order (None: not queued)
    _send_seq: int | None = None
    #: zmq MessageTrackers of a ``track=True`` send, one per message, added as they leave
    _trackers: list | None = None
    _cancel_requested = False

    def __init__(
        self,
        client: Any,
        msg_ids: list[str],
        fname: str = "unknown",
        targets: Any = None,
        single: bool = False,
        return_exceptions: bool = False,
        track: bool = False,
    ):
        # Future.__init__, with a condition that is made when first waited on
        self._condition = condition = _FutureCondition()
        self._lock = condition.lock
        self._state = PENDING
        self._result = self._exception = None
        self._waiters: list = []
        self._done_callbacks: list = []
        self._client = client
        self.msg_ids = list(msg_ids)
        self._fname = fname
        self._targets = targets
        self._single = single
        self._return_exceptions = return_exceptions
        self._replies: dict[str, dict] = {}
        # the sets of msg_ids are dicts (of None): one of strings is no work for the
        # garbage collector, which tracks every set
        self._counted: dict[str, None] = {}
        self._arrivals: list[str] = []  # counted msg_ids, in completion order
        self._idle: dict[str, None] = {}
        self._iopub_seen: dict[str, int] = {}
        self._clear_waiting: dict[str, None] = {}  # engines' clear_output(wait=True) not done yet
        self._npending = len(self.msg_ids)
        self._values: list | None = None
        self._received: dict[str, float] = {}  # time.time() of each reply
        self._submitted = time.time()
        if track:
            self._trackers = []
        if self._npending == 0:
            self.set_result(_DONE)

    def __repr__(self) -> str:
        state = "finished" if self.done() else "pending"
        return f"<{type(self).__name__}({self._fname}): {state}>"

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *Metadata()})

    # ---- metadata: made when first looked at ----------------------------------------

    #: msg_id -> Metadata, once made (under ``_lock``); until then the replies hold it
    _metadata: dict[str, Metadata] | None = None
    #: metadata key -> values per request, that each request's Metadata starts with
    _presets: dict[str, list] | None = None

    @property
    def metadata_by_id(self) -> dict[str, Metadata]:
        """``{msg_id: Metadata}`` of every request.

        Made on first use, from the replies received so far; the I/O thread then
        updates it in place. Results nobody looks at the metadata of never build it.
        """
        mds = self._metadata
        if mds is None:
            with self._lock:
                mds = self._metadata
                if mds is None:
                    mds = {m: Metadata(msg_id=m) for m in self.msg_ids}
                    for key, values in (self._presets or {}).items():
                        for md, value in zip(mds.values(), values):
                            md[key] = value
                    for msg_id, msg in self._replies.items():
                        if msg_id in mds:
                            _take_metadata(mds[msg_id], msg, self._received.get(msg_id))
                    self._metadata = mds
        return mds

    def preset_metadata(self, key: str, values: list) -> None:
        """Start the metadata of request ``i`` with ``{key: values[i]}`` (replies may
        override it): what the sender knows, such as the engine a request went to."""
        with self._lock:
            if self._metadata is None:
                self._presets = {**(self._presets or {}), key: values}
                return
        for md, value in zip(self._metadata_list(), values):
            md[key] = value

    # ---- fed by the client's I/O thread -----------------------------------------

    #: execute requests finish when their reply AND their iopub output arrived, so that
    #: the output of a cell is complete when its result is: the reply's ``iopub_count``
    #: says how many iopub messages the engine published before it (an "idle" status
    #: also completes, for kernels that don't count)
    _await_output = False

    def _receive(self, msg_id: str, msg: dict) -> None:
        received = time.time()
        with self._lock:
            if msg_id in self._replies:
                return
            self._replies[msg_id] = msg
            self._received[msg_id] = received
            if self._metadata is not None:
                _take_metadata(self._metadata[msg_id], msg, received)
            waiting = self._await_output and not self._output_complete(msg_id)
        if waiting:
            self._client.transport.expect_output(self, msg_id)
        else:
            self._count(msg_id)

    def _output_complete(self, msg_id: str) -> bool:
        """Whether all iopub output of a replied request arrived (call holding the lock)."""
        if msg_id in self._idle:
            return True
        expected = self._replies[msg_id]["metadata"].get("iopub_count")
        return expected is not None and self._iopub_seen.get(msg_id, 0) >= expected

    def _count(self, msg_id: str) -> None:
        """Request ``msg_id`` is complete (reply and, for execute requests, its output)."""
        with self._lock:
            if msg_id in self._counted:
                return
            self._counted[msg_id] = None
            self._arrivals.append(msg_id)
            self._npending -= 1
            finished = self._npending == 0
            part = self._parts.get(msg_id) if self._parts else None
            cond = self._progress_cond
        if part is not None:
            part._take_reply(msg_id, self._replies[msg_id])
        if cond is not None:
            with cond:
                cond.notify_all()
        if finished:
            self.set_result(_DONE)

    def _take_reply(self, msg_id: str, reply: dict) -> None:
        """A reply of the AsyncResult this one was split from (:meth:`split`)."""
        self._replies[msg_id] = reply
        self._count(msg_id)

    def _output(self, msg_id: str, msg: dict) -> None:
        """An iopub message for one of our requests."""
        md = self.metadata_by_id.get(msg_id)
        if md is None:
            return
        msg_type, content = msg["header"]["msg_type"], msg["content"]
        if msg_type == "clear_output":
            if content.get("wait"):
                self._clear_waiting[msg_id] = None  # Jupyter's wait: clear when output comes
            else:
                _clear_outputs(md)
        elif msg_id in self._clear_waiting and msg_type in _OUTPUT_TYPES:
            del self._clear_waiting[msg_id]
            _clear_outputs(md)
        if msg_type == "stream":
            name = content.get("name", "stdout")
            md[name] = md.get(name, "") + content.get("text", "")
        elif msg_type in ("display_data", "execute_result", "error"):
            md["outputs"].append(msg)
            if msg_type == "execute_result":
                md["execute_result"] = content
            elif msg_type == "error":
                md["error"] = content
        elif msg_type == "execute_input":
            md["execute_input"] = content.get("code")
        elif msg_type == "data_message":  # ipp.datapub.publish_data on the engine
            md["data"].update(deserialize_object(msg["buffers"]))
        listener = self._output_listener
        if listener is not None and msg_type != "status":
            listener(msg_id, msg)
        if self._await_output:  # counted last: whoever the completion wakes sees this output
            with self._lock:
                self._iopub_seen[msg_id] = self._iopub_seen.get(msg_id, 0) + 1
                if msg_type == "status" and content.get("execution_state") == "idle":
                    self._idle[msg_id] = None
                complete = msg_id in self._replies and self._output_complete(msg_id)
            if complete:
                self._count(msg_id)

    def _tracked(self, tracker: Any) -> None:
        """The I/O thread sent one of our messages with ``track=True``: its zmq tracker."""
        self._trackers.append(tracker)

    # ---- waiting ----------------------------------------------------------------

    def ready(self) -> bool:
        """Whether every request finished."""
        return self.done()

    def _wait_all(self, timeout: float | None) -> bool:
        try:
            super().result(timeout)
        except FutureTimeout:
            return False
        return True

    def _wait_until(self, satisfied: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``satisfied()`` (checked at each completed request) or the timeout."""
        with self._lock:
            if self._progress_cond is None:
                self._progress_cond = threading.Condition()
            cond = self._progress_cond
        with cond:
            return cond.wait_for(satisfied, timeout)

    def _failed(self, msg_id: str) -> bool:
        return self._replies[msg_id]["content"].get("status") != "ok"

    def wait(self, timeout: float | None = -1, return_when: str | None = None) -> bool:
        """Wait for the results; True when what ``return_when`` asks for happened in time.

        ``timeout``: seconds (None or negative: no limit). ``return_when``: ``None`` or
        ``ALL_COMPLETED`` (every request done), ``FIRST_COMPLETED`` (any one done) or
        ``FIRST_EXCEPTION`` (any one failed, else all done), as ``concurrent.futures.wait``.
        """
        check_return_when(return_when)
        timeout = _seconds(timeout)
        if return_when is None or return_when == ALL_COMPLETED:
            return self._wait_all(timeout)
        if return_when == FIRST_COMPLETED:
            return self._wait_until(lambda: bool(self._arrivals) or self.done(), timeout)
        checked = 0

        def failed_or_done() -> bool:
            nonlocal checked
            arrivals = self._arrivals
            while checked < len(arrivals):
                if self._failed(arrivals[checked]):
                    return True
                checked += 1
            return self.done()

        return self._wait_until(failed_or_done, timeout)

    def wait_for_output(self, timeout: float | None = -1) -> bool:
        """Wait until the output of the requests arrived too (True if it did in time).

        An execute request only completes once all the output its engine announced
        arrived, so this is :meth:`wait`; an ``apply`` publishes its prints before its
        reply leaves the engine, and they are read as they come.
        """
        return self.wait(timeout)

    def successful(self) -> bool:
        """Whether every request succeeded; AssertionError before they are all done."""
        if not self.done():
            raise AssertionError("successful() is only meaningful once the results are ready")
        return not any(self._failed(m) for m in self.msg_ids)

    def get(self, timeout: float | None = -1, return_exceptions: bool | None = None) -> Any:
        """The result; raises the remote error, or ``TimeoutError`` if not ready in time.

        ``return_exceptions=True`` puts each failed request's error in its place in the
        result instead of raising (default: as the call was made, usually False).
        """
        if not self._wait_all(_seconds(timeout)):
            raise error.TimeoutError(
                f"Result not ready after {timeout}s ({self.progress}/{len(self)} done)."
            )
        return self._collect(self._return_exceptions if return_exceptions is None else return_exceptions)

    def result(self, timeout: float | None = None) -> Any:
        """``Future.result``: :meth:`get` (waits forever by default)."""
        return self.get(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error :meth:`get` would raise, or None; TimeoutError if not done in time."""
        try:
            self.get(timeout)
        except error.TimeoutError:
            if not self.done():
                raise
            return None
        except Exception as e:
            return e
        return None

    def cancel(self) -> bool:
        """Abort the requests not done yet (a running one is interrupted); False when
        everything was already done."""
        if self.done():
            return False
        self._cancel_requested = True
        self.abort()
        return True

    def cancelled(self) -> bool:
        """Whether :meth:`cancel` took effect: it was called and a request ended aborted."""
        if not (self._cancel_requested and self.done()):
            return False
        return any(self._replies[m]["content"].get("status") == "aborted"
                   or self._replies[m]["content"].get("ename") == "TaskAborted" for m in self.msg_ids)

    def get_dict(self, timeout: float | None = -1) -> dict:
        """Results as ``{engine_id: result}`` (one request per engine)."""
        results = self.get(timeout)
        if self._single:
            results = [results]
        ids = [md["engine_id"] for md in self._metadata_list()]
        if len(set(ids)) != len(ids):
            raise ValueError("more than one result per engine: cannot key by engine id")
        return dict(zip(ids, results))

    @property
    def r(self) -> Any:
        """``get()``."""
        return self.get()

    @property
    def result_dict(self) -> dict:
        """``get_dict()``."""
        return self.get_dict()

    # ---- values -----------------------------------------------------------------

    def _value_of(self, msg_id: str) -> Any:
        msg = self._replies[msg_id]
        content = msg["content"]
        status = content.get("status")
        if status == "ok":
            buffers = msg.get("buffers") or []
            if not buffers:  # execute_request replies carry no value
                return None
            return deserialize_object(buffers)
        if status == "aborted":
            return error.TaskAborted(f"Task {msg_id} was aborted before it ran.")
        if not content.get("engine_info"):  # execute replies: ipykernel's content has none
            info = msg["metadata"].get("engine_info") or {"engine_id": msg["metadata"].get("engine_id")}
            content = {**content, "engine_info": {**info, "method": "execute"}}
        return error.unwrap_exception(content)

    def _collect(self, return_exceptions: bool) -> Any:
        if self._values is None:
            raw = [self._value_of(m) for m in self.msg_ids]
            # errors are found among the per-message values, never by walking a joined
            # result (a gathered array of 10**7 numbers)
            self._errors = [v for v in raw if isinstance(v, error.RemoteError | error.TaskAborted)]
            self._raw = raw
            self._values = raw if self._errors else self._reconstruct(raw)
        if self._errors:
            if return_exceptions:
                values = self._with_errors(self._raw)
                return values[0] if self._single else values
            errors = self._errors
            if self._single and len(self.msg_ids) == 1:
                raise errors[0]
            if len(errors) == 1 and not isinstance(errors[0], error.RemoteError):
                raise errors[0]
            error.collect_exceptions(self._raw, self._fname)
        values = self._values
        return values[0] if self._single else values

    def _reconstruct(self, values: list) -> list:
        """Hook for maps: turn per-message values into the user's result list."""
        return values

    def _with_errors(self, values: list) -> list:
        """Hook for maps: the result list when some requests failed, errors in place."""
        return values

    def _items_of(self, msg_id: str) -> list:
        """The result items request ``msg_id`` contributes (one here; a chunk for maps)."""
        return [self._value_of(msg_id)]

    # ---- indexing: results by position, metadata by name ---------------------------

    def __getitem__(self, key: int | slice | str) -> Any:
        """``ar[i]``/``ar[i:j]``: results (TimeoutError until done); ``ar["key"]``: that
        metadata key of every request (of the one request, for single results)."""
        if isinstance(key, str):
            values = [md[key] for md in self._stamped_metadata()]
            return values[0] if self._single else values
        if isinstance(key, int | slice):
            if not self.done():
                raise error.TimeoutError(f"Result not ready ({self.progress}/{len(self)} done).")
            if self._single:
                return self.get()[key]
            picked = self.get(return_exceptions=True)[key]
            failed = error.RemoteError | error.TaskAborted
            if isinstance(key, int):
                if isinstance(picked, failed):
                    raise picked
                return picked
            if any(isinstance(v, failed) for v in picked):
                error.collect_exceptions(picked, self._fname)
            return picked
        raise TypeError(f"index an AsyncResult by int, slice or metadata name (str), not {type(key).__name__}")

    def __getattr__(self, key: str) -> Any:
        """Metadata keys as attributes: ``ar.engine_id``, ``ar.stdout``, ``ar.status``..."""
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}") from None

    # ---- metadata and output ----------------------------------------------------

    def _metadata_list(self) -> list[Metadata]:
        return [self.metadata_by_id[m] for m in self.msg_ids]

    def _stamped_metadata(self) -> list[Metadata]:
        """The metadata, with ``submitted`` and ``engine_uuid`` (the reply's ``engine``)
        filled in when looked at, not on the submit and receive paths."""
        mds = self._metadata_list()
        submitted = None
        for md in mds:
            if md["submitted"] is None:
                submitted = submitted or datetime.fromtimestamp(self._submitted).astimezone()
                md["submitted"] = submitted
            if md["engine_uuid"] is None and md.get("engine") is not None:
                md["engine_uuid"] = md["engine"]
        return mds

    @property
    def metadata(self) -> Any:
        mds = self._stamped_metadata()
        return mds[0] if self._single else mds

    def display_outputs(self, groupby: str = "type", result_only: bool = False) -> None:
        """Print each engine's stdout/stderr and show its rich outputs and results, as
        ``%px`` does (``[stdout:0]``, ``[output:0]``, ``Out[0:3]``); TimeoutError until done.

        ``groupby``: ``"type"``, ``"engine"`` or ``"order"``. ``result_only``: only the
        results, for output that was already shown as it arrived.
        """
        from ipyparallel_lite.client.display import display_outputs

        self._ready_or_raise()
        display_outputs(self, groupby=groupby, result_only=result_only)

    @contextlib.contextmanager
    def stream_output(self) -> Iterator[None]:
        """Inside the block, show what the engines print and display as it arrives
        (``[stdout:0] ...``): ``with ar.stream_output(): ar.wait()``.

        The client's I/O thread only queues the messages; a helper thread shows them,
        and has shown all that arrived by the end of the block.
        """
        from ipyparallel_lite.client.display import OutputRenderer

        renderer = OutputRenderer(self, streaming=True)
        events: queue.SimpleQueue = queue.SimpleQueue()
        done = object()

        def show() -> None:
            while (event := events.get()) is not done:
                renderer.on_event(*event)

        shower = threading.Thread(target=show, name="ipp-lite-stream-output", daemon=True)
        shower.start()
        self._output_listener = lambda msg_id, msg: events.put((msg_id, msg))
        try:
            yield
        finally:
            self._output_listener = None
            events.put(done)
            shower.join()

    # ---- timing and progress ----------------------------------------------------

    @property
    def progress(self) -> int:
        """How many requests are done (for maps: how many items)."""
        return len(self._arrivals)

    def __len__(self) -> int:
        return len(self.msg_ids)

    @property
    def sent(self) -> bool:
        """Whether the messages left: handed to zmq, and with ``track=True`` also
        released by zmq (their buffers may then be changed safely)."""
        seq = self._send_seq
        if seq is None or not self._client.transport.sent_through(seq):
            return False
        trackers = self._trackers
        return trackers is None or all(t.done for t in trackers)

    def wait_for_send(self, timeout: float | None = -1) -> bool:
        """Wait until :attr:`sent`; ``TimeoutError`` if not within ``timeout`` seconds."""
        timeout = _seconds(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.sent:
            if deadline is not None and time.monotonic() >= deadline:
                raise error.TimeoutError(f"{self._fname}: still waiting to be sent after {timeout}s")
            time.sleep(0.0005)
        return True

    def _ready_or_raise(self) -> None:
        if not self.done():
            raise error.TimeoutError(f"Result not ready ({self.progress}/{len(self)} done).")

    def _stamps(self, key: str) -> list[datetime]:
        return [md[key] for md in self._stamped_metadata() if isinstance(md.get(key), datetime)]

    @staticmethod
    def timedelta(start: Any, end: Any, start_key: Callable = min, end_key: Callable = max) -> float:
        """Seconds between timestamps (each a datetime or a list: ``start_key``/``end_key`` pick
        one), e.g. ``ar.timedelta(ar.submitted, ar.received)``."""
        if not isinstance(start, datetime):
            start = start_key(start)
        if not isinstance(end, datetime):
            end = end_key(end)
        return (end - start).total_seconds()

    @property
    def elapsed(self) -> float:
        """Seconds since submission (until now, or until the last result arrived)."""
        if self.done():
            return self.wall_time
        return time.time() - self._submitted

    @property
    def wall_time(self) -> float:
        """Seconds from the first submission to the last result received; TimeoutError
        until done."""
        self._ready_or_raise()
        received = self._stamps("received")
        if not received:
            return 0.0
        return self.timedelta(self._stamps("submitted"), received)

    @property
    def serial_time(self) -> float:
        """Sum of the engines' run times (completed - started) of every request: what one
        engine would have spent; TimeoutError until done."""
        self._ready_or_raise()
        total = timedelta()
        for md in self._metadata_list():
            if isinstance(md.get("started"), datetime) and isinstance(md.get("completed"), datetime):
                total += md["completed"] - md["started"]
        return total.total_seconds()

    def wait_interactive(self, interval: float = 0.1, timeout: float | None = -1, widget: Any = None,
                         return_when: str | None = None) -> None:
        """Wait as :meth:`wait`, showing progress to a person (a bar in Jupyter, a line
        in a terminal, nothing under a pipe or CI); returns at ``timeout`` seconds even
        if not done (check :meth:`ready`). ``widget`` is accepted for compatibility: the
        kind of display follows where the output goes."""
        from ipyparallel_lite.client.progress import Progress

        check_return_when(return_when)
        timeout = _seconds(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with Progress(total=len(self), label=self._fname, unit="tasks") as bar:
            while True:
                step = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
                if self.wait(step, return_when):
                    break
                bar.update(self.progress)
                if deadline is not None and time.monotonic() >= deadline:
                    break
            bar.update(self.progress, force=True)

    # ---- control ----------------------------------------------------------------

    def abort(self) -> None:
        """Stop these requests: drop queued ones and interrupt running ones."""
        if self.done():
            return
        pending = [m for m in self.msg_ids if m not in self._replies]
        self._client.abort(pending, block=False)

    def split(self) -> tuple[AsyncResult, ...]:
        """One single-request AsyncResult per msg_id (per engine, per task, per map chunk),
        sharing this one's replies and metadata."""
        parts = {
            m: AsyncResult(self._client, [m], self._fname, self._targets, single=True,
                           return_exceptions=self._return_exceptions)
            for m in self.msg_ids
        }
        for m, part in parts.items():
            part.metadata_by_id[m] = self.metadata_by_id[m]
            part._submitted = self._submitted
            part._send_seq = self._send_seq
            part._trackers = self._trackers
        with self._lock:
            self._parts = {**(self._parts or {}), **parts}
            done = [m for m in self.msg_ids if m in self._counted]
        for m in done:
            parts[m]._take_reply(m, self._replies[m])
        return tuple(parts[m] for m in self.msg_ids)

    def __await__(self) -> Iterator:
        import asyncio

        yield from asyncio.wrap_future(self).__await__()
        return self.get()

    def _wait_for(self, msg_id: str) -> None:
        self._wait_until(lambda: msg_id in self._counted, None)

    def __iter__(self) -> Iterator:
        """Results in request order as they arrive; a failed request raises when reached.
        A single result is not iterable (TypeError), as in IPython parallel."""
        if self._single:
            raise TypeError("an AsyncResult with a single result is not iterable; use ar.get()")
        for msg_id in self.msg_ids:
            self._wait_for(msg_id)
            yield from self._checked_items(msg_id)

    def _checked_items(self, msg_id: str) -> list:
        items = self._items_of(msg_id)
        if not self._return_exceptions:
            for item in items:
                if isinstance(item, error.RemoteError | error.TaskAborted):
                    raise item
        return items

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    _repr_html_ = reprs.asyncresult_html


class AsyncMapResult(AsyncResult):
    """The result of a map: chunks joined into one list, iterable as they arrive.

    ``ordered=True`` iterates in input order; ``False`` as chunks complete. ``len()``
    and ``progress`` count items, not chunks.
    """

    def __init__(self, client: Any, msg_ids: list[str], fname: str = "map",
                 ordered: bool = True, return_exceptions: bool = False, joiner: Any = None,
                 nitems: int | None = None, chunk_sizes: list[int] | None = None):
        self._ordered = ordered
        self._joiner = joiner
        self._nitems = nitems
        self._chunk_sizes = dict(zip(msg_ids, chunk_sizes)) if chunk_sizes is not None else None
        super().__init__(client, msg_ids, fname, return_exceptions=return_exceptions)

    @property
    def ordered(self) -> bool:
        return self._ordered

    def __len__(self) -> int:
        return self._nitems if self._nitems is not None else len(self.msg_ids)

    @property
    def progress(self) -> int:
        """How many items are done."""
        sizes = self._chunk_sizes
        if sizes is None:
            return len(self._arrivals)
        return sum(sizes[m] for m in list(self._arrivals))

    def _items_of(self, msg_id: str) -> list:
        value = self._value_of(msg_id)
        return [value] if isinstance(value, error.RemoteError | error.TaskAborted) else value

    def _reconstruct(self, values: list) -> list:
        if self._joiner is not None:
            return self._joiner(values)
        out = []
        for chunk in values:
            out.extend(chunk)
        return out

    def _with_errors(self, values: list) -> list:
        out: list = []
        for v in values:
            out.extend([v] if isinstance(v, BaseException) else v)
        return out

    def __iter__(self) -> Iterator:
        if self._ordered:
            for msg_id in self.msg_ids:
                self._wait_for(msg_id)
                yield from self._checked_items(msg_id)
        else:
            for seen in range(len(self.msg_ids)):
                self._wait_until(lambda seen=seen: len(self._arrivals) > seen, None)
                yield from self._checked_items(self._arrivals[seen])


def _take_metadata(md: Metadata, msg: dict, received: float | None) -> None:
    """A reply's metadata into its request's Metadata (dates as datetimes)."""
    md.update(msg["metadata"])
    for key in ("started", "completed"):
        if isinstance(md.get(key), str):
            md[key] = _parse_date(md[key])
    if received is not None:
        md["received"] = datetime.fromtimestamp(received).astimezone()


def _parse_date(value: str) -> datetime | str:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
