"""``ipcluster-lite``: start, stop, list, grow and clean local clusters from a shell.

Subcommands (each a traitlets application: ``--profile``, ``--profile-dir``,
``--cluster-id``, ``--debug``, ``--Class.trait=value`` and the profile's
``ipcluster_config.py``, e.g. ``c.Cluster.n = 8``)::

    ipcluster-lite start -n 4 [--engines local|mpi|...] [--controller local|...]
                         [--profile P] [--cluster-id ID] [--daemonize] [--ip IP] [--curve]
    ipcluster-lite stop [--profile P] [--cluster-id ID | --all]
    ipcluster-lite list [--profile P] [-o text|json]
    ipcluster-lite engines -n 2 [--engines local|mpi|...] [--profile P] [--cluster-id ID]
    ipcluster-lite clean [--profile P]

Contracts:

* ``start`` returns (``--daemonize``) or prints its ready line only once all ``n``
  engines are registered with the controller. In the foreground it then stays until
  SIGINT (Ctrl-C), SIGTERM or SIGHUP and stops everything before exiting 0. A failure
  (an engine or the controller dies, or the engines time out) exits 1 with one message
  that carries the relevant log tail, and leaves no process running. ``--debug``
  raises the controller and every engine to DEBUG.
* The default cluster id is ``""``, whose connection files are
  ``ipcontroller-client.json`` / ``ipcontroller-engine.json``, so that a plain
  ``ipp.Client()`` (or ``ipp.Client(profile=P)``) finds the cluster.
* Every cluster, foreground or daemonized, has a cluster file
  (``profile_<P>/security/cluster-<id>.json``) through which ``stop``, ``list`` and
  ``engines`` find its processes. A pid is acted on only while it still runs the
  command line the file records, so a recycled pid is never signalled.
* ``clean`` removes the log files of processes that are gone and the files of
  clusters that no longer run.
* Exit codes: 0 success, 1 failure (a broken config file included), 2 usage error,
  10 the cluster is already running, 11 no such cluster (the codes ``ipcluster`` uses
  for the last two).

All process handling is :class:`~ipyparallel_lite.cluster.Cluster`'s and its launchers'
(``--engines`` picks them by name, see ``cluster/launcher.py``); finding clusters again
is ``cluster/discovery.py``'s; this module only reads options, waits, reports and cleans up.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from IPython.core.application import BaseIPythonApplication
from IPython.core.profiledir import ProfileDir
from traitlets import Bool, CaselessStrEnum
from traitlets.config import Application

from ipyparallel_lite._version import __version__
from ipyparallel_lite.applog import log_file_pid
from ipyparallel_lite.baseapp import (
    EXIT_USAGE,
    ParallelApp,
    UsageError,
    common_aliases,
    common_flags,
)
from ipyparallel_lite.cluster.cluster import Cluster, ClusterError
from ipyparallel_lite.cluster.discovery import (
    cluster_file,
    cluster_files,
    describe,
    load_cluster,
    profile_dirs,
    running_clusters,
    show_id,
    stop_and_describe,
)
from ipyparallel_lite.cluster.launcher import launcher_classes
from ipyparallel_lite.config import ConfigFileError
from ipyparallel_lite.processes import pid_running

PROG = "ipcluster-lite"
EXIT_FAILURE = 1
EXIT_ALREADY_STARTED = 10
EXIT_NOT_RUNNING = 11


class _Stop(Exception):
    """Raised by our SIGINT/SIGTERM/SIGHUP handler: unwind and stop the cluster."""


# ---- start --------------------------------------------------------------------------


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _set_signals(handler: Any) -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, handler)


class ClusterCommand(ParallelApp, BaseIPythonApplication):
    """What the subcommands share: options, the profile, usage errors."""

    version = __version__
    #: ``usage:`` line of ``--help`` and of usage errors
    usage = ""
    classes = [ProfileDir, Cluster, *launcher_classes()]
    aliases = {**common_aliases, "cluster-id": "ParallelApp.cluster_id"}
    flags = common_flags

    def _config_file_name_default(self) -> str:
        return "ipcluster_config.py"

    def emit_description(self) -> Iterator[str]:
        yield f"usage: {self.usage}"
        yield ""
        yield from super().emit_description()

    @property
    def location(self) -> Path:
        return Path(self.profile_dir.location)

    def option_given(self, trait: str) -> bool:
        """Whether ``trait`` was set on the command line (under any class)."""
        return any(trait in section for section in self.cli_config.values())

    def say_error(self, message: str) -> None:
        print(f"{self.name}: {message}", file=sys.stderr)


class StartCommand(ClusterCommand):
    name = f"{PROG} start"
    usage = (f"{PROG} start [-n N] [--engines NAME] [--profile P] [--cluster-id ID] [--daemonize] "
             "[--ip IP] [--curve] [options]")
    description = ("Start a controller and N engines; ready when all engines registered. "
                   "In the foreground until Ctrl-C, or in the background with --daemonize.")
    daemonize = Bool(False, help="Leave the cluster running in the background and exit once ready.").tag(
        config=True)
    aliases = {**ClusterCommand.aliases, "n": "Cluster.n", "ip": "Cluster.controller_ip",
               "timeout": "Cluster.engine_timeout", "engines": "Cluster.engine_launcher_class",
               "controller": "Cluster.controller_launcher_class",
               "location": "Cluster.controller_location"}
    flags = {**ClusterCommand.flags,
             "daemonize": ({"StartCommand": {"daemonize": True}}, daemonize.help),
             "curve": ({"Cluster": {"enable_curve": True}}, Cluster.enable_curve.help)}

    def start(self) -> None:
        previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
        try:
            code = self.run()
        finally:  # as they were, for a caller of main() in its own process
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        sys.exit(code)

    def run(self) -> int:
        """See the module docstring for the contract."""
        existing_path = cluster_file(self.location, self.cluster_id)
        if existing_path.exists():
            existing = load_cluster(existing_path)
            if existing is not None and existing.controller is not None:
                self.say_error(
                    f"{describe(existing)} is already running "
                    f"(controller pid {existing.controller.pid}). Stop it with "
                    f"`{PROG} stop --profile {self.profile} --cluster-id {show_id(self.cluster_id)}`"
                    " or pick another --cluster-id.")
                return EXIT_ALREADY_STARTED
            if existing is not None:  # a dead controller: clear what is left of it
                existing.stop_cluster_sync()
            existing_path.unlink(missing_ok=True)
        try:
            cluster = Cluster(parent=self, profile_dir=self.location, cluster_id=self.cluster_id,
                              load_profile=False, log_level=self.log_level, daemonize=self.daemonize)
        except Exception as e:  # a trait's value that does not fit: -n many
            raise UsageError(str(e)) from None
        try:
            cluster.check_config_files()
        except ConfigFileError as e:
            self.say_error(f"error in config file {e}")
            return EXIT_FAILURE
        return self._start(cluster)

    def _start(self, cluster: Cluster) -> int:
        n = cluster.n
        # progress only for a person at a terminal
        progress = sys.stdout.isatty() and sys.stderr.isatty()
        # SIGINT too: the default KeyboardInterrupt may land inside asyncio's own handling
        _set_signals(_raise_stop)
        t0 = time.monotonic()
        try:
            cluster.start_cluster_sync()
            client = cluster.connect_client_sync()
            cluster.wait_for_engines(client, n, progress=progress)
        except BaseException as e:
            _set_signals(signal.SIG_IGN)  # nothing may interrupt the clean-up
            cluster.stop_cluster_sync()
            if isinstance(e, _Stop | KeyboardInterrupt):
                self.say_error(f"interrupted; {describe(cluster)} stopped.")
                return 130 if isinstance(e, KeyboardInterrupt) or str(e) == "SIGINT" else EXIT_FAILURE
            if not isinstance(e, Exception):
                raise
            self.say_error(f"{describe(cluster)} failed to start: {e}")
            return EXIT_FAILURE
        ready = (f"Cluster {show_id(cluster.cluster_id)} (profile {cluster.profile}): "
                 f"{n} engines ready in {time.monotonic() - t0:.1f}s")
        if not self.daemonize:
            return _foreground(cluster, client, ready)
        _set_signals(signal.SIG_DFL)  # ready: from here on a signal must not stop the cluster
        client.close()
        stop = f"{PROG} stop --profile {cluster.profile}"
        if cluster.cluster_id:
            stop += f" --cluster-id {cluster.cluster_id}"
        print(ready, flush=True)
        print(f"Running in the background (controller pid {cluster.controller.pid}); "
              f"stop it with `{stop}`.", flush=True)
        return 0


def _foreground(cluster: Cluster, client: Any, ready: str) -> int:
    """Say ``ready``; stay until a signal or the controller's exit; then stop everything."""
    code = 0
    try:
        client.close()
        print(ready, flush=True)
        print("Press Ctrl-C to stop the cluster.", flush=True)
        while cluster.controller is not None and cluster.controller.running:
            time.sleep(0.2)
        # the controller went away on its own (or by `ipcluster-lite stop`)
        returncode = cluster.controller.exit_code if cluster.controller else None
        if returncode:
            code = EXIT_FAILURE
            print(f"{PROG}: the controller exited with code {returncode}. "
                  f"Its log ({cluster.controller.log_file}):\n{cluster.controller.output()}",
                  file=sys.stderr)
        else:
            print(f"The controller of {describe(cluster)} was stopped.", flush=True)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        _set_signals(signal.SIG_IGN)
        what = stop_and_describe(cluster)
    if what:
        print(f"Stopped {describe(cluster)}: {what}.", flush=True)
    return code


# ---- stop, list, engines, clean -----------------------------------------------------


def _running_summary(ipython_dir: Path, profile_dir: Path) -> str:
    ids = []
    for path in cluster_files(ipython_dir, profile_dir):
        cluster = load_cluster(path)
        if cluster is not None and cluster.controller is not None:
            ids.append(show_id(cluster.cluster_id))
    return f"Running in profile {profile_dir.name.removeprefix('profile_')}: {', '.join(ids)}." if ids else (
        f"No cluster runs in profile {profile_dir.name.removeprefix('profile_')} (ipython dir {ipython_dir}).")


class StopCommand(ClusterCommand):
    name = f"{PROG} stop"
    usage = f"{PROG} stop [--profile P] [--cluster-id ID | --all] [options]"
    description = "Stop a cluster's engines, then its controller, and remove its files."
    all = Bool(False, help="Stop every cluster of the profile.").tag(config=True)
    flags = {**ClusterCommand.flags, "all": ({"StopCommand": {"all": True}}, all.help)}

    def start(self) -> None:
        sys.exit(self.run())

    def run(self) -> int:
        """Stop one cluster (``--cluster-id``, default ``''``) or ``--all`` of a profile.

        Exits 11 when the named cluster does not exist or no longer runs.
        """
        ipython_dir = Path(self.ipython_dir)
        if self.all and self.option_given("cluster_id"):
            raise UsageError("--all and --cluster-id exclude each other")
        if self.all:
            paths = list(cluster_files(ipython_dir, self.location))
        else:
            paths = [cluster_file(self.location, self.cluster_id)]
            if not paths[0].exists():
                self.say_error(f"no cluster {show_id(self.cluster_id)} in profile {self.profile}. "
                               f"{_running_summary(ipython_dir, self.location)}")
                return EXIT_NOT_RUNNING
        stopped = 0
        for path in paths:
            cluster = load_cluster(path)
            if cluster is None:
                self.say_error(f"skipping unreadable cluster file {path}")
                continue
            if cluster.controller is None and cluster.engine_count == 0:
                cluster.stop_cluster_sync()  # only removes the files
                if not self.all:
                    self.say_error(f"{describe(cluster)} was not running any more; "
                                   f"removed its stale files.")
                    return EXIT_NOT_RUNNING
                continue
            print(f"Stopped {describe(cluster)}: {stop_and_describe(cluster)}.", flush=True)
            stopped += 1
        if self.all and not stopped:
            print(f"No running clusters to stop in profile {self.profile}.")
        return 0


class ListCommand(ClusterCommand):
    name = f"{PROG} list"
    usage = f"{PROG} list [--profile P] [-o text|json] [options]"
    description = "List running clusters (pruning the files of dead ones)."
    output = CaselessStrEnum(["text", "json"], default_value="text", help="Output format.").tag(
        config=True)
    aliases = {**ClusterCommand.aliases, "o": "ListCommand.output", "output": "ListCommand.output"}

    def start(self) -> None:
        sys.exit(self.run())

    def run(self) -> int:
        """A table (or ``-o json``) of running clusters of one profile (``--profile``) or all."""
        one = self.location if self.option_given("profile") or self.option_given("location") else None
        clusters = running_clusters(Path(self.ipython_dir), one)
        rows = [
            {
                "profile": c.profile,
                "cluster_id": c.cluster_id,
                "engines": c.engine_count,
                "controller_pid": c.controller.pid,
                "engine_pids": [e.pid for v in c.engines.values() for e in v],
                "cluster_file": str(c.cluster_file),
            }
            for c in clusters
        ]
        if self.output == "json":
            json.dump(rows, sys.stdout, indent=1)
            print()
            return 0
        header = ("PROFILE", "CLUSTER ID", "ENGINES", "CONTROLLER PID")
        table = [header] + [
            (r["profile"], show_id(r["cluster_id"]), str(r["engines"]), str(r["controller_pid"]))
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        return 0


class EnginesCommand(ClusterCommand):
    name = f"{PROG} engines"
    usage = f"{PROG} engines -n N [--profile P] [--cluster-id ID] [options]"
    description = ("Add N engines to a running cluster; returns once they are registered. "
                   "They run in the background and stop with the cluster.")
    aliases = {**ClusterCommand.aliases, "n": "Cluster.n", "timeout": "Cluster.engine_timeout",
               "engines": "Cluster.engine_launcher_class"}

    def start(self) -> None:
        sys.exit(self.run())

    def run(self) -> int:
        path = cluster_file(self.location, self.cluster_id)
        cluster = load_cluster(path) if path.exists() else None
        if cluster is None or cluster.controller is None:
            self.say_error(f"no running cluster {show_id(self.cluster_id)} in profile {self.profile}. "
                           f"{_running_summary(Path(self.ipython_dir), self.location)}")
            return EXIT_NOT_RUNNING
        cluster.update_config(self.config)
        cluster.daemonize = True
        cluster.log_level = self.log_level
        n = self.config.Cluster.get("n", 1)
        client = cluster.connect_client_sync()
        try:
            before = len(client.ids)
            engine_set_id = cluster.start_engines_sync(n)
            try:
                cluster.wait_for_engines(client, before + n)
            except ClusterError as e:
                cluster.stop_engines_sync(engine_set_id)
                self.say_error(f"the new engines failed to start: {e}")
                return EXIT_FAILURE
        finally:
            client.close()
        print(f"Added {n} engines to {describe(cluster)}: {before + n} engines now.", flush=True)
        return 0


class CleanCommand(ClusterCommand):
    name = f"{PROG} clean"
    usage = f"{PROG} clean [--profile P] [options]"
    description = ("Remove the log files of processes that are gone and the files of clusters "
                   "that no longer run, in one profile (--profile) or all.")

    def start(self) -> None:
        sys.exit(self.run())

    def run(self) -> int:
        one = self.location if self.option_given("profile") or self.option_given("location") else None
        ipython_dir = Path(self.ipython_dir)
        files = len(list(cluster_files(ipython_dir, one)))
        running = running_clusters(ipython_dir, one)  # prunes the files of dead clusters
        removed = 0
        for folder in profile_dirs(ipython_dir, one):
            for log in (folder / "log").glob("*.log"):
                pid = log_file_pid(log)
                if log.name.startswith(".starting-") or (pid is not None and not pid_running(pid)):
                    log.unlink(missing_ok=True)
                    removed += 1
        print(f"Removed {removed} log files and {files - len(running)} files of stopped clusters; "
              f"{len(running)} clusters still run.", flush=True)
        return 0


SUBCOMMANDS = {
    "start": (StartCommand, "start a controller and engines"),
    "stop": (StopCommand, "stop a running cluster"),
    "list": (ListCommand, "list running clusters"),
    "engines": (EnginesCommand, "add engines to a running cluster"),
    "clean": (CleanCommand, "remove log files and files of stopped clusters"),
}


class IPClusterApp(Application):
    """``ipcluster-lite``: dispatches to its subcommands."""

    name = PROG
    version = __version__
    description = "Start, stop, list, grow and clean ipyparallel_lite clusters."
    usage = f"{PROG} {{{','.join(SUBCOMMANDS)}}} [options]"
    subcommands = {k: (cls, help) for k, (cls, help) in SUBCOMMANDS.items()}

    def emit_description(self) -> Iterator[str]:
        yield f"usage: {self.usage}"
        yield ""
        yield from super().emit_description()

    def start(self) -> None:
        if self.subapp is None:
            raise UsageError("a subcommand is required: " + ", ".join(SUBCOMMANDS))
        self.subapp.start()


def main(argv: list[str] | None = None) -> int:
    """Run ``ipcluster-lite`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Usage errors exit 2, with the subcommand's short usage.
    """
    app = IPClusterApp()
    try:
        try:
            app.initialize(argv)
            app.start()
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILURE)
    except UsageError as e:
        which = app.subapp or app
        print(f"usage: {which.usage}\n{which.name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigFileError as e:
        print(f"{(app.subapp or app).name}: error in config file {e}", file=sys.stderr)
        return EXIT_FAILURE
    except ClusterError as e:
        print(f"{(app.subapp or app).name}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:  # subcommands are singletons: let main() run again in this process
        for cls, _ in SUBCOMMANDS.values():
            cls.clear_instance()
    return 0


if __name__ == "__main__":
    sys.exit(main())
