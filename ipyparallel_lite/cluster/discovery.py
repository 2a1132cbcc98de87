"""Finding clusters again: from their cluster files, whatever launched them.

A cluster file (``profile_<P>/security/cluster-<id>.json``, written by ``Cluster``)
records the controller's and every engine set's launcher (``BaseLauncher.to_dict``).
:func:`load_cluster` reads one back; a launcher whose processes are gone (or whose pid
now runs something else) is dropped, so nothing that is not ours is ever signalled.
``ipcluster-lite`` and the JupyterLab panel find clusters only through this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ipyparallel_lite.cluster.cluster import Cluster


def show_id(cluster_id: str) -> str:
    """A cluster id as people read it (``''`` for the default one)."""
    return cluster_id if cluster_id else "''"


def describe(cluster: Cluster) -> str:
    return f"cluster {show_id(cluster.cluster_id)} (profile {cluster.profile})"


def load_cluster(path: Path) -> Cluster | None:
    """The cluster recorded in ``path``, with launchers whose processes are gone dropped.

    ``None`` when the file is unreadable (half-written or not a cluster file).
    """
    try:
        cluster = Cluster.from_file(path)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError):
        return None
    if cluster.controller is not None and not cluster.controller.running:
        cluster.controller = None
    cluster.engines = {k: [e for e in v if e.running] for k, v in cluster.engines.items()}
    return cluster


def profile_dirs(ipython_dir: Path, profile_dir: Path | None) -> list[Path]:
    """One profile's folder, or every profile's when ``profile_dir`` is None."""
    return [profile_dir] if profile_dir is not None else sorted(ipython_dir.glob("profile_*"))


def cluster_files(ipython_dir: Path, profile_dir: Path | None) -> Iterator[Path]:
    """Cluster files of one profile, or of every profile when ``profile_dir`` is None."""
    for d in profile_dirs(ipython_dir, profile_dir):
        yield from sorted((d / "security").glob("cluster-*.json"))


def cluster_file(profile_dir: Path, cluster_id: str) -> Path:
    """Where Cluster writes the file of ``cluster_id``."""
    return Cluster(profile_dir=profile_dir, cluster_id=cluster_id, load_profile=False).cluster_file


def stop_and_describe(cluster: Cluster) -> str:
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


def running_clusters(ipython_dir: Path, profile_dir: Path | None = None) -> list[Cluster]:
    """Clusters whose controller runs; files of dead ones are pruned (and orphaned
    engines of a dead controller stopped)."""
    found = []
    for path in cluster_files(ipython_dir, profile_dir):
        cluster = load_cluster(path)
        if cluster is None:
            continue
        if cluster.controller is None:
            stop_and_describe(cluster)
            continue
        found.append(cluster)
    return found
