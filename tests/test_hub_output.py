"""Output in the Hub's records, from a real client against a real controller: what
tasks print (stdout, stderr), the code they ran, what they returned and raised, read
with ``db_query`` and ``get_result``, also by a client that did not submit them."""

from __future__ import annotations

import time

import pytest

import ipyparallel_lite as ipp
from ipyparallel_lite import error

OUTPUT_KEYS = ["execute_input", "stdout", "stderr", "execute_result", "error"]


def recorded(rc, msg_id: str, key: str, timeout: float = 30) -> dict:
    """The record of ``msg_id`` once ``key`` is set: the Hub reads iopub on its own
    socket, so its output may land a little after the client has the reply."""
    deadline = time.monotonic() + timeout
    while True:
        [record] = rc.db_query({"msg_id": msg_id}, keys=OUTPUT_KEYS)
        if record[key] is not None or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


def test_execute_that_prints_returns_and_raises_is_recorded(rc, dv):
    target = rc.ids[0]
    view = rc[target]
    printed = view.execute("import sys\nprint('hello hub')\nprint('oops', file=sys.stderr)",
                           block=False)
    printed.get(30)
    msg_id = printed.msg_ids[0]
    record = recorded(rc, msg_id, "stderr")
    assert record["stdout"] == "hello hub\n" and record["stderr"] == "oops\n"
    assert record["execute_input"].startswith("import sys")  # from the request: no echo
    assert record["execute_result"] is None and record["error"] is None

    returned = view.execute("6 * 7", silent=False, block=False)  # as %px runs it
    returned.get(30)
    record = recorded(rc, returned.msg_ids[0], "execute_result")
    assert record["execute_result"]["data"]["text/plain"] == "42"
    assert record["execute_input"] == "6 * 7"

    raised = view.execute("1 / 0", block=False)
    with pytest.raises(error.RemoteError):
        raised.get(30)
    record = recorded(rc, raised.msg_ids[0], "error")
    assert record["error"]["ename"] == "ZeroDivisionError"
    assert any("division by zero" in line for line in record["error"]["traceback"])

    # queries on the output keys, and the AsyncHubResult of each
    found = rc.db_query({"stdout": {"$glob": "*hello hub*"}}, keys=["msg_id"])
    assert msg_id in [r["msg_id"] for r in found]
    hub = rc.get_result(msg_id)
    hub.get(30)
    assert hub.stdout == "hello hub\n" and hub.stderr == "oops\n"
    assert rc.get_result(returned.msg_ids[0]).wait(30)
    assert rc.get_result(returned.msg_ids[0]).execute_result["data"]["text/plain"] == "42"
    failed = rc.get_result(raised.msg_ids[0])
    failed.wait(30)
    assert failed.error["ename"] == "ZeroDivisionError"


def test_px_output_of_every_engine_and_of_another_clients_task(cluster, rc, dv):
    ar = dv.execute("import os\nprint('engine', os.getpid())", block=False)
    ar.get(30)
    for msg_id, stdout in zip(ar.msg_ids, ar.stdout):
        assert recorded(rc, msg_id, "stdout")["stdout"] == stdout
    task = rc.load_balanced_view().apply_async(lambda: print("from a task") or 5)
    assert task.get(30) == 5
    recorded(rc, task.msg_ids[0], "stdout")
    other = cluster.connect_client_sync()
    try:
        theirs = other.get_result(task.msg_ids)
        assert theirs.get(30) == [5]
        assert theirs.stdout == ["from a task\n"]
        [record] = other.db_query({"msg_id": ar.msg_ids[0]}, keys=["stdout", "execute_input"])
        assert record["stdout"] == ar.stdout[0] and record["execute_input"].startswith("import os")
    finally:
        other.close()


def test_a_chatty_task_is_cut_at_the_output_limit(ipython_dir):
    cluster = ipp.Cluster(n=1, controller_args=["--IPController.output_limit=1000"])
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(1, timeout=60)
        ar = rc[:].execute("for i in range(500): print(i)", block=False)
        ar.get(30)
        assert len(ar.stdout[0]) > 1000  # the client has all of it
        record = recorded(rc, ar.msg_ids[0], "stdout")
        deadline = time.monotonic() + 30
        while "truncated" not in record["stdout"] and time.monotonic() < deadline:
            time.sleep(0.05)
            record = recorded(rc, ar.msg_ids[0], "stdout")
        assert record["stdout"].startswith(ar.stdout[0][:1000])
        assert "truncated" in record["stdout"] and len(record["stdout"]) < 1200
    finally:
        rc.close()
        cluster.stop_cluster_sync()


def test_record_output_off_keeps_the_keys_empty(ipython_dir):
    cluster = ipp.Cluster(n=1, controller_args=["--IPController.record_output=False"])
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(1, timeout=60)
        ar = rc[:].execute("print('quiet')\n3", silent=False, block=False)
        ar.get(30)
        assert ar.stdout == ["quiet\n"]  # the client still gets its output
        time.sleep(0.5)
        [record] = rc.db_query({"msg_id": ar.msg_ids[0]}, keys=OUTPUT_KEYS)
        assert all(record[key] is None for key in OUTPUT_KEYS)
    finally:
        rc.close()
        cluster.stop_cluster_sync()
