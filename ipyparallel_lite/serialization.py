"""Turning Python objects into message buffers and back.

Contract: ``serialize_object(obj)`` returns a list of frames ``[pickle, *out_of_band]``
where the first frame is a cloudpickle (protocol 5) and every large numpy array,
``bytes`` or contiguous ``memoryview`` inside ``obj`` travels as its own frame,
without being copied on the sending side. ``deserialize_object(frames)`` is the
inverse. Received arrays are writable: out-of-band frames are copied once into a
``bytearray`` so that engines and clients may mutate what they receive.

``pack_apply_message(f, args, kwargs)`` puts the function in its own frame so a map
can pickle its function once and reuse the frame for every chunk.

Functions are pickled once while unchanged: :class:`FunctionFrames` (the client side,
one per process) reuses a function's frame while everything cloudpickle would read to
pickle it is still the very same immutable object, and :class:`FunctionCache` (one
per engine) keeps unpickled functions by the digest of their frame.

Namespaces on the engine: :func:`interactive` functions (and every function pickled by
value) run with the engine's user namespace as their globals (:func:`bind_to_namespace`),
and a :class:`Reference` anywhere in an apply call's function, args or kwargs stands for
a name in that namespace. ``unpack_apply_message`` walks the arguments for References
only when unpickling them created one, so calls without References pay nothing.

Nothing here looks at signatures: callers only pass frames whose message signature
``jupyter_client.session.Session`` has already verified.
"""

from __future__ import annotations

import dis
import functools
import hashlib
import io
import operator
import pickle
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import cloudpickle

from ipyparallel_lite.error import without_traceback

#: objects smaller than this are pickled in-band: a frame of its own costs more than a copy
OOB_THRESHOLD = 64 * 1024

Frame = Any  # bytes, memoryview, PickleBuffer or zmq.Frame


class _LargeBytes:
    """Marks a large ``bytes`` for out-of-band pickling.

    Picklers skip ``reducer_override`` for exact ``bytes``, so large ones near the top of
    what is sent (an argument, a pushed value, a result) are wrapped in this first.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


#: how deep, and into how many items per container, large bytes are looked for
_WRAP_DEPTH, _WRAP_ITEMS = 3, 64


def _wrap_large_bytes(obj: Any, depth: int = _WRAP_DEPTH) -> Any:
    kind = type(obj)
    if kind is bytes:
        return _LargeBytes(obj) if len(obj) >= OOB_THRESHOLD else obj
    if depth == 0:
        return obj
    if kind is tuple and len(obj) <= _WRAP_ITEMS:
        return tuple(_wrap_large_bytes(x, depth - 1) for x in obj)
    if kind is list and len(obj) <= _WRAP_ITEMS:
        return [_wrap_large_bytes(x, depth - 1) for x in obj]
    if kind is dict and len(obj) <= _WRAP_ITEMS:
        return {k: _wrap_large_bytes(v, depth - 1) for k, v in obj.items()}
    return obj


_DYNAMIC_FILENAME = "<dynamic-code>"


def _code_reduce_keeping_filename(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, with its real file name kept.

    cloudpickle ≥ 3.1.3 renames the file of every function it pickles by value to
    "<dynamic-code>"; remote tracebacks then lose the file name users need to read them.
    """
    ctor, args = cloudpickle.cloudpickle._code_reduce(code)[:2]
    return ctor, tuple(code.co_filename if a == _DYNAMIC_FILENAME else a for a in args)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle with large ``bytes`` and ``memoryview`` objects sent out-of-band,
    and file names kept in the code of functions pickled by value."""

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is types.CodeType:
            return _code_reduce_keeping_filename(obj)
        if kind is _LargeBytes:
            return bytes, (pickle.PickleBuffer(obj.data),)
        if kind is memoryview and obj.nbytes >= OOB_THRESHOLD and obj.contiguous:
            return memoryview, (pickle.PickleBuffer(obj),)
        if kind is memoryview:
            return memoryview, (obj.tobytes(),)
        return super().reducer_override(obj)


def _dumps(obj: Any, out_of_band: list) -> bytes:
    def keep_large(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OOB_THRESHOLD:
            return True  # in-band
        out_of_band.append(raw)
        return False

    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=keep_large).dump(_wrap_large_bytes(obj))
    return stream.getvalue()


#: types the standard pickler handles exactly as ours does (no reducer of ours applies)
_PLAIN_ATOMS = frozenset({type(None), bool, int, float, complex, str, range})
#: how deep :func:`_plain` looks: the call's (args, kwargs), an argument, and two levels in it
_PLAIN_DEPTH = 4


def _plain(obj: Any, depth: int = _PLAIN_DEPTH) -> bool:
    """Whether ``obj`` is only atoms of :data:`_PLAIN_ATOMS`, ``bytes`` kept in-band, and
    small tuples, lists and dicts of them: what ``pickle.dumps`` (C, no per-call setup)
    pickles exactly as our pickler would, for the arguments of most calls."""
    kind = type(obj)
    if kind in _PLAIN_ATOMS:
        return True
    if kind is bytes:
        return len(obj) < OOB_THRESHOLD
    if kind is not tuple and kind is not list and kind is not dict:
        return False
    if depth == 0 or len(obj) > _WRAP_ITEMS:
        return False
    if kind is dict:
        return _all_plain(obj.keys(), depth - 1) and _all_plain(obj.values(), depth - 1)
    return _all_plain(obj, depth - 1)


def _all_plain(items: Iterable, depth: int) -> bool:
    for item in items:
        if type(item) not in _PLAIN_ATOMS and not _plain(item, depth):
            return False
    return True


def _pickle(obj: Any) -> bytes:
    """One in-band pickle (protocol 5) by our pickler."""
    stream = io.BytesIO()
    _Pickler(stream, protocol=5).dump(obj)
    return stream.getvalue()


def _as_buffer(frame: Frame) -> memoryview:
    """A memoryview over a frame's bytes, without copying."""
    buffer = getattr(frame, "buffer", None)  # zmq.Frame
    return buffer if buffer is not None else memoryview(frame)


def serialize_object(obj: Any) -> list[Frame]:
    """Frames for ``obj``: one pickle frame followed by its out-of-band buffers."""
    out_of_band: list = []
    data = _dumps(obj, out_of_band)
    return [data, *out_of_band]


def deserialize_object(frames: Sequence[Frame]) -> Any:
    """Rebuild the object of :func:`serialize_object` from its frames."""
    if not frames:
        raise ValueError("cannot deserialize: no frames")
    writable = [bytearray(_as_buffer(f)) for f in frames[1:]]
    return pickle.loads(_as_buffer(frames[0]), buffers=writable)


def _pickles_by_reference(obj: Any) -> bool:
    """Whether cloudpickle pickles ``obj`` (a function, class or module) by its name.

    cloudpickle's own test (``_should_pickle_by_reference``: importable, and its module
    not registered to be pickled by value); ``tests/test_serialization.py`` checks that
    it still exists and answers as relied on here. Answers are remembered until a module
    is imported or the by-value registry changes (:func:`_by_reference_stamp`).
    """
    try:
        if obj in _known_by_reference:
            return True
        if obj in _known_by_value:
            return False
    except TypeError:  # unhashable (a class whose metaclass defines __eq__ only)
        return _ask_pickles_by_reference(obj)
    answer = _ask_pickles_by_reference(obj)
    if answer:  # importable: the module keeps it alive anyway
        if len(_known_by_reference) >= 4096:
            _known_by_reference.clear()
        _known_by_reference.add(obj)
    else:  # held weakly: remembering must not keep a notebook's function alive
        try:
            _known_by_value.add(obj)
        except TypeError:  # not weakly referenceable: asked again next time
            pass
    return answer


def _ask_pickles_by_reference(obj: Any) -> bool:
    if isinstance(obj, types.BuiltinFunctionType):
        owner = getattr(obj, "__self__", None)
        return owner is None or isinstance(owner, types.ModuleType)
    if isinstance(obj, types.FunctionType | type | types.ModuleType):
        try:
            return bool(cloudpickle.cloudpickle._should_pickle_by_reference(obj))
        except Exception:
            return False
    return False


_known_by_reference: set = set()
_known_by_value: weakref.WeakSet = weakref.WeakSet()


def _by_reference_stamp() -> tuple[int, set]:
    """What :func:`_pickles_by_reference`'s answers depend on: the modules imported and
    the modules registered to be pickled by value. When it changes, they are forgotten."""
    return len(sys.modules), cloudpickle.list_registry_pickle_by_value()


def _forget_reference_answers() -> None:
    _known_by_reference.clear()
    _known_by_value.clear()


#: value types whose identity pins their pickle: they cannot change in place
_IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes, type(...), range,
                        types.CodeType})
#: how deep, and how many items per tuple, :func:`_pinned` looks into before giving up
_PIN_DEPTH, _PIN_ITEMS = 4, 64
_MISSING = object()  # a referenced global that is not defined (yet)
_EMPTY_CELL = object()  # a closure cell not yet assigned
_END = object()  # ends the items of one of a function's dicts
_SEEN = object()  # a function already being described (recursion)


def _pinned(value: Any, depth: int = _PIN_DEPTH) -> bool:
    """Whether ``value``'s identity alone pins what cloudpickle makes of it.

    True for immutable atoms, tuples and frozensets (and ``list[int]``-style aliases)
    of such values, and functions, classes and modules pickled by reference. False for
    anything that may change in place (lists, dicts, arrays, instances, classes defined
    in ``__main__``...) and for functions pickled by value, which
    :func:`_dependencies` follows instead.
    """
    kind = type(value)
    if kind in _IMMUTABLE:
        return True
    if kind is tuple or kind is frozenset:
        return depth > 0 and len(value) <= _PIN_ITEMS and all(_pinned(v, depth - 1) for v in value)
    if kind is types.GenericAlias or kind is types.UnionType:
        return depth > 0 and _pinned(value.__origin__ if kind is types.GenericAlias else None,
                                     depth - 1) and _pinned(value.__args__, depth - 1)
    if kind is types.FunctionType or kind is types.BuiltinFunctionType or kind is types.ModuleType \
            or isinstance(value, type):
        return _pickles_by_reference(value)
    return False


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Names a code object (nested functions included) reads, writes or deletes as
    globals: the ones cloudpickle captures from the function's module."""
    names = {ins.argval: None for ins in dis.get_instructions(code) if ins.opname in _GLOBAL_OPS}
    for const in code.co_consts:
        if type(const) is types.CodeType:
            names.update(dict.fromkeys(_global_names(const)))
    return tuple(names)


_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL"})


def _dependencies(f: types.FunctionType, out: list, seen: set[int]) -> bool:
    """Append to ``out`` everything cloudpickle reads to pickle ``f`` by value; False
    (and ``out`` is to be dropped) when one of them is not :func:`_pinned`.

    What is read: the code; name, qualname, module, doc; defaults and keyword defaults;
    annotations; attributes in ``f.__dict__``; the contents of each closure cell; the
    module attributes cloudpickle keeps (``__package__``, ``__name__``, ``__path__``,
    ``__file__``); the value of every global name the code (or a function nested in it)
    uses, or the fact that it is undefined. Functions pickled by value that ``f``
    refers to are followed the same way. (Which submodules of a module it uses are
    imported, which cloudpickle also records, and which objects pickle by reference,
    change only when a module is imported: :class:`FunctionFrames` then starts afresh.)
    """
    if id(f) in seen:  # recursion: f is being described already
        out.append(_SEEN)
        return True
    seen.add(id(f))
    g = f.__globals__
    out += (f.__code__, f.__name__, f.__qualname__, f.__module__, f.__doc__, f.__defaults__,
            g.get("__package__"), g.get("__name__"), g.get("__path__"), g.get("__file__"))
    if not (_pinned(f.__doc__) and _pinned(f.__defaults__) and _pinned(f.__module__)):
        return False
    values: list = []
    for mapping in (f.__kwdefaults__, f.__annotations__, f.__dict__):
        if mapping:
            for key, value in mapping.items():
                out.append(key)
                values.append(value)
        values.append(_END)
    if f.__closure__ is not None:
        for cell in f.__closure__:
            try:
                values.append(cell.cell_contents)
            except ValueError:
                values.append(_EMPTY_CELL)
    for name in _global_names(f.__code__):
        values.append(g.get(name, _MISSING))
    for value in values:
        if type(value) is types.FunctionType and not _pickles_by_reference(value):
            # described by what it is made of, not held: entries hold functions weakly
            if not _dependencies(value, out, seen):
                return False
            continue
        out.append(value)
        if value is not _MISSING and value is not _EMPTY_CELL and value is not _END \
                and not _pinned(value):
            return False
    return True


class FunctionFrames:
    """Pickled frames of functions, so that a function is pickled once while it is unchanged.

    A function pickled by reference (importable module and name, or a builtin) is kept
    with its frame. A function pickled by value (defined in a notebook, a script or a
    closure) is kept together with the objects its pickle was made from (see
    :func:`_dependencies`); the frame is reused while each of them is still the very
    same object, and the function is pickled again as soon as one is not: a rebound
    global, new defaults, a closure cell assigned, a global defined after the first
    send, a function it calls redefined, an attribute set. Redefining the function
    itself makes a new function object, which is looked up afresh. Everything is
    forgotten when a module is imported or the by-value registry changes.

    Identity can only vouch for objects that cannot change in place, so a function
    that refers to anything else (a list, a dict, an array, an instance, a class of
    ``__main__``: see :func:`_pinned`) is pickled on every send, exactly as without
    the cache. Checking costs a few microseconds; pickling a small function tens.

    A function pickled by value is held weakly: the cache never keeps it (or its
    globals) alive. What an entry holds, its frame and the immutable objects it was
    made from, is bounded by ``size`` entries and ``max_bytes`` of frames, least
    recently used out first (the entry of a function that is gone waits for that).
    Thread-safe: views may be used from several threads.
    """

    def __init__(self, size: int = 256, max_bytes: int = 32 * 2**20):
        self.size, self.max_bytes = size, max_bytes
        self._by_reference: dict[Any, bytes] = {}
        # id(f) -> (weak reference to f, dependencies, frame)
        self._by_value: dict[int, tuple[weakref.ref, list, bytes]] = {}
        self._bytes = 0
        self._stamp = _by_reference_stamp()
        self._lock = threading.Lock()

    def frame(self, f: types.FunctionType | types.BuiltinFunctionType) -> bytes:
        """``f`` pickled: from the cache when nothing it is pickled from has changed."""
        stamp = _by_reference_stamp()
        if stamp != self._stamp:  # a module was imported, or one registered by value
            with self._lock:
                self._stamp = stamp
                self._by_reference.clear()
                self._by_value.clear()
                self._bytes = 0
            _forget_reference_answers()
        frame = self._by_reference.get(f)
        if frame is not None:
            return frame
        key = id(f)
        deps: list = []
        pinned = type(f) is types.FunctionType and _dependencies(f, deps, set())
        with self._lock:
            entry = self._by_value.get(key)
            if entry is not None:
                if pinned and entry[0]() is f and len(deps) == len(entry[1]) \
                        and all(map(operator.is_, deps, entry[1])):
                    self._by_value[key] = self._by_value.pop(key)  # now the most recently used
                    return entry[2]
                self._forget(key)
        frame = _pickle(f)
        with self._lock:
            if _pickles_by_reference(f):
                if len(self._by_reference) >= 4 * self.size:
                    self._by_reference.pop(next(iter(self._by_reference)))
                self._by_reference[f] = frame
            elif pinned and len(frame) <= self.max_bytes:
                self._keep_by_value(f, deps, frame)
        return frame

    def _keep_by_value(self, f: types.FunctionType, deps: list, frame: bytes) -> None:
        self._forget(id(f))
        while self._by_value and (len(self._by_value) >= self.size
                                  or self._bytes + len(frame) > self.max_bytes):
            self._forget(next(iter(self._by_value)))
        self._by_value[id(f)] = (weakref.ref(f), deps, frame)
        self._bytes += len(frame)

    def _forget(self, key: int) -> None:
        entry = self._by_value.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[2])

    def __len__(self) -> int:
        return len(self._by_reference) + len(self._by_value)


_function_frames = FunctionFrames()


def serialize_function(f: Any) -> bytes:
    """The frame of a function (or of a :class:`Reference` to one on the engine),
    reusable across many apply messages; plain functions come from :class:`FunctionFrames`."""
    if not callable(f) and not isinstance(f, Reference):
        raise TypeError(f"{f!r} is not callable")
    if type(f) is types.FunctionType or type(f) is types.BuiltinFunctionType:
        return _function_frames.frame(f)
    return _pickle(f)


def pack_apply_message(
    f: Any, args: Sequence = (), kwargs: dict | None = None, *, function_frame: bytes | None = None
) -> list[Frame]:
    """Frames of an ``apply_request``: ``[function, args_and_kwargs, *out_of_band]``.

    Raises ``TypeError`` or ``pickle.PicklingError`` *before* anything is sent when an
    argument cannot be pickled.
    """
    if function_frame is None:
        function_frame = serialize_function(f)
    call = (tuple(args), dict(kwargs or {}))
    if _plain(call):
        return [function_frame, pickle.dumps(call, protocol=5)]
    out_of_band: list = []
    payload = _dumps(call, out_of_band)
    return [function_frame, payload, *out_of_band]


#: References unpickled so far in this process: ``unpack_apply_message`` compares it
#: before and after unpickling arguments, and walks them only when it changed
_references_loaded = 0


def _load_reference(name: str) -> Reference:
    """Unpickles a :class:`Reference`, counting it (see ``_references_loaded``)."""
    global _references_loaded
    _references_loaded += 1
    return Reference(name)


class Reference:
    """A name resolved in the engine's namespace when an apply call runs there.

    ``view.apply(f, ipp.Reference("a"))`` passes the engine's ``a`` to ``f``. A
    Reference may sit anywhere in the arguments (inside lists, tuples and dict
    values, at any depth) or be the function itself: ``view.apply(ipp.Reference("f"))``
    calls the engine's ``f``. Dotted names (``"a.b"``) resolve too.
    """

    def __init__(self, name: str):
        if not isinstance(name, str):
            raise TypeError(f"Reference needs a variable name (a str), got {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"<Reference: {self.name!r}>"

    def __reduce__(self) -> tuple:
        return _load_reference, (self.name,)

    def resolve(self, namespace: dict) -> Any:
        """The value of the name in ``namespace``; NameError naming it when it is missing."""
        try:
            return eval(self.name, namespace)
        except NameError:
            root = self.name.split(".", 1)[0].strip()
            raise without_traceback(NameError(
                f"Reference({self.name!r}): name {root!r} is not defined on this engine; "
                f"push it first (view.push({{{root!r}: ...}})) or define it with view.execute"
            )) from None


def _resolve_references(obj: Any, namespace: dict, seen: set[int]) -> Any:
    """``obj`` with every Reference inside lists, tuples and dict values resolved.

    Lists and dicts are updated in place (they were just unpickled and nobody else
    holds them); ``seen`` guards against containers that hold themselves.
    """
    kind = type(obj)
    if kind is Reference:
        return obj.resolve(namespace)
    if kind not in (list, tuple, dict) or id(obj) in seen:
        return obj
    seen.add(id(obj))
    if kind is list:
        for i, item in enumerate(obj):
            obj[i] = _resolve_references(item, namespace, seen)
        return obj
    if kind is dict:
        for key, value in obj.items():
            obj[key] = _resolve_references(value, namespace, seen)
        return obj
    return tuple(_resolve_references(item, namespace, seen) for item in obj)


def interactive(f: Callable) -> Callable:
    """Decorator: ``f`` runs on engines with the engine's namespace as its globals.

    As in IPython parallel, for functions defined in an importable module: without it
    they are sent by reference and see their module's globals on the engine; with it
    they are sent by value and read and write the engine's variables, like functions
    defined in a notebook. Names the engine lacks fall back to the module's values
    captured when the function is sent. The function still works locally unchanged.
    """
    if not isinstance(f, types.FunctionType):
        f.__module__ = "__main__"
        return f
    copy = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__ = f.__kwdefaults__
    copy.__dict__.update(f.__dict__)
    copy.__qualname__, copy.__doc__ = f.__qualname__, f.__doc__
    copy.__module__ = "__main__"  # cloudpickle sends functions of __main__ by value
    return copy


def bind_to_namespace(f: Any, namespace: dict) -> Any:
    """Make an interactively defined function see the engine's namespace as its globals.

    Functions pickled by value (those of ``__main__``: a notebook or a script) read and
    write the engine's variables, as in IPython parallel; globals that cloudpickle
    captured on the client fill in names the engine does not have yet.
    """
    if isinstance(f, MapTask):
        return MapTask(bind_to_namespace(f.f, namespace))
    if not isinstance(f, types.FunctionType) or f.__globals__ is namespace:
        return f
    module = sys.modules.get(f.__module__)
    if module is not None and module.__dict__ is f.__globals__:
        return f  # imported by reference from a real module: its globals are right
    for name, value in f.__globals__.items():
        if not name.startswith("__"):
            namespace.setdefault(name, value)
    bound = types.FunctionType(f.__code__, namespace, f.__name__, f.__defaults__, f.__closure__)
    bound.__kwdefaults__ = f.__kwdefaults__
    bound.__dict__.update(f.__dict__)
    bound.__qualname__ = f.__qualname__
    return bound


class MapTask:
    """Calls ``f`` on every item of a chunk: what a map sends as its function."""

    def __init__(self, f: Any):
        self.f = f

    def __call__(self, *chunks: Sequence) -> list:
        return list(map(self.f, *chunks))


class FunctionCache:
    """The engine's unpickled functions, by the digest of their frame (BLAKE2b, 128 bits).

    A client sends a function's frame unchanged while the function is unchanged
    (:class:`FunctionFrames`), so an engine unpickles each function once, and a map's
    chunks share one. Each entry is the function already bound to the engine's
    namespace. Bounded: the least recently used of ``size`` entries goes first.
    Frames come from verified messages only, so the digest needs no secret.
    """

    def __init__(self, size: int = 256):
        self.size = size
        self._cache: dict[bytes, Any] = {}

    def load(self, frame: Frame, namespace: dict) -> Any:
        buffer = _as_buffer(frame)
        key = hashlib.blake2b(buffer, digest_size=16).digest()
        f = self._cache.pop(key, None)
        if f is None:
            f = bind_to_namespace(pickle.loads(buffer), namespace)
            if len(self._cache) >= self.size:
                self._cache.pop(next(iter(self._cache)))
        self._cache[key] = f  # (re)inserted last: the most recently used
        return f

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()


def unpack_apply_message(
    frames: Sequence[Frame], namespace: dict, functions: FunctionCache | None = None
) -> tuple[Any, tuple, dict]:
    """``(f, args, kwargs)`` from the frames of :func:`pack_apply_message`.

    :class:`Reference` objects in the function's place or anywhere in the arguments
    are resolved in ``namespace``.
    """
    if len(frames) < 2:
        raise ValueError(f"apply_request needs at least 2 buffers, got {len(frames)}")
    if functions is None:
        f = bind_to_namespace(pickle.loads(_as_buffer(frames[0])), namespace)
    else:
        f = functions.load(frames[0], namespace)
    if type(f) is Reference:  # cached as the Reference: the engine's value may change
        f = f.resolve(namespace)
    loaded = _references_loaded
    args, kwargs = deserialize_object(frames[1:])
    if _references_loaded != loaded:  # only then can a Reference be in there
        seen: set[int] = set()
        args = _resolve_references(args, namespace, seen)
        kwargs = _resolve_references(kwargs, namespace, seen)
    return f, args, kwargs
