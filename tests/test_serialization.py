"""Serialization without sockets: frames, zero-copy buffers, namespaces, references."""

from __future__ import annotations

import os
import pickle
import threading

import numpy as np
import pytest

from ipyparallel_lite.serialization import (
    OOB_THRESHOLD,
    FunctionCache,
    MapTask,
    Reference,
    deserialize_object,
    pack_apply_message,
    serialize_function,
    serialize_object,
    unpack_apply_message,
)


def roundtrip(obj):
    return deserialize_object(serialize_object(obj))


def test_small_objects_travel_in_one_frame():
    frames = serialize_object({"a": [1, 2.5, "x"], "b": None})
    assert len(frames) == 1
    assert roundtrip({"a": [1, 2.5, "x"], "b": None}) == {"a": [1, 2.5, "x"], "b": None}


def test_large_arrays_and_bytes_are_out_of_band_without_copies():
    arr = np.arange(OOB_THRESHOLD, dtype=np.float64)
    payload = os.urandom(OOB_THRESHOLD)
    frames = serialize_object((arr, payload))
    assert len(frames) == 3
    # zero-copy on the sending side: the frames share memory with the objects
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.float64), arr)
    assert frames[2].obj is payload
    back_arr, back_bytes = deserialize_object(frames)
    np.testing.assert_array_equal(back_arr, arr)
    assert back_bytes == payload and isinstance(back_bytes, bytes)
    back_arr[0] = 42.0  # received arrays are writable


def test_non_contiguous_arrays_roundtrip():
    base = np.arange(100_000, dtype=np.int32).reshape(100, 1000)
    for arr in (base[:, ::2], base.T, base[::3]):
        np.testing.assert_array_equal(roundtrip(arr), arr)


def test_memoryview_roundtrip():
    data = bytearray(os.urandom(OOB_THRESHOLD * 2))
    back = roundtrip(memoryview(data))
    assert bytes(back) == bytes(data)
    strided = memoryview(data)[::2]
    assert bytes(roundtrip(strided)) == bytes(data[::2])


def test_unpicklable_argument_raises_before_sending():
    with pytest.raises(TypeError, match="lock"):
        pack_apply_message(len, (threading.Lock(),), None)


PLAIN_CALLS = [
    ((), {}),
    ((1, "two", 3.5, None, True, 2j, range(3), b"small"), {"k": [1, (2, 3)], "d": {"x": [b"y"]}}),
    (([1] * 64,), {}),
]
NOT_PLAIN_CALLS = [
    ((b"x" * OOB_THRESHOLD,), {}),  # out-of-band
    (([1] * 65,), {}),  # too many items to look through
    (([[[[1]]]],), {}),  # too deep
    ((memoryview(b"ab"),), {}),
    (("a", np.arange(3)), {}),
    ((len,), {"key": abs}),
]


@pytest.mark.parametrize("call", PLAIN_CALLS + NOT_PLAIN_CALLS)
def test_plain_arguments_pickle_as_our_pickler_would(call):
    """Arguments of atoms and small containers skip our pickler: the standard one gives
    the very same bytes (this fails if cloudpickle starts pickling them differently)."""
    from ipyparallel_lite.serialization import _dumps, _plain

    plain = any(call is c for c in PLAIN_CALLS)
    assert _plain(call) == plain
    if plain:
        assert pickle.dumps(call, protocol=5) == _dumps(call, [])
    f, args, kwargs = unpack_apply_message(pack_apply_message(len, *call), {})
    assert f is len
    assert _comparable((args, kwargs)) == _comparable(call)


def _comparable(obj):
    if isinstance(obj, memoryview):
        return bytes(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, list | tuple):
        return type(obj)(_comparable(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _comparable(v) for k, v in obj.items()}
    return obj


def test_apply_message_roundtrip_with_reference():
    namespace = {"x": 7}
    frames = pack_apply_message(pow, (Reference("x"), 2), {"mod": 5})
    f, args, kwargs = unpack_apply_message(frames, namespace)
    assert f(*args, **kwargs) == pow(7, 2, 5)
    with pytest.raises(NameError, match="'missing' is not defined on this engine"):
        unpack_apply_message(pack_apply_message(abs, (Reference("missing"),)), namespace)


def test_by_value_functions_use_the_engine_namespace():
    namespace = {"engine_side": 3}

    def reads_and_writes():
        global written
        written = engine_side + 1  # noqa: F821 - lives in the engine namespace
        return written

    frames = pack_apply_message(reads_and_writes)  # a local function: pickled by value
    f, args, kwargs = unpack_apply_message(frames, namespace)
    assert f() == 4 and namespace["written"] == 4


def test_function_frames_cached_only_when_pickled_by_reference():
    assert serialize_function(os.getpid) is serialize_function(os.getpid)
    assert pickle.loads(serialize_function(len)) is len
    value = [1]

    def closure():
        return value[0]

    first = serialize_function(closure)
    value[0] = 2
    assert pickle.loads(serialize_function(closure))() == 2
    assert pickle.loads(first)() == 1
    with pytest.raises(TypeError, match="not callable"):
        serialize_function(3)


def test_function_cache_and_map_task():
    cache = FunctionCache(size=2)
    frame = serialize_function(MapTask(abs))
    namespace: dict = {}
    task = cache.load(frame, namespace)
    assert cache.load(frame, namespace) is task
    assert task([-1, -2]) == [1, 2]
    for f in (len, repr, str):
        cache.load(serialize_function(f), namespace)
    assert len(cache) == 2


def test_functions_pickled_by_value_keep_their_file_name():
    """Remote tracebacks name the user's file (cloudpickle alone says "<dynamic-code>")."""

    def local():
        return 1

    frames = pack_apply_message(local)
    f, _, _ = unpack_apply_message(frames, {})
    assert f.__code__.co_filename == __file__
    assert f.__code__.co_firstlineno == local.__code__.co_firstlineno
