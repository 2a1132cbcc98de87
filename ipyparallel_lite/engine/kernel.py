"""The engine's kernel: an IPython kernel that also runs ``apply_request``.

Everything a notebook kernel does (``execute_request``, rich display, widgets) works
unchanged. ``apply_request`` takes a lean path: the function and arguments arrive as
buffers, the result leaves as buffers, and no busy/idle status is published, because
a load-balanced farm sends thousands of them and nobody renders apply status.
``execute_request`` runs ipykernel's own handler, and when nothing is queued before
it and the cell has no top-level ``await``, runs it at once, also without busy/idle
status or ``execute_input`` echo: its reply's ``iopub_count`` metadata tells clients
how many iopub messages the cell published, which is what they wait for. What IPython
and ipykernel compute from a cell's text alone (its static input transformations, its
code name) is remembered per text: ``rc[:].execute`` sends the same cells again and again.

Control messages (``abort_request``, ``clear_request``, ``signal_request``,
``steal_request``) run on ipykernel's control thread, so they are served while a task
runs. A steal request names load-balanced tasks the scheduler wants back; under one lock
with the main thread's decision to begin a request, each is either already begun (kept)
or marked so that the main thread drops it unrun when it reaches it (handed back).
"""

from __future__ import annotations

import _signal
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from typing import Any

from ipykernel.compiler import XCachingCompiler
from ipykernel.iostream import OutStream
from ipykernel.ipkernel import IPythonKernel
from ipykernel.utils import _async_in_context
from ipykernel.zmqshell import ZMQInteractiveShell
from IPython.core.inputtransformer2 import TransformerManager
from IPython.core.interactiveshell import ExecutionResult
from traitlets import Dict, Float, Instance, Integer, Type

from ipyparallel_lite.connection import (
    LONE_TASK_IDENT,
    STEAL_WINDOW,
    TASK_IDENT,
    check_message_size,
    is_claim,
    takes_replies_on_mux,
    unpack_message,
)
from ipyparallel_lite.error import UnmetDependency, wrap_exception
from ipyparallel_lite.fastzmq import frame_bytes
from ipyparallel_lite.serialization import FunctionCache, serialize_object, unpack_apply_message
from ipyparallel_lite.session import date_text

#: the routing tags of load-balanced tasks (see connection.py)
_TASK_IDENTS = (TASK_IDENT, LONE_TASK_IDENT)


def _signal_main_thread(signum: int) -> None:
    """Deliver ``signum`` so that it interrupts the user's code.

    A SIGINT sent to the process may land on any thread (the control thread, libzmq's);
    then Python raises KeyboardInterrupt only once the main thread next runs bytecode,
    and a main thread blocked in ``time.sleep(60)`` sleeps on. Aimed at the main
    thread, the signal breaks the blocking call at once. Other signals go to the process.
    """
    if signum == signal.SIGINT:
        signal.pthread_kill(threading.main_thread().ident, signum)
    else:
        os.kill(os.getpid(), signum)


def _run_to_completion(coro: Any) -> None:
    """Run a coroutine that never suspends (ipykernel's handler for a cell without await)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("a request taken on the fast path awaited; it cannot finish there")


def _cancel_unless_done(future: asyncio.Future) -> None:
    if not future.done():
        future.cancel()


def _may_await(frames: list) -> bool:
    """Whether an execute request's raw content may hold top-level ``await``/``async``.

    A byte search on the JSON, before its signature is checked and without parsing it:
    false positives (and malformed messages) only miss the fast path.
    """
    if len(frames) < 5:
        return True
    raw = frame_bytes(frames[4])
    return b"await" in raw or b"async" in raw


def _msg_type(session: Any, frames: list) -> str | None:
    """The msg_type of a message from its header alone (its signature is checked later)."""
    try:
        return session.unpack(frame_bytes(frames[1])).get("msg_type")
    except Exception:
        return None


def _count_down(counts: dict[str, int], key: str) -> None:
    """One fewer of ``key`` in a multiset kept as a dict of counts."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


class EngineOutStream(OutStream):
    """ipykernel's stdout/stderr, whose ``flush`` costs nothing when nothing was written.

    ipykernel's flush waits for a round trip through the iopub thread; the kernel flushes
    both streams around every request, written to or not.
    """

    def flush(self) -> None:
        if self._flush_pending or self._subprocess_flush_pending:
            super().flush()


class CachingTransformerManager(TransformerManager):
    """IPython's static input transformations (magics, ``!``, ``?``, prompts), remembered
    per cell text while the transforms are IPython's own.

    Those depend on the text alone, and tokenizing a cell to look for them costs more
    than running a small one; ``rc[:].execute`` sends the same cells again and again.
    Once a transform is added, replaced or removed (``input_transformers_cleanup``...),
    every cell is transformed afresh: a user's transform may keep state.
    """

    #: cells remembered (the oldest is forgotten first), and the longest one remembered
    MAX_CELLS = 256
    MAX_LENGTH = 10_000

    def __init__(self) -> None:
        super().__init__()
        self._own = self._transforms()
        self._cache: dict[str, str] = {}

    def _transforms(self) -> tuple:
        return tuple(self.cleanup_transforms), tuple(self.line_transforms), tuple(self.token_transformers)

    def transform_cell(self, cell: str) -> str:
        if self._transforms() != self._own:
            return super().transform_cell(cell)
        cache = self._cache
        transformed = cache.get(cell)
        if transformed is None:
            transformed = super().transform_cell(cell)
            if len(cell) <= self.MAX_LENGTH:
                if len(cache) >= self.MAX_CELLS:
                    del cache[next(iter(cache))]
                cache[cell] = transformed
        return transformed


class EngineCompiler(XCachingCompiler):
    """ipykernel's compiler, which names each cell's code after a pure-Python murmur2
    hash of its text (the debugger's file name): 10 us for ``a=1``, 0.5 ms a kilobyte.
    The name is remembered per text, process and ``IPYKERNEL_CELL_NAME``."""

    MAX_CELLS = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._names: dict[tuple, str] = {}

    def get_code_name(self, raw_code: str, code: str, number: int) -> str:
        key = (raw_code, os.getpid(), os.environ.get("IPYKERNEL_CELL_NAME"))
        names = self._names
        name = names.get(key)
        if name is None:
            name = super().get_code_name(raw_code, code, number)
            if len(names) >= self.MAX_CELLS:
                del names[next(iter(names))]
            names[key] = name
        return name


class EngineShell(ZMQInteractiveShell):
    """ipykernel's shell, minus a compile per cell: code that has neither ``await`` nor
    ``async`` in its text cannot need the event loop, so IPython's check is skipped; and
    minus re-tokenizing a cell seen before (:class:`CachingTransformerManager`)."""

    input_transformer_manager = Instance(CachingTransformerManager, ())

    def should_run_async(self, raw_cell: str, *, transformed_cell: str | None = None,
                         preprocessing_exc_tuple: Any = None) -> bool:
        code = raw_cell if transformed_cell is None else transformed_cell
        if "await" not in code and "async" not in code:
            return False
        return super().should_run_async(raw_cell, transformed_cell=transformed_cell,
                                        preprocessing_exc_tuple=preprocessing_exc_tuple)


class MainThreadShell:
    """Stands in for ipykernel's shell-channel thread, which engines do not run.

    Engines serve requests on the main thread, without the thread hop per request that
    kernel subshells cost. The stand-in is falsy, so ipykernel takes its single-thread
    paths, and still answers ``parent_thread`` for the code that asks which thread runs
    cells (top-level ``await`` in a cell needs it).
    """

    parent_thread = threading.main_thread()

    def __bool__(self) -> bool:
        return False


class EngineKernel(IPythonKernel):
    """IPython kernel serving ipyparallel_lite's apply and control requests."""

    shell_class = Type(EngineShell)
    compiler_class = Type(EngineCompiler)
    engine_id = Integer(-1)
    engine_info = Dict()
    #: the largest message part the controller reads: a bigger result is an error, not a
    #: message the controller would drop with this engine's connection (None: no limit)
    max_message_bytes = Integer(None, allow_none=True)
    # ipykernel sleeps this long after each cell so output "makes it" before the reply;
    # clients here wait for the output a reply announces (iopub_count) instead, which is exact
    _execute_sleep = Float(0.0).tag(config=True)

    msg_types = [*IPythonKernel.msg_types, "apply_request"]
    control_msg_types = [
        *IPythonKernel.control_msg_types,
        "abort_request",
        "clear_request",
        "signal_request",
        "steal_request",
        "removal_notification",
    ]

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._functions = FunctionCache()
        self._aborted: set[str] = set()
        self._abort_before: datetime | None = None
        self._running: str | None = None
        self._interrupt_reason: dict[str, str] = {}
        self._state_lock = threading.Lock()
        # load-balanced tasks begun lately (to answer steal requests), and tasks handed back
        # but not read yet, dropped when read; both guarded by _state_lock. Counts, since a
        # task may come here twice: a rerun, or handed back, placed here again and handed
        # back again (two copies on their way)
        self._begun: deque[str] = deque()
        self._begun_count: dict[str, int] = {}
        self._stolen: dict[str, int] = {}
        #: load-balanced tasks begun so far, and (msg_id, number) of the latest: its reply
        #: says its number (``seq``), a steal answer how many began (see steal_request)
        self._begun_total = 0
        self._task_seq: tuple[str, int] | None = None
        self._executing_now = False  # a cell runs on the fast path (see _execute_now)
        #: a request's own code runs (a task's function, a cell): SIGINT may interrupt it
        self._interruptible = False
        #: direct requests, routed by the controller's mux device (set by the engine app)
        self.mux_stream: Any = None

    @property
    def _supports_kernel_subshells(self) -> bool:
        return False

    def _topic(self, topic: str) -> bytes:
        return f"engine.{self.engine_id}.{topic}".encode()

    # ---- metadata --------------------------------------------------------------

    def init_metadata(self, parent: dict) -> dict:
        return {
            "started": time.time(),  # written as text when the reply is made
            "dependencies_met": True,
            "engine": self.ident,
            "engine_id": self.engine_id,
        }

    def set_parent(self, ident: Any, parent: dict, channel: str = "shell") -> None:
        super().set_parent(ident, parent, channel)
        header = parent.get("header") or {}
        if channel == "shell" and header.get("msg_type") == "execute_request":
            self.session.count_for(header.get("msg_id"))

    def finish_metadata(self, parent: dict, metadata: dict, reply_content: dict) -> dict:
        if parent["header"].get("msg_type") == "execute_request":
            metadata["iopub_count"] = self.session.take_count(parent["header"].get("msg_id"))
        metadata["status"] = reply_content["status"]
        task = self._task_seq
        if task is not None and task[0] == parent["header"].get("msg_id"):
            metadata["seq"] = task[1]
        started, completed = metadata["started"], time.time()
        # written as text here: the JSON encoder's hook for dates costs more, called per date
        metadata["started"], metadata["completed"] = date_text(started), date_text(completed)
        # seconds spent on the request, for the scheduler's prefetch estimate
        metadata["run_time"] = completed - started
        if reply_content["status"] == "error":
            metadata["engine_info"] = self.engine_info
            if reply_content.get("ename") == "UnmetDependency":
                metadata["dependencies_met"] = False
        return metadata

    # ---- dispatch --------------------------------------------------------------

    def start(self) -> None:
        super().start()
        self._in_flight = 0
        for stream in (self.shell_stream, self.mux_stream):
            if stream is not None:
                self._serve_requests(stream)

    def _serve_requests(self, stream: Any) -> None:
        """Serve the cluster's requests arriving on ``stream``: load-balanced tasks and
        what the controller sends on the shell stream, direct requests on the mux stream.
        Each is answered on the stream it came from."""
        if stream is self.shell_stream:
            queued = _async_in_context(partial(self.shell_main, None))
        else:
            queued = _async_in_context(partial(self._dispatch_from, stream))

        async def in_order(msg: list) -> None:
            try:
                await queued(msg)
            finally:
                self._in_flight -= 1

        stream.on_recv(partial(self._on_request, stream, in_order), copy=False)

    async def _dispatch_from(self, stream: Any, msg: list) -> None:
        """ipykernel's dispatch of a request from ``stream``, answered there: its handlers
        reply on ``self.shell_stream``, which points there while the request holds the
        lock every request takes."""
        async with self._main_asyncio_lock:
            shell_stream, self.shell_stream = self.shell_stream, stream
            try:
                await self.dispatch_shell(msg)
            finally:
                self.shell_stream = shell_stream

    def _on_request(self, stream: Any, queued: Callable[[list], Any], msg: list) -> Any:
        """Run an apply or execute request right here when nothing is queued before it.

        This skips the asyncio task and lock ipykernel spends on every request; anything
        else, a cell with top-level ``await``, or a request arriving while others wait,
        takes ipykernel's path (``queued``) so the order of requests is kept.
        """
        if self._in_flight == 0 and not self._main_asyncio_lock.locked():
            idents, frames = self.session.feed_identities(msg, copy=False)
            msg_type = _msg_type(self.session, frames)
            if msg_type == "apply_request":
                self._handle_now(stream, idents, frames, self.apply_request)
                return None
            if msg_type == "execute_request" and not self._aborting and not _may_await(frames):
                self._handle_now(stream, idents, frames, self._execute_now)
                return None
        self._in_flight += 1
        return queued(msg)

    def _execute_now(self, reply_to: Any, idents: list, msg: dict) -> None:
        """ipykernel's execute handler, run to completion here, without busy/idle status."""
        self._executing_now = True
        try:
            _run_to_completion(self.execute_request(reply_to, idents, msg))
        finally:
            self._executing_now = False

    def _publish_execute_input(self, code: str, parent: dict, execution_count: int) -> None:
        """Echo a cell's code on iopub, except on the fast path, where only the client
        that sent the code listens: it keeps the code itself."""
        if not self._executing_now:
            super()._publish_execute_input(code, parent, execution_count)

    async def do_execute(self, code: str, silent: bool, store_history: bool = True,
                         user_expressions: dict | None = None, allow_stdin: bool = False, *,
                         cell_meta: dict | None = None, cell_id: str | None = None) -> dict:
        """Run a cell; on the fast path, IPython's ``run_cell`` directly.

        ipykernel's version transforms every cell twice (once to decide whether it needs
        the event loop, which fast-path cells don't) and inspects ``run_cell``'s
        signature on every call; the reply is built the same way.
        """
        if not self._executing_now:
            self._interruptible = True
            try:
                return await super().do_execute(code, silent, store_history, user_expressions,
                                                allow_stdin, cell_meta=cell_meta, cell_id=cell_id)
            finally:
                self._interruptible = False
        shell = self.shell
        self._forward_input(allow_stdin)
        traceback: list | None = None  # the cell's, from IPython
        try:
            self._interruptible = True
            res = shell.run_cell(code, store_history=store_history, silent=silent, cell_id=cell_id)
        except KeyboardInterrupt as e:  # in IPython's bookkeeping around the cell's code
            res = ExecutionResult(None)
            res.error_in_exec, traceback = e, []
        finally:
            self._interruptible = False
            self._restore_input()
        err = res.error_before_exec if res.error_before_exec is not None else res.error_in_exec
        reply: dict[str, Any]
        if res.success and not getattr(shell, "_last_traceback_during_displayhook", False):
            reply = {"status": "ok", "user_expressions": shell.user_expressions(user_expressions or {})}
        else:
            reply = {"status": "error",
                     "traceback": (shell._last_traceback or []) if traceback is None else traceback,
                     "ename": type(err).__name__, "evalue": str(err), "user_expressions": {},
                     "engine_info": {"engine_uuid": self.ident, "engine_id": self.int_id,
                                     "method": "execute"}}
        reply["execution_count"] = shell.execution_count - 1
        reply["payload"] = shell.payload_manager.read_payload()
        shell.payload_manager.clear_payload()
        return reply

    async def dispatch_shell(self, msg: list, /, subshell_id: str | None = None, **kwargs: Any) -> None:
        """Route ``apply_request`` to the lean path, everything else to ipykernel."""
        if self.session is None:
            return
        idents, frames = self.session.feed_identities(msg, copy=False)
        if _msg_type(self.session, frames) != "apply_request":
            await super().dispatch_shell(msg, subshell_id, **kwargs)
            return
        self._handle_now(self.shell_stream, idents, frames, self.apply_request)

    def _handle_now(self, stream: Any, idents: list, frames: list,
                    handler: Callable[[Any, list, dict], None]) -> None:
        """Verify a request and run ``handler(stream, idents, msg)`` at once, as
        ipykernel's dispatch would (parent, abort check, SIGINT handler), minus its status
        messages; ``stream`` is where the request came from and its reply goes."""
        try:
            parsed = unpack_message(self.session, frames)
        except Exception:
            self.log.error("Invalid request", exc_info=True)
            return
        self.set_parent(idents, parsed, channel="shell")
        if not self.should_handle(stream, parsed, idents):
            return
        # a request read while this one runs (a stream flush in a cell) queues behind it
        self._in_flight += 1
        self.pre_handler_hook()
        try:
            handler(stream, idents, parsed)
        except Exception:
            self.log.error("Exception in %s", parsed["header"].get("msg_type"), exc_info=True)
        except KeyboardInterrupt:  # landed outside the user's code, which guards itself
            self.log.error("KeyboardInterrupt caught in kernel")
        finally:
            self.post_handler_hook()
            self._in_flight -= 1

    # ipykernel's hooks, through _signal: signal.signal turns each handler it returns
    # into an enum, which cost about 10 us a request
    def pre_handler_hook(self) -> None:
        self.saved_sigint_handler = _signal.signal(_signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """SIGINT while a request is handled: a KeyboardInterrupt in the request's own code
        (a task's function, a cell), where the handler answers it. One that arrives once
        that code has run is dropped, so the reply it was about to send still goes: an
        abort or interrupt may reach the engine at the very moment its task ends."""
        if self._interruptible:
            raise KeyboardInterrupt

    def post_handler_hook(self) -> None:
        _signal.signal(_signal.SIGINT, self.saved_sigint_handler)

    @contextlib.contextmanager
    def _cancel_on_sigint(self, future: asyncio.Future) -> Iterator[None]:
        """While a cell with top-level ``await`` runs, SIGINT cancels it (a
        ``CancelledError`` in the cell), as in ipykernel, whose context manager this is.

        Its handler hands the cancel to tornado's ``add_callback``, which, called on the
        loop's own thread, queues it without waking the loop: a cell in ``await
        asyncio.sleep(60)`` slept on until its timer. ``call_soon_threadsafe`` also
        writes to the loop's self-pipe, so the loop wakes at once. (An override of
        ipykernel's private method: test_send_signal_interrupts_a_running_request fails
        if ipykernel stops calling it.)
        """
        loop = asyncio.get_running_loop()

        def on_sigint(signum: int, frame: Any) -> None:
            loop.call_soon_threadsafe(_cancel_unless_done, future)

        saved = _signal.signal(_signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            _signal.signal(_signal.SIGINT, saved)

    def should_handle(self, stream: Any, msg: dict, idents: list) -> bool:
        msg_id = msg["header"]["msg_id"]
        # a load-balanced task: from the controller, or claimed by its client (CLAIM)
        if (idents and (idents[0] in _TASK_IDENTS or is_claim(msg.get("metadata")))
                and not self._begin_task(msg_id)):
            return False  # handed back to the scheduler: it runs elsewhere, no reply from here
        if self._abort_due(msg["header"]):
            self._reply_aborted(stream, msg, idents)
            return False
        return True

    def _abort_due(self, header: dict) -> bool:
        """Whether an abort named this request (by id, or all sent before it); it is
        then forgotten, as the request is answered as aborted."""
        msg_id = header["msg_id"]
        aborted = msg_id in self._aborted
        if not aborted and self._abort_before is not None:
            date = header.get("date")
            if isinstance(date, str):  # the lean apply path leaves dates as ISO strings
                date = datetime.fromisoformat(date.replace("Z", "+00:00"))
            aborted = isinstance(date, datetime) and date <= self._abort_before
        if aborted:
            self._aborted.discard(msg_id)
        return aborted

    def _begin_task(self, msg_id: str) -> bool:
        """Begin a load-balanced task unless a steal request took it (False)."""
        with self._state_lock:
            if self._stolen and msg_id in self._stolen:
                _count_down(self._stolen, msg_id)
                return False
            begun, counts = self._begun, self._begun_count
            if len(begun) >= STEAL_WINDOW:
                _count_down(counts, begun.popleft())
            begun.append(msg_id)
            counts[msg_id] = counts.get(msg_id, 0) + 1
            self._begun_total += 1
            self._task_seq = (msg_id, self._begun_total)
        return True

    def _reply_aborted(self, stream: Any, msg: dict, idents: list) -> None:
        content = {"status": "aborted"}
        md = self.finish_metadata(msg, self.init_metadata(msg), content)
        reply_type = msg["header"]["msg_type"].replace("_request", "_reply")
        self.session.send(stream, reply_type, content, parent=msg, ident=idents, metadata=md)

    # ---- apply -----------------------------------------------------------------

    def apply_request(self, stream: Any, ident: list, parent: dict) -> None:
        msg_id = parent["header"]["msg_id"]
        md = self.init_metadata(parent)
        result_frames: list = []
        try:
            # from here until the result is pickled, an interrupt for this task stops it
            # (an abort, a timeout, rc.interrupt); one that comes later is dropped
            self._interruptible = True
            with self._state_lock:
                self._running = msg_id
                # an abort read since should_handle found nothing running to interrupt:
                # it marked this request, and _running now lets later ones interrupt it
                aborted = self._abort_due(parent["header"])
                if aborted:
                    self._interrupt_reason[msg_id] = "TaskAborted"
            if aborted:
                raise KeyboardInterrupt
            namespace = self.shell.user_ns
            f, args, kwargs = unpack_apply_message(parent["buffers"], namespace, self._functions)
            result = f(*args, **kwargs)
            try:
                frames = serialize_object(result)
            except Exception as e:
                raise TypeError(
                    f"the result of {getattr(f, '__name__', f)!r} ({type(result).__name__}) "
                    f"could not be pickled to send back: {e}"
                ) from e
            self._interruptible = False
            check_message_size(frames, self.max_message_bytes,
                               f"the result of {getattr(f, '__name__', f)!r}")
            result_frames = frames
            content: dict = {"status": "ok"}
        except KeyboardInterrupt:
            self._interruptible = False
            reason = self._interrupt_reason.pop(msg_id, None)
            content = self._interrupted_content(reason)
        except BaseException as e:
            self._interruptible = False
            content = self._error_content(e)
        finally:
            with self._state_lock:
                self._running = None
                self._interrupt_reason.pop(msg_id, None)  # sent too late: dropped
        for out in (sys.stdout, sys.stderr):
            if out is not None:
                out.flush()  # EngineOutStream: free unless something was written
        md = self.finish_metadata(parent, md, content)
        stream, ident = self._reply_route(stream, ident, parent, content["status"] == "ok")
        self.session.send(
            stream, "apply_reply", content, parent=parent, ident=ident, buffers=result_frames, metadata=md
        )

    def _reply_route(self, stream: Any, ident: list, parent: dict, ok: bool) -> tuple[Any, list]:
        """Where an apply reply goes: where its request came from, except for a task the
        engine holds alone. A lone task's success (:data:`LONE_TASK_IDENT`) goes
        straight to its client through the mux device, without a turn of the
        controller's Python (the controller learns of it from the device's copy): a
        success is final, so the controller never has to hold it back. A claimed
        task's error (connection.CLAIM, which came through the device) goes the other
        way, to the controller as a lone task's would: the scheduler may run it again
        elsewhere (an unmet ``@depend``)."""
        if ok:
            mux = self.mux_stream
            if (mux is not None and len(ident) == 2 and ident[0] == LONE_TASK_IDENT
                    and takes_replies_on_mux(ident[1])):
                return mux, [ident[1]]
        elif len(ident) == 1 and stream is self.mux_stream and is_claim(parent.get("metadata")):
            return self.shell_stream, [LONE_TASK_IDENT, ident[0]]
        return stream, ident

    def _error_content(self, e: BaseException) -> dict:
        content = wrap_exception({**self.engine_info, "method": "apply"}, exc=e)
        if isinstance(e, UnmetDependency):
            content["ename"] = "UnmetDependency"
        return content

    def _interrupted_content(self, reason: str | None) -> dict:
        ename = reason or "KeyboardInterrupt"
        evalue = {
            "TaskAborted": "the task was aborted while running; the engine stays usable",
            "TaskTimeout": "the task ran past its timeout and was interrupted",
        }.get(ename, "interrupted")
        return {"status": "error", "ename": ename, "evalue": evalue, "traceback": [],
                "engine_info": self.engine_info}

    def serve_frontend(self, stream: Any) -> None:
        """Also serve the shell requests of a Jupyter frontend arriving on ``stream`` (a
        ``ZMQStream`` of a ROUTER socket this engine bound: ``ipp.bind_kernel``).

        They run one at a time with the cluster's requests, through ipykernel's own
        handlers (with busy/idle status, as a console expects), and are answered on
        ``stream``: ipykernel replies on ``self.shell_stream``, which points there while
        such a request holds the lock every shell request takes.
        """

        stream.on_recv(_async_in_context(partial(self._dispatch_from, stream)), copy=False)

    def publish_data(self, data: dict) -> None:
        """Send ``data`` to the client of the running request (``ipp.datapub.publish_data``):
        a ``data_message`` on iopub, whose buffers update that request's ``AsyncResult.data``."""
        # copied: the iopub thread sends later, and the caller may change its arrays meanwhile
        buffers = [bytes(frame) for frame in serialize_object(data)]
        self.session.send(self.iopub_socket, "data_message", {}, parent=self.get_parent("shell"),
                          ident=self._topic("data"), buffers=buffers)

    # ---- control ---------------------------------------------------------------

    def abort_request(self, stream: Any, ident: list, parent: dict) -> None:
        """Abort queued requests by id (or all sent before this one), interrupting a running one."""
        msg_ids = parent["content"].get("msg_ids")
        if msg_ids:
            if isinstance(msg_ids, str):
                msg_ids = [msg_ids]
            self._aborted.update(msg_ids)
            self._interrupt_if_running(set(msg_ids), "TaskAborted")
        else:
            self._abort_before = parent["header"].get("date")
            with self._state_lock:
                running = self._running
            if running is not None:
                self._interrupt_if_running({running}, "TaskAborted")
        self.session.send(stream, "abort_reply", {"status": "ok"}, parent=parent, ident=ident)

    def steal_request(self, stream: Any, ident: list, parent: dict) -> None:
        """Hand back the named load-balanced tasks not begun yet; they will not run here.

        Only the last :data:`STEAL_WINDOW` tasks begun are remembered: one begun before
        them is handed back too, and the answer says how many tasks began (``begun``,
        ``window``), so that the controller takes it only once the replies of all those
        earlier ones are in (each reply says its task's number, ``seq``)."""
        msg_ids = parent["content"].get("msg_ids")
        if not isinstance(msg_ids, list) or not all(isinstance(m, str) for m in msg_ids):
            reply = {"status": "error", "ename": "ValueError", "traceback": [],
                     "evalue": f"steal_request needs 'msg_ids', a list of strings, not {msg_ids!r}"}
        else:
            stolen, kept = [], []
            with self._state_lock:
                for msg_id in msg_ids:
                    if msg_id in self._begun_count:
                        kept.append(msg_id)
                    else:
                        self._stolen[msg_id] = self._stolen.get(msg_id, 0) + 1
                        stolen.append(msg_id)
                begun = self._begun_total
            reply = {"status": "ok", "stolen": stolen, "kept": kept, "begun": begun,
                     "window": STEAL_WINDOW}
        self.session.send(stream, "steal_reply", reply, parent=parent, ident=ident)

    def signal_request(self, stream: Any, ident: list, parent: dict) -> None:
        """Send a signal to this engine; with ``msg_id``, only if that task is running."""
        content = parent["content"]
        sig = content.get("sig", "SIGINT")
        signum = getattr(signal, sig, None) if isinstance(sig, str) else sig
        if not isinstance(signum, int):
            reply = {"status": "error", "ename": "ValueError", "evalue": f"unknown signal {sig!r}",
                     "traceback": []}
        else:
            msg_id = content.get("msg_id")
            if msg_id is not None:
                self._interrupt_if_running({msg_id}, content.get("reason") or "KeyboardInterrupt", signum)
            else:
                _signal_main_thread(signum)
            reply = {"status": "ok"}
        self.session.send(stream, "signal_reply", reply, parent=parent, ident=ident)

    def _interrupt_if_running(self, msg_ids: set, reason: str, signum: int = signal.SIGINT) -> None:
        with self._state_lock:
            if self._running in msg_ids:
                self._interrupt_reason[self._running] = reason
                _signal_main_thread(signum)

    #: set by the engine app: registers again with a restarted controller, keeping this
    #: engine's id and namespace; None when done, else why it could not. Called on the
    #: main thread, which owns the shell socket (so after the task running now)
    rejoin: Callable[[], str | None] | None = None

    def removal_notification(self, stream: Any, idents: list, parent: dict) -> None:
        """The controller removed this engine (it stalled past its heartbeats): exit.
        Or a controller restarted with ``--restore`` lost its registration: rejoin it.

        Its tasks were failed or sent elsewhere and no request will reach it again; an
        engine living on unseen would only hold memory and a core.
        """
        content = parent["content"]
        if content.get("rejoin") and self.rejoin is not None:
            self.shell_stream.io_loop.add_callback(self._rejoin, content.get("reason"))
            return
        self._leave(content.get("id"), content.get("reason"))

    def _rejoin(self, reason: str) -> None:
        refused = self.rejoin()
        if refused is not None:
            self._leave(self.engine_id, f"{reason}; registering again failed: {refused}")
        self.log.warning("%s: engine %s registered again, its namespace kept", reason, self.engine_id)

    def _leave(self, engine_id: Any, reason: str) -> None:
        self.log.critical("the controller removed engine %s (%s); this engine exits. Start a "
                          "new engine to get the capacity back.", engine_id, reason)
        for out in (sys.stdout, sys.stderr, sys.__stderr__):
            try:
                out.flush()
            except Exception:
                pass
        os._exit(1)

    def clear_request(self, stream: Any, idents: list, parent: dict) -> None:
        """Clear the engine's namespace."""
        self.shell.reset(False)
        self._functions.clear()
        self.session.send(stream, "clear_reply", {"status": "ok"}, parent=parent, ident=idents)
