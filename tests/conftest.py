"""Shared fixtures: a private IPython dir, one session cluster, and a stray-process check.

Every test runs against real processes on 127.0.0.1. The session cluster is shared by
tests that leave engines intact; tests that kill or stop things start their own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import psutil
import pytest

# A shell starts a background job with SIGINT ignored, and Python then leaves it ignored
# instead of raising KeyboardInterrupt: the tests' simulated Ctrl-C (_thread.interrupt_main,
# as a terminal or Jupyter would send) would do nothing. The handler a foreground Python has:
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# before anything imports IPython: keep ~/.ipython untouched
_IPYTHON_DIR = tempfile.mkdtemp(prefix="ipp-lite-tests-")
os.environ["IPYTHONDIR"] = _IPYTHON_DIR

import zmq  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from traitlets.config import Config  # noqa: E402

import ipyparallel_lite as ipp  # noqa: E402
from ipyparallel_lite.connection import mux_client_options, set_options, url  # noqa: E402
from ipyparallel_lite.serialization import pack_apply_message  # noqa: E402

OUR_MODULES = ("ipyparallel_lite.engine", "ipyparallel_lite.controller")


def our_processes() -> list[psutil.Process]:
    """Controller and engine processes started by this test session."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if any(m in cmdline for m in OUR_MODULES):
            found.append(proc)
    return found


def ipcluster(ipdir: str, *args: str, timeout: float = 90, **kwargs) -> subprocess.CompletedProcess:
    """``ipcluster-lite *args`` with its own IPython dir ``ipdir``, output captured;
    ``env`` adds to the environment."""
    env = {**os.environ, "IPYTHONDIR": ipdir, **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "ipyparallel_lite.cluster", *args,
                           "--ipython-dir", ipdir], env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (for the servers tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_gone(pids: set[int], timeout: float = 30) -> set[int]:
    """Wait up to ``timeout`` s for the processes ``pids`` to end (a zombie counts as
    ended); those still running."""
    import time

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # gone, also between looking it up and reading it
            return False

    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if running(p)}
        time.sleep(0.1)
    return alive


@pytest.fixture(scope="session", autouse=True)
def no_stray_processes():
    """After the whole session, no controller or engine may be left running, and the
    private IPython dir (logs, connection files, SQLite records: hundreds of MB after a
    run) is removed."""
    yield
    strays = [p for p in our_processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for proc in strays:
        proc.kill()
    try:
        assert not strays, f"processes left running after the tests: {[p.cmdline() for p in strays]}"
    finally:
        wait_gone({p.pid for p in strays}, timeout=10)
        shutil.rmtree(_IPYTHON_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def sigint_left_alone(request):
    """Each test finds the process's Ctrl-C handler as the one before it did: a handler
    left ignored, default, or raising nothing takes the simulated Ctrl-C of later tests
    (``_thread.interrupt_main`` does nothing while SIGINT is ignored). The handler is put
    back after each test, and a warning names the test that changed it (code of ours
    that did would break Ctrl-C for a user)."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        warnings.warn(f"{request.node.nodeid} left the SIGINT handler changed: {before!r} -> "
                      f"{after!r}; put back", stacklevel=1)


@pytest.fixture(scope="session")
def ipython_dir() -> str:
    return _IPYTHON_DIR


@pytest.fixture(scope="module")
def shell():
    """A real InteractiveShell, removed again after the module (it is a process singleton)."""
    if InteractiveShell.initialized():
        yield InteractiveShell.instance()
        return
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    yield ip
    atexit.unregister(ip.atexit_operations)
    ip.atexit_operations()
    ip.cleanup()
    InteractiveShell.clear_instance()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on the session cluster reports what the controller holds and its
    log's end: a task left running there by an earlier test shows up as a later test's
    timeout, and the CI's output is all there is to go on."""
    outcome = yield
    report = outcome.get_result()
    client, shared = item.funcargs.get("rc"), item.funcargs.get("cluster")
    if report.when != "call" or not report.failed or client is None:
        return
    try:
        status = client.queue_status(verbose=True)
    except Exception as e:  # the controller itself may be what failed
        status = f"queue_status failed: {type(e).__name__}: {e}"
    report.sections.append(("session cluster: queue_status", repr(status)))
    if shared is not None:
        report.sections.append(("session cluster: controller log", shared.controller.output(60)))


@pytest.fixture(scope="session")
def cluster():
    """A 2-engine cluster shared by the session (tests must not kill its engines)."""
    c = ipp.Cluster(n=2, cluster_id="session")
    c.start_cluster_sync()
    yield c
    c.stop_cluster_sync()


@pytest.fixture(scope="session")
def rc(cluster):
    client = cluster.connect_client_sync()
    client.wait_for_engines(2, timeout=60)
    yield client
    client.close()


@pytest.fixture
def dv(rc):
    view = rc[:]
    view.block = True
    return view


@pytest.fixture
def lview(rc):
    return rc.load_balanced_view()


@pytest.fixture
def own_cluster():
    """A fresh 2-engine cluster for a test that kills or stops things."""
    clusters = []

    def start(n: int = 2, **kwargs):
        c = ipp.Cluster(n=n, **kwargs)
        clusters.append(c)
        return c, c.start_and_connect_sync()

    yield start
    for c in clusters:
        c.stop_cluster_sync()


@pytest.fixture(autouse=True, scope="module")
def pickle_test_module_by_value(request):
    """Engines cannot import test modules: send their functions by value."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(request.module)
    yield
    cloudpickle.unregister_pickle_by_value(request.module)


def channel_socket(ctx: zmq.Context, info: dict, channel: str, kind: int = zmq.DEALER,
                   keyed: bool = True, **options: int) -> zmq.Socket:
    """A bare socket connected to a controller channel, for sending it whatever a test
    likes; on ``mux`` with the key's credentials unless not ``keyed`` (the device lets in
    no one else). ``options``: socket options set before connecting (``rcvhwm=1``)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name.upper()), value)
    if channel == "mux" and keyed:
        set_options(sock, mux_client_options(info))
    sock.connect(url(info, channel))
    return sock


def apply_request(session, f, *args, ident: list[bytes] | None = None,
                  metadata: dict | None = None) -> tuple[str, list]:
    """A signed ``apply_request`` of ``f(*args)`` for a raw socket: its msg_id and frames
    (``ident``: routing identities in front, such as an engine's uuid on ``mux``)."""
    msg = session.msg("apply_request", {}, metadata=metadata)
    return msg["header"]["msg_id"], session.serialize(msg, ident=ident) + pack_apply_message(f, args, {})


def next_reply(sock: zmq.Socket, session, timeout: float = 30.0) -> dict:
    """The next message on a raw socket, verified and unpacked (routing identities dropped)."""
    assert sock.poll(timeout * 1000), f"no reply within {timeout}s"
    _, frames = session.feed_identities(sock.recv_multipart())
    return session.deserialize(frames)


@pytest.fixture
def raw_socket():
    """:func:`channel_socket`, for tests that take it as a fixture."""
    return channel_socket


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> float:
    """Seconds until ``condition()`` holds, checked every 10 ms; fails naming ``what``
    after ``timeout``."""
    start = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed < timeout, f"{what} not met within {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - start


def record_sends(client: ipp.Client, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """``(channel, number of messages)`` for each batch ``client`` queues from now on."""
    sent: list[tuple[str, int]] = []
    real_submit = client.transport.submit

    def counting_submit(channel, messages, result, **kwargs):
        sent.append((channel, len(messages)))
        return real_submit(channel, messages, result, **kwargs)

    monkeypatch.setattr(client.transport, "submit", counting_submit)
    return sent


@pytest.fixture
def sent_messages(rc, monkeypatch):
    """:func:`record_sends` of the session's client ``rc``."""
    return record_sends(rc, monkeypatch)
