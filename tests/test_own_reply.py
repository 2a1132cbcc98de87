"""A thread waiting for results receives them itself (``Transport.serve``), on a real cluster.

While a thread blocks in ``get``/``wait``/``Client.wait`` and nothing else needs the
client's I/O thread, the waiting thread reads the sockets and dispatches what arrives.
These tests hold it to what the I/O thread guarantees: every reply, output and
notification reaches its place; timeouts, Ctrl-C and ``close()`` end a wait cleanly;
several threads may wait at once.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

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


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers are set from the main thread only")
def test_the_signal_modules_c_functions_share_its_handlers():
    # the transport holds Ctrl-C with _signal's functions (signal's own wrap each
    # handler in an enum lookup, 20x the cost): both must read and set one table
    import _signal

    def handler(signum, frame):
        pass

    previous = signal.getsignal(signal.SIGINT)
    try:
        assert _signal.getsignal(int(signal.SIGINT)) is previous
        _signal.signal(int(signal.SIGINT), handler)
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _signal.getsignal(int(signal.SIGINT)) is previous


def test_a_lone_call_completes_on_the_waiting_thread(rc):
    # the mechanism itself: a done-callback runs where the result was completed, which
    # is the waiting thread whenever it served (the I/O thread may hold the sockets
    # for a turn now and then, so most, not all)
    view = rc[0]
    where = []
    for i in range(20):
        ar = view.apply_async(abs, -i)
        ar.add_done_callback(lambda _: where.append(threading.current_thread()))
        assert ar.get(timeout=30) == i
    assert len(where) == 20
    assert sum(t is threading.current_thread() for t in where) >= 10, where


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


def test_output_arrives_while_a_thread_receives_its_own_reply(rc, capsys):
    # output of this request, and of another one that a second thread waits for
    other = rc[1].apply_async(chatty, 30, 0.002)
    ar = rc[0].apply_async(chatty, 40, 0.002)
    with ar.stream_output():
        assert ar.get(timeout=30) == 40
    shown = capsys.readouterr().out
    assert all(f"line {i}\n" in shown for i in range(40))
    assert ar.stdout == "".join(f"line {i}\n" for i in range(40))
    assert other.get(timeout=30) == 30
    assert other.stdout == "".join(f"line {i}\n" for i in range(30))
    # an execute completes only with its output, which comes on another socket
    ex = rc[0].execute("print('done here')")
    ex.get(timeout=30)
    assert ex.stdout == "done here\n"


def test_a_done_callback_may_submit_more_work(rc):
    view = rc[0]
    followers = []
    ar = view.apply_async(abs, -1)
    ar.add_done_callback(lambda f: followers.append(view.apply_async(abs, -2)))
    assert ar.get(timeout=30) == 1
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
    time.sleep(0.1)  # the waiter serves the sockets by now
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
