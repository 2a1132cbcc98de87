"""The client transport's own pieces: its message builder and JSON unpacker against
``jupyter_client``'s (whose internals they lean on), and one client shared by several
threads, on a real cluster.
"""

from __future__ import annotations

import threading

import pytest


def test_threads_waiting_on_lone_requests_and_a_burst_share_one_client(rc, lview):
    # blocking calls from several threads while a burst's replies stream in: every
    # reply reaches its request
    errors: list[BaseException] = []

    def lone(k: int) -> None:
        try:
            view = rc[k % len(rc.ids)]
            for i in range(150):
                assert view.apply_sync(abs, -i - k) == i + k
                assert lview.apply_sync(abs, -i) == i
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=lone, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    burst = [lview.apply_async(abs, -i) for i in range(1500)]
    assert [ar.get(timeout=120) for ar in burst] == list(range(1500))
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert rc.queue_status()["unassigned"] == 0


def test_a_lone_query_and_a_closed_client(cluster):
    client = cluster.connect_client_sync()
    try:
        assert client.queue_status() is not None  # a query, answered while nothing else waits
    finally:
        client.close()
    assert client.transport.closed
    with pytest.raises(RuntimeError, match="closed"):
        client.transport.build("apply_request")
