"""AsyncResult: the future of one or many requests.

An :class:`AsyncResult` is a ``concurrent.futures.Future`` covering the ``msg_ids``
of one call (one per engine for a direct view, one per chunk for a map). The client's
I/O thread hands it each reply with :meth:`_receive`; the reply's buffers stay
unpickled until someone asks for the value, so results nobody reads cost nothing.
One Future per call, not one per message: the client's per-task cost stays small.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ipyparallel_lite import error
from ipyparallel_lite.client import reprs
from ipyparallel_lite.serialization import deserialize_object

if TYPE_CHECKING:
    from ipyparallel_lite.client.client import Client

_DONE = object()
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
            execute_input=None, execute_result=None, error=None, data={},
        )
        self["outputs"] = []
        self.update(kwargs)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _clear_outputs(md: Metadata) -> None:
    """An engine's ``clear_output``: what its cell printed and displayed so far goes."""
    md["stdout"] = md["stderr"] = ""
    md["outputs"] = []


class AsyncResult(Future):
    """The result of an asynchronous call, as in IPython parallel."""

    #: called on the client's I/O thread with ``(msg_id, msg)`` for each iopub message
    #: (not status) of the request, in arrival order; it must be quick and never raise
    _output_listener: Callable[[str, dict], None] | None = None

    def __init__(
        self,
        client: Client,
        msg_ids: list[str],
        fname: str = "unknown",
        targets: Any = None,
        single: bool = False,
        return_exceptions: bool = False,
    ):
        super().__init__()
        self._client = client
        self.msg_ids = list(msg_ids)
        self._fname = fname
        self._targets = targets
        self._single = single
        self._return_exceptions = return_exceptions
        self._replies: dict[str, dict] = {}
        self._counted: set[str] = set()
        self._idle: set[str] = set()
        self._iopub_seen: dict[str, int] = {}
        self._clear_waiting: set[str] = set()  # engines' clear_output(wait=True) not done yet
        self._npending = len(self.msg_ids)
        self._lock = threading.Lock()
        self._values: list | None = None
        self._raw: list = []
        self._errors: list = []
        self._submitted = time.time()
        self.metadata_by_id: dict[str, Metadata] = {m: Metadata(msg_id=m) for m in self.msg_ids}
        if self._npending == 0:
            self.set_result(_DONE)

    def __repr__(self) -> str:
        state = "finished" if self.done() else "pending"
        return f"<{type(self).__name__}({self._fname}): {state}>"

    # ---- fed by the client's I/O thread -----------------------------------------

    #: execute requests finish when their reply AND their iopub output arrived, so that
    #: the output of a cell is complete when its result is: the reply's ``iopub_count``
    #: says how many iopub messages the engine published before it (an "idle" status
    #: also completes, for kernels that don't count)
    _await_output = False

    def _receive(self, msg_id: str, msg: dict) -> None:
        md = self.metadata_by_id[msg_id]
        md.update(msg["metadata"])
        for key in ("started", "completed"):
            if isinstance(md.get(key), str):
                md[key] = _parse_date(md[key])
        md["received"] = datetime.now().astimezone()
        with self._lock:
            if msg_id in self._replies:
                return
            self._replies[msg_id] = msg
            waiting = self._await_output and not self._output_complete(msg_id)
        if waiting:
            self._client._expect_output(self, msg_id)
        else:
            self._count(msg_id)

    def _output_complete(self, msg_id: str) -> bool:
        """Whether all iopub output of a replied request arrived (call holding the lock)."""
        if msg_id in self._idle:
            return True
        expected = self._replies[msg_id]["metadata"].get("iopub_count")
        return expected is not None and self._iopub_seen.get(msg_id, 0) >= expected

    def _count(self, msg_id: str) -> None:
        with self._lock:
            if msg_id in self._counted:
                return
            self._counted.add(msg_id)
            self._npending -= 1
            finished = self._npending == 0
        if finished:
            self.set_result(_DONE)

    def _output(self, msg_id: str, msg: dict) -> None:
        """An iopub message for one of our requests."""
        md = self.metadata_by_id.get(msg_id)
        if md is None:
            return
        msg_type, content = msg["header"]["msg_type"], msg["content"]
        if msg_type == "clear_output":
            if content.get("wait"):
                self._clear_waiting.add(msg_id)  # Jupyter's wait: clear when output comes
            else:
                _clear_outputs(md)
        elif msg_id in self._clear_waiting and msg_type in _OUTPUT_TYPES:
            self._clear_waiting.discard(msg_id)
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
        listener = self._output_listener
        if listener is not None and msg_type != "status":
            listener(msg_id, msg)
        if self._await_output:  # counted last: whoever the completion wakes sees this output
            with self._lock:
                self._iopub_seen[msg_id] = self._iopub_seen.get(msg_id, 0) + 1
                if msg_type == "status" and content.get("execution_state") == "idle":
                    self._idle.add(msg_id)
                complete = msg_id in self._replies and self._output_complete(msg_id)
            if complete:
                self._count(msg_id)

    # ---- waiting ----------------------------------------------------------------

    def ready(self) -> bool:
        return self.done()

    def wait(self, timeout: float | None = -1) -> bool:
        """Wait for the results; True when they all arrived."""
        if timeout is not None and timeout < 0:
            timeout = None
        try:
            super().result(timeout)
        except TimeoutError:
            return False
        except Exception:
            return True
        return True

    def successful(self) -> bool:
        if not self.done():
            raise AssertionError("successful() is only meaningful once the results are ready")
        return all(m["content"].get("status") == "ok" for m in self._replies.values())

    def get(self, timeout: float | None = -1) -> Any:
        """The result; raises the remote error, or ``TimeoutError`` if not ready in time."""
        if not self.wait(timeout):
            raise error.TimeoutError(
                f"Result not ready after {timeout}s ({self.progress}/{len(self)} done)."
            )
        return self._collect()

    def result(self, timeout: float | None = None) -> Any:
        return self.get(-1 if timeout is None else timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except error.TimeoutError:
            raise
        except Exception as e:
            return e
        return None

    def get_dict(self, timeout: float | None = -1) -> dict:
        """Results as ``{engine_id: result}`` (one request per engine)."""
        results = self.get(timeout)
        if self._single:
            results = [results]
        ids = [md["engine_id"] for md in self._metadata_list()]
        if len(set(ids)) != len(ids):
            raise ValueError("more than one result per engine: cannot key by engine id")
        return dict(zip(ids, results))

    # ---- values -----------------------------------------------------------------

    def _value_of(self, msg_id: str) -> Any:
        msg = self._replies[msg_id]
        content = msg["content"]
        status = content.get("status")
        if status == "ok":
            buffers = msg.get("buffers") or []
            if not buffers:  # execute_request replies carry no value
                return self._execute_value(msg_id)
            return deserialize_object(buffers)
        if status == "aborted":
            return error.TaskAborted(f"Task {msg_id} was aborted before it ran.")
        if not content.get("engine_info"):  # execute replies: ipykernel's content has none
            info = msg["metadata"].get("engine_info") or {"engine_id": msg["metadata"].get("engine_id")}
            content = {**content, "engine_info": {**info, "method": "execute"}}
        return error.unwrap_exception(content)

    def _execute_value(self, msg_id: str) -> Any:
        return None

    def _collect(self) -> Any:
        if self._values is None:
            raw = [self._value_of(m) for m in self.msg_ids]
            # errors are found among the per-message values, never by walking a joined
            # result (a gathered array of 10**7 numbers)
            self._errors = [v for v in raw if isinstance(v, error.RemoteError | error.TaskAborted)]
            self._raw = raw
            self._values = self._reconstruct(raw)
        if self._errors and not self._return_exceptions:
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

    # ---- metadata and output ----------------------------------------------------

    def _metadata_list(self) -> list[Metadata]:
        return [self.metadata_by_id[m] for m in self.msg_ids]

    @property
    def metadata(self) -> Any:
        mds = self._metadata_list()
        return mds[0] if self._single else mds

    def _per_request(self, key: str) -> Any:
        values = [md[key] for md in self._metadata_list()]
        return values[0] if self._single else values

    @property
    def stdout(self) -> Any:
        return self._per_request("stdout")

    @property
    def stderr(self) -> Any:
        return self._per_request("stderr")

    @property
    def outputs(self) -> Any:
        return self._per_request("outputs")

    @property
    def engine_id(self) -> Any:
        return self._per_request("engine_id")

    def display_outputs(self, groupby: str = "type") -> None:
        """Print each engine's stdout/stderr and show its rich outputs, like %px."""
        from ipyparallel_lite.client.display import display_outputs

        display_outputs(self, groupby=groupby)

    # ---- timing and progress ----------------------------------------------------

    @property
    def progress(self) -> int:
        return len(self.msg_ids) - self._npending

    def __len__(self) -> int:
        return len(self.msg_ids)

    @property
    def sent(self) -> bool:
        return True

    def _times(self, key: str) -> list[datetime]:
        return [md[key] for md in self._metadata_list() if isinstance(md.get(key), datetime)]

    @property
    def elapsed(self) -> float:
        """Seconds since submission (until now, or until the last result arrived)."""
        if self.done():
            received = self._times("received")
            if received:
                return max(received).timestamp() - self._submitted
        return time.time() - self._submitted

    @property
    def wall_time(self) -> float:
        """Seconds from the first start to the last completion on the engines."""
        started, completed = self._times("started"), self._times("completed")
        if not started or not completed:
            return 0.0
        return (max(completed) - min(started)).total_seconds()

    @property
    def serial_time(self) -> float:
        """Sum of the run times of every request: what one engine would have spent."""
        total = 0.0
        for md in self._metadata_list():
            if isinstance(md.get("started"), datetime) and isinstance(md.get("completed"), datetime):
                total += (md["completed"] - md["started"]).total_seconds()
        return total

    def wait_interactive(self, interval: float = 0.1, timeout: float = -1, widget: Any = None,
                         return_when: str = "ALL_COMPLETED") -> None:
        """Wait, printing progress when interactive."""
        from ipyparallel_lite.client.progress import Progress

        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        with Progress(total=len(self), label=self._fname) as bar:
            while not self.wait(interval):
                bar.update(self.progress)
                if deadline is not None and time.monotonic() > deadline:
                    break
            bar.update(len(self) if self.done() else self.progress)  # a map's progress counts chunks

    # ---- control ----------------------------------------------------------------

    def abort(self) -> None:
        """Stop these requests: drop queued ones and interrupt running ones."""
        if self.done():
            return
        pending = [m for m in self.msg_ids if m not in self._replies]
        self._client.abort(pending, block=False)

    def cancel(self) -> bool:
        if self.done():
            return False
        self.abort()
        return True

    def __await__(self) -> Iterator:
        import asyncio

        yield from asyncio.wrap_future(self).__await__()
        return self.get()

    def __iter__(self) -> Iterator:
        values = self.get()
        yield from ([values] if self._single else values)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    _repr_html_ = reprs.asyncresult_html


class AsyncMapResult(AsyncResult):
    """The result of a map: chunks joined into one list, iterable as they arrive.

    ``ordered=True`` iterates in input order; ``False`` as chunks complete.
    """

    def __init__(self, client: Client, msg_ids: list[str], fname: str = "map",
                 ordered: bool = True, return_exceptions: bool = False, joiner: Any = None,
                 nitems: int | None = None):
        self._ordered = ordered
        self._joiner = joiner
        self._nitems = nitems
        self._arrivals: list[str] = []
        self._arrived = threading.Condition()
        super().__init__(client, msg_ids, fname, return_exceptions=return_exceptions)

    def _count(self, msg_id: str) -> None:
        super()._count(msg_id)
        with self._arrived:
            self._arrivals.append(msg_id)
            self._arrived.notify_all()

    def __len__(self) -> int:
        return self._nitems if self._nitems is not None else len(self.msg_ids)

    def _chunk(self, msg_id: str) -> list:
        value = self._value_of(msg_id)
        if isinstance(value, error.RemoteError | error.TaskAborted):
            if self._return_exceptions:
                return [value]
            raise value
        return value

    def _reconstruct(self, values: list) -> list:
        if any(isinstance(v, error.RemoteError | error.TaskAborted) for v in values):
            if self._return_exceptions:
                out: list = []
                for v in values:
                    out.extend([v] if isinstance(v, BaseException) else v)
                return out
            return values  # _collect raises
        if self._joiner is not None:
            return self._joiner(values)
        out = []
        for chunk in values:
            out.extend(chunk)
        return out

    def __iter__(self) -> Iterator:
        if self._ordered:
            for msg_id in self.msg_ids:
                self._wait_for(msg_id)
                yield from self._chunk(msg_id)
        else:
            seen = 0
            while seen < len(self.msg_ids):
                with self._arrived:
                    while seen >= len(self._arrivals):
                        self._arrived.wait(1.0)
                    msg_id = self._arrivals[seen]
                seen += 1
                yield from self._chunk(msg_id)

    def _wait_for(self, msg_id: str) -> None:
        with self._arrived:
            while msg_id not in self._counted:
                self._arrived.wait(1.0)


def _parse_date(value: str) -> datetime | str:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
