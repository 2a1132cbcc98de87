"""``ipcontroller-lite``: run a controller, writing its connection files.

Configured as every command here (:mod:`ipyparallel_lite.baseapp`): ``--profile``,
``--profile-dir``, ``--cluster-id``, ``--debug``, ``--Class.trait=value``, and the
profile's ``ipcontroller_config.py``. The names follow ipyparallel where the concept is
the same: ``c.IPController.ip``, ``c.TaskScheduler.scheme_name``,
``c.TaskScheduler.hwm``; ``c.ControllerApp.<name>`` works too.

Task records: ``store_class`` ``memory`` (default, spilling to a temporary SQLite
file when full), ``sqlite`` (``--sqlitedb``: durable, in ``sqlite_path``) or ``none``
(``--nodb``). ``--restore`` (with ``--sqlitedb``) restarts a controller that died: the
same ports and key as its connection files say, its records, and its unfinished tasks
recorded as lost.

``--curve`` (``c.IPController.enable_curve``) encrypts every channel with CurveZMQ: a
server keypair made at start (taken back by ``--restore``), its public key in both
connection files (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import resource
import signal
import sys
import threading
from pathlib import Path

import zmq
from IPython.core.application import BaseIPythonApplication
from IPython.core.profiledir import ProfileDir
from traitlets import Bool, CaselessStrEnum, Float, Integer, Unicode
from traitlets.config import Configurable

from ipyparallel_lite._version import __version__
from ipyparallel_lite.baseapp import ParallelApp, common_aliases, common_flags, run_app
from ipyparallel_lite.cluster.launcher import watch_parent
from ipyparallel_lite.connection import (
    CONTROLLER_FILES,
    connect_address,
    connection_file_path,
    load_connection_file,
    make_session,
    new_key,
    require_curve,
    write_connection_file,
    write_private_file,
)
from ipyparallel_lite.controller.hub import Hub
from ipyparallel_lite.controller.scheduler import SCHEMES
from ipyparallel_lite.controller.scheduler import TaskScheduler as SchedulerCore
from ipyparallel_lite.controller.server import Controller, PortTaken
from ipyparallel_lite.controller.state import CLIENT_WINDOW
from ipyparallel_lite.controller.store import STORE_CLASSES, make_store
from ipyparallel_lite.prefetch import PREFETCH_MAX


class TaskScheduler(Configurable):
    """Settings of the load-balancing scheduler, under ipyparallel's names."""

    scheme_name = CaselessStrEnum(SCHEMES, default_value="leastload",
                                  help="Task scheduling scheme.").tag(config=True)
    hwm = Integer(1, help="Outstanding tasks allowed per engine (0: no limit).").tag(config=True)
    prefetch = Bool(True, help="While an engine's tasks finish in well under a round trip, "
                    f"place up to {PREFETCH_MAX} more than hwm on it, and steal back tasks it has not begun "
                    "when another engine is idle or its running task runs long. False: at most "
                    "hwm per engine, as in ipyparallel.").tag(config=True)


#: python_nice's default. A %px on 4 engines of a 2-core machine took 3.27 ms with the
#: controller's Python at nice 10 against 3.98 ms at 0 (medians of 4 alternating rounds):
#: the Hub reads the device's copy of each request and reply while the engines run them
PYTHON_NICE = 10


def lower_thread_priority(nice: int, log: logging.Logger) -> None:
    """Add ``nice`` to the calling thread's niceness, on Linux, where niceness belongs to a
    thread (elsewhere it would slow the whole process, the devices too)."""
    if not nice or not sys.platform.startswith("linux"):
        return
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except OSError as e:
        log.warning("could not lower the controller's Python thread's priority: %s", e)


class IPController(ParallelApp, BaseIPythonApplication):
    name = "ipcontroller-lite"
    version = __version__
    description = "Start an ipyparallel_lite controller (Hub and schedulers in one process)."
    log_file_prefix = "ipcontroller"

    ip = Unicode("127.0.0.1", help="Interface every channel binds to ('0.0.0.0' or '*': all "
                                   "of them).").tag(config=True)
    location = Unicode(
        "", help="Address clients and engines connect to, written in the connection files "
                 "(default: ip, or this host's reachable address when ip is every "
                 "interface; never a loopback address then).").tag(config=True)
    hb_period = Float(1.0, help="Heartbeat period in seconds.").tag(config=True)
    hb_max_misses = Integer(5, help="Missed heartbeats after which an engine is dead.").tag(config=True)
    record_limit = Integer(
        1024, help="Task records the Hub keeps in memory; the oldest finished ones go first."
    ).tag(config=True)
    size_limit = Integer(
        1 << 30, help="Bytes of buffers (arguments and results) and output text the Hub keeps "
        "in memory; past it the records finished longest ago spill to SQLite. "
        "rc.purge_results('all') or rc.purge_everything() frees them."
    ).tag(config=True)
    remember_finished = Integer(
        10_000, help="Finished tasks that new tasks may still name as dependencies."
    ).tag(config=True)
    version_check = CaselessStrEnum(
        ["refuse", "warn", "off"], default_value="refuse",
        help="An engine whose Python, cloudpickle or ipyparallel_lite minor version, or pickle "
             "protocol, would break unpickling: refuse it, admit it with a warning, or don't check.",
    ).tag(config=True)
    peer_queue_bytes = Integer(
        64 << 20, help="Bytes that may wait for one client or engine that does not read, before "
                       "its replies wait in the Hub's records instead.",
    ).tag(config=True)
    client_window = Integer(
        CLIENT_WINDOW, min=0, help="Requests one client may have waiting in the controller (received, "
                                   "not yet answered); one more is refused at once with a "
                                   "TooManyPendingTasks error. Announced to clients, which keep "
                                   "the rest in their own process. 0: no limit.",
    ).tag(config=True)
    max_message_bytes = Integer(
        1 << 30, help="The largest message part (one buffer, or a message's JSON content) a "
        "client or engine may send, in bytes; 0 for no limit. Applied as zmq's MAXMSGSIZE to "
        "every socket the controller binds: a peer sending a bigger part is disconnected "
        "before it is buffered. Clients and engines learn it from the connection files and "
        "refuse to send a bigger part, with an error naming both sizes.",
    ).tag(config=True)
    enable_curve = Bool(
        False, help="Encrypt every channel with CurveZMQ: the controller's public key goes into "
                    "the connection files; clients and engines pick it up from there.",
    ).tag(config=True)
    write_files = Bool(True, help="Write connection files (off when info travels otherwise).").tag(config=True)
    python_nice = Integer(
        PYTHON_NICE, min=0, max=19,
        help="Niceness added to the controller's Python thread (the Hub's records, the "
        "schedulers, queries), not to the devices in C that relay direct requests, claimed "
        "tasks and output. On a machine whose cores the engines and clients keep busy, the "
        "Hub's record-keeping then waits for them, not they for it. Linux only; 0 leaves it "
        "as the rest of the process.",
    ).tag(config=True)
    store_class = CaselessStrEnum(
        STORE_CLASSES, default_value="memory",
        help="Where the Hub keeps task records: memory (bounded, spills to SQLite), sqlite "
        "(durable: needed for --restore; earlier records of the cluster stay), none.",
    ).tag(config=True)
    sqlite_path = Unicode(
        "", help="SQLite file of the task records (default: the profile's security/ folder, "
        "named after the cluster)."
    ).tag(config=True)
    record_output = Bool(
        True, help="Record what tasks print and return (stdout, stderr, execute_input, "
        "execute_result, error) in the Hub's task records, from the engines' iopub; off "
        "leaves those keys None and saves the controller reading every output message."
    ).tag(config=True)
    output_limit = Integer(
        1 << 20, help="Characters of stdout, stderr and execute_input (and bytes of an "
        "execute_result or error) the Hub keeps per task; more is cut, with a marker."
    ).tag(config=True)
    restore = Bool(
        False, help="Restart a controller that died: reuse the ports and key of its connection "
        "files and its SQLite records (with store_class=sqlite)."
    ).tag(config=True)

    classes = [ProfileDir, TaskScheduler]
    aliases = {
        **common_aliases,
        "ip": "IPController.ip",
        "location": "IPController.location",
        "cluster-id": "ParallelApp.cluster_id",
        "scheme": "TaskScheduler.scheme_name",
        "hwm": "TaskScheduler.hwm",
        "hb-period": "IPController.hb_period",
        "version-check": "IPController.version_check",
        "store": "IPController.store_class",
    }
    flags = {
        **common_flags,
        "sqlitedb": ({"IPController": {"store_class": "sqlite"}},
                     "Keep task records in SQLite (durable; needed for --restore)."),
        "curve": ({"IPController": {"enable_curve": True}},
                  "Encrypt every channel with CurveZMQ (keys in the connection files)."),
        "nodb": ({"IPController": {"store_class": "none"}}, "Keep no task records."),
        "restore": ({"IPController": {"restore": True}},
                    "Restart a dead controller with its ports, key and SQLite records."),
    }

    def _config_file_name_default(self) -> str:
        return "ipcontroller_config.py"

    def connection_files(self) -> dict[str, Path]:
        return {
            kind: connection_file_path(kind, cluster_id=self.cluster_id,
                                       profile_dir_path=self.profile_dir.location)
            for kind in CONTROLLER_FILES
        }

    def database_path(self) -> Path:
        if self.sqlite_path:
            return Path(self.sqlite_path)
        client_file = self.connection_files()["client"]
        return client_file.with_name(client_file.name.replace("-client.json", "-tasks.db"))

    def curve_keypair(self) -> tuple[bytes, bytes]:
        """A new CURVE keypair, or with ``--restore`` the one clients and engines know."""
        path = self.connection_files()["curve"]
        if self.restore and path.exists():
            keys = json.loads(path.read_text())
            return keys["public"].encode("ascii"), keys["secret"].encode("ascii")
        if self.restore:
            self.log.warning("--restore --curve: no CURVE keypair of a previous controller at %s; "
                             "a new one (clients and engines must be started again)", path)
        return zmq.curve_keypair()

    def previous_connection(self) -> tuple[str, dict] | None:
        """The key and ports of the controller being restored, from its connection files."""
        files = self.connection_files()
        files.pop("curve")
        if not all(path.exists() for path in files.values()):
            self.log.warning("--restore: no connection files of a previous controller in %s; "
                             "new ports and key (clients and engines must be started again)",
                             files["client"].parent)
            return None
        infos = {kind: load_connection_file(path) for kind, path in files.items()}
        return infos["client"]["key"], {kind: info["ports"] for kind, info in infos.items()}

    def start(self) -> None:
        if self.restore and self.store_class != "sqlite":
            self.log.critical("--restore needs the SQLite store (--sqlitedb): the %s store's "
                              "records died with the previous controller", self.store_class)
            sys.exit(2)
        curve_keypair = None
        if self.enable_curve:
            try:
                require_curve()
            except RuntimeError as e:
                self.log.critical("%s", e)
                sys.exit(1)
            curve_keypair = self.curve_keypair()
        previous = self.previous_connection() if self.restore else None
        scheduling = TaskScheduler(parent=self)
        session = make_session(previous[0] if previous else new_key())
        path = self.database_path() if self.store_class == "sqlite" else None
        store = make_store(self.store_class, path=path, record_limit=self.record_limit,
                           size_limit=self.size_limit)
        hub = Hub(store, hb_period=self.hb_period, max_misses=self.hb_max_misses,
                  version_check=self.version_check, output_limit=self.output_limit)
        scheduler = SchedulerCore(scheme=scheduling.scheme_name, hwm=scheduling.hwm,
                                  prefetch=scheduling.prefetch)
        try:
            location = connect_address(self.ip, self.location)
        except ValueError as e:
            self.log.critical("%s", e)
            sys.exit(1)
        controller = Controller(session, hub, scheduler, ip=self.ip, location=location, log=self.log,
                                remember_finished=self.remember_finished, restored=self.restore,
                                record_output=self.record_output,
                                peer_queue_bytes=self.peer_queue_bytes, curve_keypair=curve_keypair,
                                client_window=self.client_window,
                                max_message_bytes=self.max_message_bytes)
        raise_open_file_limit(self.log)
        try:
            controller.bind(previous[1] if previous else None)
        except PortTaken as e:  # before touching the records a live controller may own
            self.log.critical("%s", e)
            store.close()
            sys.exit(1)
        if path is not None and len(store):
            # records of an earlier controller of this cluster stay queryable; what it
            # never finished is lost, and its record must say so
            lost = hub.mark_lost("The controller died while this task was queued or running; "
                                 "its result is lost. Resubmit it (rc.resubmit).")
            self.log.warning("restored %d task records from %s; %d unfinished tasks recorded as lost",
                             len(store), path, len(lost))
        files = self.connection_files()
        self.log.info("controller of cluster %r (profile %s): scheme %s, hwm %d, listening on %s "
                      "(connect to %s)%s", self.cluster_id, self.profile, scheduling.scheme_name,
                      scheduling.hwm, self.ip, location,
                      " (CurveZMQ encrypted)" if curve_keypair else "")
        try:
            if self.write_files and curve_keypair:
                public, secret = (key.decode("ascii") for key in curve_keypair)
                write_private_file(files["curve"], json.dumps({"public": public, "secret": secret}))
            asyncio.run(self._serve(controller, files))
        finally:
            if self.write_files:
                for path in files.values():
                    path.unlink(missing_ok=True)
            self.log.info("controller stopped")

    async def _serve(self, controller: Controller, files: dict[str, Path]) -> None:
        controller.start()
        # after start(): the devices' threads, started there, keep the process's niceness
        lower_thread_priority(self.python_nice, self.log)
        # this process runs no user code: its collector may be tuned to its own heap, and
        # what start-up built (modules, sockets, the Hub) is never collected again
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, controller.stop)
        if self.write_files:
            # written after the sockets listen, so whoever finds a file can connect
            for kind in ("client", "engine"):
                write_connection_file(files[kind], controller.connection_info(kind))
            self.log.info("connection files: %s", ", ".join(str(files[k]) for k in ("client", "engine")))
        await controller.stopped.wait()


#: the cyclic garbage collector's thresholds in the controller (Python's are 700, 10,
#: 10). A burst of tasks keeps thousands of objects alive for milliseconds (records,
#: messages in flight), and collections every 700 allocations traversed them again and
#: again while finding almost no cycles: 12 µs of CPU per load-balanced task, about 5%
#: of the controller's, against 5 µs with these thresholds and the start-up heap frozen
GC_THRESHOLDS = (10_000, 20, 20)

#: connections each engine keeps open at the controller: shell, control, iopub, and the
#: heartbeat's ping and pong
FILES_PER_ENGINE = 5


def raise_open_file_limit(log: logging.Logger) -> int:
    """Raise this process's soft limit of open files to its hard limit; the limit now.

    Every engine holds FILES_PER_ENGINE connections here, so the usual soft limit of
    1,024 would stop a controller near 200 engines while the hard limit (often 2**19 or
    more) allows thousands; raising the soft limit up to the hard one needs no privilege.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as e:  # e.g. above the kernel's nr_open
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, wanted, e)
    log.info("open-files limit %d: room for about %d engines", soft, soft // FILES_PER_ENGINE)
    return soft


class ControllerApp(IPController):
    """The ``ipcontroller-lite`` command (``c.ControllerApp`` and ``c.IPController`` both apply)."""


def main(argv: list[str] | None = None) -> None:
    watch_parent()
    app = ControllerApp.instance()
    run_app(app, argv)
    app.start()


if __name__ == "__main__":
    main()
