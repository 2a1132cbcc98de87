"""Every Hub query from a real client against a real controller, and bad input.

The session cluster serves these tests; each one names the msg_ids it made, so tests
do not depend on one another's records.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import psutil
import pytest
from conftest import wait_until

import ipyparallel_lite as ipp
from ipyparallel_lite import error
from ipyparallel_lite.client.hubresult import AsyncHubResult
from ipyparallel_lite.serialization import pack_apply_message


def square(x):
    return x * x


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def test_queue_status_shows_running_and_waiting_tasks(rc):
    eid = rc.ids[0]
    view = rc.load_balanced_view(targets=[eid])
    running = view.apply_async(nap, 1.5)
    waiting = view.apply_async(square, 2)  # hwm=1: waits for the engine
    deadline = time.monotonic() + 10
    while rc.queue_status(eid)["tasks"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    status = rc.queue_status(eid)
    assert (status["queue"], status["tasks"]) == (0, 1)
    verbose = rc.queue_status(verbose=True)
    assert verbose[eid]["tasks"] == running.msg_ids
    assert verbose["unassigned"] == waiting.msg_ids
    assert rc.queue_status()["unassigned"] == 1
    assert waiting.get(30) == 4 and running.get(30) == 1.5
    with pytest.raises(error.EngineError, match="No engine with id 999"):
        rc.queue_status(999)


def test_result_status_and_get_result(rc, lview):
    ar = lview.map_async(square, range(4))
    assert ar.get(30) == [0, 1, 4, 9]
    status = rc.result_status(ar.msg_ids)
    assert status == {"pending": [], "completed": ar.msg_ids}
    full = rc.result_status(ar.msg_ids[:2], status_only=False)
    assert full[ar.msg_ids[1]] == [1]  # a map chunk's value: a list
    hub = rc.get_result(ar.msg_ids)
    assert isinstance(hub, AsyncHubResult)
    assert hub.get(30) == [[0], [1], [4], [9]]
    assert rc.get_result(ar.msg_ids[3], block=True) == [9]
    assert rc.get_result(-1, block=True) == [9]  # an index into rc.history
    assert lview.get_result(ar.msg_ids[2], block=True) == [4]
    assert hub.metadata[0]["engine_id"] in rc.ids


def test_get_result_of_another_clients_task_and_of_a_pending_one(cluster, rc, lview):
    running = lview.apply_async(nap, 1.0)
    other = cluster.connect_client_sync()
    try:
        pending = other.get_result(running.msg_ids)
        assert not pending.ready()
        assert other.result_status(running.msg_ids)["pending"] == running.msg_ids
        assert pending.get(30) == [1.0]  # polled from the Hub until it finished
        assert other.get_result(running.msg_ids[0], block=True) == 1.0
    finally:
        other.close()


def test_errors_come_back_from_the_hub_as_remote_errors(rc, lview):
    ar = lview.apply_async(lambda: 1 / 0)
    with pytest.raises(error.RemoteError):
        ar.get(30)
    with pytest.raises(error.RemoteError, match="ZeroDivisionError"):
        rc.get_result(ar.msg_ids[0], block=True)
    assert isinstance(rc.result_status(ar.msg_ids, status_only=False)[ar.msg_ids[0]],
                      error.RemoteError)


def test_db_query_every_operator(rc):
    view = rc.load_balanced_view()
    view.label = f"ops-{time.monotonic_ns()}"
    before = datetime.now().astimezone() - timedelta(seconds=1)
    ars = [view.apply_async(square, i) for i in range(3)]
    assert [ar.get(30) for ar in ars] == [0, 1, 4]
    ids = [ar.msg_ids[0] for ar in ars]
    label = view.label

    def found(query, keys=None):
        return sorted(r["msg_id"] for r in rc.db_query({"label": label, **query}, keys or ["msg_id"]))

    first = rc.db_query({"msg_id": ids[0]}, ["submitted", "completed", "label", "queue"])[0]
    assert first["label"] == label and first["queue"] == "task"
    t0 = first["submitted"]
    assert isinstance(t0, datetime) and first["completed"] >= t0
    assert found({}) == sorted(ids)
    assert found({"msg_id": {"$eq": ids[1]}}) == [ids[1]]
    assert found({"msg_id": {"$ne": ids[1]}}) == sorted([ids[0], ids[2]])
    assert found({"msg_id": {"$in": ids[:2]}}) == sorted(ids[:2])
    assert found({"msg_id": {"$nin": ids[:2]}}) == [ids[2]]
    assert found({"submitted": {"$gt": before}}) == sorted(ids)
    assert found({"submitted": {"$lt": before}}) == []  # $gt and $lt differ (ipyparallel swaps them)
    assert found({"submitted": {"$gt": t0}}) == sorted(ids[1:])
    assert found({"submitted": {"$gte": t0}}) == sorted(ids)
    assert found({"submitted": {"$lte": t0}}) == [ids[0]]
    assert found({"submitted": {"$lt": t0}}) == []
    assert found({"label": {"$glob": label[:4] + "*"}}) == sorted(ids)
    assert found({"resubmitted": {"$exists": False}}) == sorted(ids)
    assert found({"result_buffers": {"$exists": True}}) == sorted(ids)
    engines = [r["engine_uuid"] for r in rc.db_query({"msg_id": {"$in": ids}}, ["engine_uuid"])]
    assert found({"header": {"$exists": True}, "engine_uuid": {"$in": engines}}) == sorted(ids)
    assert found({"engine_uuid": {"$nin": engines}}) == []
    tagged = rc.db_query({"msg_id": ids[2]}, ["result_buffers", "buffers", "header"])[0]
    assert isinstance(tagged["result_buffers"][0], bytes) and tagged["buffers"]
    assert tagged["header"]["msg_type"] == "apply_request"
    whole = rc.db_query({"msg_id": ids[2]})[0]
    assert whole["result_content"]["status"] == "ok" and whole["result_metadata"]["status"] == "ok"


def test_all_operator_on_a_list_label(rc):
    view = rc.load_balanced_view()
    tag = f"all-{time.monotonic_ns()}"
    view.label = [tag, "fast", "small"]
    ar = view.apply_async(square, 3)
    ar.get(30)
    view.label = [tag, "slow"]
    other = view.apply_async(square, 4)
    other.get(30)
    assert [r["msg_id"] for r in rc.db_query({"label": {"$all": [tag, "small"]}}, ["msg_id"])] == ar.msg_ids
    both = rc.db_query({"label": {"$all": [tag]}}, ["label"])
    assert sorted(r["msg_id"] for r in both) == sorted(ar.msg_ids + other.msg_ids)
    assert rc.db_query({"label": {"$all": [tag, "none-has-this"]}}) == []


def test_hub_history_lists_tasks_in_order(rc, lview):
    a = lview.apply_async(square, 1)
    a.get(30)
    b = lview.apply_async(square, 2)
    b.get(30)
    history = rc.hub_history()
    assert history.index(a.msg_ids[0]) < history.index(b.msg_ids[0])


def test_purge_results(rc, lview):
    ars = [lview.apply_async(square, i) for i in range(3)]
    ids = [ar.get(30) is not None and ar.msg_ids[0] for ar in ars]
    rc.purge_results(ids[0])
    assert ids[0] not in rc.hub_history() and ids[1] in rc.hub_history()
    with pytest.raises(error.RemoteError, match="no record of task"):
        rc.get_result(ids[0])
    rc.purge_results(targets=rc.ids)  # whatever ran on the engines
    assert ids[1] not in rc.hub_history() and ids[2] not in rc.hub_history()
    with pytest.raises(ValueError, match="needs jobs"):
        rc.purge_results()


def test_resubmit_keeps_flags_and_label(rc):
    view = rc.load_balanced_view(targets=[rc.ids[-1]])
    view.label = "again"
    ar = view.apply_async(square, 5)
    assert ar.get(30) == 25
    rerun = rc.resubmit(ar.msg_ids)
    assert rerun.get(30) == [25]
    new_id = rerun.msg_ids[0]
    assert new_id != ar.msg_ids[0]
    old = rc.db_query({"msg_id": ar.msg_ids[0]}, ["resubmitted"])[0]
    assert old["resubmitted"] == new_id
    new = rc.db_query({"msg_id": new_id}, ["label", "metadata", "engine_uuid", "resubmitted"])[0]
    assert new["label"] == "again" and new["metadata"]["targets"] == [rc.ids[-1]]
    assert new["engine_uuid"] == rc.db_query({"msg_id": ar.msg_ids[0]}, ["engine_uuid"])[0]["engine_uuid"]
    assert isinstance(new["resubmitted"], datetime)
    # a direct request reruns on its engine
    direct = rc[rc.ids[0]].apply_async(square, 6)
    direct.get(30)
    again = rc.resubmit(direct.msg_ids, block=True)
    assert again == [36]


def test_resubmit_keeps_dependencies(rc, lview):
    first = lview.apply_async(square, 2)
    first.get(30)
    with lview.temp_flags(after=first):
        dependent = lview.apply_async(square, 3)
    dependent.get(30)
    rerun = rc.resubmit(dependent.msg_ids)
    assert rerun.get(30) == [9]
    md = rc.db_query({"msg_id": rerun.msg_ids[0]}, ["metadata"])[0]["metadata"]
    assert first.msg_ids[0] in str(md["after"])


# ---- bad input: an error reply with a reason, and the controller keeps serving ------


@pytest.mark.parametrize(
    ("query", "keys", "reason"),
    [
        ({"msg_id": {"$regex": "x"}}, None, "unknown operator '$regex' on 'msg_id'"),
        ({"msg_id": {"$in": "abc"}}, None, "$in needs a list"),
        ({"completed": {"$gt": None}}, None, "$gt needs a value that can be ordered"),
        ({"msg_id": {"$exists": "yes"}}, None, "$exists needs True or False"),
        (["msg_id"], None, "a query is a dict"),
        ({}, "msg_id", "'keys' must be a list of str"),
    ],
)
def test_malformed_queries_get_readable_errors(rc, query, keys, reason):
    with pytest.raises(error.RemoteError) as info:
        rc.db_query(query, keys)
    assert reason in str(info.value)
    assert rc[:].apply_sync(square, 4) == [16] * len(rc.ids)  # still serving


def test_unknown_msg_ids_get_readable_errors(rc):
    for call in (lambda: rc.result_status(["no-such-task"]), lambda: rc.get_result("no-such-task"),
                 lambda: rc.resubmit(["no-such-task"]), lambda: rc.purge_results(["no-such-task"])):
        with pytest.raises(error.RemoteError, match="no record of task.*no-such-task"):
            call()
    with pytest.raises(error.RemoteError, match="'msg_ids', a list of str"):
        rc.transport.query("result_request", {"msg_ids": "abc"})
    with pytest.raises(error.RemoteError, match="no engine"):
        rc.transport.query("purge_request", {"msg_ids": [], "engine_ids": [999]})
    assert rc.load_balanced_view().apply_sync(square, 3) == 9


def test_purge_and_resubmit_of_pending_tasks_are_refused(rc, lview):
    running = lview.apply_async(nap, 2.0)
    msg_id = running.msg_ids[0]
    # at once: the query names the claim as in flight, and waits for the Hub's record of it
    with pytest.raises(error.RemoteError, match="cannot purge pending task"):
        rc.purge_results([msg_id])
    with pytest.raises(error.RemoteError, match="cannot resubmit pending task"):
        rc.resubmit([msg_id])
    assert running.get(30) == 2.0
    assert rc.get_result(msg_id, block=True) == 2.0  # nothing was purged
    rc.purge_results([msg_id])


def test_a_query_waits_for_the_requests_it_overtook(rc):
    """A request and a query travel on different connections, so a query sent right
    after a request may reach the Hub first; it names the request as in flight, and
    the Hub answers once it has the request's record, or after IN_FLIGHT_WAIT."""
    transport = rc.transport
    msg_id, frames = transport.build("apply_request", {}, ident=[rc.engine_uuid(rc.ids[0]).encode()],
                                     buffers=pack_apply_message(square, (5,)),
                                     metadata=transport.pack_metadata({}))
    ar = ipp.AsyncResult(rc, [msg_id], "square", rc.ids[0], single=True)
    # the query goes first; the request it names follows 0.3 s later
    threading.Timer(0.3, transport.submit, ("mux", [(msg_id, frames)], ar)).start()
    started = time.monotonic()
    reply = transport.query("result_request", {"msg_ids": [msg_id], "status_only": True,
                                               "in_flight": [msg_id]})
    assert time.monotonic() - started >= 0.25
    content = reply["content"]
    assert msg_id in content["pending"] + content["completed"]
    assert ar.get(30) == 25
    # a request that never comes: the query is answered (no record) after the wait
    started = time.monotonic()
    with pytest.raises(error.RemoteError, match="no record of task.*never-sent"):
        transport.query("result_request", {"msg_ids": ["never-sent"], "in_flight": ["never-sent"]})
    assert 0.9 <= time.monotonic() - started < 5
    assert rc[:].apply_sync(square, 4) == [16] * len(rc.ids)  # still serving


def test_a_query_naming_many_requests_that_never_come_costs_little(ipython_dir):
    """Waiting for in-flight ids that never arrive: about 15 looks at the ones still
    missing, not one every few milliseconds, and other queries answered meanwhile; past
    IN_FLIGHT_MAX of them, no wait at all."""
    cluster = ipp.Cluster(n=1)
    rc = cluster.start_and_connect_sync()
    try:
        controller = psutil.Process(cluster.controller.pid)
        bogus = [f"never-sent-{i}" for i in range(1000)]
        errors = []

        def ask() -> None:
            try:
                rc.transport.query("result_request", {"msg_ids": bogus[:1], "in_flight": bogus})
            except error.RemoteError as e:
                errors.append(e)

        waiter = threading.Thread(target=ask)
        before = sum(controller.cpu_times()[:2])
        started = time.monotonic()
        waiter.start()
        slowest = 0.0
        for _ in range(10):
            time.sleep(0.05)
            asked = time.monotonic()
            rc.queue_status()  # answered by the controller's Python, as queries are
            slowest = max(slowest, time.monotonic() - asked)
        waiter.join(10)
        assert 0.9 <= time.monotonic() - started < 5  # it waited, a bounded time
        assert slowest < 0.5
        # looking up all 1,000 ids every 2 ms for the second took 0.17-0.20 s of the
        # controller's CPU; 15 looks take 0.03 s
        assert sum(controller.cpu_times()[:2]) - before < 0.1
        assert errors and "no record of task" in str(errors[0])
        # more than IN_FLIGHT_MAX unrecorded: answered at once
        started = time.monotonic()
        with pytest.raises(error.RemoteError, match="no record of task"):
            rc.transport.query("result_request", {"msg_ids": ["x"], "in_flight": [
                f"never-sent-{i}" for i in range(1001)]})
        assert time.monotonic() - started < 0.5
    finally:
        rc.close()
        cluster.stop_cluster_sync()


def test_queries_right_after_requests_find_them(rc, lview):
    """What a user sees of that race: never 'no record' for a request just sent, lone
    claim or direct."""
    for view in (lview, rc[0]) * 20:
        ar = view.apply_async(nap, 0.01)
        status = rc.result_status(ar.msg_ids)
        assert ar.msg_ids[0] in status["pending"] + status["completed"]
        ar.get(30)


def test_none_store_answers_plainly(ipython_dir):
    cluster = ipp.Cluster(n=1, controller_args=["--nodb"])
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(1, timeout=60)
        ar = rc.load_balanced_view().apply_async(square, 3)
        assert ar.get(30) == 9  # results reach their client all the same
        assert rc.db_query({}) == [] and rc.hub_history() == []
        with pytest.raises(error.RemoteError, match="keeps no task records"):
            rc.get_result(ar.msg_ids[0])
    finally:
        rc.close()
        cluster.stop_cluster_sync()


def test_records_past_the_memory_limit_spill_and_stay_retrievable(ipython_dir):
    """ipyparallel's in-memory store culls old records, and waiting on them hangs."""
    cluster = ipp.Cluster(n=1, controller_args=["--ControllerApp.record_limit=10",
                                                "--ControllerApp.remember_finished=10"])
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(1, timeout=60)
        view = rc.load_balanced_view()
        ars = [view.apply_async(square, i) for i in range(60)]
        assert [ar.get(60) for ar in ars] == [i * i for i in range(60)]
        # it did spill (once it read the device's copies of the replies, which reach
        # the client straight from the engine: a query reads them first, a look at the
        # controller's files does not)
        controller = psutil.Process(cluster.controller.pid)
        wait_until(lambda: any("ipp-lite-spill-" in f.path for f in controller.open_files()),
                   10, "the spill file")
        old = rc.get_result(ars[0].msg_ids)
        old.wait_interactive(timeout=30)
        assert old.get(0) == [0]
        assert len(rc.hub_history()) == 60
        assert len(rc.db_query({"completed": {"$ne": None}}, ["msg_id"])) == 60
        assert rc.resubmit(ars[1].msg_ids, block=True) == [1]
        # the scheduler forgot ars[0] long ago: the Hub's record still satisfies `after`
        with view.temp_flags(after=ars[0]):
            dependent = view.apply_async(square, 3)
        with pytest.raises(error.InvalidDependency):
            dependent.get(30)
        first = view.apply_async(square, 4)
        with view.temp_flags(after=first):
            dependent = view.apply_async(square, 5)
        assert dependent.get(30) == 25
        [view.apply_async(square, i).get(30) for i in range(15)]  # first is forgotten now
        assert rc.resubmit(dependent.msg_ids, block=True) == [25]
    finally:
        rc.close()
        cluster.stop_cluster_sync()
