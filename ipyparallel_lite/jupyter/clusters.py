"""The clusters the JupyterLab panel shows, and what it may do with them.

:class:`ClusterManager` holds the clusters created from the panel and finds, through
the profiles' cluster files (as ``ipcluster-lite list`` does), the ones started from
notebooks and from the shell. It starts, stops and scales them through
:class:`~ipyparallel_lite.cluster.Cluster`, and reads what their engines are doing
from the Hub over a client connection, so the state lives in the cluster, not in the
page or here. No HTTP in this module: the handlers translate its errors to statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ipyparallel_lite.client.client import Client
from ipyparallel_lite.cluster.cluster import Cluster
from ipyparallel_lite.cluster.discovery import running_clusters

_NAME = re.compile(r"[A-Za-z0-9_.-]*")


class UnknownCluster(KeyError):
    """No cluster has this id (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Conflict(RuntimeError):
    """The cluster's state forbids the request, e.g. scaling a stopped cluster (HTTP 409)."""


def cluster_key(profile: str, cluster_id: str) -> str:
    """The id the REST API and the panel use for a cluster: ``profile:cluster_id``."""
    return f"{profile}:{cluster_id}"


def engine_count_arg(value: Any, what: str = "n") -> int:
    """``value`` as a number of engines; ValueError (HTTP 400) with a reason otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be a whole number of engines, not {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be 0 or more engines, not {value}")
    return value


def task_limit_arg(value: Any) -> int:
    """``value`` (a query argument, so a string) as a number of tasks to list, 1 to
    :data:`MAX_TASKS`; ValueError (HTTP 400) with a reason otherwise."""
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and 0 < int(value) <= MAX_TASKS):
        raise ValueError(f"limit must be a whole number of tasks from 1 to {MAX_TASKS}, not {value!r}")
    return int(value)


#: the most recent tasks one request may list
MAX_TASKS = 500
#: how far back the recent tasks are first looked for, widened until enough are found
_TASK_WINDOWS = (timedelta(minutes=1), timedelta(hours=1), timedelta(days=1), None)
#: the record keys the task list needs: no request or result bodies, no buffers
_TASK_KEYS = ["msg_id", "label", "engine_uuid", "submitted", "started", "completed",
              "result_metadata"]


@dataclass
class _Connection:
    """A client of one run of a cluster (a restarted controller needs a new one)."""

    controller_pid: int | None
    client: Client
    #: the last task list's length and the ``submitted`` of its oldest task (None: it
    #: held every record), so that the next list asks only for tasks that recent
    tasks_bound: tuple[int, datetime | None] | None = None


class ClusterManager:
    """Clusters of every profile under ``ipython_dir`` (None: IPython's rule)."""

    def __init__(self, ipython_dir: str | None = None):
        self.ipython_dir = ipython_dir
        #: clusters created from the panel, stopped or running, by key
        self._created: dict[str, Cluster] = {}
        #: running clusters found through their cluster files, refreshed by :meth:`list`
        self._found: dict[str, Cluster] = {}
        #: what a cluster is busy with while a start, stop or scale request runs
        self._busy: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._connections: dict[str, _Connection] = {}

    def _ipython_dir(self) -> Path:
        if self.ipython_dir:
            return Path(self.ipython_dir).expanduser()
        from ipyparallel_lite.connection import ipython_dir

        return ipython_dir()

    # ---- listing ----------------------------------------------------------------------

    async def list(self) -> list[dict]:
        """Every cluster: the panel's own, and those whose cluster files show them running."""
        found = await asyncio.to_thread(running_clusters, self._ipython_dir())
        self._found = {
            key: cluster for cluster in found
            if (key := cluster_key(cluster.profile, cluster.cluster_id)) not in self._created
        }
        clusters = {**self._found, **self._created}
        for key in list(self._connections):
            if key not in clusters or not _is_running(clusters[key]):
                self._disconnect(key)
        return [self.model(key) for key in sorted(clusters)]

    def get(self, key: str) -> Cluster:
        cluster = self._created.get(key) or self._found.get(key)
        if cluster is None:
            raise UnknownCluster(f"no cluster {key!r}; list them with GET .../clusters")
        return cluster

    async def describe(self, key: str) -> dict:
        """The model of one cluster, after looking for clusters started elsewhere."""
        await self.list()
        return self.model(key)

    def model(self, key: str) -> dict:
        """What the panel shows of one cluster."""
        cluster = self.get(key)
        running = _is_running(cluster)
        return {
            "id": key,
            "profile": cluster.profile,
            "cluster_id": cluster.cluster_id,
            "state": self._busy.get(key) or ("running" if running else "stopped"),
            "n": cluster.n,
            "engines": cluster.engine_count if running else 0,
            "controller_pid": cluster.controller.pid if running else None,
            "created_here": key in self._created,
            "error": self._errors.get(key),
        }

    # ---- actions ----------------------------------------------------------------------

    async def create(self, profile: str = "default", cluster_id: str | None = None,
                     n: int | None = None) -> dict:
        """A new (stopped) cluster of ``profile``; a fresh id unless ``cluster_id`` is given."""
        for what, value in (("profile", profile), ("cluster_id", cluster_id or "")):
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise ValueError(f"{what} may hold letters, digits and . _ - only, not {value!r}")
        if not profile:
            raise ValueError("profile must not be empty")
        if n is not None:
            engine_count_arg(n)
        cluster = Cluster(n=n, profile=profile, cluster_id=cluster_id,
                          ipython_dir=str(self._ipython_dir()))
        key = cluster_key(profile, cluster.cluster_id)
        await self.list()
        if key in self._created or key in self._found:
            raise Conflict(f"cluster {key!r} exists already; pick another cluster_id")
        self._created[key] = cluster
        return self.model(key)

    @contextlib.contextmanager
    def _working(self, key: str, doing: str, *, keep_error: bool = True) -> Iterator[Cluster]:
        """The cluster, marked busy ``doing`` for the block (another action on it meanwhile
        is a Conflict); an error of the block is kept for its model if ``keep_error``."""
        cluster = self.get(key)
        if key in self._busy:
            raise Conflict(f"cluster {key!r} is {self._busy[key]}; try again when it is done")
        self._busy[key] = doing
        self._errors.pop(key, None)
        try:
            yield cluster
        except Exception as e:
            if keep_error:
                self._errors[key] = str(e)
            raise
        finally:
            self._busy.pop(key, None)

    async def start(self, key: str, n: int | None = None) -> dict:
        """Start the controller and ``n`` engines (default: the cluster's ``n``); returns
        once they are registered."""
        if n is not None:
            engine_count_arg(n)
        cluster = self.get(key)
        if _is_running(cluster):
            raise Conflict(f"cluster {key!r} is running already")
        with self._working(key, "starting"):
            client = await cluster.start_and_connect(n)
            cluster.n = cluster.n if n is None else n
            self._connections[key] = _Connection(cluster.controller.pid, client)
        return self.model(key)

    async def stop(self, key: str) -> dict | None:
        """Stop the engines and the controller. A cluster found elsewhere leaves the list
        (None is returned); one created here stays, stopped, to be started again."""
        with self._working(key, "stopping", keep_error=False) as cluster:
            self._disconnect(key)
            await cluster.stop_cluster()
        if key not in self._created:
            self._found.pop(key, None)
            return None
        return self.model(key)

    async def remove(self, key: str) -> None:
        """Stop the cluster if it runs, and forget it."""
        if _is_running(self.get(key)):
            await self.stop(key)
        self._created.pop(key, None)
        self._found.pop(key, None)
        self._errors.pop(key, None)

    async def scale(self, key: str, n: Any) -> dict:
        """Add or remove engines until ``n`` run; returns once the Hub counts ``n``."""
        n = engine_count_arg(n)
        cluster = self.get(key)
        if not _is_running(cluster):
            raise Conflict(f"cluster {key!r} is stopped; start it before scaling it")
        with self._working(key, "scaling"):
            await cluster.scale(n)
        return self.model(key)

    async def stop_all(self) -> None:
        """When the server stops: stop the clusters started here, leave the others."""
        for key in list(self._connections):
            self._disconnect(key)
        running = [c for c in self._created.values() if _is_running(c)]
        await asyncio.gather(*(c.stop_cluster() for c in running), return_exceptions=True)

    # ---- what the engines do -------------------------------------------------------

    async def _client(self, key: str, cluster: Cluster) -> Client:
        pid = cluster.controller.pid if cluster.controller else None
        connection = self._connections.get(key)
        if connection is None or connection.controller_pid != pid:
            self._disconnect(key)
            client = await asyncio.to_thread(Client, cluster.connection_file("client"))
            connection = self._connections[key] = _Connection(pid, client)
        return connection.client

    def _disconnect(self, key: str) -> None:
        connection = self._connections.pop(key, None)
        if connection is not None:
            connection.client.close()

    async def engines(self, key: str) -> dict:
        """Per engine its id, state, host, pid and tasks queued/running/done, and totals,
        as the Hub knows them now."""
        cluster = self.get(key)
        if not _is_running(cluster):
            raise Conflict(f"cluster {key!r} is stopped; start it to see its engines")
        client = await self._client(key, cluster)
        status = await asyncio.to_thread(client.queue_status)
        infos = client.engine_info()
        engines = []
        for eid in sorted(k for k in status if isinstance(k, int)):
            queue = status[eid]
            pending = queue["queue"] + queue["tasks"]
            running = min(pending, 1)  # an engine runs one request at a time
            info = infos.get(eid, {})
            engines.append({
                "id": eid,
                "state": "busy" if pending else "idle",
                "host": info.get("hostname"),
                "pid": info.get("pid"),
                "queued": pending - running,
                "running": running,
                "done": queue["completed"],
            })
        totals = {
            "engines": len(engines),
            "queued": sum(e["queued"] for e in engines) + status.get("unassigned", 0),
            "running": sum(e["running"] for e in engines),
            "done": sum(e["done"] for e in engines),
        }
        return {"cluster": self.model(key), "engines": engines, "totals": totals}

    async def tasks(self, key: str, limit: int = 20) -> dict:
        """The ``limit`` tasks submitted last, newest first, each with its label, state,
        engine, times and duration, from the Hub's records."""
        cluster = self.get(key)
        if not _is_running(cluster):
            raise Conflict(f"cluster {key!r} is stopped; start it to see its tasks")
        client = await self._client(key, cluster)
        connection = self._connections[key]
        records = await asyncio.to_thread(_recent_records, client, connection, limit)
        errors = [r["msg_id"] for r in records
                  if (r.get("result_metadata") or {}).get("status") == "error"]
        # the error's name tells a failure from an abort or a loss; asked only for the
        # failed tasks listed, as their contents may hold tracebacks
        enames = {r["msg_id"]: (r.get("result_content") or {}).get("ename")
                  for r in await asyncio.to_thread(
                      client.db_query, {"msg_id": {"$in": errors}}, ["result_content"])
                  } if errors else {}
        engine_ids = client.engine_ids_by_uuid()
        tasks = [_task(r, engine_ids, enames.get(r["msg_id"])) for r in records]
        # an engine runs one request at a time: the oldest it was given runs, the
        # requests queued behind it wait (a record only says "sent to its engine")
        busy: set[int] = set()
        for task in reversed(tasks):
            if task["state"] == "running":
                if task["engine"] in busy:
                    task["state"] = "pending"
                busy.add(task["engine"])
        return {"cluster": self.model(key), "tasks": tasks}


def _recent_records(client: Client, connection: _Connection, limit: int) -> list[dict]:
    """The ``limit`` records submitted last, newest first. Asks first for the tasks
    since the oldest one the last list showed (only a poll's worth of new ones come on
    top), else for a window widened from a minute until it holds ``limit`` tasks: a
    busy Hub's thousands of older records do not travel once a second."""
    now = datetime.now(timezone.utc)
    bounds: list[datetime | None] = [now - w if w else None for w in _TASK_WINDOWS]
    if connection.tasks_bound is not None and connection.tasks_bound[0] >= limit:
        bounds.insert(0, connection.tasks_bound[1])
    for since in bounds:
        records = client.db_query({} if since is None else {"submitted": {"$gte": since}},
                                  _TASK_KEYS)
        if len(records) >= limit or since is None:
            break
    records.sort(key=lambda r: r.get("submitted") or now, reverse=True)
    del records[limit:]
    # a full list bounds the next one by its oldest task; a short one held every record
    connection.tasks_bound = (limit, records[-1]["submitted"] if len(records) == limit else None)
    return records


def _task(record: dict, engine_ids: dict[str, int], ename: str | None) -> dict:
    """What the panel shows of one task record."""
    metadata = record.get("result_metadata") or {}
    status = metadata.get("status")
    if record.get("completed") is None:
        state = "running" if record.get("engine_uuid") else "pending"
    elif status == "aborted" or ename == "TaskAborted":
        state = "aborted"
    elif ename == "EngineError":  # its engine or the controller died under it
        state = "lost"
    else:
        state = "done" if status == "ok" else "error"
    engine = metadata.get("engine_id")
    if engine is None or engine < 0:
        engine = engine_ids.get(record.get("engine_uuid"))
    started, completed = record.get("started"), record.get("completed")
    return {
        "msg_id": record["msg_id"],
        "label": record.get("label"),
        "state": state,
        "error": ename,
        "engine": engine,
        "submitted": _iso(record.get("submitted")),
        "started": _iso(started),
        "completed": _iso(completed),
        "duration": (completed - started).total_seconds() if started and completed else None,
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _is_running(cluster: Cluster) -> bool:
    return cluster.controller is not None and cluster.controller.running
