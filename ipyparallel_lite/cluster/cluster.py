"""``Cluster``: start, connect to and stop a controller and its engines.

Every method is a coroutine with a ``_sync`` twin, as in IPython parallel::

    with ipp.Cluster(n=4) as rc:      # returns once 4 engines are registered
        rc[:].apply_sync(os.getpid)

``Cluster`` is a traitlets ``Configurable``: ``Cluster(profile="p")`` reads
``profile_p/ipcluster_config.py`` (``c.Cluster.n = 8``, ``c.LocalEngineLauncher...``)
unless ``load_profile=False``; keyword arguments win over the file. Before any process
starts, the profile's controller and engine config files are checked too, so a broken
one stops the start with one message naming its file and line, not half a cluster.

The controller and the engines start at the same moment: engines wait for the
connection file while they import, so a cluster is ready in about the time one engine
takes to start. A cluster file (``security/cluster-<id>.json``) records the processes
so that ``ipcluster-lite stop`` or another ``Cluster`` can find them again.

With ``restart_engines=True`` a watcher thread starts engines again that exit unasked,
with exponential back-off, and stops (reporting a crash loop) after too many restarts.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from traitlets import Bool, Float, Integer, List, Type, Unicode, Union, default, validate
from traitlets.config import LoggingConfigurable

from ipyparallel_lite.cluster.launcher import (
    CONTROLLER_LAUNCHERS,
    ENGINE_LAUNCHERS,
    BaseLauncher,
    ClusterError,
    LaunchContext,
    LauncherError,
    find_launcher_class,
    launcher_classes,
    launcher_from_dict,
)
from ipyparallel_lite.config import find_profile_dir, load_config_file
from ipyparallel_lite.connection import CONTROLLER_FILES, connection_file_path, write_private_file


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


async def _stop_processes(launchers: list[BaseLauncher]) -> None:
    """Ask all to stop at once (SIGTERM), kill those still running after their stop_timeout.

    No threads: this also runs from an atexit hook, when no new thread may start.
    """
    for launcher in launchers:
        launcher.begin_stop()
    deadline = time.monotonic() + max((e.stop_timeout for e in launchers), default=0)
    while any(e.running for e in launchers) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for launcher in launchers:
        if launcher.running:
            launcher.kill()


def _said(launcher: BaseLauncher | None) -> str:
    """What a launcher's processes wrote last, for an error message."""
    if launcher is None:
        return ""
    command = f" `{' '.join(launcher.command)}`" if launcher.command else ""
    where = f" (log {launcher.log_file})" if launcher.log_file is not None else ""
    return f"Output of {launcher.describe()}{command}{where}:\n{launcher.output() or '(empty)'}"


def _launcher_spec(value: str | type) -> str:
    """A launcher trait's value as the cluster file keeps it: a name or a "module:Class" path."""
    return value if isinstance(value, str) else f"{value.__module__}:{value.__qualname__}"


def _new_cluster_id() -> str:
    return f"{int(time.time())}-{secrets.token_hex(2)}"


@_sync_twins
class Cluster(LoggingConfigurable):
    """A cluster: one controller and ``n`` engines, started by launchers.

    ``n`` defaults to the number of CPUs. ``cluster_id`` names the connection files
    (a fresh one by default); ``profile`` (or ``profile_dir``) picks the IPython profile.
    ``engines`` / ``controller`` pick the launchers by name (``"local"``, ``"mpi"``, ...;
    see ``engine_launcher_class``).
    """

    n = Integer(None, allow_none=True, help="Number of engines (default: the number of CPUs).").tag(
        config=True)
    profile = Unicode("default", help="IPython profile of the cluster.").tag(config=True)
    ipython_dir = Unicode(None, allow_none=True,
                          help="IPython directory (default: $IPYTHONDIR or ~/.ipython).").tag(config=True)
    cluster_id = Unicode(help="Names the cluster's files (default: a fresh id).").tag(config=True)
    engine_launcher_class = Union(
        [Unicode(), Type(klass=BaseLauncher)], default_value="local",
        help="How engines start: a name of the ipyparallel_lite.engine_launchers entry points "
             "('local', 'mpi', ...), a 'module:Class' path or a BaseLauncher subclass "
             "(also Cluster(engines=...)).").tag(config=True)
    controller_launcher_class = Union(
        [Unicode(), Type(klass=BaseLauncher)], default_value="local",
        help="How the controller starts: a name of the ipyparallel_lite.controller_launchers "
             "entry points, a 'module:Class' path or a BaseLauncher subclass (also "
             "Cluster(controller=...)).").tag(config=True)
    controller_ip = Unicode("127.0.0.1", help="Interface the controller listens on ('0.0.0.0': "
                                              "all of them).").tag(config=True)
    controller_location = Unicode(
        "", help="Address clients and engines connect to (default: controller_ip, or this "
                 "host's reachable address when that is every interface).").tag(config=True)
    controller_args = List(Unicode(), help="Extra command-line arguments of the controller.").tag(
        config=True)
    enable_curve = Bool(False, help="Encrypt the cluster's traffic with CurveZMQ (the "
                                    "controller's --curve).").tag(config=True)
    engine_args = List(Unicode(), help="Extra command-line arguments of every engine.").tag(config=True)
    log_level = Union([Integer(), Unicode()], default_value="INFO",
                      help="Log level of the controller and engines.").tag(config=True)
    daemonize = Bool(False, help="Let the processes outlive this one.").tag(config=True)
    engine_timeout = Float(60.0, help="Seconds engines may take to register.").tag(config=True)
    controller_timeout = Float(30.0, help="Seconds the controller may take to listen.").tag(config=True)
    load_profile = Bool(True, help="Read the profile's ipcluster_config.py.").tag(config=True)
    shutdown_atexit = Bool(True, help="Stop the cluster when this process exits "
                                      "(not a daemonized one).").tag(config=True)
    auto_restart_engines = Bool(
        False, help="Start an engine again when its process exits unasked (also "
                    "Cluster(restart_engines=True)).").tag(config=True)
    engine_restart_limit = Integer(
        5, help="Restarts allowed within engine_restart_window; an engine exiting once more "
                "is a crash loop: restarting stops, and restart_stopped says why.").tag(config=True)
    engine_restart_window = Float(60.0, help="Seconds over which engine restarts are counted.").tag(
        config=True)
    engine_restart_delay = Float(
        0.5, help="Seconds before restarting an engine; doubled for each restart already in "
                  "the window (back-off), at most 30 s.").tag(config=True)

    @default("cluster_id")
    def _cluster_id_default(self) -> str:
        return _new_cluster_id()

    @validate("engine_restart_limit", "engine_restart_window", "engine_restart_delay")
    def _non_negative(self, proposal: Any) -> Any:
        if proposal["value"] < 0:
            raise ValueError(f"{proposal['trait'].name} must not be negative, "
                             f"not {proposal['value']!r}")
        return proposal["value"]

    @validate("engine_launcher_class")
    def _known_engine_launcher(self, proposal: Any) -> Any:
        find_launcher_class(ENGINE_LAUNCHERS, proposal["value"])  # an unknown name: ValueError
        return proposal["value"]

    @validate("controller_launcher_class")
    def _known_controller_launcher(self, proposal: Any) -> Any:
        find_launcher_class(CONTROLLER_LAUNCHERS, proposal["value"])
        return proposal["value"]

    def __init__(self, n: int | None = None, *, profile_dir: str | Path | None = None,
                 engines: str | type | None = None, controller: str | type | None = None,
                 restart_engines: bool | None = None, **kwargs: Any):
        if n is not None and (not isinstance(n, int) or n < 0):
            raise ValueError(f"n must be a non-negative number of engines, not {n!r}")
        # None means "the default", as in IPython parallel (Cluster(cluster_id=None))
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        self._profile_dir = find_profile_dir(kwargs.get("profile") or "default",
                                              kwargs.get("ipython_dir"), profile_dir)
        if kwargs.get("load_profile", True) and "config" not in kwargs:
            kwargs["config"] = load_config_file(self._profile_dir / "ipcluster_config.py",
                                                [Cluster, *launcher_classes()])
        if n is not None:
            kwargs["n"] = n
        if restart_engines is not None:
            kwargs["auto_restart_engines"] = restart_engines
        if engines is not None:
            kwargs["engine_launcher_class"] = engines
        if controller is not None:
            kwargs["controller_launcher_class"] = controller
        super().__init__(**kwargs)
        if self._profile_dir.name.startswith("profile_") and "profile" not in kwargs:
            self.profile = self._profile_dir.name.removeprefix("profile_")
        if self.n is None:
            self.n = os.cpu_count() or 1
        self.controller: BaseLauncher | None = None
        #: engine set id -> its launchers (one per engine for local engines, one for all
        #: of an ``mpiexec``)
        self.engines: dict[str, list[BaseLauncher]] = {}
        self._client: Any = None
        #: engines started again after their process exited unasked
        self.engine_restarts = 0
        #: why automatic restarts stopped (a crash loop), or None while they go on
        self.restart_stopped: str | None = None
        self._engines_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stop_watching = threading.Event()

    def __repr__(self) -> str:
        from ipyparallel_lite.client.reprs import cluster_repr

        return cluster_repr(self)

    def _repr_html_(self) -> str:
        from ipyparallel_lite.client.reprs import cluster_html

        return cluster_html(self)

    # ---- files ------------------------------------------------------------------

    @property
    def profile_dir(self) -> Path:
        """The profile's folder (``profile_<profile>`` in the IPython directory)."""
        return self._profile_dir

    def connection_file(self, kind: str) -> Path:
        return connection_file_path(kind, cluster_id=self.cluster_id, profile_dir_path=self.profile_dir)

    @property
    def cluster_file(self) -> Path:
        return self.profile_dir / "security" / f"cluster-{self.cluster_id}.json"

    def _common_args(self) -> list[str]:
        return [f"--profile-dir={self.profile_dir}", f"--cluster-id={self.cluster_id}",
                f"--log-level={self.log_level}"]

    def _launch_context(self, args: list[str]) -> LaunchContext:
        return LaunchContext(profile_dir=self.profile_dir, cluster_id=self.cluster_id,
                             args=tuple(args), daemonize=self.daemonize)

    def to_dict(self) -> dict:
        """What the cluster file records: enough for :meth:`from_dict` to find the processes."""
        return {
            "cluster": {"class": type(self).__name__, "cluster_id": self.cluster_id,
                        "profile": self.profile, "profile_dir": str(self.profile_dir),
                        "n": self.n, "ipython_dir": self.ipython_dir,
                        "engine_launcher": _launcher_spec(self.engine_launcher_class)},
            "controller": self.controller.to_dict() if self.controller else None,
            "engines": {k: [e.to_dict() for e in v] for k, v in self.engines.items()},
        }

    def update_cluster_file(self) -> None:
        """Write the cluster file (mode 0600)."""
        write_private_file(self.cluster_file, json.dumps(self.to_dict(), indent=2))

    def remove_cluster_file(self) -> None:
        self.cluster_file.unlink(missing_ok=True)

    @classmethod
    def from_dict(cls, d: dict, **kwargs: Any) -> Cluster:
        """A Cluster object for the processes recorded in ``d`` (see :meth:`to_dict`)."""
        c = d["cluster"]
        kwargs.setdefault("engines", c.get("engine_launcher"))
        cluster = cls(n=c.get("n"), profile=c["profile"], cluster_id=c["cluster_id"],
                      ipython_dir=c.get("ipython_dir"), profile_dir=c.get("profile_dir"),
                      load_profile=False, **kwargs)
        if d.get("controller"):
            cluster.controller = launcher_from_dict(d["controller"], parent=cluster)
        cluster.engines = {k: [launcher_from_dict(e, parent=cluster) for e in v]
                           for k, v in d.get("engines", {}).items()}
        return cluster

    @classmethod
    def from_file(cls, cluster_file: str | Path | None = None, *, profile: str | None = None,
                  profile_dir: str | Path | None = None, cluster_id: str = "",
                  **kwargs: Any) -> Cluster:
        """A Cluster object for a cluster started elsewhere (by ``ipcluster-lite``, say).

        Either the cluster file's path, or the profile (or profile folder) and cluster id.
        """
        if cluster_file is None:
            folder = find_profile_dir(profile or "default", kwargs.get("ipython_dir"), profile_dir)
            cluster_file = folder / "security" / f"cluster-{cluster_id}.json"
        return cls.from_dict(json.loads(Path(cluster_file).read_text()), **kwargs)

    def check_config_files(self) -> None:
        """Raise ConfigFileError if the profile's controller or engine config file is broken.

        Run before anything starts: a broken file must not leave half a cluster.
        """
        checks = {"ipython_config.py": list}
        if (self.profile_dir / "ipcontroller_config.py").exists():
            from ipyparallel_lite.controller.app import ControllerApp

            checks["ipcontroller_config.py"] = ControllerApp.checked_classes
        if (self.profile_dir / "ipengine_config.py").exists():
            from ipyparallel_lite.engine.app import EngineApp

            checks["ipengine_config.py"] = EngineApp.checked_classes
        for name, classes in checks.items():
            load_config_file(self.profile_dir / name, classes())

    # ---- controller ----------------------------------------------------------------

    def _launch_controller(self) -> None:
        if self.controller is not None and self.controller.running:
            raise ClusterError(f"the controller of cluster {self.cluster_id!r} is already running")
        for kind in CONTROLLER_FILES:
            self.connection_file(kind).unlink(missing_ok=True)
        args = [*self._common_args(), f"--ip={self.controller_ip}",
                *([f"--location={self.controller_location}"] if self.controller_location else []),
                *(["--curve"] if self.enable_curve else []), *self.controller_args]
        launcher_class = find_launcher_class(CONTROLLER_LAUNCHERS, self.controller_launcher_class)
        self.controller = launcher_class.create(self._launch_context(args), parent=self)
        self.controller.start()
        if self.shutdown_atexit and not self.daemonize:
            # the children would exit anyway (they watch this process); this also removes
            # the cluster's files and does not leave the engines waiting for it
            atexit.register(self.stop_cluster_sync)
        self.log.info("cluster %r: controller started (pid %s)", self.cluster_id, self.controller.pid)
        self.update_cluster_file()

    async def start_controller(self) -> None:
        """Start the controller; return once a Client can connect to it."""
        self.check_config_files()
        self._launch_controller()
        try:
            await self._wait_for_connection_file()
        except BaseException:
            await self.stop_controller()
            self.remove_cluster_file()
            raise

    async def _wait_for_connection_file(self) -> Path:
        path = self.connection_file("client")
        timeout = self.controller_timeout
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.controller is None or not self.controller.running:
                raise ClusterError(f"the controller exited before it was ready. {_said(self.controller)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"the controller wrote no connection file within {timeout}s")
            await asyncio.sleep(0.01)
        return path

    async def stop_controller(self) -> None:
        if self.controller is not None:
            await _stop_processes([self.controller])
            self.log.info("cluster %r: controller stopped", self.cluster_id)
        for kind in CONTROLLER_FILES:
            self.connection_file(kind).unlink(missing_ok=True)

    # ---- engines ------------------------------------------------------------------

    async def start_engines(self, n: int | None = None, engine_set_id: str | None = None) -> str:
        """Start ``n`` engines (default: the cluster's ``n``); returns the engine set's id."""
        n = self.n if n is None else n
        engine_set_id = engine_set_id or f"{int(time.time() * 1000)}-{secrets.token_hex(2)}"
        launcher_class = find_launcher_class(ENGINE_LAUNCHERS, self.engine_launcher_class)
        size = launcher_class.max_engines or max(n, 1)
        launchers = [self._engine_launcher(launcher_class, min(size, n - i))
                     for i in range(0, n, size)]
        started: list[BaseLauncher] = []
        try:
            for launcher in launchers:
                launcher.start()
                started.append(launcher)
        except BaseException:  # a failed launch leaves nothing of this set running
            await _stop_processes(started)
            raise
        with self._engines_lock:
            self.engines.setdefault(engine_set_id, []).extend(launchers)
        self.log.info("cluster %r: %d engines started (engine set %s)", self.cluster_id, n,
                      engine_set_id)
        self.update_cluster_file()
        if self.auto_restart_engines and (self._watcher is None or not self._watcher.is_alive()):
            self._stop_watching.clear()
            self._watcher = threading.Thread(target=self._watch_engines, daemon=True,
                                             name=f"ipp-lite-engine-watch-{self.cluster_id}")
            self._watcher.start()
        return engine_set_id

    def _engine_launcher(self, launcher_class: type[BaseLauncher], n: int) -> BaseLauncher:
        args = [*self._common_args(), f"--IPEngine.registration_timeout={self.engine_timeout}",
                *self.engine_args]
        return launcher_class.create(self._launch_context(args), n, parent=self)

    def _watch_engines(self) -> None:
        """Thread: start again engines that exit unasked, with back-off; stop at a crash loop.

        The controller notices a dead engine by itself (its connection drops and its
        process is gone); this only brings the capacity back.
        """
        restarts: deque[float] = deque()  # times of the restarts within the window
        due: dict[BaseLauncher, float] = {}  # dead engine -> when to restart it
        while not self._stop_watching.wait(0.05):
            now = time.monotonic()
            restarted = False
            while restarts and now - restarts[0] > self.engine_restart_window:
                restarts.popleft()
            with self._engines_lock:
                dead = [(set_id, i, e) for set_id, launchers in self.engines.items()
                        for i, e in enumerate(launchers) if not e.stop_requested and not e.running]
                for set_id, i, launcher in dead:
                    if len(restarts) >= self.engine_restart_limit:
                        self._give_up_restarts(launcher, len(restarts))
                        return
                    if launcher not in due:
                        delay = min(self.engine_restart_delay * 2 ** len(restarts), 30.0)
                        due[launcher] = now + delay
                        self.log.warning("cluster %r: engine pid %s exited (code %s); restarting "
                                         "it in %.1fs", self.cluster_id, launcher.pid,
                                         launcher.exit_code, delay)
                    elif now >= due[launcher]:
                        del due[launcher]
                        replacement = self._engine_launcher(type(launcher), launcher.n)
                        try:
                            replacement.start()
                        except LauncherError as e:
                            self.restart_stopped = f"engine restarts stopped: {e}"
                            self.log.error("cluster %r: %s", self.cluster_id, self.restart_stopped)
                            return
                        self.engines[set_id][i] = replacement
                        restarts.append(now)
                        self.engine_restarts += 1
                        restarted = True
                        self.log.warning("cluster %r: engine restarted as pid %s (restart %d)",
                                         self.cluster_id, replacement.pid, self.engine_restarts)
                due = {e: t for e, t in due.items() if any(e is d for _, _, d in dead)}
            if restarted:
                self.update_cluster_file()

    def _give_up_restarts(self, launcher: BaseLauncher, count: int) -> None:
        self.restart_stopped = (
            f"engine restarts stopped: {count} restarts within {self.engine_restart_window:g}s "
            f"and an engine exited again (code {launcher.exit_code}), a crash loop. "
            f"{_said(launcher)}")
        self.log.error("cluster %r: %s", self.cluster_id, self.restart_stopped)

    def _engine_sets(self, engine_set_id: str | None) -> list[str]:
        if engine_set_id is None:
            return list(self.engines)
        if engine_set_id not in self.engines:
            raise KeyError(f"no engine set {engine_set_id!r} in cluster {self.cluster_id!r}; "
                           f"its engine sets are {sorted(self.engines)}")
        return [engine_set_id]

    async def stop_engines(self, engine_set_id: str | None = None) -> None:
        """Stop one engine set, or every engine of the cluster."""
        ids = self._engine_sets(engine_set_id)
        with self._engines_lock:
            launchers = [e for i in ids for e in self.engines.pop(i, [])]
        await _stop_processes(launchers)
        if launchers:
            self.log.info("cluster %r: %d engines stopped", self.cluster_id, len(launchers))
        if self.controller is not None:
            self.update_cluster_file()

    async def stop_engine_set(self, engine_set_id: str) -> None:
        await self.stop_engines(engine_set_id)

    async def signal_engines(self, signum: int, engine_set_id: str | None = None) -> None:
        """Send signal ``signum`` to one engine set's processes, or to every engine."""
        for i in self._engine_sets(engine_set_id):
            for launcher in self.engines.get(i, []):
                launcher.signal(signum)

    async def signal_engine_set(self, signum: int, engine_set_id: str) -> None:
        await self.signal_engines(signum, engine_set_id)

    async def restart_engines(self, engine_set_id: str | None = None) -> None:
        """Stop and start again one engine set (or all), as many engines as each had."""
        for i in self._engine_sets(engine_set_id):
            n = sum(e.n for e in self.engines[i])
            await self.stop_engines(i)
            await self.start_engines(n, i)

    async def restart_engine_set(self, engine_set_id: str) -> None:
        await self.restart_engines(engine_set_id)

    @property
    def engine_count(self) -> int:
        return sum(e.n for launchers in self.engines.values() for e in launchers if e.running)

    # ---- the whole cluster --------------------------------------------------------

    async def start_cluster(self, n: int | None = None) -> Cluster:
        """Start the controller and ``n`` engines together; return once a Client can connect.

        If the controller fails, nothing started is left running.
        """
        self.check_config_files()
        self._launch_controller()
        try:
            if (self.n if n is None else n) > 0:
                await self.start_engines(n)
            await self._wait_for_connection_file()
        except BaseException:
            await self.stop_cluster()
            raise
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
            await asyncio.to_thread(self.wait_for_engines, client, n)
        except BaseException:
            await self.stop_cluster()
            raise
        if activate:
            client.activate()
        return client

    def wait_for_engines(self, client: Any, n: int, timeout: float | None = None,
                         progress: bool | None = None) -> None:
        """Wait until ``n`` engines are registered with ``client``'s controller.

        Fails fast, with the relevant log, when the controller or too many engines exit;
        raises ClusterError after ``timeout`` seconds (default ``engine_timeout``).
        ``progress``: show a bar (default: when someone is watching).
        """
        from ipyparallel_lite.client.progress import Progress

        timeout = self.engine_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with Progress(total=n, label="engines ready", enabled=progress) as bar:
            while True:
                bar.update(len(client.ids))
                try:
                    client.wait_for_engines(n, timeout=0.1, interactive=False)
                    bar.update(len(client.ids), force=True)
                    return
                except TimeoutError:
                    pass
                self._check_processes(client, n)
                if time.monotonic() > deadline:
                    launchers = [e for v in self.engines.values() for e in v]
                    said = [e for e in launchers if e.output()] or [self.controller]
                    raise ClusterError(
                        f"only {len(client.ids)} of {n} engines registered within {timeout:g}s. "
                        f"{_said(said[0])}"
                    )

    def _check_processes(self, client: Any, n: int) -> None:
        if self.controller is None or not self.controller.running:
            raise ClusterError(
                f"the controller exited while engines were starting. {_said(self.controller)}")
        launchers = [e for v in self.engines.values() for e in v]
        dead = [e for e in launchers if not e.running]
        total = sum(e.n for e in launchers)
        gone = sum(e.n for e in dead)
        if total - gone < n - len(client.ids):
            raise ClusterError(
                f"{gone} of {total} engines exited before registering; "
                f"{len(client.ids)} registered; {dead[0].describe()} exited with code "
                f"{dead[0].exit_code}. {_said(dead[0])}"
            )

    async def stop_cluster(self) -> None:
        """Stop the engines, then the controller, and remove the cluster's files."""
        atexit.unregister(self.stop_cluster_sync)
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.join()
        if self._client is not None:
            self._client.close()
            self._client = None
        await self.stop_engines()
        await self.stop_controller()
        self.remove_cluster_file()

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

        extra = self.engine_count - n
        leaving = self._newest_launchers(extra) if extra > 0 else []
        client = Client(await self._wait_for_connection_file())
        self.n = n
        try:
            if extra < 0:
                await self.start_engines(-extra)
                await asyncio.to_thread(self.wait_for_engines, client, n)
            elif extra > 0:
                await asyncio.gather(*(asyncio.to_thread(e.stop) for _, e in leaving))
                with self._engines_lock:
                    for set_id, launcher in leaving:
                        self.engines[set_id].remove(launcher)
                    self.engines = {k: v for k, v in self.engines.items() if v}
                self.update_cluster_file()
                deadline = time.monotonic() + self.engine_timeout
                while len(client.ids) > n:
                    if time.monotonic() > deadline:
                        raise ClusterError(
                            f"{len(client.ids)} engines are still registered "
                            f"{self.engine_timeout}s after stopping all but {n}")
                    await asyncio.sleep(0.05)
        finally:
            client.close()

    def _newest_launchers(self, engines: int) -> list[tuple[str, BaseLauncher]]:
        """The newest running launchers that run ``engines`` engines together.

        Raises ClusterError when no such set exists (an mpiexec's engines stop together).
        """
        running = [(set_id, e) for set_id, launchers in self.engines.items()
                   for e in launchers if e.running]
        leaving: list[tuple[str, BaseLauncher]] = []
        count = 0
        while count < engines and running:
            leaving.append(running.pop())
            count += leaving[-1][1].n
        if count != engines:
            raise ClusterError(
                f"cannot stop exactly {engines} engines: {leaving[-1][1].describe()} runs "
                f"{leaving[-1][1].n} engines that stop together; scale to a count that "
                "removes whole launchers")
        return leaving

    # ---- context managers -----------------------------------------------------------

    def __enter__(self) -> Any:
        return self.start_and_connect_sync()

    def __exit__(self, *exc: Any) -> None:
        self.stop_cluster_sync()

    async def __aenter__(self) -> Any:
        return await self.start_and_connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop_cluster()
