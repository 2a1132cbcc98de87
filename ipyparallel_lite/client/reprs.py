"""How Client, Cluster, views and AsyncResult show themselves: ``__repr__`` and HTML.

All rendering lives here; each class attaches it with one line
(``_repr_html_ = reprs.client_html``), so Jupyter shows a small table (engines, cluster
id, profile, state, progress) and a terminal a one-line summary. Every function only
reads public attributes and never blocks or talks to the controller.
"""

from __future__ import annotations

from html import escape
from typing import Any


def _table(title: str, rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{escape(k)}</th>"
        f"<td style='text-align:left'>{v}</td></tr>"
        for k, v in rows
    )
    return f"<div><strong>{escape(title)}</strong><table>{cells}</table></div>"


def _ids(ids: list[int]) -> str:
    """``0-3, 5`` rather than a long list."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _progress_bar(done: int, total: int) -> str:
    return f"<progress value='{done}' max='{max(total, 1)}'></progress> {done}/{total}"


# ---- Cluster ------------------------------------------------------------------------


def _cluster_state(cluster: Any) -> str:
    controller = cluster.controller
    return "running" if controller is not None and controller.running else "stopped"


def cluster_repr(cluster: Any) -> str:
    return (f"<Cluster(cluster_id={cluster.cluster_id!r}, profile={cluster.profile!r}, "
            f"controller={_cluster_state(cluster)}, engines={cluster.engine_count})>")


def cluster_html(cluster: Any) -> str:
    controller = cluster.controller
    pid = controller.pid if controller is not None and controller.running else None
    sets = "".join(f"<li>{escape(k)}: {sum(e.n for e in v if e.running)} running</li>"
                   for k, v in cluster.engines.items())
    return _table("Cluster", [
        ("cluster id", escape(repr(cluster.cluster_id))),
        ("profile", escape(f"{cluster.profile} ({cluster.profile_dir})")),
        ("controller", f"{_cluster_state(cluster)}" + (f" (pid {pid})" if pid else "")),
        ("engines", f"{cluster.engine_count} running of n={cluster.n}"
                    + (f"<ul>{sets}</ul>" if sets else "")),
    ])


# ---- Client -------------------------------------------------------------------------


def _client_cluster_id(client: Any) -> str:
    cluster = client.cluster
    return cluster.cluster_id if cluster is not None else client.connection_info.get("cluster_id", "")


def client_repr(client: Any) -> str:
    return (f"<Client(profile={client.profile!r}, cluster_id={_client_cluster_id(client)!r}, "
            f"engines={len(client.ids)})>")


def client_html(client: Any) -> str:
    info = client.connection_info
    return _table("Client", [
        ("engines", f"{len(client.ids)}: {_ids(client.ids)}"),
        ("cluster id", escape(repr(_client_cluster_id(client)))),
        ("profile", escape(client.profile)),
        ("controller", escape(str(info.get("interface", "")))),
        ("task scheme", escape(str(info.get("task_scheme", "")))),
    ])


# ---- views --------------------------------------------------------------------------


def _view_targets(view: Any) -> str:
    targets = view.targets
    if targets is None or targets == "all":
        return "all engines"
    if isinstance(targets, int):
        return f"engine {targets}"
    if isinstance(targets, list | tuple | range):
        return f"engines {_ids(list(targets))}"
    return escape(repr(targets))


def view_html(view: Any) -> str:
    return _table(type(view).__name__, [
        ("targets", _view_targets(view)),
        ("block", str(view.block)),
        ("engines connected", str(len(view.client.ids))),
    ])


# ---- AsyncResult --------------------------------------------------------------------


def asyncresult_html(ar: Any) -> str:
    if not ar.done():
        state = "pending"
    elif ar.successful():
        state = "finished"
    else:
        state = "failed"
    return _table(type(ar).__name__, [
        ("state", state),
        ("progress", _progress_bar(ar.progress, len(ar))),
        ("requests", str(len(ar.msg_ids))),
    ])
