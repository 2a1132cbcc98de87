"""REST handlers of the cluster panel, under ``<base_url>/ipyparallel-lite/``.

=========================================  ==========================================
``GET    clusters``                        every cluster (panel, notebooks, shell)
``POST   clusters`` ``{profile, cluster_id?, n?}``   create one, stopped (201)
``GET    clusters/<id>``                   one cluster
``DELETE clusters/<id>``                   stop it if it runs, and forget it (204)
``POST   clusters/<id>/start`` ``{n?}``    start; returns once ``n`` engines are up
``POST   clusters/<id>/stop``              stop engines and controller
``POST   clusters/<id>/scale`` ``{n}``     add or remove engines until ``n`` run
``GET    clusters/<id>/engines``           engines and totals, read from the Hub
``GET    clusters/<id>/tasks?limit=20``    the tasks submitted last (1 to 500), newest
                                           first: label, state, engine, times, duration
=========================================  ==========================================

``<id>`` is ``profile:cluster_id``. Every handler is authenticated like any Jupyter
API (a request without the token gets 403). Errors answer ``{"message": reason}``:
400 bad input, 404 unknown cluster, 409 a state that forbids the request (such as
scaling a stopped cluster), 500 a cluster that failed to start (its log tail included).
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.base.handlers import APIHandler
from tornado import web

from ipyparallel_lite.cluster.cluster import ClusterError
from ipyparallel_lite.jupyter.clusters import (
    ClusterManager,
    Conflict,
    UnknownCluster,
    task_limit_arg,
)

URL_PREFIX = "ipyparallel-lite"
_KEY = r"(?P<key>[^/]+)"


class _ClusterHandler(APIHandler):
    """Shared parts: the manager, the JSON body, and errors as statuses."""

    @property
    def manager(self) -> ClusterManager:
        return self.settings["ipyparallel_lite_clusters"]

    def body(self) -> dict:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError as e:
            raise web.HTTPError(400, f"the request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return body

    async def run(self, action: Any) -> Any:
        """Await ``action`` and turn the manager's errors into HTTP errors."""
        try:
            return await action
        except UnknownCluster as e:
            raise web.HTTPError(404, str(e)) from None
        except Conflict as e:
            raise web.HTTPError(409, str(e)) from None
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        except ClusterError as e:
            raise web.HTTPError(500, str(e)) from None

    def send(self, model: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(model))


class ClustersHandler(_ClusterHandler):
    @web.authenticated
    async def get(self) -> None:
        self.send({"clusters": await self.run(self.manager.list())})

    @web.authenticated
    async def post(self) -> None:
        body = self.body()
        unknown = set(body) - {"profile", "cluster_id", "n"}
        if unknown:
            raise web.HTTPError(400, f"unknown fields {sorted(unknown)}; "
                                     "a new cluster takes profile, cluster_id and n")
        model = await self.run(self.manager.create(
            body.get("profile", "default"), body.get("cluster_id"), body.get("n")))
        self.send(model, 201)


class ClusterHandler(_ClusterHandler):
    @web.authenticated
    async def get(self, key: str) -> None:
        self.send(await self.run(self.manager.describe(key)))

    @web.authenticated
    async def delete(self, key: str) -> None:
        await self.run(self.manager.remove(key))
        self.set_status(204)
        self.finish()


class ClusterActionHandler(_ClusterHandler):
    @web.authenticated
    async def post(self, key: str, action: str) -> None:
        body = self.body()
        if action == "start":
            model = await self.run(self.manager.start(key, body.get("n")))
        elif action == "stop":
            model = await self.run(self.manager.stop(key))
        elif "n" not in body:
            raise web.HTTPError(400, 'scale takes the number of engines: {"n": 4}')
        else:
            model = await self.run(self.manager.scale(key, body["n"]))
        self.send(model if model is not None else {"id": key, "state": "stopped"})


class EnginesHandler(_ClusterHandler):
    @web.authenticated
    async def get(self, key: str) -> None:
        self.send(await self.run(self.manager.engines(key)))


class TasksHandler(_ClusterHandler):
    @web.authenticated
    async def get(self, key: str) -> None:
        try:
            limit = task_limit_arg(self.get_query_argument("limit", "20"))
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        self.send(await self.run(self.manager.tasks(key, limit)))


def handlers() -> list[tuple[str, type]]:
    base = f"/{URL_PREFIX}/clusters"
    return [
        (base, ClustersHandler),
        (f"{base}/{_KEY}", ClusterHandler),
        (f"{base}/{_KEY}/(?P<action>start|stop|scale)", ClusterActionHandler),
        (f"{base}/{_KEY}/engines", EnginesHandler),
        (f"{base}/{_KEY}/tasks", TasksHandler),
    ]
