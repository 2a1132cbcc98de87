"""The function cache: a client pickles a function once while it is unchanged, and an
engine unpickles each distinct frame once (bounded, least recently used out first).

The client side is checked frame by frame (a changed function must give a new frame
whose unpickled function behaves the new way), then end to end on the session cluster,
from two clients, and against the engine's bound.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from ipyparallel_lite.serialization import FunctionCache, FunctionFrames, serialize_function

FC_SCALE = 2


def scaled(x):
    return x * FC_SCALE


def uses_later_global():
    return FC_LATER  # noqa: F821 - defined by a test, after the first send


def fc_helper():
    return "old helper"


def calls_helper():
    return fc_helper()


def offset(x, by=1):
    return x + by


def keyword_offset(x, *, by=1):
    return x + by


FC_LIST = [1]


def reads_list():
    return FC_LIST[-1]


def stepper():
    step = 1

    def add(x):
        return x + step

    def set_step(value):
        nonlocal step
        step = value

    return add, set_step


def tally(seen=[]):  # noqa: B006 - the mutable default is the engine-side witness
    seen.append(1)
    return len(seen)


def numbered(i):
    def number():
        return i

    return number


# ---- client side, frame by frame ------------------------------------------------------


def test_an_unchanged_function_is_pickled_once():
    frames = FunctionFrames()
    first = frames.frame(scaled)
    assert frames.frame(scaled) is first
    assert pickle.loads(first)(3) == 6
    assert serialize_function(scaled) is serialize_function(scaled)


def test_a_rebound_global_is_pickled_again():
    global FC_SCALE
    frames = FunctionFrames()
    first = frames.frame(scaled)
    FC_SCALE = 5
    try:
        second = frames.frame(scaled)
        assert second is not first and pickle.loads(second)(3) == 15
        assert frames.frame(scaled) is second
    finally:
        FC_SCALE = 2
    assert pickle.loads(frames.frame(scaled))(3) == 6


def test_a_global_defined_after_the_first_send_is_picked_up():
    global FC_LATER
    frames = FunctionFrames()
    with pytest.raises(NameError):
        pickle.loads(frames.frame(uses_later_global))()
    FC_LATER = "now defined"
    try:
        assert pickle.loads(frames.frame(uses_later_global))() == "now defined"
    finally:
        del FC_LATER


def test_a_redefined_helper_is_followed():
    global fc_helper
    frames = FunctionFrames()
    assert pickle.loads(frames.frame(calls_helper))() == "old helper"
    original = fc_helper

    def fc_helper():
        return "new helper"

    try:
        assert pickle.loads(frames.frame(calls_helper))() == "new helper"
    finally:
        fc_helper = original


def test_new_defaults_closure_cells_and_attributes_are_pickled_again():
    frames = FunctionFrames()
    assert pickle.loads(frames.frame(offset))(1) == 2
    original = offset.__defaults__
    offset.__defaults__ = (10,)
    try:
        assert pickle.loads(frames.frame(offset))(1) == 11
    finally:
        offset.__defaults__ = original

    assert pickle.loads(frames.frame(keyword_offset))(1) == 2
    keyword_offset.__kwdefaults__["by"] = 7  # the same dict, changed in place
    try:
        assert pickle.loads(frames.frame(keyword_offset))(1) == 8
    finally:
        keyword_offset.__kwdefaults__["by"] = 1

    add, set_step = stepper()
    assert pickle.loads(frames.frame(add))(1) == 2
    set_step(100)
    assert pickle.loads(frames.frame(add))(1) == 101

    def labelled():
        return 0

    first = frames.frame(labelled)
    labelled.label = "set later"
    assert pickle.loads(frames.frame(labelled)).label == "set later"
    assert frames.frame(labelled) is not first


def test_what_may_change_in_place_is_pickled_on_every_send():
    frames = FunctionFrames()
    first = frames.frame(reads_list)
    assert frames.frame(reads_list) is not first  # a list: identity cannot vouch for it
    FC_LIST.append(2)
    try:
        assert pickle.loads(frames.frame(reads_list))() == 2
    finally:
        FC_LIST.pop()
    assert len(frames) == 0


def test_a_redefined_function_of_the_same_name_is_pickled_afresh():
    """Even when the new function reuses the dead one's id (the cache's key)."""
    frames = FunctionFrames()
    ids = []
    for i in range(20):
        namespace = {"__name__": "__main__"}
        exec(f"def f():\n    return {i}", namespace)
        ids.append(id(namespace["f"]))
        assert pickle.loads(frames.frame(namespace["f"]))() == i
        del namespace
        gc.collect()
    assert len(set(ids)) < len(ids)  # the case this test is about did occur


def test_the_cache_holds_functions_weakly_and_is_bounded():
    frames = FunctionFrames(size=3)
    add, _ = stepper()
    frames.frame(add)
    assert len(frames) == 1
    del add
    gc.collect()
    # its entry waits for the room to be needed; the function itself is gone
    functions = [numbered(i) for i in range(5)]
    for f in functions:
        frames.frame(f)
    assert len(frames) == 3
    assert pickle.loads(frames.frame(functions[-1]))() == 4


def test_frames_larger_than_the_byte_bound_are_not_kept():
    frames = FunctionFrames(max_bytes=1000)
    big = "x" * 5000

    def returns_big():
        return big

    assert frames.frame(returns_big) is not frames.frame(returns_big)
    assert len(frames) == 0


def test_engine_cache_is_keyed_by_digest_and_least_recently_used_out_first():
    cache = FunctionCache(size=2)
    namespace: dict = {}
    a, b, c = (serialize_function(numbered(i)) for i in range(3))
    fa = cache.load(a, namespace)
    assert cache.load(bytearray(a), namespace) is fa  # the bytes, not the object, count
    cache.load(b, namespace)
    assert cache.load(a, namespace) is fa  # a is now the most recently used
    cache.load(c, namespace)  # evicts b
    assert len(cache) == 2 and cache.load(a, namespace) is fa
    assert cache.load(b, namespace)() == 1


def test_the_cloudpickle_internals_relied_on_are_unchanged():
    """Fails when cloudpickle changes what the cache's checks mirror."""
    from cloudpickle import cloudpickle as cp

    from ipyparallel_lite import serialization

    def local():
        return 0

    # what decides by reference or by value (serialization._pickles_by_reference)
    assert cp._should_pickle_by_reference(os.path.join) is True
    assert cp._should_pickle_by_reference(int) is True
    assert cp._should_pickle_by_reference(os) is True
    assert cp._should_pickle_by_reference(local) is False
    assert cp._should_pickle_by_reference(scaled) is False  # this module is registered by value
    # what a function pickled by value is made of (serialization._dependencies)
    state, slotstate = cp._function_getstate(calls_helper)
    assert state == {}
    assert set(slotstate) == {
        "__name__", "__qualname__", "__annotations__", "__kwdefaults__", "__defaults__",
        "__module__", "__doc__", "__closure__", "_cloudpickle_submodules", "__globals__",
    }
    names = serialization._global_names(calls_helper.__code__)
    assert set(slotstate["__globals__"]) == {n for n in names if n in calls_helper.__globals__}
    # the module attributes kept with it
    newargs = cp.Pickler(io.BytesIO())._function_getnewargs(calls_helper)
    assert set(newargs[1]) <= {"__package__", "__name__", "__path__", "__file__"}


# ---- end to end -----------------------------------------------------------------------


def test_engines_see_each_change(dv, lview):
    global FC_SCALE
    assert dv.apply_sync(scaled, 3) == [6, 6]
    # names the engine has win over the values captured with a function: drop it there,
    # so the engines read the value captured now
    dv.execute("del FC_SCALE")
    FC_SCALE = 5
    try:
        assert dv.apply_sync(scaled, 3) == [15, 15]
        assert lview.apply_sync(scaled, 3) == 15
    finally:
        FC_SCALE = 2
        dv.execute("del FC_SCALE")

    assert lview.apply_sync(offset, 1) == 2
    original = offset.__defaults__
    offset.__defaults__ = (10,)
    try:
        assert lview.apply_sync(offset, 1) == 11
    finally:
        offset.__defaults__ = original

    add, set_step = stepper()
    assert dv.apply_sync(add, 1) == [2, 2]
    set_step(100)
    assert dv.apply_sync(add, 1) == [101, 101]

    def f():
        return 1

    assert lview.apply_sync(f) == 1

    def f():  # noqa: F811 - redefined on purpose
        return 2

    assert lview.apply_sync(f) == 2


def test_two_clients_each_get_their_own_function(cluster, rc):
    """A second client in this process and one in another process send functions of
    the same name to the same engine; each gets its own."""
    other = cluster.connect_client_sync()
    try:
        other.wait_for_engines(2, timeout=60)
        mine, theirs = numbered(1), numbered(2)
        assert rc[0].apply_sync(mine) == 1
        assert other[0].apply_sync(theirs) == 2
        assert rc[0].apply_sync(mine) == 1
        assert other[0].apply_sync(mine) == 1
    finally:
        other.close()

    script = textwrap.dedent(f"""
        import ipyparallel_lite as ipp
        def number():
            return "from the other process"
        rc = ipp.Client(url_file={str(cluster.connection_file("client"))!r})
        rc.wait_for_engines(2, timeout=60)
        print(rc[0].apply_sync(number))
        rc.close()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=90, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "from the other process"
    assert rc[0].apply_sync(numbered(1)) == 1


@pytest.mark.timeout(180)
def test_engine_keeps_256_functions_least_recently_used_out_first(rc):
    """``tally``'s default list lives on the engine: its count goes on while the engine
    keeps the unpickled function, and starts over once the function was evicted."""
    engine = rc[0]

    def others(start: int, count: int) -> None:
        for i in range(start, start + count):
            assert engine.apply_sync(numbered(i)) == i

    first = engine.apply_sync(tally)
    others(1000, 255)  # with tally, 256 entries: nothing is evicted
    assert engine.apply_sync(tally) == first + 1
    others(2000, 200)  # tally was inserted 455 loads ago, but used 200 loads ago
    assert engine.apply_sync(tally) == first + 2
    others(3000, 256)  # now tally is the least recently used of 257
    assert engine.apply_sync(tally) == 1
