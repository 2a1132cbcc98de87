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


def test_mpi_ranks_of_a_set_get_ids_in_rank_order_whatever_order_they_arrive_in():
    hub = Hub()
    hub.register("plain", None, {}, now=0.0)

    def rank(r: int, size: int = 3, key: str = "set-a") -> dict:
        return {"engine_set": key, "mpi_rank": r, "mpi_size": size}

    assert hub.register("r2", None, rank(2), now=0.0).id == 3
    assert hub.register("other", None, {}, now=0.0).id == 4  # past the set's reserved ids
    assert hub.register("r0", None, rank(0), now=0.0).id == 1
    assert hub.register("r1", None, rank(1), now=0.0).id == 2
    assert hub.register("b1", None, rank(1, 2, "set-b"), now=0.0).id == 6
    # a rank without a set, or an absurd one, is an ordinary engine
    assert hub.register("lone", None, {"mpi_rank": 0, "mpi_size": 1}, now=0.0).id == 7
    assert hub.register("bad", None, rank(5, 2, "set-c"), now=0.0).id == 8


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


def _hub_with_task(store=None, output_limit=1 << 20) -> Hub:
    hub = Hub(store=store or MemoryStore(), output_limit=output_limit)
    hub.submitted("m1", {"msg_id": "m1", "msg_type": "execute_request",
                         "date": "2026-11-24T10:00:00Z"}, {}, "client-session", "mux", "e")
    return hub


def test_output_fills_the_record_from_iopub_messages(tmp_path):
    from ipyparallel_lite.controller.sqlitestore import SQLiteStore

    for store in (MemoryStore(), SQLiteStore(tmp_path / "hub.db")):
        hub = _hub_with_task(store)
        assert hub.output("m1", "execute_input", {"code": "print('hi')", "execution_count": 1})
        assert hub.output("m1", "stream", {"name": "stdout", "text": "hi\n"})
        store.flush(everything=True)  # appends work on a record already written too
        assert hub.output("m1", "stream", {"name": "stdout", "text": "there\n"})
        assert hub.output("m1", "stream", {"name": "stderr", "text": "warned\n"})
        result = {"execution_count": 1, "data": {"text/plain": "42"}, "metadata": {}}
        assert hub.output("m1", "execute_result", result, size=70)
        error = {"ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": ["tb"]}
        assert hub.output("m1", "error", error, size=80)
        record = hub.store.get_record("m1")
        assert record["stdout"] == "hi\nthere\n" and record["stderr"] == "warned\n"
        assert record["execute_input"] == "print('hi')"
        assert record["execute_result"] == result and record["error"] == error
        store.close()


def test_output_ignores_what_it_does_not_record():
    hub = _hub_with_task()
    assert not hub.output("unknown", "stream", {"name": "stdout", "text": "x"})  # no record
    assert not hub.output("m1", "status", {"execution_state": "idle"})
    assert not hub.output("m1", "display_data", {"data": {}})
    assert not hub.output("m1", "stream", {"name": "stdin", "text": "x"})
    assert not hub.output("m1", "stream", {"name": "stdout", "text": b"bytes"})
    assert not hub.output("m1", "execute_result", ["not", "a", "dict"])
    record = hub.store.get_record("m1")
    assert [record[k] for k in ("stdout", "stderr", "execute_input", "execute_result")] == [None] * 4


def test_output_is_cut_at_the_limit_with_a_marker():
    hub = _hub_with_task(output_limit=10)
    assert hub.output("m1", "stream", {"name": "stdout", "text": "0123456"})
    assert hub.output("m1", "stream", {"name": "stdout", "text": "789abc"})
    kept = hub.store.get_value("m1", "stdout")
    assert kept.startswith("0123456789") and "truncated" in kept and "abc" not in kept
    assert not hub.output("m1", "stream", {"name": "stdout", "text": "more"})  # already cut
    assert hub.store.get_value("m1", "stdout") == kept
    assert hub.output("m1", "execute_input", {"code": "x = 1 + 2 + 3 + 4"})
    assert hub.store.get_value("m1", "execute_input").startswith("x = 1 + 2 ")
    big = {"execution_count": 3, "data": {"text/plain": "y" * 100}, "metadata": {}}
    assert hub.output("m1", "execute_result", big, size=150)
    kept = hub.store.get_value("m1", "execute_result")
    assert kept["execution_count"] == 3 and "150 bytes not kept" in kept["data"]["text/plain"]
    error = {"ename": "ValueError", "evalue": "bad", "traceback": ["z" * 100]}
    assert hub.output("m1", "error", error, size=120)
    kept = hub.store.get_value("m1", "error")
    assert kept["ename"] == "ValueError" and kept["evalue"] == "bad"
    assert "120 bytes not kept" in kept["traceback"][0]


def test_output_text_counts_against_the_memory_store_size_limit(tmp_path):
    store = MemoryStore(size_limit=1000, spill_path=tmp_path / "spill.db")
    hub = _hub_with_task(store)
    hub.finished("m1", {"msg_id": "r1"}, {"status": "ok"}, b"{}", [])
    hub.output("m1", "stream", {"name": "stdout", "text": "x" * 2000})
    assert not store.is_resident("m1")  # spilled, not dropped
    assert hub.store.get_value("m1", "stdout") == "x" * 2000
    store.close()


def test_input_from_request_only_when_the_engine_echoed_none():
    import json

    hub = _hub_with_task()
    hub.store.update_record("m1", {"content": b'{"code": "a = 1", "silent": true}'})
    assert hub.input_from_request("m1", json.loads)
    assert hub.store.get_value("m1", "execute_input") == "a = 1"
    hub.store.update_record("m1", {"content": b'{"code": "b = 2"}'})
    assert not hub.input_from_request("m1", json.loads)  # the engine's echo (or ours) stays
    assert hub.store.get_value("m1", "execute_input") == "a = 1"
    assert not hub.input_from_request("unknown", json.loads)
    hub.store.update_record("m1", {"content": b'{"no": "code"}', "execute_input": None})
    assert not hub.input_from_request("m1", json.loads)
