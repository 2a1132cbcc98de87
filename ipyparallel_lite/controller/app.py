"""``ipcontroller-lite``: run a controller, writing its connection files.

Configured through traitlets like every Jupyter application: ``--ip``,
``--profile``, ``--cluster-id``, ``--scheme``, ``--hwm``, ``--hb-period`` on the
command line, or ``c.ControllerApp.<name>`` in a config file.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from traitlets import Bool, CaselessStrEnum, Float, Integer, Unicode
from traitlets.config import Application

from ipyparallel_lite._version import __version__
from ipyparallel_lite.applog import LevelFilteredLogging
from ipyparallel_lite.cluster.launcher import watch_parent
from ipyparallel_lite.connection import (
    connection_file_path,
    make_session,
    new_key,
    write_connection_file,
)
from ipyparallel_lite.controller.hub import Hub
from ipyparallel_lite.controller.scheduler import SCHEMES, TaskScheduler
from ipyparallel_lite.controller.server import Controller


class ControllerApp(LevelFilteredLogging, Application):
    name = "ipcontroller-lite"
    version = __version__
    description = "Start an ipyparallel_lite controller (Hub and schedulers in one process)."

    ip = Unicode("127.0.0.1", help="Interface every channel binds to.").tag(config=True)
    profile = Unicode("default", help="IPython profile whose security/ folder gets the files.").tag(config=True)
    cluster_id = Unicode("", help="Names this cluster's connection files.").tag(config=True)
    ipython_dir = Unicode("", help="IPython directory (default: $IPYTHONDIR or ~/.ipython).").tag(config=True)
    scheme = CaselessStrEnum(SCHEMES, default_value="leastload", help="Task scheduling scheme.").tag(config=True)
    hwm = Integer(1, help="Outstanding tasks allowed per engine (0: no limit).").tag(config=True)
    hb_period = Float(1.0, help="Heartbeat period in seconds.").tag(config=True)
    hb_max_misses = Integer(5, help="Missed heartbeats after which an engine is dead.").tag(config=True)
    record_limit = Integer(
        1024, help="Task records the Hub keeps in memory; the oldest finished ones go first."
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
    write_files = Bool(True, help="Write connection files (off when info travels otherwise).").tag(config=True)

    aliases = {
        "ip": "ControllerApp.ip",
        "profile": "ControllerApp.profile",
        "cluster-id": "ControllerApp.cluster_id",
        "ipython-dir": "ControllerApp.ipython_dir",
        "scheme": "ControllerApp.scheme",
        "hwm": "ControllerApp.hwm",
        "hb-period": "ControllerApp.hb_period",
        "version-check": "ControllerApp.version_check",
        "log-level": "Application.log_level",
    }

    def connection_files(self) -> dict[str, Path]:
        return {
            kind: connection_file_path(kind, self.profile, self.cluster_id, self.ipython_dir or None)
            for kind in ("client", "engine")
        }

    def start(self) -> None:
        from ipyparallel_lite.controller.store import MemoryStore

        session = make_session(new_key())
        hub = Hub(MemoryStore(record_limit=self.record_limit), hb_period=self.hb_period,
                  max_misses=self.hb_max_misses, version_check=self.version_check)
        scheduler = TaskScheduler(scheme=self.scheme, hwm=self.hwm)
        controller = Controller(session, hub, scheduler, ip=self.ip, log=self.log,
                                remember_finished=self.remember_finished,
                                peer_queue_bytes=self.peer_queue_bytes)
        controller.bind()
        files = self.connection_files()
        try:
            asyncio.run(self._serve(controller, files))
        finally:
            if self.write_files:
                for path in files.values():
                    path.unlink(missing_ok=True)

    async def _serve(self, controller: Controller, files: dict[str, Path]) -> None:
        controller.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, controller.stop)
        if self.write_files:
            # written after the sockets listen, so whoever finds a file can connect
            for kind, path in files.items():
                write_connection_file(path, controller.connection_info(kind))
            self.log.info("connection files: %s", ", ".join(str(p) for p in files.values()))
        await controller.stopped.wait()


def main(argv: list[str] | None = None) -> None:
    watch_parent()
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    app = ControllerApp.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()
