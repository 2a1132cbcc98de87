"""Views: DirectView (named engines), BroadcastView (the same, on the controller's
broadcast channel) and LoadBalancedView (the task farm), plus :class:`ViewExecutor`.
A request for several engines is one message, which the controller fans out.

A view holds flags (``block``, ``track``, ``targets``, ``label`` and, for load
balancing, ``after``, ``follow``, ``timeout``, ``retries``, ``chunksize``, ``ordered``)
and turns calls into messages. The function of a call is pickled once and its frame
reused for every engine or chunk. A view remembers the msg_ids it sent (``history``).
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ipyparallel_lite.client import remote, reprs
from ipyparallel_lite.client.asyncresult import AsyncMapResult, AsyncResult
from ipyparallel_lite.client.transport import CLAIMS, QUEUED
from ipyparallel_lite.connection import CLAIM, QUEUED_CLAIM
from ipyparallel_lite.serialization import MapTask, pack_apply_message, serialize_function


def _fname(f: Any) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


class InvalidFlag(KeyError):
    """A view flag that does not exist (a KeyError, as in IPython parallel, that prints
    its message plainly)."""

    def __str__(self) -> str:
        return str(self.args[0])


class View:
    """What DirectView and LoadBalancedView share: flags, apply variants, waiting."""

    _flag_names: tuple[str, ...] = ("block", "track", "targets", "label")
    _channel = "mux"

    def __init__(self, client: Any, targets: Any = None, block: bool = False, **flags: Any):
        self.client = client
        self.targets = targets
        self.block = block
        #: ``track=True``: zmq tracks each send, so ``ar.sent``/``ar.wait_for_send()`` say
        #: when the arguments' buffers may be changed
        self.track = False
        #: a label sent in each request's metadata (the Hub records it)
        self.label: str | None = None
        #: msg_ids of the requests sent through this view, oldest first
        self.history: list[str] = []
        self.set_flags(**flags)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.targets!r}>"

    _repr_html_ = reprs.view_html

    def set_flags(self, **kwargs: Any) -> None:
        """Set flags (``block``, ``track``, ``targets``, ``label``...) for later calls."""
        for name, value in kwargs.items():  # all checked before any is set
            if name not in self._flag_names:
                raise InvalidFlag(f"Invalid flag {name!r} for a {type(self).__name__}; its flags "
                                  f"are {', '.join(self._flag_names)}")
            self._check_flag(name, value)
        for name, value in kwargs.items():
            setattr(self, name, value)

    def _check_flag(self, name: str, value: Any) -> None:
        if name == "label" and value is not None and not isinstance(value, str):
            raise ValueError(f"label must be a str or None, not {value!r}")

    def _request_metadata(self) -> dict | None:
        """Metadata every request of this view carries: its label, if any."""
        return None if self.label is None else {"label": self.label}

    @property
    def outstanding(self) -> set[str]:
        """msg_ids sent through this view and not answered yet."""
        pending = self.client.outstanding
        return {m for m in self.history if m in pending}

    @property
    def results(self) -> Any:
        """The client's ``{msg_id: result}`` (:attr:`Client.results`)."""
        return self.client.results

    @contextlib.contextmanager
    def temp_flags(self, **kwargs: Any) -> Iterator[None]:
        """Flags that hold only inside a ``with`` block."""
        saved = {name: getattr(self, name) for name in kwargs if name in self._flag_names}
        self.set_flags(**kwargs)  # an unknown flag raises here, before anything changed
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    # ---- apply ------------------------------------------------------------------

    def _really_apply(self, f: Callable, args: Sequence = (), kwargs: dict | None = None,
                      block: bool | None = None, **options: Any) -> Any:
        raise NotImplementedError

    def apply(self, __f: Callable, *args: Any, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` remotely; the result, or an AsyncResult if not blocking."""
        return self._really_apply(__f, args, kwargs)

    def apply_async(self, __f: Callable, *args: Any, **kwargs: Any) -> AsyncResult:
        return self._really_apply(__f, args, kwargs, block=False)

    def apply_sync(self, __f: Callable, *args: Any, **kwargs: Any) -> Any:
        return self._really_apply(__f, args, kwargs, block=True)

    def map(self, f: Callable, *sequences: Sequence, block: bool | None = None, **kwargs: Any) -> Any:
        raise NotImplementedError

    def map_async(self, f: Callable, *sequences: Iterable, **kwargs: Any) -> AsyncMapResult:
        return self.map(f, *sequences, block=False, **kwargs)

    def map_sync(self, f: Callable, *sequences: Iterable, **kwargs: Any) -> list:
        return self.map(f, *sequences, block=True, **kwargs)

    def imap(self, f: Callable, *iterables: Iterable, **kwargs: Any) -> MapIterator:
        """Results of ``map_async(f, *iterables)`` one by one, as an iterator with
        ``cancel()``.

        Iterables without a length are read into lists first (a direct map splits them
        by length); :meth:`LoadBalancedView.imap` consumes them lazily instead.
        """
        ar = self.map_async(f, *iterables, **kwargs)
        return MapIterator(iter(ar), ar.abort)

    @property
    def executor(self) -> ViewExecutor:
        """A ``concurrent.futures.Executor`` running calls through this view."""
        return ViewExecutor(self)

    def _finish(self, ar: AsyncResult, block: bool | None) -> Any:
        block = self.block if block is None else block
        return ar.get() if block else ar

    def get_result(self, indices_or_msg_ids: Any = None, block: bool | None = None) -> Any:
        """Results of earlier tasks from the Hub, as :meth:`Client.get_result` (indices
        count in the client's history); blocks as this view does."""
        return self.client.get_result(indices_or_msg_ids, block=self.block if block is None else block)

    def _submit(self, channel: str, messages: list[tuple[str, list]], ar: AsyncResult,
                reply_ids: list[str] | None = None, track: bool | None = None) -> None:
        """Queue ``messages`` for ``ar``, recorded in this view's history, tracked if asked."""
        self.client.transport.submit(channel, messages, ar, reply_ids=reply_ids, history=self.history,
                                     track=self.track if track is None else track)

    # ---- decorators -------------------------------------------------------------------

    def remote(self, block: bool | None = None, **flags: Any) -> Callable:
        """Decorator: calling the function runs it on this view's engines."""
        from ipyparallel_lite.client.remotefunction import RemoteFunction

        def decorator(f: Callable) -> RemoteFunction:
            return RemoteFunction(self, f, block=block, **flags)

        return decorator

    def parallel(self, dist: str = "b", block: bool | None = None, **flags: Any) -> Callable:
        """Decorator: calling the function on sequences maps it over the engines."""
        from ipyparallel_lite.client.remotefunction import ParallelFunction

        def decorator(f: Callable) -> ParallelFunction:
            return ParallelFunction(self, f, dist=dist, block=block, **flags)

        return decorator

    def register_joblib_backend(self, name: str = "ipyparallel_lite", make_default: bool = False) -> None:
        """Register a joblib backend ``name`` whose ``Parallel`` calls run on this view's
        engines (see :func:`ipyparallel_lite.joblib.register_joblib_backend`)."""
        from ipyparallel_lite.joblib import register_joblib_backend

        register_joblib_backend(name, make_default, view=self)

    # ---- waiting and control ------------------------------------------------------------

    def wait(self, jobs: Any = None, timeout: float = -1) -> bool:
        """Wait for ``jobs`` (default: this view's outstanding requests); True if all done."""
        return self.client.wait(self.outstanding if jobs is None else jobs, timeout)

    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = None) -> Any:
        """Abort ``jobs`` (default: this view's outstanding requests) on ``targets``."""
        jobs = self.outstanding if jobs is None else jobs
        if not jobs:
            return None
        return self.client.abort(jobs, targets=targets, block=block)

    def queue_status(self, targets: Any = None, verbose: bool = False) -> dict:
        return self.client.queue_status(targets if targets is not None else self.targets, verbose)

    def _engines(self, targets: Any) -> Any:
        """``targets``, else this view's (a load-balanced view without targets: all)."""
        if targets is not None:
            return targets
        return "all" if self.targets is None else self.targets

    def shutdown(self, targets: Any = None, restart: bool = False, hub: bool = False,
                 block: bool | None = None) -> None:
        """Stop this view's engines (or ``targets``); ``hub=True`` also the controller."""
        self.client.shutdown(self._engines(targets), restart=restart, hub=hub, block=block)

    def clear(self, targets: Any = None, block: bool | None = None) -> Any:
        """Clear the namespaces of this view's engines (or ``targets``)."""
        return self.client.clear(self._engines(targets), block=self.block if block is None else block)

    def spin(self) -> None:
        """Kept for IPython parallel code: the client receives all the time."""
        self.client.spin()

    def __len__(self) -> int:
        return len(self.client.resolve_targets(self.targets))


class DirectView(View):
    """Requests to named engines: ``rc[0]``, ``rc[:]``, ``rc[[0, 2]]``."""

    _channel = "mux"

    def __init__(self, client: Any, targets: Any = "all", block: bool = False, **flags: Any):
        super().__init__(client, targets, block, **flags)

    @property
    def _single(self) -> bool:
        return isinstance(self.targets, int)

    def _resolve_targets(self, targets: Any) -> tuple[list[int], bool]:
        """Engine ids of ``targets`` (None: the view's), and whether one engine was named."""
        if targets is None:
            targets, single = self.targets, self._single
        else:
            single = isinstance(targets, int)
        return self.client.resolve_targets(targets), single

    def _send_to_engines(self, msg_type: str, content: dict, per_engine: list[tuple[int, list | None]],
                         make_result: Callable[[list[str]], AsyncResult],
                         track: bool | None = None) -> AsyncResult:
        """One direct request per ``(engine_id, buffers)``, gathered in one AsyncResult."""
        client = self.client
        metadata = self._request_metadata()
        messages = [
            client.transport.build(msg_type, content, ident=[client.engine_uuid(eid).encode()], buffers=buffers,
                          metadata=metadata)
            for eid, buffers in per_engine
        ]
        ar = make_result([msg_id for msg_id, _ in messages])
        ar.preset_metadata("engine_id", [eid for eid, _ in per_engine])
        self._submit("mux", messages, ar, track=track)
        return ar

    def _send_each(self, msg_type: str, content: dict, targets: list[int], buffers: list | None,
                   fname: str, single: bool, listener: Callable | None = None,
                   track: bool | None = None) -> AsyncResult:
        """The same request to every target, one message per engine (the controller's
        mux device routes each by its engine; the buffers are serialized once); a
        repeated target gets one message per mention. ``listener`` hears its output
        from the first message."""
        track = self.track if track is None else track

        def make_result(msg_ids: list[str]) -> AsyncResult:
            ar = AsyncResult(self.client, msg_ids, fname, targets, single=single, track=track)
            ar._output_listener = listener
            return ar

        return self._send_to_engines(msg_type, content, [(t, buffers) for t in targets], make_result,
                                     track=track)

    def _really_apply(self, f: Callable, args: Sequence = (), kwargs: dict | None = None,
                      block: bool | None = None, targets: Any = None, track: bool | None = None,
                      **options: Any) -> Any:
        ids, single = self._resolve_targets(targets)
        buffers = pack_apply_message(f, args, kwargs)
        ar = self._send_each("apply_request", {}, ids, buffers, _fname(f), single, track=track)
        return self._finish(ar, block)

    def map(self, f: Callable, *sequences: Iterable, block: bool | None = None,
            return_exceptions: bool = False, track: bool | None = None) -> Any:
        """Map ``f`` over the sequences, split into one contiguous chunk per engine.

        Iterables without a length (generators) are read into lists first; sequences of
        unequal length stop at the shortest, as the builtin ``map`` does.
        """
        sequences = _as_sequences(sequences)
        ids = self.client.resolve_targets(self.targets)
        length = min(len(s) for s in sequences)
        frame = serialize_function(MapTask(f))
        per_engine, sizes = [], []
        for i, eid in enumerate(ids):
            lo, hi = _partition_bounds(length, len(ids), i)
            if hi > lo:
                chunks = [_slice(seq, lo, hi) for seq in sequences]
                per_engine.append((eid, pack_apply_message(None, chunks, None, function_frame=frame)))
                sizes.append(hi - lo)
        ar = self._send_to_engines("apply_request", {}, per_engine, lambda msg_ids: AsyncMapResult(
            self.client, msg_ids, _fname(f), nitems=length, return_exceptions=return_exceptions,
            chunk_sizes=sizes,
        ), track=track)
        return self._finish(ar, block)

    def execute(self, code: str, silent: bool = True, targets: Any = None,
                block: bool | None = None) -> AsyncResult:
        """Run code in the engines' namespaces, as a notebook cell would.

        Returns the AsyncResult; with ``block`` (default: the view's) it is finished,
        its output complete (``ar.stdout``, ``ar.outputs``, ``ar.execute_result``), and
        an error on any engine is raised.
        """
        ar = self._execute(code, silent, targets)
        if self.block if block is None else block:
            ar.get()
        return ar

    def _execute(self, code: str, silent: bool, targets: Any,
                 listener: Callable[[str, dict], None] | None = None) -> AsyncResult:
        """Send ``code``; ``listener`` (an ``AsyncResult._output_listener``) hears all its output."""
        ids, single = self._resolve_targets(targets)
        content = {"code": code, "silent": silent, "store_history": not silent, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": False}
        ar = self._send_each("execute_request", content, ids, None, "execute", single, listener)
        ar._await_output = True
        ar.preset_metadata("execute_input", [code] * len(ar.msg_ids))  # engines don't echo it (docs/wire.md)
        return ar

    def run(self, filename: str, targets: Any = None, block: bool | None = None) -> AsyncResult:
        """Execute a local file's code on the engines."""
        with open(filename) as f:
            code = f.read()
        return self.execute(code, targets=targets, block=block)

    def push(self, ns: dict, targets: Any = None, block: bool | None = None, track: bool | None = None) -> Any:
        """Update the engines' namespaces with the dict ``ns``."""
        if not isinstance(ns, dict):
            raise TypeError(f"push needs a dict of names to values, not {type(ns).__name__}")
        return self._really_apply(remote.push, (ns,), None, block=block, targets=targets, track=track)

    def pull(self, names: str | Sequence[str], targets: Any = None, block: bool | None = None) -> Any:
        """Values of ``names`` (a name or a list of names) on the engines."""
        if not isinstance(names, str) and not all(isinstance(n, str) for n in names):
            raise TypeError("pull needs a variable name or a list of names")
        return self._really_apply(remote.pull, (names,), None, block=block, targets=targets)

    def __getitem__(self, key: str) -> Any:
        return self.pull(key, block=True)

    def __setitem__(self, key: str, value: Any) -> None:
        self.push({key: value}, block=True)

    def get(self, key_s: str | Sequence[str]) -> Any:
        return self.pull(key_s, block=True)

    def update(self, ns: dict) -> Any:
        return self.push(ns)

    def scatter(self, key: str, seq: Sequence, dist: str = "b", flatten: bool = False,
                targets: Any = None, block: bool | None = None, track: bool | None = None) -> Any:
        """Split ``seq`` into one contiguous part per engine, pushed as ``key``."""
        if dist != "b":
            raise ValueError(f"only block distribution ('b') is supported, not {dist!r}")
        ids = self.client.resolve_targets(self.targets if targets is None else targets)
        length = len(seq)
        frame = serialize_function(remote.push)
        per_engine = []
        for i, eid in enumerate(ids):
            part = _slice(seq, *_partition_bounds(length, len(ids), i))
            if flatten and len(part) == 1:
                part = part[0]
            per_engine.append((eid, pack_apply_message(None, ({key: part},), None, function_frame=frame)))
        track = self.track if track is None else track
        ar = self._send_to_engines(
            "apply_request", {}, per_engine,
            lambda msg_ids: AsyncResult(self.client, msg_ids, "scatter", ids, track=track), track=track)
        return self._finish(ar, block)

    def gather(self, key: str, dist: str = "b", targets: Any = None, block: bool | None = None) -> Any:
        """Pull ``key`` from every engine and join the parts (lists or numpy arrays)."""
        if dist != "b":
            raise ValueError(f"only block distribution ('b') is supported, not {dist!r}")
        ids = self.client.resolve_targets(self.targets if targets is None else targets)
        buffers = pack_apply_message(remote.pull, (key,), None)
        ar = self._send_to_engines(
            "apply_request", {}, [(eid, buffers) for eid in ids],
            lambda msg_ids: AsyncMapResult(self.client, msg_ids, "gather", joiner=_join_parts),
        )
        return self._finish(ar, block)

    # ---- serialization: IPython parallel's switches ---------------------------------

    def use_cloudpickle(self) -> Any:
        """Kept for IPython parallel code: cloudpickle is always used here (functions,
        lambdas and classes defined interactively travel by value). Checks that the
        engines have it; an AsyncResult, or None when blocking."""
        return self._require_module("cloudpickle")

    def use_pickle(self) -> Any:
        """Kept for IPython parallel code: objects importable on the engines are pickled
        by reference exactly as ``pickle`` would, and the rest (interactively defined
        functions) by value, so nothing needs to switch. See docs/compatibility.md."""
        return self._require_module("pickle")

    def use_dill(self) -> Any:
        """Kept for IPython parallel code: needs ``dill`` here and on the engines (a
        clear ImportError names where it is missing); serialization stays cloudpickle,
        which sends what dill would (interactive functions, closures, lambdas)."""
        try:
            import dill  # noqa: F401
        except ImportError:
            raise ImportError("use_dill() needs the dill package, which is not installed in this "
                              "Python: pip install dill (here and on the engines)") from None
        return self._require_module("dill")

    def _require_module(self, name: str) -> Any:
        ar = self._really_apply(remote.require_module, (name,), None, block=False)
        if self.block:
            ar.get()
            return None
        return ar

    def activate(self, suffix: str = "") -> None:
        """Bind the magics ``%px{suffix}``, ``%%px{suffix}``, ``%autopx{suffix}``,
        ``%pxresult{suffix}`` and ``%pxconfig{suffix}`` of the running IPython to this view.

        A suffix keeps several views at hand, e.g. ``rc[::2].activate("_even")`` gives
        ``%px_even``. Outside IPython it only warns.
        """
        from ipyparallel_lite.magics import activate_view

        activate_view(self, suffix)

    @contextlib.contextmanager
    def sync_imports(self, local: bool = True, quiet: bool = False) -> Iterator[None]:
        """Imports inside the block happen here (if ``local``) and on the engines.

        ``import a.b`` and ``from a import b`` work; ``import a as b`` binds ``a`` remotely.
        """
        real_import = builtins.__import__
        imports: list[tuple] = []

        def recording_import(name: str, globals: Any = None, locals: Any = None,
                             fromlist: Any = (), level: int = 0) -> Any:
            if level == 0 and (globals is None or globals.get("__name__") != __name__):
                imports.append((name, tuple(fromlist or ())))
                if not quiet:
                    print(f"importing {', '.join(fromlist) + ' from ' if fromlist else ''}{name} on engine(s)")
            if local:
                return real_import(name, globals, locals, fromlist, level)
            return None

        builtins.__import__ = recording_import
        try:
            yield
        finally:
            builtins.__import__ = real_import
        code = "\n".join(
            f"from {name} import {', '.join(fromlist)}" if fromlist else f"import {name}"
            for name, fromlist in imports
        )
        if code:
            self.execute(code, block=True)


class BroadcastView(DirectView):
    """Requests sent ONCE and fanned out to the target engines by the controller.

    ``rc.broadcast_view()``: apply, execute, push and pull cost one message from the
    client however many engines there are; results have the same shapes as with a
    DirectView on the same targets. The reply of engine ``e`` answers the derived
    msg_id ``f"{msg_id}_{e}"``, and those are the AsyncResult's ``msg_ids``. ``map``,
    ``scatter`` and ``gather`` send different data to each engine, so they stay
    per-engine direct requests. Repeated targets count once.
    """

    _flag_names = ("block", "track", "targets", "label", "is_coalescing")

    def __init__(self, client: Any, targets: Any = "all", block: bool = False,
                 is_coalescing: bool = False, **flags: Any):
        #: accepted for IPython parallel compatibility; replies always come one per engine
        self.is_coalescing = is_coalescing
        super().__init__(client, targets, block, **flags)

    def _send_each(self, msg_type: str, content: dict, targets: list[int], buffers: list | None,
                   fname: str, single: bool, listener: Callable | None = None,
                   track: bool | None = None) -> AsyncResult:
        if not self.client.transport.has_channel("broadcast"):
            raise RuntimeError("this controller has no broadcast channel (an older version?); "
                               "use a DirectView (rc[:]) instead")
        targets = list(dict.fromkeys(targets))
        if not targets:  # nothing to fan out to: an empty result, as a DirectView gives
            return AsyncResult(self.client, [], fname, targets, single=single)
        return self._fan_out(msg_type, content, targets, buffers, fname, single, listener,
                             {"is_broadcast": True, "is_coalescing": self.is_coalescing},
                             track=self.track if track is None else track)

    def _fan_out(self, msg_type: str, content: dict, targets: list[int], buffers: list | None,
                 fname: str, single: bool, listener: Callable | None, metadata: dict,
                 track: bool = False) -> AsyncResult:
        """One message for all ``targets`` (distinct engine ids); the controller sends each
        engine a copy whose msg_id is ``f"{msg_id}_{engine_id}"``, the AsyncResult's ids."""
        client = self.client
        for t in targets:
            client.engine_uuid(t)  # a clear error for an engine that is gone, before sending
        msg_id, frames = client.transport.build(msg_type, content, buffers=buffers, metadata={
            **metadata, **(self._request_metadata() or {}), "targets": targets})
        reply_ids = [f"{msg_id}_{t}" for t in targets]
        ar = AsyncResult(client, reply_ids, fname, targets, single=single, track=track)
        ar._output_listener = listener
        ar.preset_metadata("engine_id", targets)
        self._submit("broadcast", [(msg_id, frames)], ar, reply_ids=reply_ids, track=track)
        return ar


class LoadBalancedView(View):
    """The task farm: each request runs on whichever engine the scheduler picks."""

    _flag_names = ("block", "track", "targets", "label", "after", "follow", "timeout", "retries",
                   "chunksize", "ordered")
    _channel = "task"

    def __init__(self, client: Any, targets: Any = None, block: bool = False, **flags: Any):
        self.after: Any = None
        self.follow: Any = None
        self.timeout: float | None = None
        self.retries = 0
        self.chunksize = 1
        self.ordered = True
        self.label: str | None = None
        super().__init__(client, targets, block, **flags)

    def _check_flag(self, name: str, value: Any) -> None:
        super()._check_flag(name, value)
        if name == "timeout" and value is not None and (not isinstance(value, int | float) or value < 0):
            raise ValueError(f"timeout must be a non-negative number of seconds or None, not {value!r}")
        if name == "retries" and (not isinstance(value, int) or value < 0):
            raise ValueError(f"retries must be a non-negative int, not {value!r}")
        if name == "chunksize" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"chunksize must be a positive int, not {value!r}")

    #: the flags every task carries in its metadata, which a call (``map``) may override
    _task_flags = ("after", "follow", "timeout", "retries", "targets", "label")

    def _metadata(self, **overrides: Any) -> dict:
        flags = {name: getattr(self, name) for name in self._task_flags}
        if overrides:
            unknown = sorted(set(overrides) - set(flags))
            if unknown:
                raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                                f"per call a load-balanced view also takes {', '.join(self._task_flags)}")
            self._check_flag("label", overrides.get("label"))
            flags.update(overrides)
        for name in ("timeout", "retries"):
            self._check_flag(name, flags[name] if name != "retries" else (flags[name] or 0))
        targets = flags["targets"]
        if targets is not None:
            targets = self.client.resolve_targets(targets)
        metadata = {
            "after": _dependency(flags["after"]),
            "follow": _dependency(flags["follow"]),
            "timeout": flags["timeout"],
            "retries": flags["retries"] or 0,
            "targets": targets,
        }
        if flags["label"] is not None:
            metadata["label"] = flags["label"]
        return metadata

    def _packed_metadata(self, **overrides: Any) -> bytes:
        """:meth:`_metadata`, packed for the message. Packed once while the flags stay
        plain (no dependencies, no targets, no per-call overrides): an ``apply_async``
        burst then packs its metadata once."""
        if overrides or self.after is not None or self.follow is not None or self.targets is not None:
            return self.client.transport.pack_metadata(self._metadata(**overrides))
        timeout, retries = self.timeout, self.retries
        key = (type(timeout), timeout, type(retries), retries, self.label)  # typed: 1, 1.0, True differ in JSON
        cached = self._plain_metadata
        if cached is None or cached[0] != key:
            cached = self._plain_metadata = (key, self.client.transport.pack_metadata(self._metadata()))
        return cached[1]

    #: (flag values, packed metadata) of :meth:`_packed_metadata`
    _plain_metadata: tuple[tuple, bytes] | None = None

    def _submit_task(self, frame: bytes, args: Sequence, kwargs: dict | None, metadata: bytes,
                     fname: str, return_exceptions: bool = False, track: bool | None = None,
                     engine: bytes | None = None) -> AsyncResult:
        """Submit one load-balanced ``apply_request`` whose function is the pickled ``frame``.

        The one way this view sends a task: :meth:`_really_apply` pickles its function
        and calls it once, :meth:`imap` pickles once and calls it per item. Arguments
        that cannot be pickled raise here, before anything is sent. ``engine``: a
        claim's engine (:meth:`_claim`), which ``metadata`` names it for.
        """
        buffers = pack_apply_message(None, args, kwargs, function_frame=frame)
        message = self.client.transport.build("apply_request", {}, buffers=buffers, metadata=metadata,
                                              ident=[engine] if engine is not None else None)
        track = self.track if track is None else track
        ar = AsyncResult(self.client, [message[0]], fname, single=True,
                         return_exceptions=return_exceptions, track=track)
        self._submit("task" if engine is None else CLAIMS, [message], ar, track=track)
        return ar

    def _route(self, track: bool | None, tasks: int = 1, **options: Any) -> tuple[bytes | None, bytes]:
        """Where ``tasks`` tasks submitted together go, and their packed metadata: as
        claims (the engine or :data:`QUEUED` of the transport's
        :meth:`~.transport.Transport.claim_engine`) when nothing constrains where they
        run (no dependencies, targets, timeout or retries, no per-call ``options``) and
        their sends are not tracked (a tracked send goes alone); else through the
        controller's scheduler (None)."""
        if (options or self.after is not None or self.follow is not None or self.targets is not None
                or self.timeout is not None or self.retries
                or (self.track if track is None else track)):
            return None, self._packed_metadata(**options)
        engine = self.client.transport.claim_engine(tasks)
        if engine is None:
            return None, self._packed_metadata()
        return engine, self._claim_metadata(engine == QUEUED)

    def _really_apply(self, f: Callable, args: Sequence = (), kwargs: dict | None = None,
                      block: bool | None = None, track: bool | None = None, **options: Any) -> Any:
        engine, metadata = self._route(track, **options)
        ar = self._submit_task(serialize_function(f), args, kwargs, metadata, _fname(f), track=track,
                               engine=engine)
        return self._finish(ar, block)

    def _claim_metadata(self, queued: bool) -> bytes:
        """The packed metadata of a claimed task (connection.CLAIM): the plain flags,
        and whether it is queued behind others, packed once per label."""
        cached = self._claim_packed
        if cached is None or cached[0] != self.label:
            pack = self.client.transport.pack_metadata
            plain = self._metadata()
            cached = self._claim_packed = (self.label, pack({**plain, CLAIM: True}),
                                           pack({**plain, CLAIM: QUEUED_CLAIM}))
        return cached[2] if queued else cached[1]

    #: (label, packed metadata of a lone claim, of a queued one) of :meth:`_claim_metadata`
    _claim_packed: tuple[str | None, bytes, bytes] | None = None

    def map(self, f: Callable, *sequences: Iterable, block: bool | None = None,
            chunksize: int | None = None, ordered: bool | None = None,
            return_exceptions: bool = False, track: bool | None = None, **options: Any) -> Any:
        """Map ``f`` over the sequences in load-balanced chunks of ``chunksize`` items.

        Iterables without a length (generators) are read into lists first (for lazy
        reading use :meth:`imap`); sequences of unequal length stop at the shortest, as
        the builtin ``map`` does.
        """
        chunksize = self.chunksize if chunksize is None else chunksize
        self._check_flag("chunksize", chunksize)
        ordered = self.ordered if ordered is None else ordered
        sequences = _as_sequences(sequences)
        length = min(len(s) for s in sequences)
        engine, metadata = self._route(track, -(-length // chunksize), **options)
        ident = None if engine is None else [engine]
        frame = serialize_function(MapTask(f))
        client = self.client
        messages, sizes = [], []
        for lo in range(0, length, chunksize):
            hi = min(lo + chunksize, length)
            chunks = [_slice(seq, lo, hi) for seq in sequences]
            buffers = pack_apply_message(None, chunks, None, function_frame=frame)
            messages.append(client.transport.build("apply_request", {}, buffers=buffers,
                                                   metadata=metadata, ident=ident))
            sizes.append(hi - lo)
        ar = AsyncMapResult(client, [m for m, _ in messages], _fname(f), ordered=ordered,
                            return_exceptions=return_exceptions, nitems=length, chunk_sizes=sizes)
        self._submit("task" if engine is None else CLAIMS, messages, ar, track=track)
        return self._finish(ar, block)

    def imap(self, f: Callable, *iterables: Iterable, ordered: bool = True,
             max_outstanding: int | str = "auto", return_exceptions: bool = False) -> MapIterator:
        """Lazily map ``f`` over ``iterables``: one load-balanced task per item.

        Unlike :meth:`map`, the iterables are read only as results are consumed: at any
        time at most ``max_outstanding`` items have been taken from them and not yet
        yielded, so huge or endless iterators (``itertools.count()``) run in bounded
        memory. The first ``max_outstanding`` tasks are submitted by this call; each
        result taken from the returned generator lets one more item in.

        ``ordered``: yield results in input order (``True``) or as they complete.
        ``max_outstanding``: a positive int; ``0`` reads the iterables to the end at
        once (never with an endless one); ``"auto"`` is ``2 * engines * hwm`` (the
        view's targets, else the engines registered now; the controller's high-water
        mark, 1 by default): every engine holds as many tasks as it may, and as many
        again wait in the controller, so no engine idles while a result travels back.
        ``return_exceptions``: yield a failed item's error instead of raising it.
        Raising ends the iteration.

        The function is pickled once. The view's flags (``after``, ``follow``,
        ``timeout``, ``retries``, ``targets``) apply to every task. Closing the
        iterator (``cancel()`` or ``close()``, or dropping it, e.g. by breaking out of
        the ``for`` loop that holds it) aborts the tasks still outstanding.
        """
        gen = self._imap(f, iterables, ordered, max_outstanding, return_exceptions)
        return MapIterator(gen, gen.close)

    def _auto_outstanding(self) -> int:
        engines = len(self.client.resolve_targets(self.targets)) if self.targets is not None \
            else len(self.client.ids)
        hwm = self.client.connection_info.get("hwm", 1) or 1  # 0 means no limit: count it as 1
        return 2 * max(engines, 1) * hwm

    def _imap(self, f: Callable, iterables: Sequence[Iterable], ordered: bool,
              max_outstanding: int | str, return_exceptions: bool,
              track: Callable[[AsyncResult], None] | None = None,
              deadline: float | None = None) -> Iterator:
        """:meth:`imap`, plus what the executor needs: ``track`` sees every submitted
        task, and past the ``time.monotonic()`` ``deadline`` waiting raises TimeoutError."""
        if not iterables:
            raise ValueError("imap needs at least one iterable")
        if max_outstanding == "auto":
            limit = self._auto_outstanding()
        elif isinstance(max_outstanding, int) and not isinstance(max_outstanding, bool) \
                and max_outstanding >= 0:
            limit = max_outstanding
        else:
            raise ValueError(f"max_outstanding must be 'auto' or an int >= 0 (0: no limit), "
                             f"not {max_outstanding!r}")
        frame = serialize_function(f)
        items = zip(*iterables)
        gen = self._imap_results(frame, _fname(f), items, limit, ordered,
                                 return_exceptions, track, deadline)
        next(gen)  # runs to the priming point: the first tasks are out before we return
        return gen

    def _imap_results(self, frame: bytes, fname: str, items: Iterator[tuple],
                      limit: int, ordered: bool, return_exceptions: bool,
                      track: Callable[[AsyncResult], None] | None,
                      deadline: float | None) -> Iterator:
        # insertion-ordered: the head is the oldest task (ordered mode)
        outstanding: dict[AsyncResult, None] = {}
        completed: queue.SimpleQueue[AsyncResult] = queue.SimpleQueue()  # unordered mode
        exhausted = False

        def top_up() -> None:
            nonlocal exhausted
            while not exhausted and (not limit or len(outstanding) < limit):
                try:
                    args = next(items)
                except StopIteration:
                    exhausted = True
                    return
                engine, metadata = self._route(None)
                ar = self._submit_task(frame, args, None, metadata, fname, return_exceptions=True,
                                       engine=engine)
                outstanding[ar] = None
                if track is not None:
                    track(ar)
                if not ordered:
                    ar.add_done_callback(completed.put)  # runs in the client's I/O thread

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            top_up()
            yield None  # priming point, consumed by _imap
            while outstanding:
                if ordered:
                    ar = next(iter(outstanding))
                    if not ar.wait(remaining()):
                        raise TimeoutError(f"imap: result not ready within the deadline ({fname})")
                else:
                    try:
                        ar = completed.get(timeout=remaining())
                    except queue.Empty:
                        raise TimeoutError(
                            f"imap: no result ready within the deadline ({fname})") from None
                del outstanding[ar]
                value = ar.get()  # return_exceptions=True: errors come back as values
                top_up()  # the freed slot goes back to work before the consumer sees this one
                if isinstance(value, BaseException) and not return_exceptions:
                    raise value
                yield value
        finally:
            # closed, dropped, or raising: what is still running is nobody's anymore
            pending = [m for ar in outstanding if not ar.done() for m in ar.msg_ids]
            if pending and not self.client.transport.closed:
                self.client.abort(pending, block=False)


class ViewExecutor(concurrent.futures.Executor):
    """A PEP 3148 ``concurrent.futures.Executor`` over a view (``view.executor``).

    ``submit`` returns the view's :class:`AsyncResult`, itself a Future. ``map`` uses
    :meth:`LoadBalancedView.imap` on a load-balanced view (lazy, at most "auto" tasks
    ahead) and a direct map otherwise. ``shutdown(wait=True)`` waits for the tasks this
    executor submitted; it never stops engines. Items of a ``map`` iterator that were
    not yet submitted at shutdown are not waited for.
    """

    def __init__(self, view: View):
        self.view = view
        try:
            self._max_workers = len(view)
        except Exception:  # no engines yet: a load-balanced view still queues work
            self._max_workers = 0
        self._outstanding: set[AsyncResult] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def _track(self, ar: AsyncResult) -> None:
        with self._lock:
            self._outstanding.add(ar)
        # outside the lock: a finished Future calls back at once, in this thread
        ar.add_done_callback(self._untrack)

    def _untrack(self, ar: Any) -> None:
        with self._lock:
            self._outstanding.discard(ar)

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new work after shutdown")

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> AsyncResult:
        """``view.apply_async(fn, *args, **kwargs)``: an AsyncResult (a Future)."""
        self._check_open()
        ar = self.view.apply_async(fn, *args, **kwargs)
        self._track(ar)
        return ar

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator:
        """Results of ``fn`` over ``iterables``, in order, as ``Executor.map``.

        ``timeout``: seconds from this call after which ``next()`` raises
        ``TimeoutError`` if the next result is not ready. ``chunksize`` is accepted and
        ignored (as by ``ThreadPoolExecutor``): each item is its own task.
        """
        self._check_open()
        if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
            raise ValueError(f"timeout must be a non-negative number of seconds or None, not {timeout!r}")
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, not {chunksize!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        view = self.view
        if isinstance(view, LoadBalancedView):
            return view._imap(fn, iterables, True, "auto", False, track=self._track,
                              deadline=deadline)
        ar = view.map_async(fn, *iterables)
        self._track(ar)
        return _results_by(ar, deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work after this; ``wait``: return once submitted tasks are done;
        ``cancel_futures``: abort those not done. Engines keep running."""
        self._shutdown = True
        with self._lock:
            outstanding = [ar for ar in self._outstanding if not ar.done()]
        if cancel_futures and outstanding:
            self.view.client.abort(outstanding, block=False)
        if wait:
            for ar in outstanding:
                ar.wait()


def _results_by(ar: AsyncResult, deadline: float | None) -> Iterator:
    if deadline is not None and not ar.wait(max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"map results not ready within the timeout ({ar._fname})")
    yield from ar


def _dependency(dep: Any) -> Any:
    """Msg_ids (or a Dependency dict) from AsyncResults, ids, or Dependency objects."""
    if dep is None:
        return None
    if hasattr(dep, "as_dict"):
        return dep.as_dict()
    if isinstance(dep, AsyncResult):
        return list(dep.msg_ids)
    if isinstance(dep, str):
        return [dep]
    ids: list[str] = []
    for item in dep:
        if isinstance(item, AsyncResult):
            ids.extend(item.msg_ids)
        elif isinstance(item, str):
            ids.append(item)
        else:
            raise TypeError(f"dependencies are AsyncResults or msg_ids, not {item!r}")
    return ids


class MapIterator(Iterator):
    """The results of ``imap``, one by one; ``cancel()`` stops it and aborts the tasks
    still outstanding (``close()`` is the same)."""

    def __init__(self, results: Iterator, abort: Callable[[], Any]):
        self._results = results
        self._abort = abort
        self._cancelled = False

    def __next__(self) -> Any:
        if self._cancelled:
            raise StopIteration
        return next(self._results)

    def cancel(self) -> None:
        """Stop iterating and abort what is still queued or running."""
        if not self._cancelled:
            self._cancelled = True
            self._abort()

    close = cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled


def _as_sequences(iterables: Sequence[Iterable]) -> list:
    """The map's inputs as sequences: iterables without a length are read into lists."""
    if not iterables:
        raise ValueError("map needs at least one sequence")
    return [it if hasattr(it, "__len__") else list(it) for it in iterables]


def _partition_bounds(length: int, parts: int, index: int) -> tuple[int, int]:
    """Bounds of part ``index`` of ``parts`` near-equal contiguous parts."""
    base, extra = divmod(length, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def _slice(seq: Any, lo: int, hi: int) -> Any:
    """A contiguous part: a view for arrays and sequences that slice, else a list."""
    try:
        return seq[lo:hi]
    except TypeError:
        return list(seq)[lo:hi]


def _join_parts(parts: list) -> Any:
    if parts and all(type(p).__module__ == "numpy" and hasattr(p, "ndim") for p in parts):
        import numpy

        return numpy.concatenate(parts)
    out: list = []
    for part in parts:
        out.extend(part)
    return out
