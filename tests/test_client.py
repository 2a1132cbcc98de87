"""The client API on a real 2-engine cluster: views, apply, map, data movement, errors."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import ipyparallel_lite as ipp


def square(x):
    return x * x


def test_ids_and_view_indexing(rc):
    assert rc.ids == [0, 1]
    assert len(rc) == 2
    assert rc[0].targets == 0
    assert rc[-1].targets == 1
    assert rc[:].targets == [0, 1]
    assert rc[[1]].targets == [1]
    assert rc[0:1].targets == [0]
    with pytest.raises(ipp.EngineError, match="No engine with id 7"):
        rc[7]
    with pytest.raises(TypeError):
        rc["x"]


def test_apply_single_and_many(rc):
    assert rc[0].apply_sync(square, 3) == 9
    pids = rc[:].apply_sync(os.getpid)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    ar = rc[:].apply_async(square, 4)
    assert isinstance(ar, ipp.AsyncResult)
    assert ar.get(timeout=10) == [16, 16]
    assert ar.ready() and ar.successful() and ar.done()
    assert ar.result() == [16, 16]
    assert [md["engine_id"] for md in ar.metadata] == [0, 1]
    assert ar.metadata[0].status == "ok"
    assert ar.progress == 2 and len(ar) == 2
    assert ar.elapsed > 0 and ar.wall_time >= 0 and ar.serial_time >= 0
    assert ar.get_dict() == {0: 16, 1: 16}
    assert rc[1].apply(square, 5).get() == 25  # block defaults to False


def test_requests_to_several_engines_go_as_one_message_per_engine(rc, sent_messages):
    # the controller's mux device routes each message to one engine, as ipyparallel's does
    sent = sent_messages
    payload = np.arange(10**5)
    rc[:].push({"payload": payload}, block=True)
    ar = rc[:].execute("total = int(payload.sum())", block=False)
    assert ar.get(timeout=10) == [None, None]
    assert sent == [("mux", 2), ("mux", 2)]
    assert len(set(ar.msg_ids)) == 2 and ar.engine_id == [0, 1]
    assert rc[:].pull("total", block=True) == [int(payload.sum())] * 2
    # a repeated target is a request of its own each time it is named
    sent.clear()
    assert rc[[0, 0]].apply_sync(square, 3) == [9, 9]
    assert sent == [("mux", 2)]


def test_one_engine_sees_direct_requests_in_order(rc):
    # one-engine and several-engine requests take the same path, so they keep their order
    rc[:].execute("seen = []", block=True)
    ars = []
    for i in range(20):
        view = rc[0] if i % 2 else rc[:]
        ars.append(view.execute(f"seen.append({i})", block=False))
    assert rc.wait(ars, timeout=10)
    assert rc[0].pull("seen", block=True) == list(range(20))
    assert rc[1].pull("seen", block=True) == list(range(0, 20, 2))


def test_get_timeout_and_wait(rc):
    ar = rc[0].apply_async(time.sleep, 0.5)
    with pytest.raises(ipp.TimeoutError, match="not ready"):
        ar.get(timeout=0.01)
    assert not ar.wait(0.01)
    assert ar.wait(10)
    assert rc.wait([ar], timeout=5)


def test_future_protocol(rc):
    ar = rc[0].apply_async(square, 6)
    seen = []
    ar.add_done_callback(lambda f: seen.append(f.result()))
    assert ar.result(timeout=10) == 36
    deadline = time.monotonic() + 2
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [36]


def test_execute_and_output(dv):
    ar = dv.execute("import os\nprint('hello', 40 + 2)\nx_exec = 11", block=False)
    ar.get(timeout=10)
    assert ar.stdout == ["hello 42\n", "hello 42\n"]
    assert dv.pull("x_exec") == [11, 11]


def test_execute_result_waits_for_all_announced_output(rc, dv, monkeypatch):
    # the reply says how many iopub messages the cell published (streams, display,
    # result); the result is done once all of them arrived, however far the
    # reply overtakes the output (here a megabyte of stdout), not after a grace period
    monkeypatch.setattr(rc.transport, "OUTPUT_GRACE", 60.0)
    code = ("from IPython.display import display, HTML\n"
            "for i in range(1000): print('%04d' % i + '.' * 995)\n"
            "display(HTML('<b>shown</b>'))\n"
            "6 * 7")
    for _ in range(3):
        ar = dv.execute(code, silent=False, block=False)
        ar.get(timeout=30)
        for md in ar.metadata:
            assert md["iopub_count"] >= 3
            assert md["stdout"].count("\n") == 1000 and md["stdout"].endswith("0999" + "." * 995 + "\n")
            kinds = [out["header"]["msg_type"] for out in md["outputs"]]
            assert kinds == ["display_data", "execute_result"]
            assert md["execute_input"] == code
            assert md["execute_result"]["data"]["text/plain"] == "42"


def test_execute_with_top_level_await_and_engine_history(rc, dv, monkeypatch):
    # a cell with top-level await takes ipykernel's own path; both paths count output
    monkeypatch.setattr(rc.transport, "OUTPUT_GRACE", 60.0)
    ar = dv.execute("import asyncio\nawait asyncio.sleep(0.01)\nprint('awaited')", silent=False, block=False)
    ar.get(timeout=10)
    assert ar.stdout == ["awaited\n", "awaited\n"]
    assert all(md["iopub_count"] >= 2 for md in ar.metadata)
    # engines keep their history in memory: %history works, no shared sqlite file is written
    dv.execute("history_probe = 1", silent=False, block=True)
    files = dv.apply_sync(lambda: get_ipython().history_manager.hist_file)  # noqa: F821
    assert files == [":memory:", ":memory:"]
    ar = dv.execute("%history -l 1", silent=False, block=False)
    ar.get(timeout=10)
    assert all("history_probe = 1" in out for out in ar.stdout)


def test_apply_stdout_reaches_metadata(rc):
    def talk():
        print("from the engine")
        return 1

    ar = rc[0].apply_async(talk)
    assert ar.get(timeout=10) == 1
    deadline = time.monotonic() + 2
    while not ar.stdout and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ar.stdout == "from the engine\n"


def test_push_pull_getitem(dv):
    dv.push({"a": 5, "b": "text"})
    assert dv.pull("a") == [5, 5]
    assert dv.pull(["a", "b"]) == [[5, "text"], [5, "text"]]
    dv["c"] = [1, 2]
    assert dv["c"] == [[1, 2], [1, 2]]
    with pytest.raises(ipp.CompositeError, match="NameError"):
        dv.pull("never_defined")


def test_interactive_functions_see_engine_namespace(dv):
    dv.push({"engine_value": 3})

    def uses_global():
        return engine_value * 2  # noqa: F821 - defined on the engines

    assert dv.apply_sync(uses_global) == [6, 6]

    def sets_global():
        global set_remotely
        set_remotely = "yes"

    dv.apply_sync(sets_global)
    assert dv.pull("set_remotely") == ["yes", "yes"]


def test_reference(dv):
    dv.push({"ref_target": 21})
    assert dv.apply_sync(square, ipp.Reference("ref_target")) == [441, 441]


def test_scatter_gather_lists_and_arrays(dv):
    dv.scatter("part", list(range(10)))
    assert dv.pull("part") == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert dv.gather("part") == list(range(10))
    arr = np.arange(11.0)
    dv.scatter("arr", arr)
    gathered = dv.gather("arr")
    assert isinstance(gathered, np.ndarray)
    np.testing.assert_array_equal(gathered, arr)


def test_direct_map(dv):
    assert dv.map_sync(square, range(7)) == [x * x for x in range(7)]
    ar = dv.map_async(lambda a, b: a + b, [1, 2, 3], [10, 20, 30])
    assert list(ar) == [11, 22, 33]
    assert len(ar) == 3


def test_load_balanced_apply_and_map(lview):
    assert lview.apply_sync(square, 9) == 81
    ar = lview.map_async(square, range(100))
    assert ar.get(timeout=30) == [x * x for x in range(100)]
    assert len(ar) == 100
    assert list(lview.map_async(square, range(20), chunksize=7)) == [x * x for x in range(20)]
    unordered = lview.map_async(square, range(20), ordered=False)
    assert sorted(unordered) == [x * x for x in range(20)]


def test_load_balanced_spreads_work(rc, lview):
    ars = [lview.apply_async(time.sleep, 0.05) for _ in range(8)]
    rc.wait(ars, timeout=30)
    assert {ar.metadata["engine_id"] for ar in ars} == {0, 1}


def test_decorators(rc, dv):
    @dv.remote(block=True)
    def pid_and_arg(x):
        import os

        return os.getpid(), x

    result = pid_and_arg(3)
    assert len(result) == 2 and all(x == 3 for _, x in result)

    @rc.load_balanced_view().parallel(block=True)
    def double(x):
        return 2 * x

    assert double(range(5)) == [0, 2, 4, 6, 8]
    assert double.map([1, 2]) == [2, 4]


def test_sync_imports(dv):
    with dv.sync_imports(quiet=True):
        import json  # noqa: F401

    assert dv.apply_sync(lambda: json.dumps([1])) == ["[1]", "[1]"]  # noqa: F821


def test_run_file(dv, tmp_path):
    script = tmp_path / "script.py"
    script.write_text("from_file = 7 * 6\n")
    dv.run(str(script), block=True)
    assert dv.pull("from_file") == [42, 42]


def test_flags(lview, dv):
    with pytest.raises(KeyError, match="Invalid flag"):
        dv.set_flags(nonsense=1)
    with lview.temp_flags(timeout=5, retries=1):
        assert lview.timeout == 5 and lview.retries == 1
    assert lview.timeout is None and lview.retries == 0
    with pytest.raises(ValueError, match="timeout"):
        lview.set_flags(timeout=-1)


def test_queue_status(rc):
    status = rc.queue_status()
    assert set(status) >= {0, 1, "unassigned"}
    assert status[0]["queue"] == 0 and status[0]["tasks"] == 0


def test_queue_status_counts_completed_per_engine(rc):
    before = rc.queue_status()[1]["completed"]
    rc[1].apply_sync(lambda: None)
    rc.load_balanced_view(targets=[1]).apply_sync(lambda: None)
    after = rc.queue_status(verbose=True)[1]
    assert after == {"queue": [], "tasks": [], "completed": before + 2}


def test_engine_info_names_host_and_pid(rc):
    import socket

    infos = rc.engine_info()
    assert sorted(infos) == rc.ids
    pids = {info["pid"] for info in infos.values()}
    assert len(pids) == len(rc.ids) and all(info["hostname"] == socket.gethostname()
                                             for info in infos.values())
    assert pids == set(rc[:].apply_sync(os.getpid))


def test_numpy_100mb_push_pull(rc):
    big = np.random.default_rng(0).random(100 * 1024 * 1024 // 8)
    view = rc[0]
    view.push({"big": big}, block=True)
    back = view.pull("big", block=True)
    assert back.dtype == big.dtype and back.shape == big.shape
    np.testing.assert_array_equal(back, big)
    back[0] = -1.0  # results are writable
    assert view.apply_sync(lambda: float(big.sum())) == pytest.approx(float(big.sum()))  # noqa: F821


def test_non_contiguous_and_structured_arrays(rc):
    base = np.arange(200_000, dtype=np.int64).reshape(400, 500)
    for arr in (base[:, ::3], base.T, base[::2, 1:], np.asfortranarray(base)):
        np.testing.assert_array_equal(rc[0].apply_sync(lambda a: a, arr), arr)
    rec = np.zeros(10, dtype=[("x", "f8"), ("y", "i4")])
    rec["y"] = np.arange(10)
    np.testing.assert_array_equal(rc[0].apply_sync(lambda a: a, rec), rec)


def test_large_bytes_roundtrip(rc):
    payload = os.urandom(5 * 1024 * 1024)
    assert rc[0].apply_sync(lambda b: b, payload) == payload
    assert rc[0].apply_sync(lambda b: bytes(b), memoryview(payload)) == payload


def test_remote_error_has_traceback(rc):
    def fails():
        return 1 / 0

    with pytest.raises(ipp.RemoteError) as info:
        rc[0].apply_sync(fails)
    err = info.value
    assert err.ename == "ZeroDivisionError"
    text = "\n".join(err.render_traceback())
    assert "test_client.py" in text and "line" in text and "1 / 0" in text
    assert "ipyparallel_lite/engine" not in text


def test_composite_error_summary(dv):
    with pytest.raises(ipp.CompositeError) as info:
        dv.apply_sync(lambda: 1 / 0)
    summary = str(info.value)
    assert "2 engines raised ZeroDivisionError" in summary
    assert len(info.value.elist) == 2


def test_unpicklable_argument_fails_before_sending(rc):
    before = len(rc.history)
    with pytest.raises(TypeError, match="lock"):
        rc[0].apply_async(lambda x: x, threading.Lock())
    assert len(rc.history) == before


def test_unpicklable_result_is_a_remote_error(rc):
    with pytest.raises(ipp.RemoteError, match="could not be pickled"):
        rc[0].apply_sync(lambda: __import__("threading").Lock())


def test_clear_namespace(rc):
    view = rc[1]
    view.push({"to_clear": 1}, block=True)
    rc.clear(targets=1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            view.pull("to_clear", block=True)
        except ipp.RemoteError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("clear_request did not clear the namespace")


def test_abort_queued_task(rc):
    view = rc[0]
    blocker = view.apply_async(time.sleep, 1.0)
    queued = view.apply_async(square, 2)
    queued.abort()
    with pytest.raises(ipp.TaskAborted):
        queued.get(timeout=10)
    blocker.get(timeout=10)


def test_abort_running_task_keeps_engine(rc):
    view = rc[1]
    t0 = time.monotonic()
    ar = view.apply_async(time.sleep, 60)
    time.sleep(0.3)
    ar.abort()
    with pytest.raises(ipp.TaskAborted):
        ar.get(timeout=10)
    assert time.monotonic() - t0 < 5
    assert view.apply_sync(square, 3) == 9


def _pause_before_the_next_task(seconds: float) -> None:
    """On an engine: the next ``apply_request`` pauses ``seconds`` after the engine
    checked it against the aborts it read, before it starts, as a busy machine may."""
    import time

    from IPython import get_ipython

    kernel = get_ipython().kernel
    this_request = kernel.get_parent()["header"]["msg_id"]
    original = kernel.init_metadata

    def slow(parent: dict) -> dict:
        if parent["header"].get("msg_type") == "apply_request" and parent["header"]["msg_id"] != this_request:
            del kernel.init_metadata  # once
            time.sleep(seconds)
        return original(parent)

    kernel.init_metadata = slow


@pytest.mark.parametrize("how", ["direct", "load-balanced"])
def test_an_abort_landing_as_its_task_starts_stops_it(rc, how):
    """The abort travels on the control channel, the task on the mux (or as a claim), so
    the abort may reach the engine after its check of the task and before the task runs,
    when there is nothing running to interrupt yet. The task must not run on (30 s)."""
    rc[:].apply_sync(_pause_before_the_next_task, 0.3)
    try:
        view = rc[0] if how == "direct" else rc.load_balanced_view()
        t0 = time.monotonic()
        ar = view.apply_async(time.sleep, 30)
        time.sleep(0.1)  # the engine has the task and pauses
        ar.abort()
        with pytest.raises(ipp.TaskAborted):
            ar.get(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:  # the engine the task did not reach still waits for one
        rc[:].apply_sync(square, 2)


def _signal_after_the_code(kind: str) -> None:
    """On an engine: the next ``kind`` request gets a SIGINT once its code has run, just
    before its reply is built, as when an abort or interrupt reaches the engine at the
    moment a task ends."""
    import signal
    import threading

    from IPython import get_ipython

    kernel = get_ipython().kernel
    this_request = kernel.get_parent()["header"]["msg_id"]
    original = kernel.finish_metadata

    def late(parent: dict, metadata: dict, reply_content: dict) -> dict:
        header = parent["header"]
        if header.get("msg_type") == kind and header.get("msg_id") != this_request:
            del kernel.finish_metadata  # once
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return original(parent, metadata, reply_content)

    kernel.finish_metadata = late


@pytest.mark.parametrize("kind", ["apply_request", "execute_request"])
def test_an_interrupt_landing_after_the_code_ran_loses_no_reply(rc, kind):
    view = rc[0]
    view.apply_async(_signal_after_the_code, kind).get(timeout=10)
    if kind == "apply_request":
        assert view.apply_async(square, 4).get(timeout=10) == 16
    else:
        view.execute("late_signal = 1", block=False).get(timeout=10)
    assert view.apply_async(square, 5).get(timeout=10) == 25  # and the engine serves on


def test_display_outputs(dv, capsys):
    ar = dv.execute("print('shown', 1)", block=False)
    ar.get(timeout=10)
    capsys.readouterr()
    ar.display_outputs()
    out = capsys.readouterr().out
    assert "[stdout:0] shown 1\n" in out and "[stdout:1] shown 1\n" in out
    with pytest.raises(ValueError, match="groupby"):
        ar.display_outputs("sideways")
