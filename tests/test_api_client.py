"""The client, view and AsyncResult API as IPython parallel documents it, end to end.

Each test exercises one documented behaviour on a real cluster: AsyncResult indexing
and metadata, ``wait(return_when=)``, ``split()``, ``sent``/``track``, progress and
timing, ``display_outputs``; views' ``execute`` returning its AsyncResult, flags
(``track``, ``label``, bad ones), ``history``/``outstanding``/``results``, ``map`` over
generators and unequal lengths, ``imap(...).cancel()``, ``timeout`` and ``retries``;
the client's control methods (``clear``, ``abort``, ``send_signal``, ``shutdown``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION
from datetime import datetime

import numpy as np
import pytest

import ipyparallel_lite as ipp
from ipyparallel_lite import error


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def fail_if_negative(x: float) -> float:
    import time

    if x < 0:
        raise ValueError(f"negative: {x}")
    time.sleep(x)
    return x


def engine_id() -> int:
    from IPython import get_ipython

    return get_ipython().kernel.engine_id


def request_label() -> str | None:
    from IPython import get_ipython

    return get_ipython().kernel.get_parent("shell")["metadata"].get("label")


# ---- AsyncResult: results by position, metadata by name -----------------------------


def test_results_by_index_and_metadata_by_name(rc):
    ar = rc[:].apply_async(nap, 0.05)
    ar.wait(30)
    assert ar[0] == ar[-1] == 0.05
    assert ar[0:2] == [0.05, 0.05]
    assert ar["engine_id"] == ar.engine_id == rc.ids
    assert ar.status == ["ok", "ok"]
    for key in ("submitted", "started", "completed", "received"):
        stamps = getattr(ar, key)
        assert len(stamps) == 2 and all(isinstance(s, datetime) for s in stamps), key
    for submitted, started, completed, received in zip(ar.submitted, ar.started, ar.completed, ar.received):
        assert submitted <= received and started <= completed
    assert ar.metadata[0]["engine_id"] == rc.ids[0]
    assert len(set(ar.engine_uuid)) == 2 and all(isinstance(u, str) for u in ar.engine_uuid)
    assert ar.stdout == ["", ""] and ar.outputs == [[], []] and ar.error == [None, None]
    single = rc[rc.ids[0]].apply_async(engine_id)
    assert single.get(30) == rc.ids[0]
    assert single.engine_id == rc.ids[0] and single["status"] == "ok"
    with pytest.raises(AttributeError, match="no_such_key"):
        ar.no_such_key  # noqa: B018
    with pytest.raises(KeyError):
        ar["no_such_key"]
    with pytest.raises(TypeError, match="int, slice or metadata name"):
        ar[1.5]


def test_results_by_index_wait_for_completion(rc):
    ar = rc[:].apply_async(nap, 2)
    with pytest.raises(error.TimeoutError, match="not ready"):
        ar[0]
    assert ar.engine_id == rc.ids  # metadata does not need the results
    assert ar.completed == [None, None]
    assert ar.get(30) == [2, 2]
    # the metadata looked at before the replies took them in
    assert all(isinstance(c, datetime) for c in ar.completed) and ar.status == ["ok", "ok"]


def test_index_raises_only_that_requests_error(rc):
    ar = rc[:].map_async(fail_if_negative, [0.0, -1.0])
    assert ar.wait(30)
    assert ar[0] == 0.0
    with pytest.raises(error.RemoteError) as info:
        ar[1]
    assert info.value.ename == "ValueError"
    assert info.value.engine_info["engine_id"] == rc.ids[1]
    with pytest.raises(error.CompositeError):
        ar[0:2]
    with pytest.raises(error.CompositeError):
        ar.get()
    values = ar.get(return_exceptions=True)
    assert values[0] == 0.0 and isinstance(values[1], error.RemoteError)


def test_engine_info_on_errors(rc, lview):
    with pytest.raises(error.RemoteError) as info:
        lview.apply_sync(fail_if_negative, -2)
    assert info.value.engine_info["engine_id"] in rc.ids
    assert info.value.engine_info["method"] == "apply"
    ar = rc[:].execute("1/0", block=False)
    ar.wait(30)
    assert all(e["ename"] == "ZeroDivisionError" for e in ar.error)
    with pytest.raises(error.CompositeError) as composite:
        ar.get()
    assert sorted(e[3]["engine_id"] for e in composite.value.elist) == rc.ids


# ---- waiting ----------------------------------------------------------------------


def test_wait_return_when(rc):
    first = rc[:].map_async(nap, [0.0, 3.0])
    t0 = time.monotonic()
    assert first.wait(20, return_when=FIRST_COMPLETED)
    assert time.monotonic() - t0 < 2.5 and not first.done() and first.progress == 1
    assert not first.wait(0.01, return_when=ALL_COMPLETED)
    assert first.wait(20, return_when=ALL_COMPLETED) and first.done()

    failing = rc[:].map_async(fail_if_negative, [-1.0, 3.0])
    t0 = time.monotonic()
    assert failing.wait(20, return_when=FIRST_EXCEPTION)
    assert time.monotonic() - t0 < 2.5 and not failing.done()
    failing.wait(20)

    fine = rc[:].map_async(nap, [0.2, 0.4])
    assert fine.wait(20, return_when=FIRST_EXCEPTION) and fine.done()  # no error: all done
    assert not rc[:].apply_async(nap, 2).wait(0.05, return_when=FIRST_COMPLETED)


@pytest.mark.parametrize("bad", ["first", 1, "FIRST_COMPLETE"])
def test_wait_rejects_unknown_return_when(rc, bad):
    ar = rc[:].apply_async(nap, 0)
    for call in (lambda: ar.wait(1, return_when=bad), lambda: ar.wait_interactive(return_when=bad)):
        with pytest.raises(ValueError, match="ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION") as info:
            call()
        assert repr(bad) in str(info.value)
    ar.get(30)


def test_wait_interactive(rc, lview):
    ar = lview.map_async(nap, [0.1] * 4)
    assert ar.wait_interactive(interval=0.05) is None and ar.done()
    slow = rc[:].map_async(nap, [0.0, 3.0])
    t0 = time.monotonic()
    slow.wait_interactive(interval=0.05, return_when=FIRST_COMPLETED)
    assert time.monotonic() - t0 < 2.5 and slow.progress == 1
    slow.wait_interactive(interval=0.05, timeout=0.2)  # returns at the timeout
    assert not slow.done()
    slow.wait_interactive(interval=0.05, widget=False)
    assert slow.done()


def test_get_timeout_and_return_exceptions(lview):
    ar = lview.apply_async(nap, 2)
    with pytest.raises(error.TimeoutError):
        ar.get(0.05)
    assert ar.get(timeout=30) == 2
    failed = lview.apply_async(fail_if_negative, -1)
    assert isinstance(failed.get(30, return_exceptions=True), error.RemoteError)
    with pytest.raises(error.RemoteError):
        failed.get()


def test_future_interface(rc, lview):
    ar = lview.apply_async(nap, 0.1)
    called = []
    ar.add_done_callback(called.append)

    async def main():
        return await ar

    assert asyncio.run(main()) == 0.1
    assert called == [ar] and ar.done() and not ar.cancelled()
    assert ar.result() == 0.1 and ar.exception() is None
    failed = lview.apply_async(fail_if_negative, -1)
    assert isinstance(failed.exception(30), error.RemoteError)
    done, not_done = concurrent.futures.wait([ar, failed], timeout=30)
    assert not not_done
    pending = lview.apply_async(nap, 3)
    with pytest.raises(error.TimeoutError):
        pending.exception(0.05)
    assert pending.cancel()
    with pytest.raises(error.TaskAborted):
        pending.get(30)
    assert pending.cancelled() and not pending.cancel()


def test_split(rc):
    ar = rc[:].apply_async(nap, 0.5)
    parts = ar.split()
    assert len(parts) == 2 and all(isinstance(p, ipp.AsyncResult) for p in parts)
    assert [p.get(30) for p in parts] == [0.5, 0.5]
    assert [p.engine_id for p in parts] == rc.ids
    assert [p.msg_ids for p in parts] == [[m] for m in ar.msg_ids]
    done_first = rc[:].map_async(nap, [0.0, 0.2])
    done_first.wait(30)
    assert [p.get(0) for p in done_first.split()] == [[0.0], [0.2]]  # map parts: chunks


# ---- sending ------------------------------------------------------------------------


def test_sent_and_track(rc, dv, lview):
    data = np.arange(1_000_000, dtype=np.float64)
    ar = dv.push({"tracked": data}, block=False, track=True)
    assert ar.wait_for_send(10) and ar.sent
    data[:] = -1  # safe once sent: the engines got the original
    ar.get(30)
    assert dv.apply_sync(lambda: float(tracked[5])) == [5.0, 5.0]  # noqa: F821
    ar = dv.scatter("part", np.arange(10), block=False, track=True)
    assert ar.wait_for_send(10) and ar.sent
    ar.get(30)
    with lview.temp_flags(track=True):
        tracked_task = lview.apply_async(nap, 0)
    assert tracked_task.wait_for_send(10) and tracked_task.get(30) == 0
    untracked = lview.apply_async(nap, 0)
    assert untracked.wait_for_send(10) and untracked.sent
    assert untracked.get(30) == 0


# ---- progress and timing ----------------------------------------------------------------


def test_progress_counts_map_items(rc, lview):
    ar = lview.map_async(nap, [0.05] * 10, chunksize=5)
    assert len(ar) == 10 and len(ar.msg_ids) == 2
    seen = set()
    while not ar.done():
        seen.add(ar.progress)
        time.sleep(0.01)
    assert ar.progress == 10 and seen <= {0, 5, 10}
    direct = rc[:].map_async(nap, [0.0] * 7)
    direct.wait(30)
    assert len(direct) == direct.progress == 7
    plain = rc[:].apply_async(nap, 0)
    plain.wait(30)
    assert len(plain) == plain.progress == 2


def test_timing(rc):
    ar = rc[:].apply_async(nap, 0.5)
    with pytest.raises(error.TimeoutError):
        ar.wall_time  # noqa: B018
    with pytest.raises(error.TimeoutError):
        ar.serial_time  # noqa: B018
    assert 0 <= ar.elapsed < 0.5
    ar.wait(30)
    assert ar.wall_time >= 0.5
    assert 1.0 <= ar.serial_time <= 2 * ar.wall_time
    assert ar.elapsed == ar.wall_time
    assert ar.timedelta(ar.submitted, ar.received) == ar.wall_time


def test_display_outputs(rc, capsys):
    ar = rc[:].execute("print('hello from', 40 + 2)", block=False)
    with pytest.raises(error.TimeoutError):
        rc[:].apply_async(nap, 2).display_outputs()
    ar.wait(30)
    ar.display_outputs()
    out = capsys.readouterr().out
    assert "[stdout:0] hello from 42" in out and "[stdout:1] hello from 42" in out
    ar.display_outputs(groupby="engine")
    by_engine = capsys.readouterr().out
    assert by_engine.index("[stdout:0]") < by_engine.index("[stdout:1]")
    with_result = rc[:].execute("print('side')\n6 * 7", silent=False, block=True)
    with_result.display_outputs()
    everything = capsys.readouterr().out
    assert "[stdout:0] side" in everything and "Out[0:" in everything and "]: 42" in everything
    with_result.display_outputs(result_only=True)
    results = capsys.readouterr().out
    assert "side" not in results and results.count("]: 42") == 2
    with pytest.raises(ValueError, match="groupby must be"):
        with_result.display_outputs(groupby="size")


def test_stream_output(rc, capsys):
    # the first tick waits a moment: stream_output shows what arrives from its start on
    ar = rc[:].execute("import time\ntime.sleep(0.5)\nfor i in range(3):\n"
                       "    print('tick', i, flush=True)\n    time.sleep(0.4)", silent=False, block=False)
    with ar.stream_output():
        shown = ""
        deadline = time.monotonic() + 20
        while "[stdout:0] tick 0" not in shown and time.monotonic() < deadline:
            time.sleep(0.02)
            shown += capsys.readouterr().out
        assert "[stdout:0] tick 0" in shown and not ar.done()  # shown as it arrived
        ar.wait(30)
    assert "tick 2" in shown + capsys.readouterr().out


def test_map_iteration_ordered_and_unordered(lview):
    ordered = lview.map_async(nap, [1.0, 0.0, 0.0])
    assert list(ordered) == [1.0, 0.0, 0.0]
    unordered = lview.map_async(nap, [1.5, 0.0, 0.0], ordered=False)
    assert list(unordered) == [0.0, 0.0, 1.5]
    failing = lview.map_async(fail_if_negative, [0.0, -1.0, 0.0])
    it = iter(failing)
    assert next(it) == 0.0
    with pytest.raises(error.RemoteError):
        next(it)
    with pytest.raises(TypeError, match="single result is not iterable"):
        iter(lview.apply_async(nap, 0)).__next__()


# ---- views --------------------------------------------------------------------------


def test_execute_returns_finished_asyncresult(rc, dv):
    ar = dv.execute("x_api = 20\nprint('hi')\nx_api + 1", silent=False, block=True)
    assert isinstance(ar, ipp.AsyncResult) and ar.done() and ar.wait_for_output(0)
    assert ar.stdout == ["hi\n", "hi\n"]
    assert [r["data"]["text/plain"] for r in ar.execute_result] == ["21", "21"]
    assert [[o["header"]["msg_type"] for o in outs] for outs in ar.outputs] == [["execute_result"]] * 2
    assert ar.get() == [None, None]
    with pytest.raises(error.CompositeError, match="NameError"):
        dv.execute("undefined_name_here", block=True)
    pending = rc[:].execute("import time; time.sleep(0.3)")
    assert isinstance(pending, ipp.AsyncResult) and not pending.done()
    pending.get(30)
    single = rc[rc.ids[0]].execute("print('one')", block=True)
    assert single.stdout == "one\n"


def test_serializer_switches(dv):
    assert dv.use_cloudpickle() is None and dv.use_pickle() is None
    ar = dv.use_pickle.__func__(dv.__class__(dv.client, dv.targets))  # non-blocking view
    assert isinstance(ar, ipp.AsyncResult) and ar.get(30) == [None, None]
    assert dv.apply_sync(lambda: 3) == [3, 3]
    with pytest.raises(ImportError, match="pip install dill"):
        dv.use_dill()


def test_label_flag_is_sent_with_requests(rc, dv, lview):
    with dv.temp_flags(label="my-label"):
        assert dv.apply_sync(request_label) == ["my-label", "my-label"]
    assert dv.label is None and dv.apply_sync(request_label) == [None, None]
    lview.set_flags(label="task-label")
    assert lview.apply_sync(request_label) == "task-label"
    assert lview.map_sync(lambda _: request_label(), range(2)) == ["task-label"] * 2
    assert lview.map_sync(lambda _: request_label(), range(2), label="per-call") == ["per-call"] * 2
    with pytest.raises(ValueError, match="label must be a str"):
        lview.set_flags(label=5)
    with pytest.raises(TypeError, match="'lable'.*label"):
        lview.map_sync(abs, range(2), lable="typo")


def test_unknown_flags_are_one_readable_error(dv, lview):
    for view, valid in ((dv, "block, track, targets, label"), (lview, "retries")):
        with pytest.raises(KeyError) as info:
            view.set_flags(foo=1)
        message = str(info.value)
        assert message.startswith("Invalid flag 'foo'") and valid in message
        with pytest.raises(KeyError, match="Invalid flag 'bar'"):
            with view.temp_flags(bar=2):
                pass
    assert not hasattr(dv, "foo") and not hasattr(dv, "bar")
    with pytest.raises(KeyError, match="Invalid flag 'nope'"):
        dv.set_flags(block=False, nope=1)
    assert dv.block is True  # nothing was set


def test_history_outstanding_results(rc):
    view = rc.load_balanced_view()
    ar = view.apply_async(nap, 1.0)
    msg_id = ar.msg_ids[0]
    assert view.history == [msg_id] and rc.history[-1] == msg_id
    assert view.outstanding == {msg_id} and msg_id in rc.outstanding
    with pytest.raises(KeyError):
        rc.results[msg_id]
    # the task runs before the direct requests go: through the mux device they travel
    # faster than a task through the scheduler, and one could reach its engine first
    time.sleep(0.2)
    other = rc[:].apply_async(nap, 2.0)
    assert view.wait(timeout=30)  # waits for the view's own requests only
    assert not other.done()
    assert view.outstanding == set() and msg_id not in rc.outstanding
    assert rc.results[msg_id] == view.results[msg_id] == 1.0
    assert rc.metadata[msg_id]["engine_id"] in rc.ids
    assert msg_id in set(rc.results) and msg_id in rc.metadata
    other.get(30)
    failed = view.apply_async(fail_if_negative, -1)
    failed.wait(30)
    assert isinstance(rc.results[failed.msg_ids[0]], error.RemoteError)

    running = view.apply_async(nap, 2)
    with pytest.raises(RuntimeError, match="outstanding"):
        rc.purge_local_results(running)
    with pytest.raises(ValueError, match="jobs .* or targets"):
        rc.purge_local_results()
    rc.purge_local_results(ar)
    assert msg_id not in rc.results and msg_id not in rc.metadata
    assert ar.get() == 1.0  # the AsyncResult keeps its value
    running.get(30)
    rc.purge_local_results(targets=running.engine_id)
    assert running.msg_ids[0] not in rc.metadata
    assert rc.wait(timeout=30)  # "all" refuses while anything is outstanding
    rc.purge_local_results("all")
    assert len(rc.results) == 0


def test_map_over_generators_and_unequal_lengths(dv, lview):
    def add(x, y):
        return x + y

    assert dv.map_sync(add, (i for i in range(5)), [10, 10, 10]) == [10, 11, 12]
    assert lview.map_sync(add, iter(range(5)), range(100, 102)) == [100, 102]
    assert lview.map_sync(add, range(4), range(4), chunksize=3) == [0, 2, 4, 6]
    assert dv.map_sync(abs, (x for x in [-1, -2, -3])) == [1, 2, 3]
    assert dv.map_sync(abs, []) == []
    with pytest.raises(ValueError, match="at least one sequence"):
        lview.map_sync(abs)


def test_imap_cancel(rc, lview):
    results = lview.imap(nap, [0.0] + [2.0] * 6, max_outstanding=3)
    assert next(results) == 0.0
    results.cancel()
    assert results.cancelled
    with pytest.raises(StopIteration):
        next(results)
    deadline = time.monotonic() + 10
    while lview.outstanding and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lview.outstanding  # the running and queued tasks were aborted, not waited for
    direct = rc[:].imap(nap, [0.0, 3.0])
    assert next(direct) == 0.0
    t0 = time.monotonic()
    direct.cancel()
    assert list(direct) == []
    rc.wait(timeout=10)
    assert time.monotonic() - t0 < 2.5


def test_timeout_covers_retries_and_ends_them(rc, tmp_path):
    """``timeout`` counts from submission and covers every attempt; ``retries`` reruns a
    failed attempt; a task past its timeout fails with TaskTimeout and is not retried."""
    counter = str(tmp_path / "attempts")

    def flaky(path, sleep):
        import time

        with open(path, "a") as f:
            f.write("x")
        with open(path) as f:
            attempts = len(f.read())
        time.sleep(sleep)
        if attempts == 1:
            raise RuntimeError("first attempt fails")
        return attempts

    view = rc.load_balanced_view()
    view.set_flags(retries=1, timeout=20)
    assert view.apply_sync(flaky, counter, 0) == 2  # the retry ran within the timeout
    counter2 = str(tmp_path / "attempts2")
    view.set_flags(retries=3, timeout=1)
    with pytest.raises(error.RemoteError) as info:
        view.apply_sync(flaky, counter2, 3)
    assert info.value.ename == "TaskTimeout"
    with open(counter2) as f:
        assert f.read() == "x"  # one attempt: the timeout is final, not retried


def test_view_control_methods(rc):
    view = rc.load_balanced_view()
    mine = view.apply_async(nap, 3)
    other = rc[:].apply_async(nap, 0.5)
    t0 = time.monotonic()
    view.abort()  # aborts this view's requests only
    with pytest.raises(error.TaskAborted):
        mine.get(30)
    assert time.monotonic() - t0 < 2.5
    assert other.get(30) == [0.5, 0.5]
    view.spin()
    assert view.wait() is True  # nothing outstanding


# ---- the client -----------------------------------------------------------------------


def test_client_wait_and_spin(rc):
    ars = [rc[:].apply_async(nap, 0.2), rc.load_balanced_view().apply_async(nap, 0.1)]
    assert not rc.wait(ars, timeout=0.01)
    assert rc.wait([ars[0].msg_ids[0], ars[1]], timeout=30)
    assert rc.wait(ars, 30)
    rc.wait_interactive(ars, interval=0.05)
    t0 = time.monotonic()
    slow = rc[:].apply_async(nap, 2)
    rc.wait_interactive([slow], interval=0.05, timeout=0.2)
    assert time.monotonic() - t0 < 1.5 and not slow.done()
    rc.spin()
    rc.spin_thread(interval=0.5)
    rc.stop_spin_thread()
    assert slow.get(30) == [2, 2]
    assert rc.ids == sorted(rc.ids) and len(rc) == len(rc.ids) == 2


def test_client_control_on_own_cluster(own_cluster):
    cluster, client = own_cluster(n=2)
    try:
        client.wait_for_engines(2, timeout=60)
        dv = client[:]
        dv.push({"doomed": 1}, block=True)
        assert client.clear(targets=client.ids[0], block=True) is None
        with pytest.raises(error.RemoteError, match="doomed"):
            client[client.ids[0]].pull("doomed", block=True)
        assert client[client.ids[1]].pull("doomed", block=True) == 1
        ar = dv.clear(block=False)
        assert isinstance(ar, ipp.AsyncResult) and ar.get(30) == [None, None]

        running = client[client.ids[0]].apply_async(nap, 30)
        time.sleep(0.5)
        assert client.send_signal(signal.SIGINT, targets=client.ids[0], block=True) is None
        with pytest.raises(error.RemoteError, match="KeyboardInterrupt"):
            running.get(30)
        with pytest.raises(ValueError, match="unknown signal"):
            client.send_signal("SIGNOPE")

        queued = [client[client.ids[1]].apply_async(nap, 1) for _ in range(3)]
        assert client.abort(queued[1:], block=True) is None
        assert queued[0].get(30) == 1
        for ar in queued[1:]:
            with pytest.raises(error.TaskAborted):
                ar.get(30)
        assert client.outstanding == set()

        with pytest.raises(ValueError, match="restart"):
            client.shutdown(restart=True)
        gone = client.ids[1]
        client[gone].shutdown(block=True)  # the view's engines, through client.shutdown
        assert client.ids == [client.ids[0]] and gone not in client.ids
        client.close()
        with pytest.raises(RuntimeError, match="closed"):
            client[:].apply_async(nap, 0)
    finally:
        client.close()


def test_client_abort_drops_queued_load_balanced_tasks(rc):
    view = rc.load_balanced_view()
    running = [view.apply_async(nap, 3) for _ in rc.ids]
    queued = [view.apply_async(nap, 0.1) for _ in range(3)]
    t0 = time.monotonic()
    assert rc.abort(queued, block=True) is None
    for ar in queued:
        with pytest.raises(error.TaskAborted):
            ar.get(30)
    assert time.monotonic() - t0 < 2.5  # dropped from the queue, not run after the long ones
    rc.abort(running, block=True)
    assert rc.wait(running, 30)
