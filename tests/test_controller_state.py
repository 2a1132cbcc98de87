"""Unit tests of the controller's pure core: events in, actions compared (no sockets, no clock)."""

from __future__ import annotations

import json
import pickle
import sqlite3

import pytest

from ipyparallel_lite.connection import QUEUED_CLAIM, shared_identity
from ipyparallel_lite.controller.hub import Hub, RegistrationError
from ipyparallel_lite.controller.scheduler import TaskScheduler
from ipyparallel_lite.controller.sqlitestore import SQLiteStore
from ipyparallel_lite.controller.state import (
    BROADCAST,
    LONE_TASK,
    MUX,
    TASK,
    WINDOW_ENAME,
    ControllerState,
    Fail,
    Interrupt,
    Notify,
    ReplyToClient,
    SendToEngine,
    Steal,
    TellToExit,
)
from ipyparallel_lite.controller.store import RecordNotFound

DELIM = b"<IDS|MSG>"
ALICE, BOB = b"alice", b"bob"


def core(engines: int = 2, hwm: int = 1, **kw) -> ControllerState:
    """A core with ``engines`` ready engines, uuids e0, e1, ..."""
    state = ControllerState(Hub(), TaskScheduler(hwm=hwm), unpack=json.loads, **kw)
    for i in range(engines):
        ready(state, f"e{i}")
    return state


def ready(state: ControllerState, uuid: str) -> list:
    state.register(uuid, None, {"hostname": "h"}, now=0.0)
    assert state.engine_ready(uuid, "shell", now=0.0) == []
    return state.engine_ready(uuid, "control", now=0.0)


def request(msg_id: str, msg_type: str = "apply_request", **metadata) -> tuple[list, dict, dict]:
    """(frames from DELIM on, header, metadata) of a signed request as the server parsed it."""
    header = {"msg_id": msg_id, "msg_type": msg_type, "session": "s1",
              "date": "2026-12-01T00:00:00+00:00"}
    frames = [DELIM, b"sig", json.dumps(header).encode(), b"{}", json.dumps(metadata).encode(),
              b'{"code": "a = 1"}', b"function", b"args"]
    return frames, header, metadata


def task(state: ControllerState, msg_id: str, client: bytes = ALICE, now: float = 0.0, **md) -> list:
    frames, header, metadata = request(msg_id, **md)
    return state.task(client, frames, header, metadata, now)


def direct(state: ControllerState, msg_id: str, engine: str, client: bytes = ALICE,
           msg_type: str = "apply_request") -> list:
    """A direct request as the mux device routed it."""
    frames, header, metadata = request(msg_id, msg_type)
    return state.routed_request(client, engine, frames, header, metadata, 0.0)


def reply(state: ControllerState, engine: str, tag: bytes, parent_id: str, client: bytes = ALICE,
          status: str = "ok", now: float = 1.0, msg_type: str = "apply_reply", routed: bool = False,
          **md) -> list:
    """An engine's reply; ``routed``: the mux device delivered it (always, for MUX)."""
    header = {"msg_id": f"reply-{parent_id}", "msg_type": msg_type}
    metadata = {"status": status, "engine": engine, "started": "2026-12-01T00:00:01+00:00",
                "completed": "2026-12-01T00:00:02+00:00", **md}
    frames = [DELIM, b"sig", json.dumps(header).encode(), b"parent", json.dumps(metadata).encode(),
              b'{"status": "%s"}' % status.encode(), b"result:" + parent_id.encode()]
    if tag == MUX or routed:  # as the mux device routed it to the client
        return state.routed_reply(engine, client, parent_id, frames, header, metadata, msg_type, now)
    return state.reply(engine, tag, client, parent_id, frames, header, metadata, msg_type, now)


def sends(actions: list) -> list[tuple[str, int]]:
    return [(a.msg_id, a.engine_id) for a in actions if isinstance(a, SendToEngine)]


def fails(actions: list) -> dict[str, str]:
    return {a.msg_id: a.ename for a in actions if isinstance(a, Fail)}


def replies(actions: list) -> list[str]:
    return [a.msg_id for a in actions if isinstance(a, ReplyToClient)]


# ---- registration ----------------------------------------------------------------


def test_engine_is_announced_once_both_channels_are_connected():
    state = core(0)
    engine = state.register("e0", None, {"hostname": "h"}, now=0.0)
    assert engine.id == 0 and state.hub.ready_engines() == {}
    assert state.engine_ready("e0", "shell", now=0.1) == []
    assert state.engine_ready("e0", "control", now=0.2) == [
        Notify("registration_notification", {"id": 0, "uuid": "e0", "info": {"hostname": "h"}})]
    assert state.engine_ready("e0", "control", now=0.3) == []  # once
    assert state.connection()["engines"] == {"0": "e0"}
    with pytest.raises(RegistrationError, match="already registered"):
        state.register("e0", None, {}, now=0.4)


def test_a_task_submitted_before_any_engine_runs_on_the_first_one_ready():
    state = core(0)
    assert task(state, "t1") == []
    actions = ready(state, "e0")
    assert sends(actions) == [("t1", 0)]
    assert isinstance(actions[-1], Notify)


# ---- routing -----------------------------------------------------------------------


def test_direct_request_routed_by_the_device_is_recorded_and_tracked_not_sent():
    state = core()
    assert direct(state, "d1", "e1") == []
    assert state.pending["d1"].engine_id == 1
    assert state.waiting == {}  # the client's own window bounds direct requests
    record = state.hub.store.get_record("d1")
    assert (record["queue"], record["engine_uuid"], record["completed"]) == ("mux", "e1", None)
    assert state.queue_status(None, verbose=True)["1"] == {"queue": ["d1"], "tasks": [], "completed": 0}


def test_direct_request_to_an_unknown_engine_or_of_an_unanswered_type_fails_at_once():
    state = core()
    (fail,) = direct(state, "d1", "nobody")
    assert (fail.msg_id, fail.ename, fail.client, fail.tag) == ("d1", "EngineError", ALICE, MUX)
    assert "rc.ids" in fail.evalue
    assert fails(direct(state, "d2", "e0", msg_type="shutdown_request")) == {"d2": "ValueError"}
    assert state.pending == {} and state.waiting == {}


def test_tasks_go_to_engines_with_room_and_queue_beyond_hwm():
    state = core(2, hwm=1)
    assert sends(task(state, "t1")) == [("t1", 0)]
    assert sends(task(state, "t2")) == [("t2", 1)]
    assert task(state, "t3") == []  # both engines full
    assert state.queue_status(None, verbose=False)["unassigned"] == 1
    actions = reply(state, "e0", TASK, "t1")
    # the freed engine gets its next task before the client its result (it starts sooner)
    assert sends(actions) == [("t3", 0)] and replies(actions) == ["t1"]
    assert actions.index(next(a for a in actions if isinstance(a, SendToEngine))) == 0


def test_task_of_a_type_engines_do_not_answer_is_rejected():
    state = core()
    assert fails(task(state, "t1", msg_type="kernel_info_request")) == {"t1": "ValueError"}
    assert fails(task(state, "t2", retries=-1)) == {"t2": "ValueError"}


def test_fan_out_sends_one_copy_per_distinct_engine_and_fails_unknown_ones():
    state = core(2)
    frames, header, md = request("b1", targets=[0, 1, 1, 7])
    actions = state.fan_out(ALICE, frames, header, md)
    assert sends(actions) == [("b1_0", 0), ("b1_1", 1)]
    copy = actions[0]
    assert copy.header == {**header, "msg_id": "b1_0"}  # signed by the server
    assert copy.frames == [b"e0", BROADCAST, ALICE, *frames]
    assert fails(actions) == {"b1_7": "EngineError"}
    assert sorted(state.pending) == ["b1_0", "b1_1"]
    assert state.hub.store.get_record("b1_1")["queue"] == "broadcast"
    assert replies(reply(state, "e1", BROADCAST, "b1_1")) == ["b1_1"]


def test_fan_out_with_malformed_targets_is_dropped():
    state = core(2)
    for targets in (None, [], ["0"], [True]):
        frames, header, md = request("b1", targets=targets)
        assert state.fan_out(ALICE, frames, header, md) == []
    assert state.pending == {}


# ---- replies -----------------------------------------------------------------------


def test_reply_goes_to_its_client_and_completes_the_record():
    state = core()
    task(state, "t1")
    actions = reply(state, "e0", TASK, "t1")
    record = state.hub.store.get_record("t1")
    header, metadata = record["result_header"], record["result_metadata"]
    assert actions[0] == ReplyToClient(TASK, ALICE, "t1", [
        ALICE, DELIM, b"sig", json.dumps(header).encode(), b"parent", json.dumps(metadata).encode(),
        b'{"status": "ok"}', b"result:t1"])
    assert state.pending == {} and state.waiting == {}
    assert state.completed == {b"e0": 1}
    content, buffers = state.results(["t1"], status_only=False)
    assert content["completed"] == ["t1"] and buffers == [b"result:t1"]
    assert content["t1"]["content"] == {"status": "ok"}
    assert content["t1"]["outputs"] == {}


def test_reply_the_device_routed_completes_the_record_and_is_not_sent_again():
    state = core()
    direct(state, "d1", "e0")
    assert reply(state, "e0", MUX, "d1") == []
    assert state.pending == {} and state.completed == {b"e0": 1}
    assert state.hub.store.get_record("d1")["result_buffers"] == [b"result:d1"]


def tags(actions: list) -> dict[str, bytes]:
    return {a.msg_id: a.frames[1] for a in actions if isinstance(a, SendToEngine)}


def test_a_task_its_engine_holds_alone_is_tagged_lone_for_a_client_that_takes_replies_on_mux():
    carol = shared_identity()  # one identity on all its sockets, as our client has
    state = core(1, hwm=3)
    assert tags(task(state, "t1", client=carol)) == {"t1": LONE_TASK}
    assert tags(task(state, "t2", client=carol)) == {"t2": TASK}  # the engine holds t1 too
    # a client whose mux socket has another identity never gets a reply that way
    assert tags(task(state, "u1", client=ALICE)) == {"u1": TASK}
    reply(state, "e0", TASK, "t2", client=carol)
    reply(state, "e0", TASK, "u1")
    # its engine answered through the controller after all (an error, say): same tag back
    assert replies(reply(state, "e0", LONE_TASK, "t1", client=carol, status="error")) == ["t1"]
    assert state.pending == {}


def test_a_lone_tasks_success_the_device_routed_completes_it_and_frees_its_engine():
    carol = shared_identity()
    state = core(1, hwm=1)
    assert tags(task(state, "t1", client=carol)) == {"t1": LONE_TASK}
    assert sends(task(state, "t2", client=carol)) == []  # waits for the engine
    assert state.waiting == {carol: 2}
    actions = reply(state, "e0", TASK, "t1", client=carol, routed=True)
    assert replies(actions) == []  # the client has it already
    assert tags(actions) == {"t2": LONE_TASK}
    assert state.waiting == {carol: 1} and state.completed == {b"e0": 1}
    assert state.hub.store.get_record("t1")["result_buffers"] == [b"result:t1"]


def claim(state: ControllerState, msg_id: str, engine: str, client: bytes, now: float = 0.0,
          value: object = True) -> list:
    """A load-balanced task its client sent straight to ``engine``, as the device routed
    it (``value``: its metadata's claim, True for a lone one)."""
    frames, header, metadata = request(msg_id, claim=value)
    return state.routed_request(client, engine, frames, header, metadata, now)


def test_a_claimed_task_is_placed_on_its_engine_and_its_routed_success_frees_it():
    carol = shared_identity()
    state = core(2)
    assert claim(state, "c1", "e0", carol) == []  # the device delivered it
    assert state.scheduler.load(0) == 1 and state.pending["c1"].tag == TASK
    assert state.hub.store.get_record("c1")["queue"] == "task"
    assert state.hub.store.get_record("c1")["engine_uuid"] == "e0"
    assert sends(task(state, "t1", client=ALICE)) == [("t1", 1)]  # e0 is busy
    assert replies(reply(state, "e0", TASK, "c1", client=carol, routed=True)) == []
    assert state.scheduler.load(0) == 0 and "c1" not in state.pending
    assert state.hub.store.get_record("c1")["result_buffers"] == [b"result:c1"]
    assert state.connection()["claims"] == state.scheduler.hwm == 1
    lru = ControllerState(Hub(), TaskScheduler(scheme="lru"), unpack=json.loads)
    assert lru.connection()["claims"] == 0


def test_a_claim_that_meets_another_task_on_its_engine_asks_both_back():
    carol = shared_identity()
    state = core(2)
    assert sends(task(state, "t1", client=BOB)) == [("t1", 0)]
    actions = claim(state, "c1", "e0", carol)  # carol's idea of e0 was stale
    assert [(a.engine_ident, a.msg_ids) for a in actions if isinstance(a, Steal)] == [
        (b"e0", ("t1", "c1"))]
    # e0 began t1, not the claim: it runs on the free engine, signed anew
    actions = state.stolen("e0", ["c1"], ["t1"], now=0.1)
    assert sends(actions) == [("c1", 1)]
    assert [a.attempt for a in actions if isinstance(a, SendToEngine)] == [1]


def test_a_queued_claim_stays_behind_the_tasks_on_its_engine():
    carol = shared_identity()
    state = core(2)
    assert sends(task(state, "t1", client=BOB)) == [("t1", 0)]
    # carol placed it behind her own requests there: nothing is asked back
    assert claim(state, "c1", "e0", carol, value=QUEUED_CLAIM) == []
    assert state.scheduler.load(0) == 2 and state.pending["c1"].engine_id == 0


def test_a_claim_of_an_engine_that_is_gone_is_placed_by_the_scheduler():
    carol = shared_identity()
    state = core(2)
    actions = claim(state, "c1", "e9", carol)
    assert sends(actions) == [("c1", 0)] and tags(actions) == {"c1": LONE_TASK}


def test_a_claimed_tasks_unmet_dependency_runs_it_on_another_engine():
    """Its engine sends a claim's error through the controller, as a lone task's."""
    carol = shared_identity()
    state = core(2)
    assert claim(state, "c1", "e0", carol) == []
    actions = reply(state, "e0", LONE_TASK, "c1", client=carol, status="error",
                    dependencies_met=False)
    assert replies(actions) == [] and sends(actions) == [("c1", 1)]
    assert replies(reply(state, "e1", LONE_TASK, "c1", client=carol, status="error")) == ["c1"]
    assert state.pending == {}


def test_a_client_taking_replies_on_mux_may_exceed_its_window_by_the_tasks_on_engines():
    # the client counts a reply the device delivered before this core reads its copy
    carol = shared_identity()
    state = core(2, hwm=1, client_window=2)
    assert len(sends(task(state, "t1", client=carol) + task(state, "t2", client=carol))) == 2
    assert task(state, "t3", client=carol) == []  # t1 or t2 may be answered already
    assert task(state, "t4", client=carol) == []
    assert fails(task(state, "t5", client=carol)) == {"t5": WINDOW_ENAME}  # 2 + 2 running
    assert state.waiting == {carol: 4}


def test_records_keep_the_json_frames_and_write_them_as_they_came(tmp_path):
    """Headers and metadata are recorded as dicts and written to SQLite as the frames
    they were read from; a session that does not pack JSON gets its dicts encoded."""
    path = tmp_path / "hub.db"
    state = ControllerState(Hub(SQLiteStore(path)), TaskScheduler(), unpack=json.loads)
    assert state.json_frames
    ready(state, "e0")
    frames, header, metadata = request("t1", after=[])
    frames[2] = json.dumps(header, indent=1).encode()  # not what json.dumps(header) writes
    state.task(ALICE, frames, header, metadata, 0.0)
    reply(state, "e0", TASK, "t1")
    state.hub.store.close()
    db = sqlite3.connect(path)
    stored_header, stored_md = db.execute("SELECT header, metadata FROM tasks").fetchone()
    db.close()
    assert stored_header == b"\x00W" + frames[2] and stored_md == b"\x00W" + frames[4]
    record = SQLiteStore(path).get_record("t1")
    assert record["header"] == header and record["metadata"] == {"after": []}
    assert record["result_metadata"]["engine"] == "e0"
    assert type(record["header"]) is dict

    def not_json(raw: bytes) -> object:
        return pickle.loads(raw)

    assert not ControllerState(unpack=not_json).json_frames


def test_execute_reply_records_the_code_of_its_request():
    state = core()
    direct(state, "d1", "e0", msg_type="execute_request")
    reply(state, "e0", MUX, "d1", msg_type="execute_reply")
    assert state.hub.store.get_record("d1")["execute_input"] == "a = 1"


def test_failed_task_with_retries_runs_again_with_a_new_attempt():
    state = core(2)
    task(state, "t1", retries=1)
    actions = reply(state, "e0", TASK, "t1", status="error")
    assert replies(actions) == []  # the client waits for the rerun
    (rerun,) = [a for a in actions if isinstance(a, SendToEngine)]
    assert (rerun.msg_id, rerun.engine_id, rerun.attempt) == ("t1", 1, 1)
    assert replies(reply(state, "e1", TASK, "t1")) == ["t1"]


# ---- engine loss -------------------------------------------------------------------


def test_lost_engine_fails_its_direct_requests_and_reruns_tasks_with_retries():
    state = core(2, hwm=2)
    direct(state, "d1", "e0")
    assert sends(task(state, "t1", retries=1)) == [("t1", 0)]
    assert sends(task(state, "t2", targets=[0])) == [("t2", 0)]
    actions = state.engine_lost(0, "its process exited", now=2.0)
    assert fails(actions) == {"d1": "EngineError", "t2": "EngineError"}
    assert "its process exited" in next(a.evalue for a in actions if a.msg_id == "d1")
    assert [(a.msg_id, a.engine_id, a.attempt) for a in actions
            if isinstance(a, SendToEngine)] == [("t1", 1, 1)]
    assert actions[-1] == Notify("unregistration_notification",
                                 {"id": 0, "uuid": "e0", "reason": "its process exited"})
    assert sorted(state.pending) == ["t1"]
    assert state.engine_lost(0, "again", now=3.0) == []


def test_task_without_retries_on_a_lost_engine_fails_with_engine_error():
    state = core(1)
    task(state, "t1")
    assert fails(state.engine_lost(0, "stopped answering heartbeats", now=1.0)) == {"t1": "EngineError"}


def test_send_refused_by_a_full_engine_queue_fails_that_request():
    state = core(1)
    task(state, "t1")
    (fail,) = state.engine_refused(0, "t1", 64 << 20)
    assert (fail.ename, fail.engine_id) == ("EngineError", 0) and "64 MB" in fail.evalue


def test_late_reply_of_a_removed_engine_is_stored_not_delivered():
    state = core(1)
    direct(state, "d1", "e0")
    assert fails(state.engine_lost(0, "stopped answering heartbeats", now=1.0)) == {"d1": "EngineError"}
    # the server records the EngineError it answers with
    state.hub.finished("d1", {"msg_id": "err"}, {"status": "error"}, {"ename": "EngineError"}, [])
    assert reply(state, "e0", MUX, "d1") == []  # the client had its answer
    record = state.hub.store.get_record("d1")
    assert record["result_content"] == b'{"status": "ok"}'
    assert record["result_buffers"] == [b"result:d1"]
    assert record["result_metadata"]["status"] == "ok"
    assert reply(state, "e0", MUX, "d1") == []  # a second copy changes nothing
    assert state.hub.store.get_record("d1")["result_content"] == b'{"status": "ok"}'


def test_late_reply_of_a_task_rerun_elsewhere_leaves_the_rerun_in_charge():
    state = core(2)
    task(state, "t1", retries=1)
    assert sends(state.engine_lost(0, "stopped answering heartbeats", now=1.0)) == [("t1", 1)]
    assert reply(state, "e0", TASK, "t1") == []
    assert state.hub.store.get_record("t1")["completed"] is None
    assert replies(reply(state, "e1", TASK, "t1")) == ["t1"]


def test_pong_of_an_engine_removed_while_alive_tells_it_to_exit():
    state = core(1)
    assert state.pong("e0", now=1.0) == []
    state.engine_lost(0, "stopped answering heartbeats", now=6.0)
    # a heartbeat period later: what it finished while stalled comes first
    assert state.pong("e0", now=7.0) == [TellToExit("e0", 0, "stopped answering heartbeats", delay=1.0)]
    assert state.pong("e0", now=8.0) == []


def test_silent_engines_are_named_dead():
    state = core(2)
    state.pong("e1", now=4.0)
    assert state.dead_engines(now=5.5) == [0]


# ---- abort, time, dependencies -------------------------------------------------------


def test_abort_fails_queued_tasks_and_interrupts_running_ones():
    state = core(1)
    task(state, "t1")
    task(state, "t2")
    actions = state.abort(["t1", "t2", "unknown"], now=1.0)
    assert fails(actions) == {"t2": "TaskAborted"}
    assert [a for a in actions if isinstance(a, Interrupt)] == [Interrupt(b"e0", "t1", "TaskAborted")]
    assert state.abort("t2", now=1.0) == []  # answered already


def test_timeout_of_a_waiting_task_fails_it_at_its_deadline():
    state = core(0)
    task(state, "t1", now=10.0, timeout=2)
    assert state.next_deadline() == 12.0
    assert state.tick(11.0) == []
    assert fails(state.tick(12.0)) == {"t1": "TaskTimeout"}
    assert state.next_deadline() is None


def test_a_task_after_a_direct_request_is_released_by_its_reply():
    state = core(2)
    direct(state, "d1", "e0")
    assert task(state, "t1", after=["d1"]) == []
    actions = reply(state, "e0", MUX, "d1")
    assert replies(actions) == [] and sends(actions) == [("t1", 0)]


def test_a_task_after_a_failed_direct_request_fails_as_impossible():
    state = core(1)
    direct(state, "d1", "e0")
    assert task(state, "t1", after={"dependencies": ["d1"], "success": True, "failure": False}) == []
    actions = state.engine_lost(0, "its process exited", now=1.0)
    assert fails(actions) == {"d1": "EngineError", "t1": "ImpossibleDependency"}


# ---- Hub queries ---------------------------------------------------------------------


def test_hub_queries_on_pending_and_finished_work():
    state = core(1)
    direct(state, "d1", "e0")
    direct(state, "d2", "e0")
    reply(state, "e0", MUX, "d1")
    content, _ = state.results(["d1", "d2"], status_only=True)
    assert (content["completed"], content["pending"]) == (["d1"], ["d2"])
    with pytest.raises(RecordNotFound, match="never submitted"):
        state.results(["nope"], status_only=True)
    with pytest.raises(ValueError, match="cannot purge pending"):
        state.purge(["d1", "d2"], None)
    records, buffers = state.db_records({"msg_id": "d1"}, ["msg_id", "result_content", "result_buffers"])
    assert records["records"] == [{"msg_id": "d1", "result_content": {"status": "ok"}}]
    assert records["result_buffer_lens"] == [1] and buffers == [b"result:d1"]
    with pytest.raises(ValueError, match="cannot resubmit pending"):
        state.to_resubmit(["d2"])
    (record,) = state.to_resubmit(["d1"])
    assert state.resubmit_metadata(record)["targets"] == [0]
    state.purge(["d1"], None)
    assert "d1" not in state.hub.store


# ---- per-client window -----------------------------------------------------------------


def test_a_request_beyond_the_clients_window_is_refused_at_once_and_others_go_on():
    state = core(1, hwm=2, client_window=2)
    assert state.connection()["window"] == 2
    assert sends(task(state, "t1")) == [("t1", 0)]
    assert sends(task(state, "t2")) == [("t2", 0)]
    (refused,) = task(state, "t3")
    assert (refused.ename, refused.record, refused.client) == (WINDOW_ENAME, False, ALICE)
    assert "2 requests waiting" in refused.evalue and "client_window" in refused.evalue
    assert "t3" not in state.pending and "t3" not in state.hub.store  # never queued
    frames, header, md = request("b1", targets=[0])
    assert fails(state.fan_out(ALICE, frames, header, md)) == {"b1_0": WINDOW_ENAME}
    # the mux device delivered a direct request already: it is recorded, never refused
    assert direct(state, "d1", "e0") == [] and "d1" in state.pending
    assert task(state, "u1", client=BOB) == []  # another client has its own window
    assert state.waiting == {ALICE: 2, BOB: 1}
    reply(state, "e0", TASK, "t1")  # an answer frees a place
    assert state.waiting == {ALICE: 1, BOB: 1}


def test_a_fan_out_needs_room_for_all_its_copies():
    state = core(2, client_window=3)
    task(state, "t1")
    frames, header, md = request("b1", targets=[0, 1, 1])
    assert sends(state.fan_out(ALICE, frames, header, md)) == [("b1_0", 0), ("b1_1", 1)]
    frames, header, md = request("b2", targets=[0])
    assert fails(state.fan_out(ALICE, frames, header, md)) == {"b2_0": WINDOW_ENAME}


def test_client_window_zero_is_no_limit_and_negative_is_refused():
    state = core(0, client_window=0)
    for i in range(5000):
        assert task(state, f"t{i}") == []
    assert state.waiting == {ALICE: 5000}
    with pytest.raises(ValueError, match="client_window"):
        ControllerState(unpack=json.loads, client_window=-1)
