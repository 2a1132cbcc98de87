"""``ipcontroller-lite``: run a controller, writing its connection files.

Configured as every command here (:mod:`ipyparallel_lite.baseapp`): ``--profile``,
``--profile-dir``, ``--cluster-id``, ``--debug``, ``--Class.trait=value``, and the
profile's ``ipcontroller_config.py``. The names follow ipyparallel where the concept is
the same: ``c.IPController.ip``, ``c.TaskScheduler.scheme_name``,
``c.TaskScheduler.hwm``; ``c.ControllerApp.<name>`` works too.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from IPython.core.application import BaseIPythonApplication
from IPython.core.profiledir import ProfileDir
from traitlets import Bool, CaselessStrEnum, Float, Integer, Unicode
from traitlets.config import Configurable

from ipyparallel_lite._version import __version__
from ipyparallel_lite.baseapp import ParallelApp, common_aliases, common_flags, run_app
from ipyparallel_lite.cluster.launcher import watch_parent
from ipyparallel_lite.connection import (
    connection_file_path,
    make_session,
    new_key,
    write_connection_file,
)
from ipyparallel_lite.controller.hub import Hub
from ipyparallel_lite.controller.scheduler import SCHEMES
from ipyparallel_lite.controller.scheduler import TaskScheduler as SchedulerCore
from ipyparallel_lite.controller.server import Controller


class TaskScheduler(Configurable):
    """Settings of the load-balancing scheduler, under ipyparallel's names."""

    scheme_name = CaselessStrEnum(SCHEMES, default_value="leastload",
                                  help="Task scheduling scheme.").tag(config=True)
    hwm = Integer(1, help="Outstanding tasks allowed per engine (0: no limit).").tag(config=True)


class IPController(ParallelApp, BaseIPythonApplication):
    name = "ipcontroller-lite"
    version = __version__
    description = "Start an ipyparallel_lite controller (Hub and schedulers in one process)."
    log_file_prefix = "ipcontroller"

    ip = Unicode("127.0.0.1", help="Interface every channel binds to.").tag(config=True)
    hb_period = Float(1.0, help="Heartbeat period in seconds.").tag(config=True)
    hb_max_misses = Integer(5, help="Missed heartbeats after which an engine is dead.").tag(config=True)
    record_limit = Integer(
        1024, help="Task records the Hub keeps in memory; the oldest finished ones go first."
    ).tag(config=True)
    remember_finished = Integer(
        10_000, help="Finished tasks that new tasks may still name as dependencies."
    ).tag(config=True)
    write_files = Bool(True, help="Write connection files (off when info travels otherwise).").tag(config=True)

    classes = [ProfileDir, TaskScheduler]
    aliases = {
        **common_aliases,
        "ip": "IPController.ip",
        "cluster-id": "ParallelApp.cluster_id",
        "scheme": "TaskScheduler.scheme_name",
        "hwm": "TaskScheduler.hwm",
        "hb-period": "IPController.hb_period",
    }
    flags = common_flags

    def _config_file_name_default(self) -> str:
        return "ipcontroller_config.py"

    def connection_files(self) -> dict[str, Path]:
        return {
            kind: connection_file_path(kind, cluster_id=self.cluster_id,
                                       profile_dir_path=self.profile_dir.location)
            for kind in ("client", "engine")
        }

    def start(self) -> None:
        from ipyparallel_lite.controller.store import MemoryStore

        scheduling = TaskScheduler(parent=self)
        session = make_session(new_key())
        hub = Hub(MemoryStore(record_limit=self.record_limit), hb_period=self.hb_period,
                  max_misses=self.hb_max_misses)
        scheduler = SchedulerCore(scheme=scheduling.scheme_name, hwm=scheduling.hwm)
        controller = Controller(session, hub, scheduler, ip=self.ip, log=self.log,
                                remember_finished=self.remember_finished)
        controller.bind()
        files = self.connection_files()
        self.log.info("controller of cluster %r (profile %s): scheme %s, hwm %d, listening on %s",
                      self.cluster_id, self.profile, scheduling.scheme_name, scheduling.hwm, self.ip)
        try:
            asyncio.run(self._serve(controller, files))
        finally:
            if self.write_files:
                for path in files.values():
                    path.unlink(missing_ok=True)
            self.log.info("controller stopped")

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


class ControllerApp(IPController):
    """The ``ipcontroller-lite`` command (``c.ControllerApp`` and ``c.IPController`` both apply)."""


def main(argv: list[str] | None = None) -> None:
    watch_parent()
    app = ControllerApp.instance()
    run_app(app, argv)
    app.start()


if __name__ == "__main__":
    main()
