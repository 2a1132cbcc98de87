"""Turning Python objects into message buffers and back.

Contract: ``serialize_object(obj)`` returns a list of frames ``[pickle, *out_of_band]``
where the first frame is a cloudpickle (protocol 5) and every large numpy array,
``bytes`` or contiguous ``memoryview`` inside ``obj`` travels as its own frame,
without being copied on the sending side. ``deserialize_object(frames)`` is the
inverse. Received arrays are writable: out-of-band frames are copied once into a
``bytearray`` so that engines and clients may mutate what they receive.

``pack_apply_message(f, args, kwargs)`` puts the function in its own frame so a map
can pickle its function once and reuse the frame for every chunk.

Namespaces on the engine: :func:`interactive` functions (and every function pickled by
value) run with the engine's user namespace as their globals (:func:`bind_to_namespace`),
and a :class:`Reference` anywhere in an apply call's function, args or kwargs stands for
a name in that namespace. ``unpack_apply_message`` walks the arguments for References
only when unpickling them created one, so calls without References pay nothing.

Nothing here looks at signatures: callers only pass frames whose message signature
``jupyter_client.session.Session`` has already verified.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from collections.abc import Callable, Sequence
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


#: frames of functions pickled by reference (module and name): they never change, and
#: looking up the importability of a function costs more than sending it
_reference_frames: dict[Any, bytes] = {}


def _pickles_by_reference(f: Any) -> bool:
    if isinstance(f, types.BuiltinFunctionType):
        owner = getattr(f, "__self__", None)
        return owner is None or isinstance(owner, types.ModuleType)
    if isinstance(f, types.FunctionType):
        try:
            return bool(cloudpickle.cloudpickle._should_pickle_by_reference(f))
        except Exception:
            return False
    return False


def serialize_function(f: Any) -> bytes:
    """The frame of a function (or of a :class:`Reference` to one on the engine),
    reusable across many apply messages."""
    if not callable(f) and not isinstance(f, Reference):
        raise TypeError(f"{f!r} is not callable")
    if isinstance(f, types.FunctionType | types.BuiltinFunctionType):
        frame = _reference_frames.get(f)
        if frame is not None:
            return frame
        frame = _pickle(f)
        if _pickles_by_reference(f):
            if len(_reference_frames) >= 1024:
                _reference_frames.clear()
            _reference_frames[f] = frame
        return frame
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
    out_of_band: list = []
    payload = _dumps((tuple(args), dict(kwargs or {})), out_of_band)
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
    """Unpickled functions keyed by their frame, so a map's function unpickles once."""

    def __init__(self, size: int = 64):
        self._size = size
        self._cache: dict[bytes, Any] = {}

    def load(self, frame: Frame, namespace: dict) -> Any:
        key = bytes(_as_buffer(frame))
        f = self._cache.get(key)
        if f is None:
            f = bind_to_namespace(pickle.loads(key), namespace)
            if len(self._cache) >= self._size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = f
        return f

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
