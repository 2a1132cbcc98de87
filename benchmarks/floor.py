"""The floor: the bare per-message pipeline that every latency and throughput row is read against.

Three processes in the shape of a cluster: a client (in the benchmark process), a relay
standing in for the controller, and an engine (``python -m benchmarks.floor relay|engine``).
Every message is a Jupyter message of the same shape as an ``apply_request`` /
``apply_reply`` (``[idents, <IDS|MSG>, signature, header, parent, metadata, content,
buffers]``: two tiny buffers on a request, one on a reply), signed with
``jupyter_client.session.Session`` (HMAC-SHA256 over the four JSON dicts, the key of a
fresh random connection key). At every hop the receiver checks the signature and reads
the JSON header; senders build a fresh header (``Session.msg_header``: new msg_id and
date). Sockets are those of our path: client DEALER -> relay ROUTER, relay ROUTER ->
engine DEALER, frames passed with the same lean pyzmq calls (:mod:`ipyparallel_lite.fastzmq`).

What it leaves out, on purpose: pickling, a scheduler's choice, the Hub's records, any
bookkeeping (the relay routes a reply back by the client identity stacked in front of
the request, as a ROUTER-ROUTER relay does). The relay keeps ``hwm`` = 1 request in
flight per engine and queues the rest, like our controller's load balancing with
default flags, or (``hwm`` = 0) sends each request on at once, like direct requests.

So the figures are what this machine allows a design that pays one signed message per
task at every hop: ``rtt`` is one request at a time (``apply_sync``-like); ``rate`` and
``rate_unbounded`` are a stream of tiny requests all submitted at once, then waited for
(``apply_async``-like), through a relay with ``hwm`` = 1 and 0.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from hmac import compare_digest

import zmq
from jupyter_client.session import Session

from ipyparallel_lite.fastzmq import FastSocket, readable

DELIM = b"<IDS|MSG>"
REQUEST_BUFFERS = [b"f" * 64, b"a" * 32]
"""Stand-ins of the pickled function and arguments of a tiny apply request."""
REPLY_BUFFERS = [b"r" * 16]
"""Stand-in of a pickled ``None`` result."""
START_TIMEOUT = 60.0
"""Seconds the relay and engines may take to start and meet."""


def make_session(key: bytes) -> Session:
    """The signing session our components use: HMAC-SHA256, JSON packer."""
    return Session(key=key, signature_scheme="hmac-sha256", username="floor")


def signed(session: Session, msg_type: str, parent: bytes, content: bytes) -> list[bytes]:
    """``[DELIM, signature, header, parent, metadata, content]`` with a fresh header."""
    parts = [session.pack(session.msg_header(msg_type)), parent, b"{}", content]
    return [DELIM, session.sign(parts), *parts]


def verified_header(session: Session, frames: list[bytes]) -> dict:
    """Check the signature of a message starting at ``DELIM``; return its header."""
    if frames[0] != DELIM or not compare_digest(frames[1], session.sign(frames[2:6])):
        raise ValueError("floor: a message with a bad signature or framing")
    return json.loads(frames[2])


def split(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """``(identities, message)``: the message starts at the delimiter."""
    at = frames.index(DELIM)
    return frames[:at], frames[at:]


def _socket(ctx: zmq.Context, kind: int) -> FastSocket:
    sock = ctx.socket(kind, socket_class=FastSocket)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 0  # a benchmark stream must never be dropped by a ROUTER
    return sock


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


# ------------------------------------------------------------------ processes


def run_relay(key: bytes, engines: int, hwm: int) -> None:
    """The controller's stand-in: print both ports, wait for ``engines``, relay forever,
    with at most ``hwm`` requests in flight per engine (0: no limit)."""
    session, parent = make_session(key), os.getppid()
    ctx = zmq.Context()
    front, back = _socket(ctx, zmq.ROUTER), _socket(ctx, zmq.ROUTER)
    front_port = front.bind_to_random_port("tcp://127.0.0.1")
    back_port = back.bind_to_random_port("tcp://127.0.0.1")
    print(f"ports {front_port} {back_port}", flush=True)
    ready: list[bytes] = []  # engine identities; each engine says hello once connected
    while len(ready) < engines:
        if not back.poll(1000):
            if _orphaned(parent):
                return
            continue
        idents, msg = split(back.recv_multipart())
        verified_header(session, msg)
        ready.append(idents[0])
    print("ready", flush=True)
    waiting: deque[list[bytes]] = deque()
    free = deque(ready * hwm)  # one entry per request an engine may still take
    sent = 0
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        if not poller.poll(1000):
            if _orphaned(parent):
                return
            continue
        while readable(front):  # a request: [client, DELIM, ...]
            frames = front.recv_multipart()
            verified_header(session, split(frames)[1])
            if not hwm:  # no limit: straight on, engines in turn
                back.send_multipart([ready[sent % engines], *frames])
                sent += 1
            elif free:
                back.send_multipart([free.popleft(), *frames])
            else:
                waiting.append(frames)
        while readable(back):  # a reply: [engine, client, DELIM, ...]
            engine, *frames = back.recv_multipart()
            verified_header(session, split(frames)[1])
            front.send_multipart(frames)
            if waiting:
                back.send_multipart([engine, *waiting.popleft()])
            elif hwm:
                free.append(engine)


def run_engine(key: bytes, url: str) -> None:
    """The engine's stand-in: answer every request with a signed reply and one buffer."""
    session, parent = make_session(key), os.getppid()
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.DEALER)
    sock.connect(url)
    sock.send_multipart(signed(session, "hello", b"{}", b"{}"))
    ok = b'{"status": "ok"}'
    while True:
        if not sock.poll(1000):
            if _orphaned(parent):
                return
            continue
        while readable(sock):
            idents, msg = split(sock.recv_multipart())
            verified_header(session, msg)
            sock.send_multipart([*idents, *signed(session, "apply_reply", msg[2], ok), *REPLY_BUFFERS])


# --------------------------------------------------------------------- client


class FloorClient:
    """The client end, in this process: send signed requests, read signed replies."""

    def __init__(self, key: bytes, url: str):
        self.session = make_session(key)
        self.ctx = zmq.Context()
        self.sock = _socket(self.ctx, zmq.DEALER)
        self.sock.connect(url)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def send(self) -> None:
        self.sock.send_multipart([*signed(self.session, "apply_request", b"{}", b"{}"), *REQUEST_BUFFERS])

    def receive(self, timeout: float = START_TIMEOUT) -> dict:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"floor: no reply within {timeout:g} s")
        return verified_header(self.session, self.sock.recv_multipart())

    def round_trip(self) -> None:
        self.send()
        self.receive()

    def stream(self, n: int) -> float:
        """Seconds to submit ``n`` requests at once and receive the ``n`` replies."""
        t0 = time.perf_counter()
        for _ in range(n):
            self.send()
        for _ in range(n):
            self.receive()
        return time.perf_counter() - t0


def _spawn(key: bytes, *args: str) -> subprocess.Popen:
    """``python -m benchmarks.floor ARGS``; the key travels by environment, not argv."""
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.floor", *args],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "FLOOR_KEY": key.decode()},
    )


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


def _expect(proc: subprocess.Popen, word: str) -> list[str]:
    """The next line the relay prints, which must start with ``word``."""
    line = proc.stdout.readline() if proc.stdout is not None else ""
    fields = line.split()
    if not fields or fields[0] != word:
        raise RuntimeError(f"floor relay printed {line!r}, expected {word!r} (exit code {proc.poll()})")
    return fields[1:]


@contextmanager
def floor_pipeline(engines: int = 1, hwm: int = 1) -> Iterator[FloorClient]:
    """Start a relay and ``engines`` engines; yield the connected client; stop them all.

    The caller bounds the time (the harness's deadline interrupts a stuck read).
    """
    key = secrets.token_hex(32).encode()
    with ExitStack() as stack:
        relay = _spawn(key, "relay", "--engines", str(engines), "--hwm", str(hwm))
        stack.callback(_stop, relay)
        front, back = _expect(relay, "ports")
        for _ in range(engines):
            stack.callback(_stop, _spawn(key, "engine", f"tcp://127.0.0.1:{back}"))
        _expect(relay, "ready")
        client = FloorClient(key, f"tcp://127.0.0.1:{front}")
        stack.callback(client.close)
        client.round_trip()  # the connection is up before anything is timed
        yield client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    relay = sub.add_parser("relay")
    relay.add_argument("--engines", type=int, default=1)
    relay.add_argument("--hwm", type=int, default=1)
    engine = sub.add_parser("engine")
    engine.add_argument("url")
    args = parser.parse_args(argv)
    key = os.environ["FLOOR_KEY"].encode()
    if args.role == "relay":
        run_relay(key, args.engines, args.hwm)
    else:
        run_engine(key, args.url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
