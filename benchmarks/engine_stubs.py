"""Many engines in one thread: stubs that speak the engines' real protocol to a real
controller, for registration and heartbeat load that real engine processes (one
IPython kernel each) cannot reach on a small machine.

Each stub does what ``ipengine-lite`` does on the wire, with the same signed Session
messages: ``registration_request`` on its own DEALER (carrying the same ``engine_info``
as an engine), then ``engine_ready`` on its shell and control DEALERs (identity: its
uuid), then it echoes every heartbeat ping from its SUB socket on its heartbeat DEALER,
and at the end ``unregistration_request``. It runs no kernel and answers no requests:
it is a load for the controller's registration and liveness paths, nothing more.

:class:`StubProcess` runs them in a child process (``python -m benchmarks.engine_stubs``),
so that their thousands of sockets and files are not the caller's: each stub holds four
zmq sockets, two open files each.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ipyparallel_lite.connection import (
    curve_client_options,
    load_connection_file,
    make_session,
    set_options,
    url,
)
from ipyparallel_lite.controller.app import raise_open_file_limit
from ipyparallel_lite.engine.app import engine_info

#: zmq sockets one stub keeps open (shell, control, heartbeat in and out), plus the one
#: it registers on
SOCKETS_PER_STUB = 5


@dataclass
class Stub:
    uuid: str
    registration: zmq.Socket
    eid: int | None = None
    #: its shell, control and heartbeat sockets, kept referenced (a collected socket closes)
    sockets: list[zmq.Socket] = field(default_factory=list)


class EngineStubs:
    """``n`` engine stubs registering with the controller of ``info`` (an engine
    connection file's dict), all at once, served by one thread.

    :meth:`start` sends every registration request and returns; :attr:`registered`
    is set once every stub has its id (or :attr:`refused` says why not); heartbeats are
    echoed until :meth:`stop`, which unregisters every stub and closes its sockets.
    """

    def __init__(self, info: dict, n: int):
        self.info = info
        self.n = n
        self.session = make_session(info["key"])
        self.curve = curve_client_options(info)
        self.context = zmq.Context()
        self.context.max_sockets = SOCKETS_PER_STUB * n + 64
        self.stubs: list[Stub] = []
        self.ids: list[int] = []
        self.refused: list[str] = []
        self.registered = threading.Event()
        #: why the stubs' thread stopped, if it failed
        self.error: str | None = None
        self.pings_echoed = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-stubs", daemon=True)

    def _socket(self, kind: int, address: str, identity: bytes | None = None) -> zmq.Socket:
        sock = set_options(self.context.socket(kind), self.curve)
        sock.linger = 0
        if identity is not None:
            sock.identity = identity
        if kind == zmq.SUB:
            sock.subscribe(b"")
        sock.connect(address)
        return sock

    def start(self) -> None:
        """Send all ``n`` registration requests now; the thread takes the replies."""
        info = engine_info()
        for _ in range(self.n):
            stub = Stub(str(uuid.uuid4()), self._socket(zmq.DEALER, url(self.info, "registration")))
            self.session.send(stub.registration, "registration_request",
                              {"uuid": stub.uuid, "id": None, "info": info})
            self.stubs.append(stub)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:  # said by main() instead of a stub thread dying unseen
            self.error = f"{type(e).__name__}: {e}"
            self.registered.set()

    def _serve(self) -> None:
        poller = zmq.Poller()
        registering = {stub.registration: stub for stub in self.stubs}
        echo: dict[zmq.Socket, zmq.Socket] = {}
        for sock in registering:
            poller.register(sock, zmq.POLLIN)
        while not self._stopping.is_set():
            for sock, _ in poller.poll(50):
                if sock in echo:
                    ping = sock.recv(zmq.NOBLOCK)
                    echo[sock].send(ping, zmq.NOBLOCK)
                    self.pings_echoed += 1
                    continue
                stub = registering.pop(sock)
                poller.unregister(sock)
                _, reply = self.session.recv(sock, mode=zmq.NOBLOCK)
                sock.close()
                content = reply["content"]
                if content.get("status") != "ok":
                    self.refused.append(str(content.get("evalue")))
                else:
                    self._connect(stub, content, poller, echo)
                if not registering:
                    self.registered.set()

    def _connect(self, stub: Stub, reply: dict, poller: zmq.Poller,
                 echo: dict[zmq.Socket, zmq.Socket]) -> None:
        """What an engine does once it has its id: shell and control say engine_ready,
        and the heartbeat is echoed."""
        stub.eid = reply["id"]
        self.ids.append(stub.eid)
        ident = stub.uuid.encode()
        info = reply.get("connection_info") or self.info
        for channel in ("shell", "control"):
            sock = self._socket(zmq.DEALER, url(info, channel), ident)
            self.session.send(sock, "engine_ready", {"id": stub.eid})
            stub.sockets.append(sock)
        ping = self._socket(zmq.SUB, url(info, "hb_ping"))
        pong = self._socket(zmq.DEALER, url(info, "hb_pong"), ident)
        stub.sockets += [ping, pong]
        echo[ping] = pong
        poller.register(ping, zmq.POLLIN)

    def stop(self, unregister: bool = True, timeout: float = 30.0) -> None:
        """Stop echoing heartbeats and close every connection. ``unregister``: first send
        ``unregistration_request`` for each stub and wait for the replies, as an engine
        does when it exits; else the stubs just vanish, as engines on a lost host do."""
        if self._thread.is_alive():
            self._stopping.set()
            self._thread.join(timeout)
        if unregister:
            self._unregister(timeout)
        self.context.destroy(linger=0)

    def _unregister(self, timeout: float) -> None:
        leave = self._socket(zmq.DEALER, url(self.info, "registration"))
        for eid in self.ids:
            self.session.send(leave, "unregistration_request", {"id": eid})
        deadline = time.monotonic() + timeout
        replies = 0
        while replies < len(self.ids) and leave.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            leave.recv_multipart()
            replies += 1


# ---- in a child process ---------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


class StubProcess:
    """``n`` stubs in a child process, registering with the controller whose engine
    connection file is ``path``; driven through the child's stdin and stdout."""

    def __init__(self, path: str | os.PathLike, n: int):
        self.n = n
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *sys.path])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.engine_stubs", str(path), str(n)],
            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ids: list[int] = []
        self.refused: list[str] = []
        try:
            #: the child's limit of open files, for when it runs out
            self.open_files_limit = self._answer(60.0)["open_files_limit"]
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def start(self) -> None:
        """Have every stub send its registration request now."""
        self.proc.stdin.write("start\n")
        self.proc.stdin.flush()

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise TimeoutError(f"the engine stubs did not answer within {timeout:g}s "
                               f"(exit code {self.proc.poll()}; open-files limit "
                               f"{getattr(self, 'open_files_limit', '?')})")
        return json.loads(line)

    def _ask(self, command: str, timeout: float) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def wait_registered(self, timeout: float) -> None:
        """Until every stub has its registration reply: :attr:`ids`, :attr:`refused`."""
        answer = self._answer(timeout)
        if answer["error"]:
            raise RuntimeError(f"the engine stubs failed: {answer['error']} (open-files "
                               f"limit {self.open_files_limit})")
        self.ids, self.refused = answer["ids"], answer["refused"]

    def pings_echoed(self, timeout: float = 30.0) -> int:
        return self._ask("pings", timeout)["pings"]

    def stop(self, unregister: bool = True, timeout: float = 60.0) -> None:
        """:meth:`EngineStubs.stop` in the child, which then exits (killed if it does not)."""
        try:
            if self.proc.poll() is None:
                self._ask("stop" if unregister else "vanish", timeout)
            self.proc.wait(timeout)
        except (OSError, TimeoutError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.engine_stubs ENGINE_FILE N``: run N stubs until told on stdin.

    Prints ``{}`` once ready and waits for ``start``; prints ``{"ids", "refused"}``
    once every stub has its registration reply; then answers ``pings``
    with ``{"pings"}``, and ``stop`` (unregister first) or ``vanish`` with ``{}`` and
    exits. Stdin closing (the parent gone) makes the stubs vanish.
    """
    path, n = (argv or sys.argv[1:])[:2]
    # two files per zmq socket (its TCP connection and its mailbox), five sockets per stub
    limit = raise_open_file_limit(logging.getLogger("engine_stubs"))
    stubs = EngineStubs(load_connection_file(path), int(n))
    print(json.dumps({"open_files_limit": limit}), flush=True)
    if sys.stdin.readline().strip() != "start":
        return
    stubs.start()
    stubs.registered.wait()
    print(json.dumps({"ids": stubs.ids, "refused": stubs.refused, "error": stubs.error}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "pings":
            print(json.dumps({"pings": stubs.pings_echoed}), flush=True)
        elif command in ("stop", "vanish"):
            stubs.stop(unregister=command == "stop")
            print("{}", flush=True)
            return
    stubs.stop(unregister=False)


if __name__ == "__main__":
    main()
