"""Load balancing end to end: dependencies, retries, timeouts, aborts and signals,
lazy imap, the Executor API, broadcast views, bad input, and every scheduling scheme.

All on real clusters. Tests on the shared session cluster leave its two engines idle
and usable; tests that kill engines or need another scheme start their own.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import signal
import time

import pytest

import ipyparallel_lite as ipp
from ipyparallel_lite.controller.scheduler import SCHEMES

pytestmark = pytest.mark.timeout(120)


# ---- functions sent to engines (pickled by value: see conftest) -------------------


def sleep_and_pid(t: float) -> int:
    import os
    import time

    time.sleep(t)
    return os.getpid()


def pid() -> int:
    import os

    return os.getpid()


def fail(msg: str = "boom") -> None:
    raise ValueError(msg)


def double(x: int) -> int:
    return 2 * x


def on_engine_with_pid(wanted: int) -> bool:
    import os

    return os.getpid() == wanted


def never() -> bool:
    return False


def pids_of(rc) -> dict[int, int]:
    """``{engine_id: pid}`` of the engines."""
    return dict(zip(rc.ids, rc[rc.ids].apply_sync(pid)))


def assert_engines_serve(rc, timeout: float = 5.0) -> None:
    """Every engine answers a direct request quickly (nothing left running there)."""
    t0 = time.monotonic()
    ars = [rc[eid].apply_async(pid) for eid in rc.ids]
    for ar in ars:
        ar.get(timeout=timeout)
    assert time.monotonic() - t0 < timeout


# ---- dependencies -------------------------------------------------------------------


def test_after_chain_runs_in_order(lview):
    a = lview.apply_async(sleep_and_pid, 0.4)
    with lview.temp_flags(after=a):
        b = lview.apply_async(sleep_and_pid, 0.2)
    with lview.temp_flags(after=[b]):
        c = lview.apply_async(sleep_and_pid, 0.0)
    for ar in (a, b, c):
        ar.get(timeout=20)
    assert b.metadata["started"] >= a.metadata["completed"]
    assert c.metadata["started"] >= b.metadata["completed"]


def test_after_a_dependency_object(lview):
    a = lview.apply_async(fail)
    with lview.temp_flags(after=ipp.Dependency(a, success=False, failure=True)):
        b = lview.apply_async(double, 4)
    assert b.get(timeout=20) == 8


def test_follow_pins_to_one_engine(rc, lview):
    a = lview.apply_async(pid)
    home = a.get(timeout=10)
    with lview.temp_flags(follow=a):
        ars = [lview.apply_async(sleep_and_pid, 0.05) for _ in range(6)]
    assert {ar.get(timeout=20) for ar in ars} == {home}


def test_impossible_dependency_fails_at_once(lview):
    a = lview.apply_async(fail)
    with pytest.raises(ipp.RemoteError):
        a.get(timeout=10)
    t0 = time.monotonic()
    with lview.temp_flags(after=a):
        b = lview.apply_async(double, 1)
    with pytest.raises(ipp.ImpossibleDependency):
        b.get(timeout=10)
    assert time.monotonic() - t0 < 2
    # and a task waiting on b inherits the verdict
    with lview.temp_flags(after=b):
        c = lview.apply_async(double, 1)
    with pytest.raises(ipp.ImpossibleDependency):
        c.get(timeout=10)


def test_unknown_dependency_is_invalid(lview):
    with lview.temp_flags(after=["no-such-msg-id"]):
        ar = lview.apply_async(double, 1)
    with pytest.raises(ipp.InvalidDependency, match="no-such-msg-id"):
        ar.get(timeout=10)
    with lview.temp_flags(follow="also-unknown"):
        ar = lview.apply_async(double, 1)
    with pytest.raises(ipp.InvalidDependency):
        ar.get(timeout=10)


def test_depend_decorator_reschedules_to_the_engine_that_meets_it(rc, lview):
    pids = pids_of(rc)
    wanted = pids[max(pids)]

    @ipp.depend(on_engine_with_pid, wanted)
    def where() -> int:
        import os

        return os.getpid()

    ars = [lview.apply_async(where) for _ in range(4)]
    assert [ar.get(timeout=20) for ar in ars] == [wanted] * 4


def test_depend_never_met_is_impossible(lview):
    @ipp.depend(never)
    def unreachable() -> int:
        return 1

    t0 = time.monotonic()
    with pytest.raises(ipp.ImpossibleDependency):
        lview.apply_async(unreachable).get(timeout=20)
    assert time.monotonic() - t0 < 5


def test_require_decorator(lview):
    @ipp.require("json")
    def dumps() -> str:
        return json.dumps([1])  # noqa: F821  (bound on the engine by require)

    assert lview.apply_sync(dumps) == "[1]"

    @ipp.require("ipp_lite_no_such_module")
    def needs_missing() -> int:
        return 1

    with pytest.raises(ipp.ImpossibleDependency):
        lview.apply_async(needs_missing).get(timeout=20)


# ---- retries, timeouts, aborts, signals ---------------------------------------------------


def test_retries(lview, tmp_path):
    counter = str(tmp_path / "attempts")

    def flaky(path: str, succeed_on: int) -> int:
        with open(path, "a") as f:
            f.write("x")
        with open(path) as f:
            attempts = len(f.read())
        if attempts < succeed_on:
            raise RuntimeError(f"attempt {attempts} fails")
        return attempts

    with lview.temp_flags(retries=2):
        assert lview.apply_async(flaky, counter, 3).get(timeout=20) == 3
    os.remove(counter)
    with lview.temp_flags(retries=1):
        with pytest.raises(ipp.RemoteError, match="attempt 2 fails"):
            lview.apply_async(flaky, counter, 3).get(timeout=20)


def test_timeout_of_a_waiting_task(lview):
    blocker = lview.apply_async(sleep_and_pid, 3)
    t0 = time.monotonic()
    with lview.temp_flags(after=blocker, timeout=0.3):
        waiting = lview.apply_async(double, 1)
    with pytest.raises(ipp.TaskTimeout, match="did not start"):
        waiting.get(timeout=10)
    assert time.monotonic() - t0 < 2
    blocker.get(timeout=10)


def test_timeout_interrupts_a_running_task(rc, lview):
    t0 = time.monotonic()
    with lview.temp_flags(timeout=0.5):
        ar = lview.apply_async(time.sleep, 60)
    with pytest.raises(ipp.TaskTimeout):
        ar.get(timeout=10)
    assert time.monotonic() - t0 < 2
    eid = ar.metadata["engine_id"]
    assert eid in rc.ids
    with lview.temp_flags(targets=[eid]):
        assert lview.apply_sync(double, 21) == 42


def test_abort_running_load_balanced_task(rc, lview):
    ar = lview.apply_async(time.sleep, 60)
    time.sleep(0.3)
    t0 = time.monotonic()
    ar.abort()
    with pytest.raises(ipp.TaskAborted):
        ar.get(timeout=10)
    assert time.monotonic() - t0 < 2
    eid = ar.metadata["engine_id"]
    with lview.temp_flags(targets=[eid]):
        assert lview.apply_sync(double, 5) == 10
    assert_engines_serve(rc)


def test_view_abort_stops_running_and_queued(rc, lview):
    with lview.temp_flags(targets=[0]):
        ars = [lview.apply_async(time.sleep, 60) for _ in range(3)]
    time.sleep(0.3)
    t0 = time.monotonic()
    lview.abort(ars)
    for ar in ars:
        with pytest.raises(ipp.TaskAborted):
            ar.get(timeout=10)
    assert time.monotonic() - t0 < 2
    # no jobs: everything this client has outstanding
    running = lview.apply_async(time.sleep, 60)
    time.sleep(0.3)
    lview.abort()
    with pytest.raises(ipp.TaskAborted):
        running.get(timeout=10)
    assert_engines_serve(rc)


@pytest.mark.parametrize("start, ename", [
    (lambda view: view.apply_async(time.sleep, 60), "KeyboardInterrupt"),
    # a cell with top-level await runs on the engine's event loop, asleep in its poll
    (lambda view: view.execute("import asyncio\nawait asyncio.sleep(60)", block=False), "CancelledError"),
], ids=["task", "cell that awaits"])
def test_send_signal_interrupts_a_running_request(rc, start, ename):
    ar = start(rc[0])
    time.sleep(0.5)
    t0 = time.monotonic()
    rc.send_signal(signal.SIGINT, targets=[0])
    with pytest.raises(ipp.RemoteError, match=ename):
        ar.get(timeout=10)
    assert time.monotonic() - t0 < 2
    assert rc[0].apply_sync(double, 2) == 4


# ---- imap -----------------------------------------------------------------------------------


class CountingIterator:
    """An endless iterator that counts how many items were taken from it."""

    def __init__(self):
        self.taken = 0
        self._count = itertools.count()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        self.taken += 1
        return next(self._count)


@pytest.mark.parametrize("ordered", [True, False])
def test_imap_reads_endless_iterator_lazily(lview, ordered):
    source = CountingIterator()
    results = lview.imap(double, source, ordered=ordered, max_outstanding=3)
    assert source.taken <= 3  # the first tasks go out at once, no more
    seen = []
    for value in results:
        seen.append(value)
        assert source.taken <= len(seen) + 3
        if len(seen) == 20:
            break
    if ordered:
        assert seen == [2 * i for i in range(20)]
    else:
        assert len(set(seen)) == 20 and all(v % 2 == 0 and v < 2 * source.taken for v in seen)
    results.close()
    assert source.taken <= 23


def test_imap_auto_window_and_finite_input(rc, lview):
    source = CountingIterator()
    results = lview.imap(double, source)
    expected_window = 2 * len(rc.ids) * rc.connection_info.get("hwm", 1)
    assert next(results) == 0
    assert 1 < source.taken <= 1 + expected_window
    results.close()
    assert list(lview.imap(pow, [2, 3, 4], [2, 2, 2])) == [4, 9, 16]
    assert sorted(lview.imap(double, range(7), ordered=False, max_outstanding=0)) == [
        2 * i for i in range(7)
    ]


def test_imap_close_aborts_outstanding(rc, lview):
    def slow_after(i: int) -> int:
        import time

        time.sleep(0 if i < 2 else 60)
        return i

    results = lview.imap(slow_after, itertools.count(), max_outstanding=2)
    assert [next(results), next(results)] == [0, 1]
    time.sleep(0.3)  # items 2 and 3 are running now
    t0 = time.monotonic()
    results.close()
    assert_engines_serve(rc)
    assert time.monotonic() - t0 < 3

    # breaking out of a for loop drops the generator, which aborts the same way
    for i in lview.imap(slow_after, itertools.count(), max_outstanding=2):
        if i == 1:
            break
    time.sleep(0.3)
    assert_engines_serve(rc)
    deadline = time.monotonic() + 5
    while rc.outstanding and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rc.outstanding


def test_imap_errors(lview):
    def fail_on_two(i: int) -> int:
        if i == 2:
            raise ValueError("two")
        return i

    with pytest.raises(ipp.RemoteError, match="two"):
        list(lview.imap(fail_on_two, range(5)))
    out = list(lview.imap(fail_on_two, range(5), return_exceptions=True))
    assert out[:2] == [0, 1] and out[3:] == [3, 4]
    assert isinstance(out[2], ipp.RemoteError) and out[2].ename == "ValueError"
    with pytest.raises(ValueError, match="max_outstanding"):
        lview.imap(double, range(3), max_outstanding=-1)
    with pytest.raises(ValueError, match="at least one"):
        lview.imap(double)


def test_imap_pickles_the_function_once(lview, monkeypatch):
    from ipyparallel_lite.client import view as view_module

    calls = []
    real = view_module.serialize_function
    monkeypatch.setattr(view_module, "serialize_function", lambda f: calls.append(f) or real(f))
    assert list(lview.imap(double, range(10))) == [2 * i for i in range(10)]
    assert len(calls) == 1


# ---- executor -------------------------------------------------------------------------------


def test_executor_submit_and_map(rc):
    with rc.executor() as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        futures = [ex.submit(pow, 2, i) for i in range(6)]
        assert all(isinstance(f, ipp.AsyncResult) for f in futures)
        done, _ = concurrent.futures.wait(futures, timeout=20)
        assert len(done) == 6
        assert sorted(f.result() for f in concurrent.futures.as_completed(futures)) == [
            2**i for i in range(6)
        ]
        assert list(ex.map(double, range(10))) == [2 * i for i in range(10)]
        assert list(ex.map(pow, iter([2, 3]), [3, 2], chunksize=4)) == [8, 9]
        slow = ex.submit(sleep_and_pid, 0.5)
    # shutdown(wait=True) on leaving the block waited for it
    assert slow.done()
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(pow, 2, 2)


def test_executor_map_timeout(rc):
    ex = rc.load_balanced_view().executor
    results = ex.map(sleep_and_pid, [3, 3], timeout=0.3)
    with pytest.raises(TimeoutError):
        next(results)
    results.close()
    ex.shutdown(wait=True, cancel_futures=True)
    assert_engines_serve(rc)


def test_direct_view_executor(rc, dv):
    ex = dv.executor
    assert ex.submit(pid).result() == list(pids_of(rc).values())
    assert list(ex.map(double, range(5))) == [0, 2, 4, 6, 8]
    ex.shutdown()


# ---- broadcast -------------------------------------------------------------------------------


def test_broadcast_matches_direct_view(rc):
    bview = rc.broadcast_view()
    dview = rc.direct_view()
    assert isinstance(bview, ipp.BroadcastView)
    assert bview.apply_sync(pid) == dview.apply_sync(pid)
    bview.push({"shared": 7, "other": [1]}, block=True)
    assert bview.pull("shared", block=True) == dview.pull("shared", block=True) == [7, 7]
    assert bview.pull(["shared", "other"], block=True) == [[7, [1]], [7, [1]]]
    ar = bview.execute("print(shared * 6)")
    assert ar.get(timeout=10) == dview.execute("pass", block=True).get() == [None, None]
    assert ar.stdout == ["42\n", "42\n"]
    # one message, one derived reply id per engine
    base = ar.msg_ids[0].rsplit("_", 1)[0]
    assert ar.msg_ids == [f"{base}_{eid}" for eid in rc.ids]
    assert [md["engine_id"] for md in ar.metadata] == rc.ids
    # single-engine and sublist targets give DirectView's shapes too
    single = rc.broadcast_view(targets=1)
    assert single.apply_sync(pid) == rc[1].apply_sync(pid)
    assert rc.broadcast_view(targets=[1]).apply_sync(pid) == rc[[1]].apply_sync(pid)
    assert rc.broadcast_view(targets=[1]).pull("shared", block=True) == [7]
    # map/scatter/gather are per-engine direct requests, same results
    assert bview.map_sync(double, range(6)) == dview.map_sync(double, range(6))
    bview.scatter("part", list(range(4)), block=True)
    assert bview.gather("part", block=True) == list(range(4))


def test_broadcast_sends_one_message_and_can_be_depended_on(rc, lview, sent_messages):
    ar = rc.broadcast_view().apply_async(sleep_and_pid, 0.3)
    assert sent_messages == [("broadcast", 1)]
    with lview.temp_flags(after=ar):
        later = lview.apply_async(pid)
    later.get(timeout=10)
    # the broadcast's replies travel another socket than the task's: they may reach
    # this client after the task's, though the controller saw them first
    ar.get(timeout=10)
    assert later.metadata["started"] >= max(md["completed"] for md in ar.metadata)
    status = rc.queue_status(verbose=True)
    queued = {m for eid in rc.ids for m in status[eid]["queue"]}
    assert not queued & set(ar.msg_ids)


def test_bad_fan_out_messages_are_dropped(cluster, rc, raw_socket):
    channel = "broadcast"
    import zmq

    from ipyparallel_lite.connection import load_connection_file, make_session

    info = load_connection_file(cluster.connection_file("client"))
    ctx = zmq.Context()
    try:
        sock = raw_socket(ctx, info, channel)
        evil, good = make_session("not-the-key"), make_session(info["key"])
        sock.send_multipart(evil.serialize(evil.msg("apply_request", {}, metadata={"targets": [0]})))
        for targets in (None, [], "all", [0, "x"], [True]):
            msg = good.msg("apply_request", {}, metadata={"targets": targets})
            sock.send_multipart(good.serialize(msg))
        sock.send_multipart([b"<IDS|MSG>", b"sig"])
        # a signed request of a type engines do not answer gets an error per engine
        msg = good.msg("bogus_request", {}, metadata={"targets": [0, 1]})
        sock.send_multipart(good.serialize(msg))
        assert sock.poll(5000)
        replies = [good.deserialize(good.feed_identities(sock.recv_multipart())[1])]
        assert sock.poll(5000)
        replies.append(good.deserialize(good.feed_identities(sock.recv_multipart())[1]))
        assert sorted(r["parent_header"]["msg_id"] for r in replies) == [
            f"{msg['header']['msg_id']}_{eid}" for eid in (0, 1)]
        assert all("only apply_request" in r["content"]["evalue"] for r in replies)
        time.sleep(0.3)
        assert rc.broadcast_view().apply_sync(double, 2) == [4] * len(rc.ids)
    finally:
        ctx.destroy(linger=0)
    log = cluster.controller.log_file.read_text(errors="replace")
    assert "dropped broadcast request" in log
    assert "failed verification" in log


def test_broadcast_errors_have_direct_view_shape(rc):
    bview = rc.broadcast_view()
    with pytest.raises(ipp.CompositeError) as info:
        bview.apply_sync(fail, "bcast")
    assert len(info.value.elist) == len(rc.ids)
    with pytest.raises(ipp.CompositeError):
        bview.execute("1/0", block=True)
    assert rc.broadcast_view(targets=0).apply_async(double, 3).get_dict(timeout=10) == {0: 6}


@pytest.mark.parametrize("view", ["broadcast", "direct"])
def test_fan_out_engine_death_fails_its_part(own_cluster, view):
    cluster, client = own_cluster(2)
    pids = pids_of(client)
    ar = (client.broadcast_view() if view == "broadcast" else client[:]).apply_async(sleep_and_pid, 30)
    time.sleep(0.5)
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    ar.wait(timeout=1)  # engine 0 is still sleeping
    md1 = ar.metadata_by_id[ar.msg_ids[1]]
    deadline = time.monotonic() + 10
    while md1["status"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert md1["status"] == "error"
    assert time.monotonic() - t0 < 6
    ar.abort()
    with pytest.raises(ipp.CompositeError) as info:
        ar.get(timeout=10)
    assert "EngineError" in {ename for ename, *_ in info.value.elist}


# ---- bad input -------------------------------------------------------------------------------


def test_unknown_message_type_cannot_take_a_task_slot(cluster, rc, lview, raw_socket):
    """A signed request engines never answer is refused, not left holding an engine."""
    import zmq

    from ipyparallel_lite.connection import load_connection_file, make_session

    info = load_connection_file(cluster.connection_file("client"))
    ctx = zmq.Context()
    try:
        sock = raw_socket(ctx, info, "task")
        good = make_session(info["key"])
        for _ in range(len(rc.ids)):
            sock.send_multipart(good.serialize(good.msg("bogus_request", {})))
            assert sock.poll(5000)
            reply = good.deserialize(good.feed_identities(sock.recv_multipart())[1])
            assert reply["content"]["ename"] == "ValueError"
            assert "only apply_request" in reply["content"]["evalue"]
    finally:
        ctx.destroy(linger=0)
    # every engine still takes load-balanced work (bounded: a failure then reports the
    # session cluster's queues, see conftest)
    with lview.temp_flags(retries=len(rc.ids)):
        for eid in rc.ids:
            with lview.temp_flags(targets=[eid]):
                assert lview.apply_async(double, eid).get(timeout=30) == 2 * eid


def test_negative_timeout_rejected(lview):
    with pytest.raises(ValueError, match="timeout"):
        lview.set_flags(timeout=-1)
    with pytest.raises(ValueError, match="timeout"), lview.temp_flags(timeout=-0.5):
        pass
    assert lview.timeout is None
    other = lview.client.load_balanced_view()
    other.timeout = -3  # bypassing set_flags is still caught before sending
    with pytest.raises(ValueError, match="timeout"):
        other.apply_async(double, 1)
    with pytest.raises(ValueError, match="timeout"):
        lview.executor.map(double, range(3), timeout=-1)


def test_targets_naming_no_live_engine(rc):
    with pytest.raises(ipp.EngineError, match="No engine with id 99"):
        rc.load_balanced_view(targets=[99])
    view = rc.load_balanced_view()
    view.targets = [99]
    with pytest.raises(ipp.EngineError, match="registered engines are"):
        view.apply_async(double, 1)
    with pytest.raises(ipp.EngineError, match="No engine with id 99"):
        rc.broadcast_view(targets=[0, 99])
    with pytest.raises(ipp.EngineError):
        rc.direct_view(targets=[99])


def test_unknown_scheme_fails_clearly_and_leaves_nothing_running(ipython_dir):
    from conftest import our_processes

    before = {p.pid for p in our_processes()}
    cluster = ipp.Cluster(n=1, controller_args=["--scheme=bogus"])
    with pytest.raises(ipp.ClusterError) as info:
        cluster.start_and_connect_sync()
    message = str(info.value)
    assert "bogus" in message
    for scheme in SCHEMES:
        assert scheme in message
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [p for p in our_processes() if p.pid not in before and p.is_running()
                and p.status() != "zombie"]
        if not left:
            break
        time.sleep(0.1)
    assert not left, [p.cmdline() for p in left]
    assert not cluster.connection_file("client").exists()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_runs_a_map(own_cluster, scheme):
    cluster, client = own_cluster(2, controller_args=[f"--scheme={scheme}"])
    assert client.connection_info["task_scheme"] == scheme
    view = client.load_balanced_view()
    assert view.map_sync(double, range(24)) == [2 * i for i in range(24)]
    used = set(view.map_sync(sleep_and_pid, [0.05] * 12))
    assert used <= set(pids_of(client).values())
    assert list(view.imap(double, range(5))) == [0, 2, 4, 6, 8]
