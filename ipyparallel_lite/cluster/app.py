"""``ipcluster-lite``: start, stop and list local clusters from a shell.

Subcommands::

    ipcluster-lite start -n 4 [--profile P] [--cluster-id ID] [--daemonize] [--ip IP]
    ipcluster-lite stop [--profile P] [--cluster-id ID | --all]
    ipcluster-lite list [--profile P] [-o text|json]

Contracts:

* ``start`` returns (``--daemonize``) or prints its ready line only once all ``n``
  engines are registered with the controller. In the foreground it then stays until
  SIGINT (Ctrl-C), SIGTERM or SIGHUP and stops everything before exiting 0. A failure
  (an engine or the controller dies, or the engines time out) exits 1 with one message
  that carries the relevant log tail, and leaves no process running.
* The default cluster id is ``""``, whose connection files are
  ``ipcontroller-client.json`` / ``ipcontroller-engine.json``, so that a plain
  ``ipp.Client()`` (or ``ipp.Client(profile=P)``) finds the cluster.
* Every cluster, foreground or daemonized, has a cluster file
  (``profile_<P>/security/cluster-<id>.json``) through which ``stop`` and ``list``
  find its processes. A pid is acted on only while it still runs the command line the
  file records, so a recycled pid is never signalled.
* Exit codes: 0 success, 1 failure, 2 usage error, 10 the cluster is already running,
  11 no such cluster (the codes ``ipcluster`` uses for the last two).

All process handling is :class:`~ipyparallel_lite.cluster.Cluster`'s; this module
only parses arguments, waits, reports and cleans up.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ipyparallel_lite._version import __version__
from ipyparallel_lite.client.progress import Progress
from ipyparallel_lite.cluster.cluster import Cluster, ClusterError

PROG = "ipcluster-lite"
EXIT_FAILURE = 1
EXIT_ALREADY_STARTED = 10
EXIT_NOT_RUNNING = 11

_LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "CRITICAL")


class _Stop(Exception):
    """Raised by our SIGINT/SIGTERM/SIGHUP handler: unwind and stop the cluster."""


# ---- finding clusters ---------------------------------------------------------------


def _ipython_dir(arg: str | None) -> Path:
    """``--ipython-dir``, else ``$IPYTHONDIR``, else ``~/.ipython`` (IPython's rule)."""
    if arg:
        return Path(arg).expanduser().resolve()
    from ipyparallel_lite.connection import ipython_dir

    return ipython_dir()


def _show_id(cluster_id: str) -> str:
    return cluster_id if cluster_id else "''"


def _owns(launcher: Any) -> bool:
    """True when ``launcher``'s pid is alive and still runs the command it launched."""
    import psutil

    if launcher is None or launcher.pid is None or not launcher.running:
        return False  # ``running`` also compares the process start time (pid reuse)
    try:
        cmdline = psutil.Process(launcher.pid).cmdline()
    except psutil.Error:
        return False
    return cmdline[1:] == list(launcher.args)[1:]


def load_cluster(path: Path) -> Cluster | None:
    """The cluster recorded in ``path``, with launchers whose pid is gone or reused dropped.

    ``None`` when the file is unreadable (half-written or not a cluster file).
    """
    try:
        cluster = Cluster.from_file(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _owns(cluster.controller):
        cluster.controller = None
    cluster.engines = {k: [e for e in v if _owns(e)] for k, v in cluster.engines.items()}
    return cluster


def _cluster_files(ipython_dir: Path, profile: str | None) -> Iterator[Path]:
    """Cluster files of one profile, or of every profile when ``profile`` is None."""
    if profile is not None:
        dirs = [ipython_dir / f"profile_{profile}"]
    else:
        dirs = sorted(ipython_dir.glob("profile_*"))
    for d in dirs:
        yield from sorted((d / "security").glob("cluster-*.json"))


def _cluster_file(ipython_dir: Path, profile: str, cluster_id: str) -> Path:
    """Where Cluster writes the file of ``cluster_id``."""
    return Cluster(profile=profile, cluster_id=cluster_id, ipython_dir=str(ipython_dir)).cluster_file


def _describe(cluster: Cluster) -> str:
    return f"cluster {_show_id(cluster.cluster_id)} (profile {cluster.profile})"


def _stop(cluster: Cluster) -> str:
    """Stop ``cluster`` (engines, then controller; its files go) and say what was stopped
    ("" when nothing was running any more)."""
    engines = cluster.engine_count
    ctl = cluster.controller
    controller = ctl.pid if ctl is not None and ctl.running else None
    cluster.stop_cluster_sync()
    what = [f"{engines} engine{'s' if engines != 1 else ''}"] if engines else []
    if controller is not None:
        what.append(f"the controller (pid {controller})")
    return " and ".join(what)


# ---- start --------------------------------------------------------------------------


def _wait_for_engines(cluster: Cluster, client: Any, n: int, timeout: float,
                      shown: Progress) -> None:
    """Return once ``n`` engines are registered; raise ClusterError (with a log tail) on
    a dead controller, a dead engine, or ``timeout`` seconds without all of them."""
    deadline = time.monotonic() + timeout
    while True:
        shown.update(len(client.ids))
        try:
            client.wait_for_engines(n, timeout=0.1, interactive=False)
            shown.update(n, force=True)
            return
        except TimeoutError:
            pass
        controller = cluster.controller
        if controller is None or not controller.running:
            tail = controller.log_tail() if controller is not None else ""
            raise ClusterError(
                f"the controller exited while engines were starting. "
                f"Its log ({controller.log_file if controller else '?'}):\n{tail}"
            )
        launchers = [e for v in cluster.engines.values() for e in v]
        dead = [e for e in launchers if not e.running]
        if dead:
            raise ClusterError(
                f"{len(dead)} of {len(launchers)} engines exited before all registered "
                f"({len(client.ids)} registered). Log of the first "
                f"({dead[0].log_file}):\n{dead[0].log_tail()}"
            )
        if time.monotonic() > deadline:
            logs = [e for e in launchers if e.log_tail()] or [controller]
            raise ClusterError(
                f"only {len(client.ids)} of {n} engines registered within {timeout:g}s. "
                f"Log of {logs[0].log_file}:\n{logs[0].log_tail() or '(empty)'}"
            )


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def _set_signals(handler: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def cmd_start(args: argparse.Namespace) -> int:
    """``start``: see the module docstring for the contract."""
    ipython_dir = _ipython_dir(args.ipython_dir)
    existing_path = _cluster_file(ipython_dir, args.profile, args.cluster_id)
    if existing_path.exists():
        existing = load_cluster(existing_path)
        if existing is not None and existing.controller is not None:
            print(
                f"{PROG} start: {_describe(existing)} is already running "
                f"(controller pid {existing.controller.pid}). Stop it with "
                f"`{PROG} stop --profile {args.profile} --cluster-id {_show_id(args.cluster_id)}`"
                " or pick another --cluster-id.",
                file=sys.stderr,
            )
            return EXIT_ALREADY_STARTED
        if existing is not None:  # a dead controller: clear what is left of it
            existing.stop_cluster_sync()
        existing_path.unlink(missing_ok=True)

    cluster = Cluster(
        n=args.n, profile=args.profile, cluster_id=args.cluster_id,
        ipython_dir=str(ipython_dir), controller_ip=args.ip, log_level=args.log_level,
        daemonize=args.daemonize, engine_timeout=args.timeout,
    )
    n = cluster.n
    # progress (on stderr) only for a person at a terminal
    progress = sys.stdout.isatty() and sys.stderr.isatty()
    # SIGINT too: the default KeyboardInterrupt may land inside asyncio's own handling
    _set_signals(_raise_stop)
    t0 = time.monotonic()
    try:
        with Progress(total=n, label="engines ready", enabled=progress) as shown:
            cluster.start_cluster_sync()
            client = cluster.connect_client_sync()
            _wait_for_engines(cluster, client, n, args.timeout, shown)
    except BaseException as e:
        _set_signals(signal.SIG_IGN)  # nothing may interrupt the clean-up
        cluster.stop_cluster_sync()
        if isinstance(e, _Stop | KeyboardInterrupt):
            print(f"{PROG} start: interrupted; {_describe(cluster)} stopped.", file=sys.stderr)
            return 130 if isinstance(e, KeyboardInterrupt) or str(e) == "SIGINT" else EXIT_FAILURE
        if not isinstance(e, Exception):
            raise
        print(f"{PROG} start: {_describe(cluster)} failed to start: {e}", file=sys.stderr)
        return EXIT_FAILURE
    ready = (f"Cluster {_show_id(cluster.cluster_id)} (profile {cluster.profile}): "
             f"{n} engines ready in {time.monotonic() - t0:.1f}s")
    if not args.daemonize:
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
        process = cluster.controller.process if cluster.controller else None
        returncode = process.returncode if process is not None else None
        if returncode:
            code = EXIT_FAILURE
            print(f"{PROG}: the controller exited with code {returncode}. "
                  f"Its log ({cluster.controller.log_file}):\n{cluster.controller.log_tail()}",
                  file=sys.stderr)
        else:
            print(f"The controller of {_describe(cluster)} was stopped.", flush=True)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        _set_signals(signal.SIG_IGN)
        what = _stop(cluster)
    if what:
        print(f"Stopped {_describe(cluster)}: {what}.", flush=True)
    return code


# ---- stop and list ------------------------------------------------------------------


def _running_summary(ipython_dir: Path, profile: str) -> str:
    ids = []
    for path in _cluster_files(ipython_dir, profile):
        cluster = load_cluster(path)
        if cluster is not None and cluster.controller is not None:
            ids.append(_show_id(cluster.cluster_id))
    return f"Running in profile {profile}: {', '.join(ids)}." if ids else (
        f"No cluster runs in profile {profile} (ipython dir {ipython_dir}).")


def cmd_stop(args: argparse.Namespace) -> int:
    """``stop``: stop one cluster (``--cluster-id``, default ``''``) or ``--all`` of a profile.

    Exits 11 when the named cluster does not exist or no longer runs.
    """
    ipython_dir = _ipython_dir(args.ipython_dir)
    if args.all:
        paths = list(_cluster_files(ipython_dir, args.profile))
    else:
        paths = [_cluster_file(ipython_dir, args.profile, args.cluster_id)]
        if not paths[0].exists():
            print(f"{PROG} stop: no cluster {_show_id(args.cluster_id)} in profile "
                  f"{args.profile}. {_running_summary(ipython_dir, args.profile)}", file=sys.stderr)
            return EXIT_NOT_RUNNING
    stopped = 0
    for path in paths:
        cluster = load_cluster(path)
        if cluster is None:
            print(f"{PROG} stop: skipping unreadable cluster file {path}", file=sys.stderr)
            continue
        if cluster.controller is None and cluster.engine_count == 0:
            cluster.stop_cluster_sync()  # only removes the files
            if not args.all:
                print(f"{PROG} stop: {_describe(cluster)} was not running any more; "
                      f"removed its stale files.", file=sys.stderr)
                return EXIT_NOT_RUNNING
            continue
        print(f"Stopped {_describe(cluster)}: {_stop(cluster)}.", flush=True)
        stopped += 1
    if args.all and not stopped:
        print(f"No running clusters to stop in profile {args.profile}.")
    return 0


def running_clusters(ipython_dir: Path, profile: str | None = None) -> list[Cluster]:
    """Clusters whose controller runs; files of dead ones are pruned (and orphaned
    engines of a dead controller stopped)."""
    found = []
    for path in _cluster_files(ipython_dir, profile):
        cluster = load_cluster(path)
        if cluster is None:
            continue
        if cluster.controller is None:
            _stop(cluster)
            continue
        found.append(cluster)
    return found


def cmd_list(args: argparse.Namespace) -> int:
    """``list``: a table (or ``-o json``) of running clusters of one or every profile."""
    clusters = running_clusters(_ipython_dir(args.ipython_dir), args.profile)
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
    if args.output == "json":
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    header = ("PROFILE", "CLUSTER ID", "ENGINES", "CONTROLLER PID")
    table = [header] + [
        (r["profile"], _show_id(r["cluster_id"]), str(r["engines"]), str(r["controller_pid"]))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


# ---- the command line ---------------------------------------------------------------


def _engine_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of engines: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("the number of engines cannot be negative")
    return n


def _log_level(text: str) -> str | int:
    if text.isdigit():
        return int(text)
    level = text.upper().replace("WARNING", "WARN")
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is none of {', '.join(_LOG_LEVELS)}")
    return level


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ipcluster-lite`` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ipython-dir", metavar="DIR",
                        help="IPython directory (default: $IPYTHONDIR or ~/.ipython)")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Start, stop and list ipyparallel_lite clusters.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{start,stop,list}", required=True)
    parser.set_defaults(subparsers=sub.choices)

    start = sub.add_parser(
        "start", parents=[common], help="start a controller and engines",
        description="Start a controller and N engines; ready when all engines registered. "
                    "In the foreground until Ctrl-C, or in the background with --daemonize.")
    start.add_argument("-n", "--n", type=_engine_count, default=None, metavar="N",
                       help="number of engines (default: number of CPUs)")
    start.add_argument("--profile", default="default", help="IPython profile (default: default)")
    start.add_argument("--cluster-id", default="", metavar="ID",
                       help="names the connection files (default: '', found by a plain Client())")
    start.add_argument("--daemonize", action="store_true",
                       help="leave the cluster running in the background and exit once ready")
    start.add_argument("--ip", default="127.0.0.1", help="interface the controller listens on")
    start.add_argument("--log-level", type=_log_level, default="WARN", metavar="LEVEL",
                       help=f"log level of controller and engines ({', '.join(_LOG_LEVELS)})")
    start.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="how long engines may take to register (default: 60)")
    start.set_defaults(func=cmd_start)

    stop = sub.add_parser(
        "stop", parents=[common], help="stop a running cluster",
        description="Stop a cluster's engines, then its controller, and remove its files.")
    stop.add_argument("--profile", default="default", help="IPython profile (default: default)")
    which = stop.add_mutually_exclusive_group()
    which.add_argument("--cluster-id", default="", metavar="ID",
                       help="the cluster to stop (default: '')")
    which.add_argument("--all", action="store_true", help="stop every cluster of the profile")
    stop.set_defaults(func=cmd_stop)

    lst = sub.add_parser(
        "list", parents=[common], help="list running clusters",
        description="List running clusters (pruning the files of dead ones).")
    lst.add_argument("--profile", default=None, help="only this profile (default: all)")
    lst.add_argument("-o", "--output", choices=("text", "json"), default="text",
                     help="output format (default: text)")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``ipcluster-lite`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Usage errors exit 2 (through argparse's ``SystemExit``).
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # complain with the subcommand's own (short) usage
        args.subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except ClusterError as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
