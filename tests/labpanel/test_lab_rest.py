"""The cluster panel's REST API, served by a real Jupyter server (pytest-jupyter) against
real clusters in a private IPython dir: every endpoint, and bad input on each."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import datetime

import pytest
from tornado.httpclient import HTTPClientError

import ipyparallel_lite as ipp

pytestmark = pytest.mark.timeout(180)

API = "ipyparallel-lite"


@pytest.fixture
def lab_ipython_dir(tmp_path):
    return tmp_path / "ipython"


@pytest.fixture
def jp_server_config(lab_ipython_dir):
    return {
        "ServerApp": {"jpserver_extensions": {"ipyparallel_lite.jupyter": True}},
        "ClusterPanelApp": {"ipython_dir": str(lab_ipython_dir)},
    }


@pytest.fixture
def api(jp_fetch):
    """``await api("GET", "clusters")`` -> the decoded JSON body (None for 204)."""

    async def call(method: str, *parts: str, body: dict | None = None, **kwargs):
        if method == "POST" and body is None:
            body = {}
        response = await jp_fetch(API, *parts, method=method, request_timeout=120,
                                  body=None if body is None else json.dumps(body), **kwargs)
        return json.loads(response.body) if response.body else None

    return call


async def _until(condition, timeout: float = 60) -> None:
    """Wait (without blocking the server under test) until ``condition()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def _error(call) -> tuple[int, str]:
    with pytest.raises(HTTPClientError) as info:
        await call
    body = json.loads(info.value.response.body)
    return info.value.code, body["message"]


async def test_create_start_watch_scale_stop_delete(api, lab_ipython_dir):
    created = await api("POST", "clusters", body={"profile": "default", "cluster_id": "rest", "n": 1})
    assert created["id"] == "default:rest" and created["state"] == "stopped"
    listed = await api("GET", "clusters")
    assert [c["id"] for c in listed["clusters"]] == ["default:rest"]

    started = await api("POST", "clusters", "default:rest", "start", body={"n": 2})
    assert started["state"] == "running" and started["engines"] == 2 and started["n"] == 2
    view = await api("GET", "clusters", "default:rest", "engines")
    assert [e["id"] for e in view["engines"]] == [0, 1]
    assert all(e["pid"] and e["host"] and e["state"] == "idle" for e in view["engines"])
    assert view["totals"] == {"engines": 2, "queued": 0, "running": 0, "done": 0}

    # work submitted by a client shows in the counters, read from the Hub
    with ipp.Client(profile="default", cluster_id="rest", ipython_dir=str(lab_ipython_dir)) as rc:
        rc.load_balanced_view().map_sync(lambda x: x, range(10))
        view = await api("GET", "clusters", "default:rest", "engines")
        assert view["totals"]["done"] == 10 and sum(e["done"] for e in view["engines"]) == 10

        # the recent tasks, newest first, with what the Hub recorded of each
        lview = rc.load_balanced_view()
        lview.label = "squares"
        lview.map_sync(lambda x: x * x, range(3))
        lview.label = "broken"
        failed = lview.apply_async(lambda: 1 / 0)
        with pytest.raises(ipp.RemoteError):
            failed.get(30)
        lview.label = "slow"
        slow = lview.apply_async(__import__("time").sleep, 60)
        await _until(lambda: rc.queue_status()["unassigned"] == 0
                     and not rc.result_status(slow.msg_ids)["completed"])
        listed = (await api("GET", "clusters", "default:rest", "tasks"))["tasks"]
        assert len(listed) == 15  # fewer than the default limit of 20: all of them
        assert [t["label"] for t in listed[:5]] == ["slow", "broken", "squares", "squares", "squares"]
        assert listed[0]["msg_id"] == slow.msg_ids[0] and listed[1]["msg_id"] == failed.msg_ids[0]
        assert listed[0]["state"] == "running" and listed[0]["engine"] in (0, 1)
        assert listed[0]["duration"] is None and listed[0]["completed"] is None
        assert listed[1]["state"] == "error" and listed[1]["error"] == "ZeroDivisionError"
        assert all(t["state"] == "done" and t["error"] is None for t in listed[2:])
        assert all(t["engine"] in (0, 1) and 0 <= t["duration"] < 10 for t in listed[1:])
        times = [[datetime.fromisoformat(t[k]) for k in ("submitted", "started", "completed")]
                 for t in listed[1:]]
        assert all(submitted <= started <= completed for submitted, started, completed in times)
        assert [t["label"] for t in listed[5:]] == [None] * 10
        newest = (await api("GET", "clusters", "default:rest", "tasks", params={"limit": "2"}))["tasks"]
        assert newest == listed[:2]
        # a request queued on the slow task's engine waits behind it
        engine = listed[0]["engine"]
        behind = rc[engine].apply_async(int, 2)
        await _until(lambda: rc.db_query({"msg_id": behind.msg_ids[0]}, ["msg_id"]) != [])
        waiting = (await api("GET", "clusters", "default:rest", "tasks", params={"limit": "2"}))["tasks"]
        assert [(t["msg_id"], t["state"], t["engine"]) for t in waiting] == [
            (behind.msg_ids[0], "pending", engine), (slow.msg_ids[0], "running", engine)]
        # aborted, as the record says; then the one behind it runs
        slow.abort()
        assert behind.get(30) == 2
        listed = (await api("GET", "clusters", "default:rest", "tasks", params={"limit": "500"}))["tasks"]
        assert len(listed) == 16 and [t["state"] for t in listed[:2]] == ["done", "aborted"]
        assert listed[1]["msg_id"] == slow.msg_ids[0] and listed[1]["error"] == "TaskAborted"
        assert (await api("GET", "clusters", "default:rest", "tasks", params={"limit": "3"}))["tasks"] == listed[:3]
        # a full list bounds the next one by its oldest task's submission: still exact
        five = (await api("GET", "clusters", "default:rest", "tasks", params={"limit": "5"}))["tasks"]
        lview.label = "last"
        lview.apply_sync(int, 1)
        after = (await api("GET", "clusters", "default:rest", "tasks", params={"limit": "5"}))["tasks"]
        assert after[0]["label"] == "last" and after[0]["state"] == "done" and after[1:] == five[:4]

    scaled = await api("POST", "clusters", "default:rest", "scale", body={"n": 3})
    assert scaled["engines"] == 3 and scaled["n"] == 3
    view = await api("GET", "clusters", "default:rest", "engines")
    assert len(view["engines"]) == 3
    scaled = await api("POST", "clusters", "default:rest", "scale", body={"n": 1})
    view = await api("GET", "clusters", "default:rest", "engines")
    assert scaled["engines"] == 1 and len(view["engines"]) == 1

    stopped = await api("POST", "clusters", "default:rest", "stop")
    assert stopped["state"] == "stopped" and stopped["engines"] == 0
    code, reason = await _error(api("POST", "clusters", "default:rest", "scale", body={"n": 2}))
    assert code == 409 and "stopped; start it before scaling it" in reason
    code, reason = await _error(api("GET", "clusters", "default:rest", "engines"))
    assert code == 409 and "stopped" in reason
    code, reason = await _error(api("GET", "clusters", "default:rest", "tasks"))
    assert (code, reason) == (409, "cluster 'default:rest' is stopped; start it to see its tasks")
    # a cluster created here can start again, with its last n
    again = await api("POST", "clusters", "default:rest", "start")
    assert again["state"] == "running" and again["engines"] == 1
    code, reason = await _error(api("POST", "clusters", "default:rest", "start"))
    assert code == 409 and "running already" in reason

    assert await api("DELETE", "clusters", "default:rest") is None
    code, _ = await _error(api("GET", "clusters", "default:rest"))
    assert code == 404
    assert (await api("GET", "clusters"))["clusters"] == []


async def test_lists_and_stops_clusters_started_from_notebooks_and_the_shell(api, lab_ipython_dir):
    notebook = ipp.Cluster(n=1, cluster_id="nb", ipython_dir=str(lab_ipython_dir),
                           controller_args=["--nodb"])
    shell = subprocess.run(
        [sys.executable, "-m", "ipyparallel_lite.cluster", "start", "-n", "1", "--daemonize",
         "--profile", "other", "--ipython-dir", str(lab_ipython_dir)],
        capture_output=True, text=True, timeout=90)
    assert shell.returncode == 0, shell.stderr
    try:
        await notebook.start_cluster()
        listed = {c["id"]: c for c in (await api("GET", "clusters"))["clusters"]}
        assert set(listed) == {"default:nb", "other:"}
        assert all(c["state"] == "running" and not c["created_here"] for c in listed.values())
        assert listed["other:"]["engines"] == 1
        one = await api("GET", "clusters", "other:")
        assert one["controller_pid"] == listed["other:"]["controller_pid"]
        view = await api("GET", "clusters", "other:", "engines")
        assert view["totals"]["engines"] == 1
        # a controller that keeps no task records lists no tasks, without an error
        with notebook.connect_client_sync() as rc:
            rc.wait_for_engines(1, timeout=60)
            rc[:].apply_sync(int, 1)
        assert (await api("GET", "clusters", "default:nb", "tasks"))["tasks"] == []
        stopped = await api("POST", "clusters", "other:", "stop")
        assert stopped == {"id": "other:", "state": "stopped"}
        assert [c["id"] for c in (await api("GET", "clusters"))["clusters"]] == ["default:nb"]
    finally:
        await notebook.stop_cluster()
        subprocess.run([sys.executable, "-m", "ipyparallel_lite.cluster", "stop", "--all",
                        "--profile", "other", "--ipython-dir", str(lab_ipython_dir)],
                       capture_output=True, timeout=60)
    assert (await api("GET", "clusters"))["clusters"] == []


async def test_bad_input_gets_one_clear_error(api):
    await api("POST", "clusters", body={"cluster_id": "bad", "n": 1})
    for method, parts, body in [
        ("GET", ("clusters", "default:nope"), None),
        ("GET", ("clusters", "default:nope", "engines"), None),
        ("GET", ("clusters", "default:nope", "tasks"), None),
        ("POST", ("clusters", "default:nope", "start"), {}),
        ("POST", ("clusters", "default:nope", "stop"), {}),
        ("POST", ("clusters", "default:nope", "scale"), {"n": 1}),
        ("DELETE", ("clusters", "default:nope"), None),
    ]:
        code, reason = await _error(api(method, *parts, body=body))
        assert (code, reason) == (404, "no cluster 'default:nope'; list them with GET .../clusters")
    code, reason = await _error(api("POST", "clusters", "default:bad", "scale", body={"n": None}))
    assert code == 400 and "whole number of engines, not None" in reason
    for n in ("3", 2.5, -1, True):
        code, reason = await _error(api("POST", "clusters", "default:bad", "start", body={"n": n}))
        assert code == 400 and "engines" in reason, (n, reason)
        code, reason = await _error(api("POST", "clusters", "default:bad", "scale", body={"n": n}))
        assert code == 400 and "engines" in reason, (n, reason)
        code, reason = await _error(api("POST", "clusters", body={"n": n, "cluster_id": "x"}))
        assert code == 400 and "engines" in reason, (n, reason)
    for limit in ("0", "-1", "2.5", "x", "501", ""):
        code, reason = await _error(api("GET", "clusters", "default:bad", "tasks", params={"limit": limit}))
        assert (code, reason) == (400, f"limit must be a whole number of tasks from 1 to 500, not {limit!r}")
    code, reason = await _error(api("POST", "clusters", "default:bad", "scale"))
    assert code == 400 and '{"n": 4}' in reason
    code, reason = await _error(api("POST", "clusters", body={"cluster_id": "../etc"}))
    assert code == 400 and "letters, digits" in reason
    code, reason = await _error(api("POST", "clusters", body={"cluster_id": "bad"}))
    assert code == 409 and "exists already" in reason
    code, reason = await _error(api("POST", "clusters", body={"engines": 2}))
    assert code == 400 and "unknown fields ['engines']" in reason
    # nothing was started by any of it
    assert (await api("GET", "clusters", "default:bad"))["state"] == "stopped"


async def test_requests_without_the_token_are_refused(jp_fetch):
    for method, parts in [("GET", ("clusters",)), ("POST", ("clusters",)),
                          ("GET", ("clusters", "default:x", "engines")),
                          ("GET", ("clusters", "default:x", "tasks")),
                          ("POST", ("clusters", "default:x", "scale"))]:
        with pytest.raises(HTTPClientError) as info:
            await jp_fetch(API, *parts, method=method, headers={"Authorization": ""},
                           body="{}" if method == "POST" else None)
        assert info.value.code == 403, (method, parts)
