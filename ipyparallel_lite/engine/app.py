"""``ipengine-lite``: an engine process, an IPython kernel connected to a controller.

Start-up: read the connection info (a file, or ``$IPP_LITE_CONNECTION_INFO``), send
``registration_request`` and wait for the id, connect the shell, control, iopub and
heartbeat channels, then say ``engine_ready`` on shell and control. The controller
counts the engine as ready when both arrive, so no heartbeat period is waited for.

The heartbeat is echoed by libzmq in its own thread (no GIL), so an engine busy in a
long computation still counts as alive.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

import zmq
from ipykernel.kernelapp import IPKernelApp
from IPython.core.profiledir import ProfileDir
from traitlets import DottedObjectName, Float, Integer, Type, Unicode
from zmq.devices import ThreadDevice
from zmq.utils.monitor import recv_monitor_message

from ipyparallel_lite import fastzmq
from ipyparallel_lite._version import __version__
from ipyparallel_lite.baseapp import ParallelApp, common_aliases, common_flags, run_app
from ipyparallel_lite.cluster.launcher import watch_parent
from ipyparallel_lite.connection import (
    CONNECTION_INFO_ENV,
    MAX_MESSAGE_BYTES,
    connection_file_path,
    controller_window,
    curve_client_options,
    heartbeat_options,
    load_connection_file,
    make_session,
    mux_client_options,
    set_device_options,
    set_options,
    url,
)
from ipyparallel_lite.engine.kernel import EngineKernel, MainThreadShell
from ipyparallel_lite.engine.session import EngineSession
from ipyparallel_lite.engine.stream import ShellStream
from ipyparallel_lite.versions import versions


def engine_info() -> dict:
    """What an engine says of itself at registration, to catch version skew early."""
    return {
        **versions(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }


#: where MPI runtimes put a process's rank and the number of ranks (OpenMPI, MPICH/Hydra, PMIx)
MPI_RANK_ENV = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
MPI_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def mpi_rank() -> tuple[int, int] | None:
    """(rank, size) when this process is an MPI rank, read from the runtime's environment."""
    rank = next((os.environ[k] for k in MPI_RANK_ENV if k in os.environ), None)
    size = next((os.environ[k] for k in MPI_SIZE_ENV if k in os.environ), None)
    if rank is None or size is None or not (rank.isdigit() and size.isdigit()):
        return None
    return int(rank), int(size)


class RegistrationFailed(RuntimeError):
    pass


class IPEngine(ParallelApp, IPKernelApp):
    """An engine: ``c.IPEngine.<name>`` (ipyparallel's name) or ``c.EngineApp.<name>``.

    It reads the profile's ``ipython_config.py`` and ``ipengine_config.py`` and runs
    the profile's ``startup/`` files, ``startup_command`` and ``startup_script``.
    """

    name = "ipengine-lite"
    version = __version__
    description = "Start an ipyparallel_lite engine connected to a running controller."
    log_file_prefix = "ipengine"
    read_ipython_config = True

    kernel_class = Type(EngineKernel, klass="ipykernel.kernelbase.Kernel").tag(config=True)
    outstream_class = DottedObjectName("ipyparallel_lite.engine.kernel.EngineOutStream").tag(config=True)
    url_file = Unicode("", help="Engine connection file of the controller.").tag(config=True)
    engine_id = Integer(-1, help="Engine id to ask for (-1: the controller picks).").tag(config=True)
    registration_timeout = Float(30.0, help="Seconds to wait for the controller.").tag(config=True)
    controller_timeout = Float(
        30.0, help="Seconds an engine waits for a lost controller (dead, or silent for its "
        "heartbeat window) to come back before it exits. A controller restarted in that time "
        "with --restore is joined again, with the engine's id and namespace; 0: exit at once."
    ).tag(config=True)
    engine_set = Unicode(
        "", help="Id of the engine set this engine was started with (the MPI launcher sets "
                 "it): the controller gives the ranks of one set consecutive ids in rank "
                 "order.").tag(config=True)
    startup_command = Unicode("", help="Code every engine runs once it is connected.").tag(config=True)
    startup_script = Unicode("", help="A script every engine runs once it is connected.").tag(config=True)

    classes = [ProfileDir]
    subcommands = {}
    aliases = {
        **common_aliases,
        "file": "IPEngine.url_file",
        "cluster-id": "ParallelApp.cluster_id",
        "id": "IPEngine.engine_id",
        "timeout": "IPEngine.registration_timeout",
    }
    flags = common_flags

    def _config_file_name_default(self) -> str:
        return "ipengine_config.py"

    def load_info(self) -> dict:
        env = os.environ.get(CONNECTION_INFO_ENV)
        if env and not self.url_file:
            return json.loads(env)
        path = self.url_file or connection_file_path(
            "engine", cluster_id=self.cluster_id, profile_dir_path=self.profile_dir.location
        )
        # a cluster starts engines and controller together: wait for the controller's file
        deadline = time.monotonic() + self.registration_timeout
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not os.path.exists(path):
            raise RegistrationFailed(
                f"no controller: its connection file {path} did not appear within "
                f"{self.registration_timeout:g}s. Start one (`ipcluster-lite start` or "
                "`ipcontroller-lite`), or name its file with --file."
            )
        try:
            return load_connection_file(path)
        except ValueError as e:
            raise RegistrationFailed(str(e)) from None

    # IPKernelApp writes and binds its own connection: an engine connects instead
    def init_connection_file(self) -> None:
        self.info = self.load_info()
        self.session = make_session(self.info["key"], session_class=EngineSession)
        self.session.session = self.ident = str(uuid.uuid4())
        try:
            #: CURVE options of every socket to the controller (empty if it does not encrypt)
            self.curve = curve_client_options(self.info)
        except RuntimeError as e:
            raise RegistrationFailed(str(e)) from None

    def write_connection_file(self, **kwargs: Any) -> None:
        pass

    def log_connection_info(self) -> None:
        pass

    def init_poller(self) -> None:
        self.poller = None

    def register(self, requested: int | None = None) -> dict:
        """Ask the controller for an id (``requested``, else ``engine_id`` if set); its reply."""
        sock = set_options(self.context.socket(zmq.DEALER), self.curve)
        sock.linger = 0
        sock.connect(url(self.info, "registration"))
        if requested is None and self.engine_id >= 0:
            requested = self.engine_id
        info = engine_info()
        rank = mpi_rank()
        if rank is not None:
            info["mpi_rank"], info["mpi_size"] = rank
            if self.engine_set:
                info["engine_set"] = self.engine_set
        content = {"uuid": self.ident, "id": requested, "info": info}
        self.session.send(sock, "registration_request", content)
        if not sock.poll(int(self.registration_timeout * 1000)):
            raise RegistrationFailed(
                f"No answer from the controller at {url(self.info, 'registration')} within "
                f"{self.registration_timeout:g}s. Is it running? Is the connection file current?"
            )
        _, reply = self.session.recv(sock, mode=0)
        sock.close()
        content = reply["content"]
        if content.get("status") != "ok":
            raise RegistrationFailed(f"registration refused: {content.get('evalue')}")
        return content

    def init_sockets(self) -> None:
        self.context = ctx = zmq.Context()
        reply = self.register()
        self.eid = reply["id"]
        info = reply.get("connection_info") or self.info
        ident = self.ident.encode()

        self.shell_socket = set_options(fastzmq.socket(ctx, zmq.DEALER), self.curve)
        # ZMTP heartbeats: a controller that hangs without closing the connection
        # (stopped, or a cut network) drops it, and counts as gone, like a dead one. On
        # control, which carries only small messages: a ping waits behind a message
        # being transferred, and a big request or result may take longer than the window
        self.control_socket = set_options(fastzmq.socket(ctx, zmq.DEALER), {
            **self.curve, **heartbeat_options(info, controller_window(info))})
        # direct requests come through the controller's mux device, which routes by this
        # identity: connected before the engine says it is ready, or the first ones drop
        self.mux_socket = set_options(fastzmq.socket(ctx, zmq.DEALER), mux_client_options(info))
        self._connect_mux(ident, url(info, "mux"))
        for sock, channel in ((self.shell_socket, "shell"), (self.control_socket, "control")):
            sock.identity = ident
            sock.linger = 1000
            sock.connect(url(info, channel))
            self.session.send(sock, "engine_ready", {"id": self.eid})
        self.stdin_socket = None
        self.debugpy_socket = ctx.socket(zmq.STREAM)
        self.debug_shell_socket = ctx.socket(zmq.DEALER)
        from ipykernel.control import ControlThread
        from ipykernel.iostream import IOPubThread

        self.control_thread = ControlThread(daemon=True)
        self.shell_channel_thread = MainThreadShell()
        iopub = set_options(fastzmq.socket(ctx, zmq.PUB), self.curve)
        iopub.linger = 1000
        iopub.connect(url(info, "iopub"))
        self.iopub_thread = IOPubThread(iopub, pipe=True, session=self.session)
        self.iopub_thread.start()
        self.iopub_socket = self.iopub_thread.background_socket
        self._ports = {}
        self.controller_info = info
        # back means a completed handshake: a stopped process's kernel still accepts TCP
        self._watch_controller(self.control_socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED))
        atexit.register(self.unregister)

    def _connect_mux(self, ident: bytes, address: str) -> None:
        """Connect the mux socket and wait for its handshake (up to the registration
        timeout): the device drops what it cannot route to a connected engine. A thread
        keeps ``_mux_up`` set while it is connected, for :meth:`rejoin` too."""
        sock = self.mux_socket
        sock.identity = ident
        sock.linger = 1000
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        up = self._mux_up = threading.Event()

        def watch() -> None:
            while True:
                try:
                    event = recv_monitor_message(monitor)["event"]
                except zmq.ZMQError:  # the engine is closing
                    return
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    up.set()
                else:
                    up.clear()

        threading.Thread(target=watch, name="ipp-lite-mux-watch", daemon=True).start()
        sock.connect(address)
        if not up.wait(self.registration_timeout):
            raise RegistrationFailed(f"the controller's mux channel at {address} did not "
                                     f"answer within {self.registration_timeout:g}s")

    def _watch_controller(self, monitor: zmq.Socket) -> None:
        """Exit when the controller is gone for ``controller_timeout`` seconds.

        An engine whose controller crashed would otherwise live on, unreachable. One
        restarted in time with ``--restore`` (same ports and key) is joined again instead:
        it tells this engine to register again (see :meth:`rejoin`).
        """
        grace = self.controller_timeout
        log = self.log

        def watch() -> None:
            lost_since = None
            while True:
                if monitor.poll(500):
                    event = recv_monitor_message(monitor)["event"]
                    if event == zmq.EVENT_DISCONNECTED:
                        lost_since = lost_since or time.monotonic()
                    elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        lost_since = None
                if lost_since is not None and time.monotonic() - lost_since > grace:
                    log.critical("the controller is gone since %.0fs; this engine exits", grace)
                    os._exit(1)

        threading.Thread(target=watch, name="ipp-lite-controller-watch", daemon=True).start()

    def rejoin(self) -> str | None:
        """Register again with a controller restarted with ``--restore``, under this
        engine's id, and say ``engine_ready`` on shell and control, so it is ready again
        with its namespace as it was; None when done, else why not. Runs on the main
        thread, which owns the shell socket; the control thread sends on its own."""
        try:
            self.register(requested=self.eid)
        except (RegistrationFailed, zmq.ZMQError) as e:
            return str(e)
        # the mux socket reconnects by itself, maybe not yet: the device would drop
        # the direct requests clients send once this engine says it is ready
        if not self._mux_up.wait(self.registration_timeout):
            return f"its mux channel did not reconnect within {self.registration_timeout:g}s"
        kernel = self.kernel
        self.session.send(kernel.shell_stream, "engine_ready", {"id": self.eid})
        kernel.control_stream.io_loop.add_callback(
            self.session.send, kernel.control_stream, "engine_ready", {"id": self.eid})
        return None

    def init_heartbeat(self) -> None:
        info = self.controller_info
        self.heart = ThreadDevice(zmq.FORWARDER, zmq.SUB, zmq.DEALER)
        self.heart.daemon = True
        self.heart.setsockopt_in(zmq.SUBSCRIBE, b"")
        self.heart.setsockopt_in(zmq.LINGER, 0)
        self.heart.setsockopt_out(zmq.IDENTITY, self.ident.encode())
        self.heart.setsockopt_out(zmq.LINGER, 0)
        set_device_options(self.heart, self.curve)
        self.heart.connect_in(url(info, "hb_ping"))
        self.heart.connect_out(url(info, "hb_pong"))
        self.heart.start()

    def init_kernel(self) -> None:
        # run by IPKernelApp's init_code after the profile's startup/ files
        if self.startup_command:
            self.exec_lines = [*self.exec_lines, self.startup_command]
        if self.startup_script:
            self.exec_files = [*self.exec_files, self.startup_script]
        if "hist_file" not in self.config.HistoryManager:
            # engines are many and short-lived: one shared history.sqlite written after
            # every cell by each of them costs more than the cell (%history still works)
            self.config.HistoryManager.hist_file = ":memory:"
        super().init_kernel()
        kernel = self.kernel
        # ipykernel made a plain ZMQStream for the shell socket: swap in the lean one
        plain = kernel.shell_stream
        plain.io_loop.remove_handler(plain.socket)
        kernel.shell_stream = ShellStream(self.shell_socket, plain.io_loop)
        kernel.mux_stream = ShellStream(self.mux_socket, plain.io_loop, routed=True)
        kernel.ident = self.ident
        kernel.engine_id = self.eid
        kernel.int_id = self.eid  # ipykernel puts int_id in execute errors' engine_info
        kernel.engine_info = {"engine_id": self.eid, "engine_uuid": self.ident, **engine_info()}
        kernel.max_message_bytes = self.controller_info.get(MAX_MESSAGE_BYTES)
        kernel.rejoin = self.rejoin
        topic = f"engine.{self.eid}."
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "topic"):
                stream.topic = (topic + stream.name).encode()
        if hasattr(self, "displayhook") and hasattr(self.displayhook, "topic"):
            self.displayhook.topic = (topic + "execute_result").encode()
        if kernel.shell is not None and hasattr(kernel.shell, "display_pub"):
            kernel.shell.display_pub.topic = (topic + "displaypub").encode()
        self.log.info("engine %d connected (uuid %s)", self.eid, self.ident)

    _bound_connection_file: str | None = None

    def bind_kernel(self, ip: str = "127.0.0.1") -> str:
        """Bind kernel sockets on ``ip`` so a Jupyter frontend can use this engine as a
        kernel (``ipp.bind_kernel``); the path of the connection file written for it.

        Shell and stdin are new ROUTER sockets served on the kernel's loop, iopub is the
        engine's PUB socket bound a second time (frontends see the cluster's output
        too, as IPython parallel's bound engines do), and the heartbeat is ipykernel's.
        The control port is bound but not served: interrupt the engine through the
        cluster (``rc.send_signal``, ``ar.abort()``). The file holds the cluster's key:
        it is written readable by its owner only, and removed when the engine exits.
        """
        if self._bound_connection_file is not None:
            return self._bound_connection_file
        from ipykernel.heartbeat import Heartbeat
        from jupyter_client.connect import write_connection_file
        from jupyter_core.paths import jupyter_runtime_dir
        from zmq.eventloop.zmqstream import ZMQStream

        address = f"tcp://{ip}"
        ports = {"iopub_port": self._bind_iopub(address)}
        sockets = {}
        for channel in ("shell", "stdin", "control"):
            sock = sockets[channel] = self.context.socket(zmq.ROUTER)
            sock.linger = 1000
            ports[f"{channel}_port"] = sock.bind_to_random_port(address)
        heartbeat = Heartbeat(self.context, ("tcp", ip, 0))
        heartbeat.start()
        ports["hb_port"] = heartbeat.port
        kernel = self.kernel
        kernel.stdin_socket = sockets["stdin"]
        kernel.serve_frontend(ZMQStream(sockets["shell"], kernel.shell_stream.io_loop))
        runtime_dir = jupyter_runtime_dir()
        os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
        path, _ = write_connection_file(
            os.path.join(runtime_dir, f"kernel-{os.getpid()}.json"), ip=ip, key=self.session.key,
            signature_scheme=self.session.signature_scheme, **ports)
        _remove_at_exit(path)
        self._bound_connection_file = path
        self.log.info("engine %s bound as a kernel; to connect a frontend: jupyter console "
                      "--existing %s", self.eid, path)
        return path

    def _bind_iopub(self, address: str) -> int:
        """Bind the engine's iopub socket (it also stays connected to the controller) to a
        random port of ``address``, on the iopub thread that owns it; the port."""
        bound: list = []
        done = threading.Event()

        def bind() -> None:
            try:
                bound.append(self.iopub_thread.socket.bind_to_random_port(address))
            except Exception as e:
                bound.append(e)
            done.set()

        self.iopub_thread.io_loop.add_callback(bind)
        if not done.wait(10):
            raise RuntimeError("the engine's iopub thread did not answer within 10s")
        if isinstance(bound[0], Exception):
            raise bound[0]
        return bound[0]

    def unregister(self) -> None:
        """Tell the controller this engine leaves, so its tasks fail over at once."""
        try:
            sock = set_options(self.context.socket(zmq.DEALER), self.curve)
            sock.linger = 200
            sock.connect(url(self.controller_info, "registration"))
            self.session.send(sock, "unregistration_request", {"id": self.eid})
            sock.close()
        except Exception:
            pass


def _remove_at_exit(path: str) -> None:
    """Remove ``path`` when this process exits, normally or by SIGTERM (how clusters stop
    engines), after which SIGTERM still ends the process as before."""

    def remove() -> None:
        with contextlib.suppress(OSError):
            os.remove(path)

    atexit.register(remove)
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        remove()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


class EngineApp(IPEngine):
    """The ``ipengine-lite`` command (``c.EngineApp`` and ``c.IPEngine`` both apply)."""


def main(argv: list[str] | None = None) -> None:
    watch_parent()
    app = EngineApp.instance()
    try:
        run_app(app, argv)
    except RegistrationFailed as e:
        print(f"ipengine-lite: {e}", file=sys.__stderr__)
        sys.exit(1)
    app.start()


if __name__ == "__main__":
    main()
