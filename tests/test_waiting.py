"""Waiting for results, on a real cluster: what a blocked ``get``/``wait``/``Client.wait``
must keep doing, whichever thread receives the replies.

Several threads wait at once; timeouts end a wait and the result still arrives; output
(of the awaited request and of others) and registration notifications arrive while a
thread waits; a done-callback may submit more work; Ctrl-C ends a wait and, at whatever
moment it comes, drops no result; ``close()`` ends a wait cleanly. (Written for a
variant in which the waiting thread received its own replies: a Ctrl-C could then land
between receiving a reply and dispatching it.)
"""

from __future__ import annotations

import concurrent.futures
import gc
import inspect
import os
import random
import re
import signal
import threading
import time
from concurrent.futures import _base as futures_base

import pytest

import ipyparallel_lite as ipp
from ipyparallel_lite import error


def slow_echo(x, seconds):
    import time

    time.sleep(seconds)
    return x


def chatty(n, pause):
    import sys
    import time

    for i in range(n):
        print(f"line {i}")
        sys.stdout.flush()
        time.sleep(pause)
    return n


def test_several_threads_wait_at_once(rc, lview):
    errors: list[BaseException] = []

    def waiter(k: int) -> None:
        try:
            view = rc[k % len(rc.ids)]
            for i in range(25):
                assert view.apply_sync(slow_echo, (k, i), 0.002) == (k, i)
                assert lview.apply_async(slow_echo, (k, -i), 0.001).get(timeout=30) == (k, -i)
                assert rc.wait([view.apply_async(abs, -i)], timeout=30)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=waiter, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def test_timeouts_end_a_wait_and_the_result_still_arrives(rc):
    ar = rc[0].apply_async(slow_echo, "late", 0.6)
    with pytest.raises(error.TimeoutError):
        ar.get(timeout=0.05)
    assert not ar.wait(0.05)
    assert not rc.wait([ar], timeout=0.05)
    assert not ar.wait(0.05, return_when=ipp.FIRST_COMPLETED)
    assert rc[1].apply_sync(abs, -3) == 3  # the other engine answers meanwhile
    assert ar.get(timeout=30) == "late"


def eventually(check, seconds: float = 30) -> bool:
    """Whether ``check()`` holds within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_output_arrives_while_a_thread_waits(rc, capsys):
    # output of this request, and of another one that nobody waits for yet; an apply's
    # output travels the iopub socket, its reply another: it may come just after the reply
    lines = "".join(f"line {i}\n" for i in range(40))
    other = rc[1].apply_async(chatty, 30, 0.002)
    ar = rc[0].apply_async(chatty, 40, 0.002)
    with ar.stream_output():
        assert ar.get(timeout=30) == 40
        assert eventually(lambda: ar.stdout == lines), ar.stdout
    shown = capsys.readouterr().out.replace("[stdout:0] ", "")
    assert shown and lines.endswith(shown)  # shown from the block's start, to the end
    assert other.get(timeout=30) == 30
    assert eventually(lambda: other.stdout == "".join(f"line {i}\n" for i in range(30)))
    # an execute completes only with its output
    ex = rc[0].execute("print('done here')")
    ex.get(timeout=30)
    assert ex.stdout == "done here\n"


def test_future_internals_are_what_asyncresult_replaces():
    # AsyncResult sets up Future's fields itself, with a condition made only when a
    # thread waits (asyncresult._FutureCondition): if Future's fields, or what its code
    # (and wait/as_completed) does with its condition, change, this fails
    fresh = vars(concurrent.futures.Future())
    assert set(fresh) == {
        "_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
    assert fresh["_state"] == futures_base.PENDING and fresh["_waiters"] == []
    uses = set(re.findall(r"_condition\.(\w+)", inspect.getsource(futures_base)))
    assert uses <= {"acquire", "release", "wait", "notify_all"}, uses


def test_an_asyncresult_is_a_future_to_every_waiter(rc):
    slow = rc[0].apply_async(slow_echo, "slow", 0.5)
    quick = rc[1].apply_async(abs, -1)
    # concurrent.futures' own waits take the conditions of many futures at once
    done, not_done = concurrent.futures.wait([slow, quick], timeout=30,
                                             return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {quick} and not_done == {slow}
    assert [f.result() for f in concurrent.futures.as_completed([slow, quick], timeout=30)] in (
        ["slow", 1], [1, "slow"])
    # result() from several threads, each woken by the one notification of its future
    pending = [rc[i % 2].apply_async(slow_echo, i, 0.3) for i in range(4)]
    got = {}
    threads = [threading.Thread(target=lambda f=f: got.setdefault(f, f.result(timeout=30)))
               for f in pending for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[f] for f in pending] == [0, 1, 2, 3]
    with pytest.raises(concurrent.futures.TimeoutError):
        rc[0].apply_async(slow_echo, "late", 0.5).result(timeout=0.05)


def test_a_pending_asyncresult_keeps_few_objects_for_the_garbage_collector(rc):
    # the collector's passes over what a burst keeps alive cost a client more CPU than
    # any step of apply_async (a set, a list or a Future's Condition is tracked)
    view = rc[0]
    busy = rc[0].apply_async(slow_echo, None, 2)
    gc.collect()
    before = len(gc.get_objects())
    ars = [view.apply_async(abs, -i) for i in range(200)]
    per_call = (len(gc.get_objects()) - before) / len(ars)
    assert per_call < 16, per_call  # 25 before the Future's condition was made lazily
    busy.get(timeout=30)
    assert [ar.get(timeout=30) for ar in ars] == list(range(200))


def test_a_done_callback_may_submit_more_work(rc):
    # (the callback may run after get() returns, on the thread that received the reply)
    view = rc[0]
    followers = []
    called = threading.Event()

    def follow(_) -> None:
        followers.append(view.apply_async(abs, -2))
        called.set()

    ar = view.apply_async(abs, -1)
    ar.add_done_callback(follow)
    assert ar.get(timeout=30) == 1
    assert called.wait(30)
    assert len(followers) == 1
    assert followers[0].get(timeout=30) == 2


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="Python raises KeyboardInterrupt in the main thread only")
def test_ctrl_c_ends_a_wait_and_drops_no_result(rc):
    view = rc[0]
    state = {"in_get": False}

    def interrupt_in_get(signum, frame):
        if state["in_get"]:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt_in_get)
    try:
        # a Ctrl-C while waiting for a long call ends the wait; the result comes later
        ar = view.apply_async(slow_echo, "long", 0.5)
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        state["in_get"] = True
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            ar.get(timeout=30)
        state["in_get"] = False
        timer.join()
        assert ar.get(timeout=30) == "long"
        # Ctrl-C at any moment of many short waits, some while a reply is being
        # received and dispatched: no reply may be lost
        stop = threading.Event()

        def interrupter() -> None:
            while not stop.is_set():
                time.sleep(random.uniform(0, 0.003))
                if state["in_get"]:
                    os.kill(os.getpid(), signal.SIGINT)

        thread = threading.Thread(target=interrupter, daemon=True)
        thread.start()
        interrupted = []
        try:
            for i in range(400):
                ar = view.apply_async(abs, -i)
                state["in_get"] = True
                try:
                    assert ar.get(timeout=30) == i
                except KeyboardInterrupt:
                    interrupted.append((i, ar))
                finally:
                    state["in_get"] = False
        finally:
            stop.set()
            thread.join(10)
        assert interrupted  # the test did interrupt waits
        assert [ar.get(timeout=30) for _, ar in interrupted] == [i for i, _ in interrupted]
        assert signal.getsignal(signal.SIGINT) is interrupt_in_get  # given back
        assert view.apply_sync(abs, -7) == 7
    finally:
        signal.signal(signal.SIGINT, previous)


def test_close_while_a_thread_waits(cluster):
    client = cluster.connect_client_sync()
    client.wait_for_engines(2, timeout=60)
    ar = client[0].apply_async(slow_echo, 1, 0.5)
    outcome: list = []

    def waiter() -> None:
        try:
            outcome.append(ar.get(timeout=3))
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.1)  # the waiter waits by now
    client.close()
    thread.join(10)
    assert not thread.is_alive()
    assert client.closed
    # a reply that came before close() was read is kept; after it, the wait times out
    assert outcome == [1] or isinstance(outcome[0], error.TimeoutError), outcome


def test_notifications_arrive_while_a_thread_waits(own_cluster):
    cluster, client = own_cluster(n=1)
    try:
        client.wait_for_engines(1, timeout=60)
        ar = client[0].apply_async(slow_echo, "waited", 60)
        starter = threading.Thread(target=cluster.start_engines_sync, args=(1,))
        starter.start()
        deadline = time.monotonic() + 60
        # only waiting (no query): the registration notification must be read meanwhile
        while len(client.ids) < 2 and time.monotonic() < deadline:
            assert not ar.wait(0.25)
        starter.join(60)
        assert len(client.ids) == 2
    finally:
        client.close()
