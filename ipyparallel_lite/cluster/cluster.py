"""``Cluster``: start, connect to and stop a controller and its engines.

Every method is a coroutine with a ``_sync`` twin, as in IPython parallel::

    with ipp.Cluster(n=4) as rc:      # returns once 4 engines are registered
        rc[:].apply_sync(os.getpid)

The controller and the engines start at the same moment: engines wait for the
connection file while they import, so a cluster is ready in about the time one engine
takes to start. A cluster file (``security/cluster-<id>.json``) records the processes
so that ``ipcluster-lite stop`` or another ``Cluster`` can find them again.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from ipyparallel_lite.cluster.launcher import (
    LocalProcessLauncher,
    controller_command,
    engine_command,
    launcher_from_dict,
)
from ipyparallel_lite.connection import connection_file_path, profile_dir, write_private_file


class ClusterError(RuntimeError):
    """A cluster that could not start, with what its processes said."""


def _run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from synchronous code, even inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # inside Jupyter: a loop is running in this thread, so run ours in another one
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _sync_twins(cls: type) -> type:
    for name in list(vars(cls)):
        method = getattr(cls, name)
        if asyncio.iscoroutinefunction(method) and not name.startswith("_"):
            def make(name: str = name) -> Any:
                def sync(self: Any, *args: Any, **kwargs: Any) -> Any:
                    return _run_sync(getattr(self, name)(*args, **kwargs))

                sync.__name__ = f"{name}_sync"
                sync.__doc__ = f"Synchronous twin of :meth:`{name}`."
                return sync

            setattr(cls, f"{name}_sync", make())
    return cls


@_sync_twins
class Cluster:
    """A local cluster: one controller process and ``n`` engine processes.

    ``n`` defaults to the number of CPUs. ``cluster_id`` names the connection files
    (a fresh one by default); ``profile`` picks the IPython profile folder.
    """

    def __init__(
        self,
        n: int | None = None,
        *,
        profile: str = "default",
        cluster_id: str | None = None,
        ipython_dir: str | None = None,
        controller_ip: str = "127.0.0.1",
        controller_args: list[str] | None = None,
        engine_args: list[str] | None = None,
        engines: str = "local",
        log_level: str = "WARN",
        daemonize: bool = False,
        engine_timeout: float = 60.0,
        **kwargs: Any,
    ):
        if engines != "local":
            raise ValueError(f"unknown engine launcher {engines!r}; this release has 'local'")
        if n is not None and (not isinstance(n, int) or n < 0):
            raise ValueError(f"n must be a non-negative number of engines, not {n!r}")
        self.n = n if n is not None else (os.cpu_count() or 1)
        self.profile = profile
        self.cluster_id = (
            cluster_id if cluster_id is not None else f"{int(time.time())}-{secrets.token_hex(2)}"
        )
        self.ipython_dir = ipython_dir
        self.controller_ip = controller_ip
        self.controller_args = list(controller_args or [])
        self.engine_args = list(engine_args or [])
        self.log_level = log_level
        self.daemonize = daemonize
        self.engine_timeout = engine_timeout
        self.controller: LocalProcessLauncher | None = None
        self.engines: dict[str, list[LocalProcessLauncher]] = {}
        self._client: Any = None

    def __repr__(self) -> str:
        running = "running" if self.controller and self.controller.running else "stopped"
        return f"<Cluster(cluster_id={self.cluster_id!r}, profile={self.profile!r}, {running}, {self.engine_count} engines)>"

    # ---- files ------------------------------------------------------------------

    @property
    def profile_dir(self) -> Path:
        return profile_dir(self.profile, self.ipython_dir)

    def connection_file(self, kind: str) -> Path:
        return connection_file_path(kind, self.profile, self.cluster_id, self.ipython_dir)

    @property
    def cluster_file(self) -> Path:
        return self.profile_dir / "security" / f"cluster-{self.cluster_id}.json"

    def _log_file(self, name: str) -> Path:
        return self.profile_dir / "log" / f"ipp-lite-{self.cluster_id}-{name}.log"

    def _common_args(self) -> list[str]:
        args = [f"--profile={self.profile}", f"--cluster-id={self.cluster_id}", f"--log-level={self.log_level}"]
        if self.ipython_dir:
            args.append(f"--ipython-dir={self.ipython_dir}")
        return args

    def to_dict(self) -> dict:
        return {
            "cluster": {"cluster_id": self.cluster_id, "profile": self.profile, "n": self.n,
                        "ipython_dir": self.ipython_dir},
            "controller": self.controller.to_dict() if self.controller else None,
            "engines": {k: [e.to_dict() for e in v] for k, v in self.engines.items()},
        }

    def _write_cluster_file(self) -> None:
        write_private_file(self.cluster_file, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_file(cls, path: str | Path) -> Cluster:
        """A Cluster object for a cluster started elsewhere (by the CLI, say)."""
        d = json.loads(Path(path).read_text())
        c = d["cluster"]
        cluster = cls(n=c.get("n"), profile=c["profile"], cluster_id=c["cluster_id"],
                      ipython_dir=c.get("ipython_dir"))
        if d.get("controller"):
            cluster.controller = launcher_from_dict(d["controller"])
        cluster.engines = {k: [launcher_from_dict(e) for e in v] for k, v in d.get("engines", {}).items()}
        return cluster

    # ---- controller ----------------------------------------------------------------

    async def start_controller(self) -> None:
        """Start the controller process (its connection files appear when it listens)."""
        if self.controller is not None and self.controller.running:
            raise ClusterError(f"the controller of cluster {self.cluster_id!r} is already running")
        for kind in ("client", "engine"):
            self.connection_file(kind).unlink(missing_ok=True)
        args = [*self._common_args(), f"--ip={self.controller_ip}", *self.controller_args]
        self.controller = LocalProcessLauncher(
            controller_command(args), self._log_file("controller"), daemonize=self.daemonize
        )
        self.controller.start()
        self._write_cluster_file()

    async def _wait_for_connection_file(self, timeout: float = 30) -> Path:
        path = self.connection_file("client")
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.controller is None or not self.controller.running:
                tail = self.controller.log_tail() if self.controller else ""
                raise ClusterError(f"the controller exited before it was ready. Its log:\n{tail}")
            if time.monotonic() > deadline:
                raise ClusterError(f"the controller wrote no connection file within {timeout}s")
            await asyncio.sleep(0.01)
        return path

    async def stop_controller(self) -> None:
        if self.controller is not None:
            await asyncio.to_thread(self.controller.stop)
        for kind in ("client", "engine"):
            self.connection_file(kind).unlink(missing_ok=True)

    # ---- engines ------------------------------------------------------------------

    async def start_engines(self, n: int | None = None, engine_set_id: str | None = None) -> str:
        """Start ``n`` engines (default: the cluster's ``n``); returns the engine set's id."""
        n = self.n if n is None else n
        engine_set_id = engine_set_id or f"{int(time.time() * 1000)}-{secrets.token_hex(2)}"
        args = [*self._common_args(), f"--EngineApp.registration_timeout={self.engine_timeout}",
                *self.engine_args]
        launchers = [
            LocalProcessLauncher(engine_command(args), self._log_file(f"engine-{engine_set_id}-{i}"),
                                 daemonize=self.daemonize)
            for i in range(n)
        ]
        for launcher in launchers:
            launcher.start()
        self.engines[engine_set_id] = launchers
        self._write_cluster_file()
        return engine_set_id

    async def stop_engines(self, engine_set_id: str | None = None) -> None:
        ids = [engine_set_id] if engine_set_id else list(self.engines)
        launchers = [e for i in ids for e in self.engines.pop(i, [])]
        await asyncio.gather(*(asyncio.to_thread(e.stop) for e in launchers))
        self._write_cluster_file()

    async def signal_engines(self, signum: int, engine_set_id: str | None = None) -> None:
        ids = [engine_set_id] if engine_set_id else list(self.engines)
        for i in ids:
            for launcher in self.engines.get(i, []):
                launcher.signal(signum)

    @property
    def engine_count(self) -> int:
        return sum(1 for launchers in self.engines.values() for e in launchers if e.running)

    # ---- the whole cluster --------------------------------------------------------

    async def start_cluster(self, n: int | None = None) -> Cluster:
        """Start the controller and ``n`` engines together."""
        await self.start_controller()
        if (self.n if n is None else n) > 0:
            await self.start_engines(n)
        await self._wait_for_connection_file()
        return self

    async def connect_client(self, **kwargs: Any) -> Any:
        """A Client of this cluster (it waits for the connection file)."""
        from ipyparallel_lite.client.client import Client

        path = await self._wait_for_connection_file()
        client = Client(path, cluster=self, **kwargs)
        self._client = client
        return client

    async def start_and_connect(self, n: int | None = None, activate: bool = False) -> Any:
        """Start everything and return a Client once ``n`` engines are registered.

        If anything fails on the way, everything started is stopped again.
        """
        n = self.n if n is None else n
        try:
            await self.start_cluster(n)
            client = await self.connect_client()
            await asyncio.to_thread(self._wait_for_engines, client, n)
        except BaseException:
            await self.stop_cluster()
            raise
        if activate:
            client.activate()
        return client

    def _wait_for_engines(self, client: Any, n: int) -> None:
        """Wait for ``n`` engines, failing fast (with the logs) when processes die instead."""
        from ipyparallel_lite.client.progress import Progress

        deadline = time.monotonic() + self.engine_timeout
        with Progress(total=n, label="engines ready") as progress:
            while True:
                progress.update(len(client.ids))
                try:
                    client.wait_for_engines(n, timeout=0.25, interactive=False)
                    progress.update(len(client.ids), force=True)
                    return
                except TimeoutError:
                    pass
                self._check_processes(client, n)
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"only {len(client.ids)} of {n} engines registered within {self.engine_timeout}s"
                    )

    def _check_processes(self, client: Any, n: int) -> None:
        if self.controller is None or not self.controller.running:
            tail = self.controller.log_tail() if self.controller else ""
            raise ClusterError(f"the controller exited while engines were starting. Its log:\n{tail}")
        launchers = [e for v in self.engines.values() for e in v]
        dead = [e for e in launchers if not e.running]
        if len(launchers) - len(dead) < n - len(client.ids):
            tail = dead[0].log_tail() if dead else ""
            raise ClusterError(
                f"{len(dead)} of {len(launchers)} engines exited before registering; "
                f"{len(client.ids)} registered. The first one's log:\n{tail}"
            )

    async def stop_cluster(self) -> None:
        """Stop the engines, then the controller, and remove the cluster's files."""
        if self._client is not None:
            self._client.close()
            self._client = None
        await self.stop_engines()
        await self.stop_controller()
        self.cluster_file.unlink(missing_ok=True)

    async def scale(self, n: int) -> None:
        """Add or remove engines of a running cluster until ``n`` run.

        Returns once the controller counts ``n`` engines: new ones registered, removed
        ones (the newest first) stopped and unregistered.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative number of engines, not {n!r}")
        if self.controller is None or not self.controller.running:
            raise ClusterError(
                f"cluster {self.cluster_id!r} is not running; start it before scaling it")
        from ipyparallel_lite.client.client import Client

        client = Client(await self._wait_for_connection_file())
        self.n = n
        try:
            extra = self.engine_count - n
            if extra < 0:
                await self.start_engines(-extra)
                await asyncio.to_thread(self._wait_for_engines, client, n)
            elif extra > 0:
                running = [(set_id, e) for set_id, launchers in self.engines.items()
                           for e in launchers if e.running]
                leaving = running[-extra:]
                await asyncio.gather(*(asyncio.to_thread(e.stop) for _, e in leaving))
                for set_id, launcher in leaving:
                    self.engines[set_id].remove(launcher)
                self.engines = {k: v for k, v in self.engines.items() if v}
                self._write_cluster_file()
                deadline = time.monotonic() + self.engine_timeout
                while len(client.ids) > n:
                    if time.monotonic() > deadline:
                        raise ClusterError(
                            f"{len(client.ids)} engines are still registered "
                            f"{self.engine_timeout}s after stopping all but {n}")
                    await asyncio.sleep(0.05)
        finally:
            client.close()

    async def restart_engines(self, engine_set_id: str | None = None) -> None:
        n = self.engine_count
        await self.stop_engines(engine_set_id)
        await self.start_engines(n)

    # ---- context managers -----------------------------------------------------------

    def __enter__(self) -> Any:
        return self.start_and_connect_sync()

    def __exit__(self, *exc: Any) -> None:
        self.stop_cluster_sync()

    async def __aenter__(self) -> Any:
        return await self.start_and_connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop_cluster()
