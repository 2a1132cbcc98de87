"""The engine's ShellStream on real zmq sockets: order, batching, sends, flush, errors."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
from tornado.ioloop import IOLoop

from ipyparallel_lite import batch, fastzmq
from ipyparallel_lite.engine import stream as stream_mod
from ipyparallel_lite.engine.stream import ShellStream


@pytest.fixture
def pair():
    """``(router, dealer)``: a controller-like ROUTER and an engine-like DEALER."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = fastzmq.socket(ctx, zmq.DEALER)
    dealer.linger = 0
    dealer.identity = b"engine"
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield router, dealer
    ctx.destroy(linger=0)


async def _until(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_messages_arrive_in_order_and_replies_go_straight_out(pair, monkeypatch):
    router, dealer = pair
    monkeypatch.setattr(stream_mod, "BATCH", 3)  # several passes, each after other callbacks

    async def main() -> list:
        stream = ShellStream(dealer, IOLoop.current())
        got: list = []
        handled = asyncio.Event()

        def on_message(msg: list) -> None:
            got.append(fastzmq.frame_bytes(msg[0]))
            stream.send_multipart([b"reply-" + fastzmq.frame_bytes(msg[0])])
            if len(got) == 10:
                handled.set()

        # the ROUTER only knows the DEALER once it has said something
        stream.send_multipart([b"hello"])
        await _until(lambda: router.poll(0))
        assert router.recv_multipart() == [b"engine", b"hello"]
        for i in range(10):
            router.send_multipart([b"engine", str(i).encode()])
        await asyncio.sleep(0.2)  # all ten wait in libzmq: passes of BATCH each
        stream.on_recv(on_message, copy=False)
        await asyncio.wait_for(handled.wait(), 5)
        replies, zmq_messages = [], 0
        while len(replies) < 10:
            assert router.poll(5000)
            frames = router.recv_multipart()[1:]
            zmq_messages += 1
            if batch.is_batch(frames[0]):  # replies ready together leave together
                replies.extend(m[0] for m in batch.unpack(frames))
            else:
                replies.append(frames[0])
        stream.close()
        assert stream.closed()
        return [got, replies, zmq_messages]

    got, replies, zmq_messages = asyncio.run(main())
    assert got == [str(i).encode() for i in range(10)]
    assert replies == [b"reply-" + str(i).encode() for i in range(10)]
    assert zmq_messages < 10


def test_a_lone_request_is_answered_at_once_and_a_slow_one_holds_no_replies(pair):
    router, dealer = pair

    async def main() -> list:
        stream = ShellStream(dealer, IOLoop.current())
        arrivals: list = []

        def on_message(msg: list) -> None:
            name = fastzmq.frame_bytes(msg[0])
            if name == b"slow":
                time.sleep(stream_mod.HOLD_BELOW * 20)
            if name == b"after-slow":
                # the slow request's reply left when it ended, not with this pass
                assert router.poll(2000)
                arrivals.append(router.recv_multipart()[1:])
            stream.send_multipart([b"reply-" + name])

        stream.send_multipart([b"hello"])
        await _until(lambda: router.poll(0))
        router.recv_multipart()
        stream.on_recv(on_message, copy=False)
        router.send_multipart([b"engine", b"alone"])
        await _until(lambda: router.poll(0))
        arrivals.append(router.recv_multipart()[1:])
        stream.on_recv(None)
        router.send_multipart([b"engine", b"slow"])
        router.send_multipart([b"engine", b"after-slow"])
        await asyncio.sleep(0.2)  # both wait in libzmq: one pass handles them
        stream.on_recv(on_message, copy=False)
        await _until(lambda: len(arrivals) == 2)
        await _until(lambda: router.poll(0))
        arrivals.append(router.recv_multipart()[1:])
        stream.close()
        return arrivals

    arrivals = asyncio.run(main())
    assert arrivals == [[b"reply-alone"], [b"reply-slow"], [b"reply-after-slow"]]


def test_awaitables_are_scheduled_and_errors_do_not_stop_the_stream(pair):
    router, dealer = pair

    async def main() -> list:
        stream = ShellStream(dealer, IOLoop.current())
        done: list = []

        async def later(tag: bytes) -> None:
            await asyncio.sleep(0)
            done.append(tag)

        def on_message(msg: list):
            tag = msg[0]
            if tag == b"boom":
                raise RuntimeError("a handler failed")
            return later(tag)

        stream.on_recv(on_message)
        stream.send_multipart([b"hello"])
        await _until(lambda: router.poll(0))
        router.recv_multipart()
        for tag in (b"a", b"boom", b"b"):
            router.send_multipart([b"engine", tag])
        await _until(lambda: len(done) == 2)
        stream.close()
        return done

    assert asyncio.run(main()) == [b"a", b"b"]


def test_flush_hands_over_waiting_messages_at_once(pair):
    router, dealer = pair

    async def main() -> tuple:
        stream = ShellStream(dealer, IOLoop.current())
        got: list = []
        stream.send_multipart([b"hello"])
        await _until(lambda: router.poll(0))
        router.recv_multipart()
        for i in range(4):
            router.send_multipart([b"engine", str(i).encode()])
        await _until(lambda: dealer.poll(0))
        await asyncio.sleep(0.05)  # all four are queued in libzmq by now
        assert stream.flush() == 0  # nobody reads yet: nothing is taken
        stream.on_recv(lambda msg: got.append(msg[0]))
        # flush, as ipykernel's abort does, without waiting for the loop
        count = stream.flush()
        assert stream.flush(zmq.POLLOUT) == 0
        stream.close()
        return count, got

    count, got = asyncio.run(main())
    assert count == 4
    assert got == [b"0", b"1", b"2", b"3"]


def test_a_batch_of_requests_is_served_in_order_and_answered_by_one_batch(pair, caplog):
    router, dealer = pair

    async def main() -> tuple:
        stream = ShellStream(dealer, IOLoop.current())
        got: list = []
        behind: list = []

        def on_message(msg: list) -> None:
            got.append(fastzmq.frame_bytes(msg[0]))
            behind.append(stream.waiting)  # the rest of the batch waits in the stream
            stream.send_multipart([b"reply-" + fastzmq.frame_bytes(msg[0])])

        stream.send_multipart([b"hello"])
        await _until(lambda: router.poll(0))
        router.recv_multipart()
        stream.on_recv(on_message, copy=False)
        router.send_multipart([b"engine", *batch.pack([[str(i).encode()] for i in range(5)])])
        await _until(lambda: router.poll(0))
        answer = router.recv_multipart()[1:]
        # a malformed batch is dropped whole, with a warning; the next message is served
        router.send_multipart([b"engine", batch.MARKER, b"\x01\x00\x00\x00\x05\x00\x00\x00", b"x", b"y"])
        router.send_multipart([b"engine", b"after"])
        await _until(lambda: router.poll(0))
        after = router.recv_multipart()[1:]
        stream.close()
        return got, behind, answer, after

    with caplog.at_level("WARNING", logger="ipyparallel_lite.engine"):
        got, behind, answer, after = asyncio.run(main())
    assert got == [b"0", b"1", b"2", b"3", b"4", b"after"]
    assert behind == [4, 3, 2, 1, 0, 0]
    # five quick requests that came together: their replies leave together, in order
    assert batch.is_batch(answer[0])
    assert batch.unpack(answer) == [[b"reply-%d" % i] for i in range(5)]
    assert after == [b"reply-after"]
    assert "dropped a malformed batch" in caplog.text


def test_a_routed_stream_reads_batches_behind_the_client_and_batches_replies_per_client(pair):
    # the engine's mux stream, behind the controller's device: every message starts with
    # the client's identity, and a batch of replies may only go to one client
    router, dealer = pair

    async def main() -> list:
        stream = ShellStream(dealer, IOLoop.current(), routed=True)
        got: list = []

        def on_message(msg: list) -> None:
            client, body = (fastzmq.frame_bytes(f) for f in msg)
            got.append((client, body))
            stream.send_multipart([client, b"reply-" + body])

        stream.send_multipart([b"hello"])
        await _until(lambda: router.poll(0))
        router.recv_multipart()
        stream.on_recv(on_message, copy=False)
        alice = [[b"alice", b"a%d" % i] for i in range(3)]
        router.send_multipart([b"engine", *batch.pack_routed(b"alice", alice)])
        answers: list = []
        await _until(lambda: router.poll(0))
        answers.append(router.recv_multipart()[1:])
        # requests of two clients in one pass: each client's replies go on their own
        router.send_multipart([b"engine", b"bob", b"b0"])
        router.send_multipart([b"engine", *batch.pack_routed(b"alice", [[b"alice", b"a3"]] * 2)])
        router.send_multipart([b"engine", b"bob", b"b1"])
        while sum(len(batch.unpack(a, 1)) if batch.is_batch(a[1]) else 1 for a in answers) < 7:
            await _until(lambda: router.poll(0))
            answers.append(router.recv_multipart()[1:])
        stream.close()
        return got, answers

    got, answers = asyncio.run(main())
    assert got[:3] == [(b"alice", b"a0"), (b"alice", b"a1"), (b"alice", b"a2")]
    assert got[3:] == [(b"bob", b"b0"), (b"alice", b"a3"), (b"alice", b"a3"), (b"bob", b"b1")]
    replies = []
    for answer in answers:
        if batch.is_batch(answer[1]):
            peer = answer[0]
            assert all(m[0] == peer for m in batch.unpack_routed(answer, 1))
            replies += batch.unpack_routed(answer, 1)
        else:
            replies.append(answer)
    assert replies == [[c, b"reply-" + b] for c, b in got]
    assert batch.is_batch(answers[0][1]), "three quick requests that came together: one batch"


def test_a_request_that_drains_the_stream_gets_the_rest_of_its_batch_first(pair):
    router, dealer = pair

    async def main() -> list:
        stream = ShellStream(dealer, IOLoop.current())
        got: list = []

        def on_message(msg: list) -> None:
            got.append(msg[0])
            if msg[0] == b"0":  # as ipykernel's abort does, while a request runs
                assert dealer.poll(2000)
                stream.flush()

        stream.send_multipart([b"hello"])
        await _until(lambda: router.poll(0))
        router.recv_multipart()
        router.send_multipart([b"engine", *batch.pack([[b"0"], [b"1"], [b"2"]])])
        router.send_multipart([b"engine", b"3"])
        await _until(lambda: dealer.poll(0))
        await asyncio.sleep(0.05)  # both wait in libzmq
        stream.on_recv(on_message)
        await _until(lambda: len(got) == 4)
        stream.close()
        return got

    assert asyncio.run(main()) == [b"0", b"1", b"2", b"3"]
