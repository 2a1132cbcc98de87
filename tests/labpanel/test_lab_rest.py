"""The cluster panel's REST API, served by a real Jupyter server (pytest-jupyter) against
real clusters in a private IPython dir: every endpoint, and bad input on each."""

from __future__ import annotations

import json
import subprocess
import sys

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
    notebook = ipp.Cluster(n=1, cluster_id="nb", ipython_dir=str(lab_ipython_dir))
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
                          ("POST", ("clusters", "default:x", "scale"))]:
        with pytest.raises(HTTPClientError) as info:
            await jp_fetch(API, *parts, method=method, headers={"Authorization": ""},
                           body="{}" if method == "POST" else None)
        assert info.value.code == 403, (method, parts)
