"""The controller's Outbox on real ROUTER/DEALER sockets: order, bounds, rebuilt messages."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from ipyparallel_lite import batch, fastzmq
from ipyparallel_lite.controller.outbox import Outbox, Sent


@pytest.fixture
def ctx():
    # destroyed even when a test fails: a context left to the garbage collector, with a
    # socket still holding messages, blocks whichever later test collects it
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def pair(ctx: zmq.Context, peer: bytes) -> tuple[zmq.Socket, zmq.Socket]:
    router = fastzmq.socket(ctx, zmq.ROUTER)
    router.router_mandatory = 1
    router.sndhwm = 4
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.identity = peer
    dealer.rcvhwm = 4
    dealer.setsockopt(zmq.RCVBUF, 4096)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")  # the router learns the peer's identity
    assert router.recv_multipart() == [peer, b"hello"]
    return router, dealer


def messages(frames: list) -> list[list]:
    """The messages one zmq message carries: a batch's, or itself."""
    return batch.unpack(frames) if batch.is_batch(frames[0]) else [frames]


def numbers(frames: list) -> list[int]:
    """The numbers the tests put in front of each message's first frame."""
    return [int.from_bytes(m[0][:4], "big") for m in messages(frames)]


async def receive(dealer: zmq.Socket, until: bytes, timeout: float = 5) -> list[bytes]:
    """What the dealer receives up to the frame ``until``, while the loop retries sends."""
    got: list[bytes] = []
    for _ in range(int(timeout / 0.01)):
        while dealer.poll(0):
            got.append(dealer.recv())
        if got and got[-1] == until:
            break
        await asyncio.sleep(0.01)
    return got


def test_a_peer_that_does_not_read_gets_its_messages_in_order_later(ctx: zmq.Context):
    async def run():
        router, dealer = pair(ctx, b"slow")
        outbox = Outbox(asyncio.get_running_loop(), max_bytes=16 << 20)
        payload = bytes(10_000)
        results = [outbox.send(router, [b"slow", i.to_bytes(4, "big") + payload]) for i in range(500)]
        assert results[0] is Sent.SENT and results[-1] is Sent.QUEUED
        assert outbox.backlog()["peers"] == 1
        got = []
        while len(got) < 500:
            await asyncio.sleep(0.01)
            while dealer.poll(0):
                got.append(int.from_bytes(dealer.recv()[:4], "big"))
        assert got == list(range(500))
        await asyncio.sleep(0.1)
        assert outbox.backlog() == {"peers": 0, "messages": 0, "bytes": 0}
        outbox.close()

    asyncio.run(run())


def test_past_its_byte_bound_a_message_waits_as_a_rebuilder_or_is_refused(ctx: zmq.Context):
    async def run():
        router, dealer = pair(ctx, b"slow")
        cut = []
        outbox = Outbox(asyncio.get_running_loop(), max_bytes=100_000, max_entries=50)
        outbox.log.warning = lambda *a: cut.append(a)
        big = bytes(40_000)
        sent = [outbox.send(router, [b"slow", big]) for _ in range(60)]
        assert Sent.FULL in sent  # no rebuilder: refused once the bound is reached
        rebuilt = []

        def later():
            rebuilt.append(1)
            return [b"slow", b"rebuilt"]

        assert outbox.send(router, [b"slow", big], later) is Sent.QUEUED
        assert not rebuilt  # built only when its turn comes
        got = await receive(dealer, until=b"rebuilt")
        assert got[-1] == b"rebuilt" and rebuilt == [1]
        # a peer past max_entries is cut off: its queue is dropped and logged
        for _ in range(200):
            outbox.send(router, [b"slow", big], later)
        assert cut and "cut off" in cut[0][0]
        outbox.close()

    asyncio.run(run())


def test_a_peer_that_leaves_is_released_and_reported(ctx: zmq.Context):
    async def run():
        router, dealer = pair(ctx, b"gone")
        gone = []
        # as the controller's reader does after every send: reading EVENTS lets libzmq
        # read the departed peer's end-of-pipe mark and drop its pipe. A router nobody
        # reads keeps the pipe (6 releases in 20 within 3 s without this, 20 in 20 with)
        outbox = Outbox(asyncio.get_running_loop(), on_gone=lambda s, p: gone.append(p),
                        after_send=lambda sock: sock.getsockopt(zmq.EVENTS))
        for _ in range(200):
            outbox.send(router, [b"gone", bytes(10_000)])
        assert outbox.backlog()["peers"] == 1
        dealer.close(linger=0)
        for _ in range(1000):
            await asyncio.sleep(0.01)
            if gone:
                break
        assert gone == [b"gone"]
        assert outbox.backlog()["peers"] == 0
        assert outbox.send(router, [b"gone", b"x"]) is Sent.GONE
        outbox.close()

    asyncio.run(run())


def test_replies_of_one_turn_go_as_one_batch_or_wait_one_by_one_in_order(ctx: zmq.Context):
    async def run():
        reader = batch.reader_identity()
        router, dealer = pair(ctx, reader)
        outbox = Outbox(asyncio.get_running_loop(), max_bytes=16 << 20)
        for i in range(3):  # one loop turn: the first at once, the others as one batch
            outbox.send_soon(router, [reader, b"reply-%d" % i], lambda: None)
        assert dealer.poll(1000)
        assert dealer.recv_multipart() == [b"reply-0"]
        assert not dealer.poll(0)  # the rest waits for the turn's end
        await asyncio.sleep(0.05)
        frames = dealer.recv_multipart()
        assert batch.is_batch(frames[0])
        assert batch.unpack(frames) == [[b"reply-1"], [b"reply-2"]]
        # a peer that does not read: its turns' batches wait as single messages, in order
        payload = bytes(10_000)
        for turn in range(20):
            for i in range(25):
                n = turn * 25 + i
                outbox.send_soon(router, [reader, n.to_bytes(4, "big") + payload], lambda: None)
            await asyncio.sleep(0)
        assert outbox.backlog()["peers"] == 1  # zmq refused a batch: its messages wait
        got = []
        for _ in range(500):
            await asyncio.sleep(0.01)
            while dealer.poll(0):
                got.extend(numbers(dealer.recv_multipart()))
            if len(got) == 500:
                break
        assert got == list(range(500))
        outbox.close()

    asyncio.run(run())


def test_a_client_that_reads_no_batches_gets_lone_messages(ctx: zmq.Context):
    async def run():
        router, dealer = pair(ctx, b"plain-client")
        outbox = Outbox(asyncio.get_running_loop())
        for i in range(3):
            outbox.send_soon(router, [b"plain-client", b"reply-%d" % i], lambda: None)
        await asyncio.sleep(0.05)
        assert [dealer.recv_multipart() for _ in range(3)] == [[b"reply-0"], [b"reply-1"], [b"reply-2"]]
        outbox.close()

    asyncio.run(run())


def test_a_turn_ends_when_defer_says_and_its_replies_go_as_one_batch(ctx: zmq.Context):
    """``defer`` decides when a turn ends (the controller: at the end of a reader's drain):
    the first reply leaves at once, the rest wait for the deferred callback."""
    async def run():
        peer = batch.reader_identity()
        router, dealer = pair(ctx, peer)
        deferred: list = []
        outbox = Outbox(asyncio.get_running_loop(), defer=deferred.append)
        for i in range(3):
            outbox.send_soon(router, [peer, b"reply-%d" % i], lambda: None)
        assert dealer.poll(2000) and dealer.recv_multipart() == [b"reply-0"]
        await asyncio.sleep(0.05)
        assert not dealer.poll(0) and len(deferred) == 1  # nothing but the callback ran it
        deferred.pop()()
        assert dealer.poll(2000)
        frames = dealer.recv_multipart()
        assert batch.is_batch(frames[0]) and batch.unpack(frames) == [[b"reply-1"], [b"reply-2"]]
        outbox.close()

    asyncio.run(run())


def test_recheck_after_a_send_finds_a_message_whose_signal_the_send_took(ctx: zmq.Context):
    """libzmq's socket FD is edge-triggered, and a send processes the socket's pending
    commands, which can take the signal of a message that arrived meanwhile. After such
    a send, ``Drainer.recheck`` (one ``EVENTS`` read) must find the message: this fails if
    pyzmq or libzmq change how EVENTS and the FD work."""
    async def run():
        router, dealer = pair(ctx, b"peer")
        got: list = []
        reader = fastzmq.Drainer(asyncio.get_running_loop(), router, got.append, 64)
        await asyncio.sleep(0.05)
        for i in range(20):
            dealer.send(b"msg-%d" % i)
            time_left = 200
            while not router.poll(0) and time_left:  # arrived, the FD signalled...
                time_left -= 1
                await asyncio.sleep(0)
            router.send_multipart([b"peer", b"ack"])  # ...and the send may take the signal
            reader.recheck()
            for _ in range(200):
                if len(got) > i:
                    break
                await asyncio.sleep(0.005)
            assert [f.bytes for f in got[i]] == [b"peer", b"msg-%d" % i]
        reader.close()

    asyncio.run(run())


def test_an_engines_requests_of_one_turn_go_as_one_batch_and_each_refusal_is_reported(ctx: zmq.Context):
    """Requests to an engine (``reads_batches`` says so) batch like replies; past the byte
    bound, a request that cannot wait is reported to its ``refused`` callback, at once or
    at the end of its turn, and every other one arrives once, in order."""
    async def run():
        router, dealer = pair(ctx, b"engine")
        deferred: list = []
        outbox = Outbox(asyncio.get_running_loop(), max_bytes=200_000, defer=deferred.append,
                        reads_batches=lambda sock, peer: peer == b"engine")
        refused: list[int] = []
        for i in range(3):
            outbox.send_soon(router, [b"engine", b"request-%d" % i], refused=lambda: refused.append(-1))
        assert dealer.poll(2000) and dealer.recv_multipart() == [b"request-0"]
        deferred.pop()()
        assert dealer.poll(2000)
        frames = dealer.recv_multipart()
        assert batch.unpack(frames) == [[b"request-1"], [b"request-2"]]
        # an engine that does not read: turn after turn, until some are refused
        payload = bytes(20_000)
        n = 0
        for _turn in range(40):
            for _ in range(10):
                outbox.send_soon(router, [b"engine", n.to_bytes(4, "big") + payload],
                                 refused=lambda n=n: refused.append(n))
                n += 1
            while deferred:
                deferred.pop()()
        assert refused and -1 not in refused
        got: list[int] = []
        for _ in range(500):
            await asyncio.sleep(0.01)
            while dealer.poll(0):
                got.extend(numbers(dealer.recv_multipart()))
            if len(got) + len(refused) == n and not outbox.backlog()["peers"]:
                break
        assert got == sorted(got)  # in order, none twice
        assert sorted(got + refused) == list(range(n))  # each sent or refused, not both
        outbox.close()

    asyncio.run(run())


def test_an_engine_gone_by_the_end_of_its_turn_is_reported(ctx: zmq.Context):
    async def run():
        router, dealer = pair(ctx, b"engine")
        deferred: list = []
        gone: list = []
        outbox = Outbox(asyncio.get_running_loop(), defer=deferred.append,
                        on_gone=lambda sock, peer: gone.append(peer),
                        reads_batches=lambda sock, peer: True)
        for i in range(3):
            outbox.send_soon(router, [b"engine", b"request-%d" % i])
        assert dealer.poll(2000)
        dealer.close(linger=0)
        for _ in range(500):  # until the router has seen the engine leave
            try:
                router.send_multipart([b"engine", b"probe"], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    break
            await asyncio.sleep(0.01)
        assert not gone
        deferred.pop()()  # the turn's batch finds the engine gone
        assert gone == [b"engine"]
        outbox.send_soon(router, [b"engine", b"alone"])  # so does the first of a turn
        assert gone == [b"engine", b"engine"] and not deferred
        assert outbox.backlog()["peers"] == 0
        outbox.close()

    asyncio.run(run())


def test_a_message_sent_behind_a_turns_batch_follows_it_and_gets_its_own_answer(ctx: zmq.Context):
    """``send`` for a peer whose turn batch waits sends that batch first (order kept), and
    then answers for its own message: refused when it cannot wait, never silently lost."""
    async def run():
        router, dealer = pair(ctx, b"ipp-batch-reader:x")
        deferred: list = []
        outbox = Outbox(asyncio.get_running_loop(), max_bytes=100_000, defer=deferred.append)
        for i in range(3):
            outbox.send_soon(router, [b"ipp-batch-reader:x", b"reply-%d" % i])
        assert outbox.send(router, [b"ipp-batch-reader:x", b"control"]) is Sent.SENT
        got = []
        for _ in range(3):
            assert dealer.poll(2000)
            got.extend(messages(dealer.recv_multipart()))
        assert got == [[b"reply-0"], [b"reply-1"], [b"reply-2"], [b"control"]]
        while deferred:
            deferred.pop()()  # the turn's end finds nothing left to send
        assert not dealer.poll(100)
        # a peer that does not read: a message behind a refused batch is refused itself
        big = bytes(40_000)
        answers = [outbox.send(router, [b"ipp-batch-reader:x", big]) for _ in range(30)]
        assert Sent.FULL in answers
        refused: list[int] = []
        outbox.send_soon(router, [b"ipp-batch-reader:x", big], refused=lambda: refused.append(1))
        outbox.send_soon(router, [b"ipp-batch-reader:x", big], refused=lambda: refused.append(2))
        assert outbox.send(router, [b"ipp-batch-reader:x", big]) is Sent.FULL
        assert 2 in refused
        outbox.close()

    asyncio.run(run())
