"""The Hub's bookkeeping without sockets: registration, readiness, liveness, records."""

from __future__ import annotations

import pytest

from ipyparallel_lite.controller.hub import Hub, RegistrationError
from ipyparallel_lite.controller.store import MemoryStore


def test_engine_is_ready_only_when_shell_and_control_confirmed():
    hub = Hub()
    engine = hub.register("u0", None, {"python": "3.11"}, now=0.0)
    assert engine.id == 0 and engine.state == "registering"
    assert hub.ready_engines() == {}
    assert hub.confirm("u0", "shell", now=0.1) is None
    assert hub.confirm("u0", "control", now=0.2) is engine
    assert engine.state == "ready"
    assert hub.ready_engines() == {0: "u0"}
    assert hub.engine_infos() == {0: {"python": "3.11"}}
    assert hub.confirm("u0", "control", now=0.3) is None  # only once
    assert hub.confirm("nobody", "shell", now=0.3) is None


def test_ids_are_assigned_and_requested():
    hub = Hub()
    assert hub.register("a", None, {}, 0).id == 0
    assert hub.register("b", 5, {}, 0).id == 5
    assert hub.register("c", None, {}, 0).id == 6
    hub.remove(0)
    assert hub.register("d", 0, {}, 0).id == 0


@pytest.mark.parametrize(
    ("uuid", "requested", "reason"),
    [("", None, "non-empty"), ("a", None, "already registered"), ("z", 0, "is taken"), ("z", -1, "non-negative")],
)
def test_bad_registrations_are_refused(uuid, requested, reason):
    hub = Hub()
    hub.register("a", 0, {}, 0)
    with pytest.raises(RegistrationError, match=reason):
        hub.register(uuid, requested, {}, 0)


def test_silent_engines_and_stale_registrations_are_dead():
    hub = Hub(hb_period=1.0, max_misses=3, registration_timeout=10)
    live = hub.register("live", None, {}, 0)
    hub.confirm("live", "shell", 0)
    hub.confirm("live", "control", 0)
    hub.register("stuck", None, {}, 0)
    hub.beat("live", 2.5)
    assert hub.dead_engines(now=5.0) == []
    assert hub.dead_engines(now=5.6) == [live]
    assert [e.uuid for e in hub.dead_engines(now=10.5)] == ["live", "stuck"]
    # a quick probe after a disconnect: silent since the probe started means dead
    assert hub.dead_engines(now=3.0, grace=0.4) == [live]
    assert hub.remove(live.id) is live and hub.by_uuid("live") is None


def test_engines_removed_against_their_will_are_remembered_once():
    hub = Hub()
    for uuid in ("stalled", "leaving"):
        hub.register(uuid, None, {}, 0)
    assert hub.beat("stalled", 1.0) and not hub.beat("stranger", 1.0)
    stalled, leaving = hub.by_uuid("stalled"), hub.by_uuid("leaving")
    hub.remove(stalled.id, forced_because="stopped answering heartbeats")
    hub.remove(leaving.id)  # it unregistered itself: nothing to tell it
    assert not hub.beat("stalled", 2.0)
    assert hub.take_removed("stalled") == (stalled.id, "stopped answering heartbeats")
    assert hub.take_removed("stalled") is None  # told once
    assert hub.take_removed("leaving") is None
    small = Hub()
    small.REMEMBER_REMOVED = 2
    for i in range(3):
        small.register(f"e{i}", None, {}, 0)
        small.remove(i, forced_because="unreachable")
    assert small.take_removed("e0") is None and small.take_removed("e2") == (2, "unreachable")


def test_task_records_follow_request_and_reply():
    hub = Hub(store=MemoryStore())
    header = {"msg_id": "m1", "msg_type": "apply_request", "date": "2026-11-24T10:00:00Z"}
    hub.submitted("m1", header, {"after": []}, "client-session", "task")
    record = hub.store.get_record("m1")
    assert record["queue"] == "task" and record["completed"] is None
    assert record["submitted"].year == 2026
    hub.assigned("m1", "engine-uuid")
    assert hub.store.get_record("m1")["engine_uuid"] == "engine-uuid"
    reply_md = {"engine": "engine-uuid", "status": "ok", "started": "2026-11-24T10:00:01Z",
                "completed": "2026-11-24T10:00:02Z"}
    hub.finished("m1", {"msg_id": "r1"}, reply_md, b"{}", [b"result"])
    record = hub.store.get_record("m1")
    assert record["completed"].second == 2 and record["result_buffers"] == [b"result"]
    hub.finished("unknown", {}, {}, b"{}", [])  # replies to purged records are ignored


def test_record_transitions_fill_every_key(tmp_path):
    from ipyparallel_lite.controller.sqlitestore import SQLiteStore
    from ipyparallel_lite.controller.store import RECORD_KEYS

    for store in (MemoryStore(record_limit=0, spill_path=tmp_path / "spill.db"),
                  SQLiteStore(tmp_path / "hub.db")):
        hub = Hub(store=store)
        header = {"msg_id": "m1", "msg_type": "apply_request", "date": "2026-11-24T10:00:00Z"}
        hub.submitted("m1", header, {"label": "mine", "after": []}, "client-session", "task",
                      None, b'{"x": 1}', [b"function", b"args"])
        record = hub.store.get_record("m1")
        assert set(record) == set(RECORD_KEYS)
        assert record["label"] == "mine" and record["content"] == b'{"x": 1}'
        assert [bytes(b) for b in record["buffers"]] == [b"function", b"args"]
        assert record["engine_uuid"] is None and record["completed"] is None
        hub.assigned("m1", "engine-uuid")
        assert hub.store.get_record("m1")["engine_uuid"] == "engine-uuid"
        hub.finished("m1", {"msg_id": "r1"}, {"engine": "engine-uuid", "status": "ok",
                                              "started": "2026-11-24T10:00:01Z"}, b"{}", [b"42"])
        record = hub.store.get_record("m1")
        assert record["started"].second == 1 and record["completed"] is not None
        assert record["received"] is not None and record["result_header"] == {"msg_id": "r1"}
        hub.submitted("m2", {**header, "msg_id": "m2"}, {}, "other", "task")
        hub.resubmitted("m1", "m2")
        assert hub.store.get_record("m1")["resubmitted"] == "m2"
        assert hub.store.get_record("m2")["resubmitted"] is not None
        store.close()


def test_unfinished_records_are_marked_lost(tmp_path):
    from ipyparallel_lite.controller.sqlitestore import SQLiteStore

    path = tmp_path / "hub.db"
    hub = Hub(store=SQLiteStore(path))
    for msg_id in ("done", "queued", "running"):
        hub.submitted(msg_id, {"msg_id": msg_id, "date": "2026-11-24T10:00:00Z"}, {}, "c", "task")
    hub.assigned("running", "e")
    hub.finished("done", {"msg_id": "r"}, {"status": "ok"}, b"{}", [])
    hub.store.close()  # as a controller killed after its last flush leaves it
    restored = Hub(store=SQLiteStore(path))
    assert sorted(restored.mark_lost("the controller died")) == ["queued", "running"]
    record = restored.store.get_record("running")
    assert record["completed"] is not None
    assert record["result_content"]["ename"] == "EngineError"
    assert record["result_content"]["evalue"] == "the controller died"
    assert restored.store.get_record("done")["result_content"] == b"{}"
    assert restored.mark_lost("again") == []
    restored.store.close()
