"""Tests of the Hub's record stores: the query matcher, the contract every store keeps
(run against each), SQLite batching, and the memory store's spilling."""

from __future__ import annotations

import json
from array import array
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import zmq

from ipyparallel_lite.controller.sqlitestore import (
    SeenIds,
    SQLiteStore,
    decode_buffers,
    decode_value,
    encode_buffers,
    encode_value,
)
from ipyparallel_lite.controller.store import (
    BaseStore,
    JSONDict,
    MemoryStore,
    NoStore,
    QueryError,
    RecordNotFound,
    compile_query,
    make_store,
    match,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def _rec(msg_id: str, seconds: int = 0, completed: bool = False, **extra) -> dict:
    rec = {
        "msg_id": msg_id,
        "submitted": T0 + timedelta(seconds=seconds),
        "completed": T0 + timedelta(seconds=seconds + 1) if completed else None,
        "engine_uuid": None,
        "buffers": [],
        "result_buffers": None,
    }
    rec.update(extra)
    return rec


RECORD = {
    "msg_id": "m1",
    "n": 5,
    "x": 2.5,
    "name": "apply_request",
    "flag": False,
    "none": None,
    "tags": ["a", "b", "c"],
    "header": {"msg_type": "apply_request"},
    "when": T0,
}


# ---- match: equality -----------------------------------------------------------------


@pytest.mark.parametrize(
    "query, expected",
    [
        ({}, True),
        ({"n": 5}, True),
        ({"n": 6}, False),
        ({"n": 5, "name": "apply_request"}, True),
        ({"n": 5, "name": "other"}, False),
        ({"none": None}, True),
        ({"missing": None}, True),  # a missing key reads as None
        ({"missing": 1}, False),
        ({"flag": False}, True),
        ({"header": {"msg_type": "apply_request"}}, True),  # plain dict: equality
        ({"header": {"msg_type": "x"}}, False),
        ({"tags": ["a", "b", "c"]}, True),
        ({"when": T0}, True),
        ({"when": T0 + timedelta(seconds=1)}, False),
    ],
)
def test_equality(query, expected):
    assert match(query, RECORD) is expected


# ---- match: operators ----------------------------------------------------------------


@pytest.mark.parametrize(
    "condition, expected",
    [
        ({"$eq": 5}, True),
        ({"$eq": 4}, False),
        ({"$ne": 4}, True),
        ({"$ne": 5}, False),
        ({"$lt": 6}, True),
        ({"$lt": 5}, False),
        ({"$lte": 5}, True),
        ({"$lte": 4}, False),
        ({"$gt": 4}, True),
        ({"$gt": 5}, False),
        ({"$gte": 5}, True),
        ({"$gte": 6}, False),
        ({"$gt": 4.5}, True),
        ({"$gt": 1, "$lt": 10}, True),  # several operators: all must hold
        ({"$gt": 1, "$lt": 3}, False),
        ({"$in": [1, 5, 9]}, True),
        ({"$in": (1, 9)}, False),
        ({"$in": {5}}, True),
        ({"$in": []}, False),
        ({"$nin": [1, 9]}, True),
        ({"$nin": [5]}, False),
        ({"$exists": True}, True),
        ({"$exists": False}, False),
        ({"$mod": [2, 1]}, True),
        ({"$mod": [5, 1]}, False),
    ],
)
def test_operators_on_int(condition, expected):
    assert match({"n": condition}, RECORD) is expected


@pytest.mark.parametrize(
    "key, condition, expected",
    [
        ("name", {"$glob": "apply_*"}, True),
        ("name", {"$glob": "*_request"}, True),
        ("name", {"$glob": "apply_?equest"}, True),
        ("name", {"$glob": "execute*"}, False),
        ("name", {"$glob": "APPLY_*"}, False),  # case-sensitive everywhere
        ("n", {"$glob": "5"}, False),  # non-str values never match a glob
        ("missing", {"$glob": "*"}, False),
        ("name", {"$lt": "b"}, True),
        ("tags", {"$all": ["a", "c"]}, True),
        ("tags", {"$all": ["a", "z"]}, False),
        ("tags", {"$all": []}, False),  # like MongoDB
        ("name", {"$all": ["a"]}, False),  # a str is not a list of items
        ("missing", {"$all": ["a"]}, False),
        ("header", {"$eq": {"msg_type": "apply_request"}}, True),
        ("header", {"$in": [{"msg_type": "apply_request"}]}, True),
        ("tags", {"$in": [["a", "b", "c"]]}, True),
        ("tags", {"$in": ["a", "b"]}, False),  # unhashable value against a set
        ("flag", {"$exists": True}, True),  # False exists
    ],
)
def test_operators_on_other_types(key, condition, expected):
    assert match({key: condition}, RECORD) is expected


@pytest.mark.parametrize(
    "condition, expected",
    [
        ({"$lt": 1}, False),
        ({"$lte": 1}, False),
        ({"$gt": 1}, False),
        ({"$gte": 1}, False),
        ({"$gt": T0}, False),
        ({"$eq": None}, True),
        ({"$ne": None}, False),
        ({"$ne": 1}, True),
        ({"$in": [None]}, True),
        ({"$in": [1]}, False),
        ({"$nin": [1]}, True),
        ({"$nin": [None, 1]}, False),
        ({"$exists": True}, False),
        ({"$exists": False}, True),
        ({"$mod": [2, 0]}, False),
    ],
)
@pytest.mark.parametrize("key", ["none", "missing"])
def test_operators_on_none_and_missing(key, condition, expected):
    assert match({key: condition}, RECORD) is expected


def test_comparison_of_unorderable_types_is_false():
    assert match({"name": {"$gt": 3}}, RECORD) is False
    assert match({"n": {"$lt": "z"}}, RECORD) is False
    assert match({"when": {"$lt": 3}}, RECORD) is False
    assert match({"header": {"$lt": 3}}, RECORD) is False


def test_mod_ignores_bools_and_strings():
    assert match({"flag": {"$mod": [2, 0]}}, RECORD) is False
    assert match({"name": {"$mod": [2, 0]}}, RECORD) is False
    assert match({"x": {"$mod": [2, 0.5]}}, RECORD) is True


def test_datetime_comparisons():
    later = T0 + timedelta(minutes=1)
    assert match({"when": {"$lt": later}}, RECORD)
    assert match({"when": {"$gte": T0}}, RECORD)
    assert not match({"when": {"$gt": T0}}, RECORD)
    assert match({"when": {"$in": [later, T0]}}, RECORD)
    assert match({"when": {"$nin": [later]}}, RECORD)


def test_naive_datetimes_are_local_time():
    naive = T0.astimezone().replace(tzinfo=None)  # T0 as local wall-clock time
    assert match({"when": naive}, RECORD)
    assert match({"when": {"$lte": naive}}, RECORD)
    assert match({"when": {"$in": [naive]}}, RECORD)
    record = {"when": naive}
    assert match({"when": T0}, record)
    assert match({"when": {"$lt": T0 + timedelta(seconds=1)}}, record)
    assert match({"when": {"$gt": naive - timedelta(seconds=1)}}, record)


def test_compiled_query_is_reusable():
    matcher = compile_query({"n": {"$gte": 3}})
    records = [{"n": i} for i in range(6)] + [{}]
    assert [r.get("n") for r in records if matcher(r)] == [3, 4, 5]


# ---- bad queries ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, message",
    [
        ({"n": {"$in": 3}}, "$in needs a list, got 3"),
        ({"n": {"$nin": "abc"}}, "$nin needs a list, got 'abc'"),
        ({"n": {"$all": 1}}, "$all needs a list, got 1"),
        ({"n": {"$exists": 1}}, "$exists needs True or False, got 1"),
        ({"n": {"$glob": 5}}, "$glob needs a str pattern, got 5"),
        ({"n": {"$lt": None}}, "$lt needs a value that can be ordered, got None"),
        ({"n": {"$gte": {"a": 1}}}, "$gte needs a value that can be ordered"),
        ({"n": {"$mod": [0, 1]}}, "$mod needs [divisor, remainder]"),
        ({"n": {"$mod": [2]}}, "$mod needs [divisor, remainder]"),
        ({"n": {"$regex": "x"}}, "unknown operator '$regex' on 'n'; known: $all"),
        ({"n": {"$lt": 3, "x": 1}}, "mixes operators and plain keys"),
        ({1: 2}, "query keys are str, got 1"),
        (["n"], "a query is a dict, got ['n']"),
    ],
)
def test_bad_queries(query, message):
    with pytest.raises(QueryError) as info:
        compile_query(query)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_query_fails_even_without_records():
    with pytest.raises(QueryError):
        MemoryStore().find_records({"n": {"$in": 3}})
    with pytest.raises(QueryError):
        MemoryStore().drop_matching_records({"n": {"$bogus": 3}})


# ---- the contract every store keeps ---------------------------------------------------


@pytest.fixture(params=["memory", "spilling", "sqlite"])
def make(request, tmp_path):
    """A factory of empty stores of one kind: in memory, in memory spilling every
    completed record at once, and SQLite."""
    stores = []

    def new() -> BaseStore:
        if request.param == "memory":
            store = MemoryStore()
        elif request.param == "spilling":
            store = MemoryStore(record_limit=0, spill_path=tmp_path / f"spill{len(stores)}.db")
        else:
            store = SQLiteStore(tmp_path / f"records{len(stores)}.db", batch_size=3)
        stores.append(store)
        return store

    yield new
    for store in stores:
        store.close()


def test_is_a_base_store(make):
    assert isinstance(make(), BaseStore)
    with pytest.raises(TypeError):
        BaseStore()  # abstract


def test_add_get_update(make):
    store = make()
    store.add_record("a", _rec("a", header={"msg_type": "apply_request"}))
    assert "a" in store and "b" not in store and len(store) == 1
    store.update_record("a", {"engine_uuid": "e1", "completed": T0})
    rec = store.get_record("a")
    assert rec["engine_uuid"] == "e1"
    assert rec["completed"] == T0
    assert rec["header"] == {"msg_type": "apply_request"}
    store.flush()
    store.update_record("a", {"label": "again"})  # an update after the record was written
    assert store.get_record("a")["label"] == "again"
    assert store.get_record("a")["completed"] == T0


def test_values_round_trip(make):
    store = make()
    rec = _rec("a", completed=True, header={"date": T0, "n": [1, 2.5, None, True]},
               result_content=b"{\"status\": \"ok\"}", buffers=[b"abc", memoryview(b"de")],
               result_buffers=[bytearray(b"")], label="x")
    store.add_record("a", rec)
    store.flush()
    got = store.get_record("a")
    assert got["header"] == {"date": T0, "n": [1, 2.5, None, True]}
    assert bytes(got["result_content"]) == b'{"status": "ok"}'
    assert [bytes(b) for b in got["buffers"]] == [b"abc", b"de"]
    assert [bytes(b) for b in got["result_buffers"]] == [b""]
    assert got["label"] == "x" and got["submitted"] == T0 and got.get("stdout") is None


def test_get_value_reads_one_key(make):
    store = make()
    store.add_record("a", _rec("a", completed=True, stdout="printed\n", label="x"))
    for _ in range(2):  # in memory, then written (or spilled)
        assert store.get_value("a", "stdout") == "printed\n"
        assert store.get_value("a", "label") == "x" and store.get_value("a", "stderr") is None
        store.flush(everything=True)
    store.update_record("a", {"stdout": "printed\nmore\n"})
    assert store.get_value("a", "stdout") == "printed\nmore\n"
    with pytest.raises(RecordNotFound):
        store.get_value("nope", "stdout")


def test_add_sets_msg_id(make):
    store = make()
    store.add_record("a", {"submitted": T0})
    assert store.get_record("a")["msg_id"] == "a"
    with pytest.raises(ValueError):
        store.add_record("b", {"msg_id": "c"})
    with pytest.raises(ValueError):
        store.update_record("a", {"msg_id": "c"})


def test_duplicate_add_raises(make):
    store = make()
    store.add_record("a", _rec("a", completed=True))
    store.flush()
    with pytest.raises(KeyError, match="already stored"):
        store.add_record("a", _rec("a"))


def test_missing_records_raise_readable_key_errors(make):
    store = make()
    for call in (store.get_record, store.drop_record, lambda m: store.update_record(m, {}),
                 lambda m: store.get_value(m, "stdout")):
        with pytest.raises(KeyError) as info:
            call("nope")
        assert isinstance(info.value, RecordNotFound)
        assert str(info.value) == "no record with msg_id 'nope'"


def test_find_records_and_keys_projection(make):
    store = make()
    for i in range(5):
        store.add_record(f"m{i}", _rec(f"m{i}", seconds=i, completed=i % 2 == 0, n=i))
    done = store.find_records({"completed": {"$ne": None}})
    assert sorted(r["msg_id"] for r in done) == ["m0", "m2", "m4"]
    assert set(done[0]) >= {"submitted", "buffers", "n"}
    slim = store.find_records({"n": {"$gte": 3}}, keys=["n", "nonexistent"])
    assert sorted(slim, key=lambda r: r["n"]) == [
        {"msg_id": "m3", "n": 3, "nonexistent": None},
        {"msg_id": "m4", "n": 4, "nonexistent": None},
    ]
    assert store.find_records({"n": 1}, keys=("msg_id",)) == [{"msg_id": "m1"}]
    # None or empty keys: whole records, as in ipyparallel
    assert store.find_records({"n": 1}, keys=[]) == store.find_records({"n": 1})


def test_gt_and_lt_are_not_swapped_in_any_store(make):
    """ipyparallel's in-memory store answers $gt with "less than": ours does not."""
    store = make()
    for i in range(4):
        store.add_record(f"m{i}", _rec(f"m{i}", seconds=i, completed=True, n=i))
    ids = lambda q: sorted(r["msg_id"] for r in store.find_records(q, ["n"]))  # noqa: E731
    assert ids({"n": {"$gt": 1}}) == ["m2", "m3"]
    assert ids({"n": {"$lt": 1}}) == ["m0"]
    assert ids({"submitted": {"$gt": T0 + timedelta(seconds=2)}}) == ["m3"]
    assert ids({"submitted": {"$lt": T0 + timedelta(seconds=1)}}) == ["m0"]


def test_history_sorted_by_submitted(make):
    store = make()
    store.add_record("late", _rec("late", seconds=30))
    store.add_record("unsubmitted", _rec("unsubmitted", submitted=None))
    store.add_record("early", _rec("early", seconds=-30, completed=True))
    store.add_record("tie1", _rec("tie1", seconds=0))
    store.add_record("tie2", _rec("tie2", seconds=0))
    naive = (T0 + timedelta(seconds=10)).astimezone().replace(tzinfo=None)
    store.add_record("naive", _rec("naive", submitted=naive))
    assert store.get_history() == ["early", "tie1", "tie2", "naive", "late"]


def test_drop_record(make):
    store = make()
    store.add_record("a", _rec("a", buffers=[b"12345"]))
    store.add_record("b", _rec("b", completed=True))
    store.drop_record("a")
    store.drop_record("b")
    assert "a" not in store and "b" not in store and len(store) == 0
    with pytest.raises(RecordNotFound):
        store.get_record("a")


def test_drop_matching_records(make):
    store = make()
    for i in range(6):
        store.add_record(f"m{i}", _rec(f"m{i}", seconds=i, completed=i < 4, buffers=[b"x" * i]))
    dropped = store.drop_matching_records(
        {"completed": {"$exists": True}, "msg_id": {"$glob": "m[0-2]"}}
    )
    assert dropped == 3
    assert sorted(r["msg_id"] for r in store.find_records({})) == ["m3", "m4", "m5"]
    assert store.drop_matching_records({"msg_id": "none"}) == 0


def test_bad_query_is_an_error_in_every_store(make):
    store = make()
    store.add_record("a", _rec("a", n=1))
    for bad in ({"n": {"$bogus": 1}}, {"n": {"$in": 3}}, ["n"]):
        with pytest.raises(QueryError):
            store.find_records(bad)
        with pytest.raises(QueryError):
            store.drop_matching_records(bad)
    assert len(store) == 1


def test_base_store_default_drop_matching():
    class Minimal(MemoryStore):
        drop_matching_records = BaseStore.drop_matching_records

    store = Minimal()
    store.add_record("a", _rec("a", n=1))
    store.add_record("b", _rec("b", n=2))
    assert store.drop_matching_records({"n": 1}) == 1
    assert list(store.get_history()) == ["b"]


# ---- SQLite ----------------------------------------------------------------------------


def test_sqlite_writes_in_batches_and_survives_reopening(tmp_path):
    path = tmp_path / "hub.db"
    store = SQLiteStore(path, batch_size=100)
    for i in range(10):
        store.add_record(f"m{i}", _rec(f"m{i}", i, completed=i < 5, result_buffers=[b"r%d" % i]))
    store.update_record("m7", {"engine_uuid": "e7"})
    other = SQLiteStore(path)  # another connection sees only what was flushed
    assert len(other) == 0
    # pending records wait one flush (most tasks finish by then: written once, not twice)
    assert store.flush() == 5 and len(other) == 5
    store.update_record("m9", {"completed": T0})
    assert store.flush() == 5 and store.flush() == 0
    assert len(other) == 10
    assert other.get_record("m9")["completed"] == T0
    store.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert other.get_record("m7")["engine_uuid"] == "e7"
    assert other.get_record("m3")["result_buffers"] == [b"r3"]
    assert other.find_records({"completed": None}, ["msg_id"]) == [
        {"msg_id": f"m{i}"} for i in range(5, 9)]
    other.close()


def test_sqlite_rewritten_row_loses_the_values_set_to_none(tmp_path):
    """A row names only its columns that are not NULL: rewriting a record whose values
    became None must clear them on disk, and rows of different columns keep the order
    they were added in."""
    path = tmp_path / "hub.db"
    store = SQLiteStore(path)
    store.add_record("a", _rec("a", 0, completed=True, engine_uuid="e", stdout="out", label="x"))
    store.add_record("b", _rec("b", 1, completed=True))
    store.add_record("c", _rec("c", 2, completed=True, stdout="more", extra_key={"k": 1}))
    store.flush()
    store.update_record("a", {"engine_uuid": None, "stdout": None, "label": None})
    store.update_record("c", {"extra_key": None})
    store.close()
    reopened = SQLiteStore(path)
    assert [r["msg_id"] for r in reopened.find_records({})] == ["a", "b", "c"]
    a = reopened.get_record("a")
    assert a["engine_uuid"] is None and a["stdout"] is None and a["label"] is None
    assert a["completed"] == T0 + timedelta(seconds=1)
    assert reopened.get_record("c")["extra_key"] is None
    reopened.close()


def test_json_dicts_are_written_as_their_text_and_read_back_as_dicts():
    """A header kept with the JSON it came as is written as that text, even text a
    session reads only with its bad UTF-8 replaced; reads give plain dicts."""
    header = {"msg_id": "m1", "date": "2024-05-01T12:00:00Z", "username": "\ufffd"}
    raw = b'{"msg_id": "m1", "date": "2024-05-01T12:00:00Z", "username": "\xff"}'
    assert JSONDict.of(header, None) is header and JSONDict.of([1], raw) == [1]
    kept = JSONDict.of(header, zmq.Frame(raw))
    assert type(kept) is JSONDict and kept == header and kept.raw == raw
    assert encode_value(kept) == b"\x00W" + raw  # the wire tag: read back without tags
    assert decode_value(bytes(encode_value(kept))) == header
    store = MemoryStore(record_limit=0)  # spills the record once it completes
    store.add_record("m1", _rec("m1", completed=True, header=kept))
    store.flush()
    assert not store.is_resident("m1")
    back = store.get_record("m1")["header"]
    assert back == header and type(back) is dict
    store.close()


def test_sqlite_reads_back_bytearray_blobs_as_bytes(tmp_path):
    """Blobs are bound as bytearrays (bytes cost more to bind): SQLite must store them
    as BLOBs that read back as bytes, which decode_value reads."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "t.db")
    db.execute("CREATE TABLE t (v)")
    db.execute("INSERT INTO t VALUES (?)", (encode_value({"a": [1, T0]}),))
    ((stored,),) = db.execute("SELECT v FROM t").fetchall()
    db.close()
    assert type(stored) is bytes and decode_value(stored) == {"a": [1, T0]}


def test_sqlite_reopened_knows_its_msg_ids(tmp_path):
    """The filter of stored msg_ids is filled from the table when a store opens: a
    duplicate of a record written by an earlier store is still refused."""
    path = tmp_path / "hub.db"
    store = SQLiteStore(path)
    for i in range(5):
        store.add_record(f"m{i}", _rec(f"m{i}", i, completed=True))
    store.drop_record("m4")
    store.close()
    reopened = SQLiteStore(path)
    assert "m0" in reopened and "m3" in reopened and "m4" not in reopened and "m9" not in reopened
    with pytest.raises(KeyError, match="already stored"):
        reopened.add_record("m2", _rec("m2"))
    reopened.add_record("m4", _rec("m4"))  # dropped: free again
    assert reopened.get_record("m4")["msg_id"] == "m4"
    reopened.close()


def test_seen_ids_never_miss_and_grow():
    seen = SeenIds()
    ids = [f"task-{i}" for i in range(150_000)]
    for i, msg_id in enumerate(ids):
        seen.add(msg_id)
        if seen.full:
            seen.refill(iter(ids[:i + 1]), i + 1)
    assert not seen.full
    assert all(msg_id in seen for msg_id in ids)  # no false negatives, ever
    false = sum(f"other-{i}" in seen for i in range(20_000))
    assert false < 400  # a Bloom filter: rare false positives, which cost a SELECT


@pytest.mark.parametrize("value", [
    T0, datetime(2024, 5, 1, 12, 0, 1, 999_999, tzinfo=timezone.utc),
    datetime(1, 1, 1, tzinfo=timezone.utc), datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=timezone.utc),
    datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))), datetime(2024, 5, 1, 12, 0),
])
def test_dates_round_trip_with_their_zone(value):
    back = decode_value(encode_value(value))
    assert back == value and back.utcoffset() == value.utcoffset()


def test_frames_and_typed_buffers_are_written_as_their_bytes():
    """zmq Frames are concatenated as they are (their len() is their size): this fails
    if pyzmq's Frame stops being a flat buffer."""
    frame, typed = zmq.Frame(b"frame-bytes"), memoryview(array("h", [1, 2, 3]))
    assert len(frame) == memoryview(frame).nbytes == 11
    assert decode_value(encode_value(frame)) == b"frame-bytes"
    assert decode_value(encode_value(typed)) == typed.tobytes()
    assert decode_buffers(encode_buffers([frame, typed, b"", bytearray(b"ba")])) == [
        b"frame-bytes", typed.tobytes(), b"", b"ba"]


def test_dates_as_earlier_versions_wrote_them_still_read():
    assert decode_value(b'\x00J{"$date":"2024-05-01T12:00:00+00:00"}') == T0


def test_a_users_dict_that_looks_tagged_reads_back_as_it_was(tmp_path):
    """Client metadata is stored as the JSON it came as; a one-key dict in it that looks
    like a tagged value, valid or not, reads back as the dict it was."""
    metadata = {"when": {"$date": "garbage"}, "blob": {"$bytes": "not base64!"},
                "n": {"$date": 5}, "date": {"$date": "2024-05-01T12:00:00+00:00"},
                "bytes": {"$bytes": "aGk="}}
    raw = json.dumps(metadata).encode()
    assert decode_value(encode_value(JSONDict.of(metadata, raw))) == metadata
    # rows an earlier version wrote read as they did: only the invalid ones stay dicts
    assert decode_value(b"\x00J" + raw) == {**metadata, "date": T0, "bytes": b"hi"}
    store = SQLiteStore(tmp_path / "hub.db")
    store.add_record("m1", _rec("m1", completed=True, metadata=JSONDict.of(metadata, raw)))
    store.flush()
    store.close()
    reopened = SQLiteStore(tmp_path / "hub.db")
    assert reopened.get_record("m1")["metadata"] == metadata
    reopened.close()


def test_sqlite_flushes_itself_at_batch_size(tmp_path):
    store = SQLiteStore(tmp_path / "hub.db", batch_size=4)
    other = SQLiteStore(tmp_path / "hub.db")
    for i in range(9):
        store.add_record(f"m{i}", _rec(f"m{i}", i, completed=True))
    assert len(other) == 8  # two batches of 4 written, one record waiting
    assert store.get_record("m8")["msg_id"] == "m8"  # readable before it is written
    store.close()
    other.close()


def test_none_store_keeps_nothing_but_checks_queries():
    store = NoStore()
    store.add_record("a", _rec("a"))
    store.update_record("a", {"completed": T0})
    assert len(store) == 0 and "a" not in store and store.get_history() == []
    assert store.find_records({"n": {"$gt": 1}}) == []
    with pytest.raises(RecordNotFound, match="keeps no task records"):
        store.get_record("a")
    with pytest.raises(QueryError):
        store.find_records({"n": {"$gt": None}})


def test_make_store(tmp_path):
    assert isinstance(make_store("memory"), MemoryStore)
    assert isinstance(make_store("none"), NoStore)
    sqlite = make_store("sqlite", path=tmp_path / "x.db")
    assert isinstance(sqlite, SQLiteStore)
    sqlite.close()
    with pytest.raises(ValueError, match="needs a database path"):
        make_store("sqlite")
    with pytest.raises(ValueError, match="choose one of memory, sqlite, none"):
        make_store("mongodb")


# ---- MemoryStore -----------------------------------------------------------------------


def test_reads_are_copies_and_writes_are_owned():
    """Readers cannot change stored records; writers hand their values over (no copy on
    the Hub's hot path), so the stored record is the very dict values given."""
    store = MemoryStore()
    header = {"msg_type": "apply_request"}
    original = _rec("a", header=header, tags=["x"])
    store.add_record("a", original)
    original["header"] = {"msg_type": "replaced at top level"}  # the record itself was copied
    assert store._records["a"]["header"] is header
    fetched = store.get_record("a")
    assert fetched["header"]["msg_type"] == "apply_request"
    assert fetched["tags"] == ["x"]
    fetched["header"]["msg_type"] = "changed again"
    store.find_records({})[0]["tags"].append("z")
    assert store.get_record("a")["header"]["msg_type"] == "apply_request"
    assert store.get_record("a")["tags"] == ["x"]


def test_buffers_are_shared_not_copied():
    buf = memoryview(bytearray(b"abc"))
    store = MemoryStore()
    store.add_record("a", _rec("a", buffers=[buf]))
    assert store.get_record("a")["buffers"][0] is buf


# ---- spilling -------------------------------------------------------------------------


@pytest.fixture
def spilling(tmp_path):
    stores = []

    def new(**limits) -> MemoryStore:
        store = MemoryStore(spill_path=tmp_path / f"spill{len(stores)}.db", **limits)
        stores.append(store)
        return store

    yield new
    for store in stores:
        store.close()


def test_spills_oldest_completed_by_count(spilling):
    store = spilling(record_limit=3)
    store.add_record("p0", _rec("p0", 0))  # pending
    store.add_record("c1", _rec("c1", 1, completed=True))
    store.add_record("c2", _rec("c2", 2, completed=True))
    store.add_record("c3", _rec("c3", 3, completed=True))
    assert store.resident == 3 and len(store) == 4
    assert store.is_resident("p0") and not store.is_resident("c1")
    assert "c1" in store and store.get_record("c1")["completed"] == T0 + timedelta(seconds=2)
    store.add_record("p4", _rec("p4", 4))
    assert store.get_history() == ["p0", "c1", "c2", "c3", "p4"]
    assert sorted(r["msg_id"] for r in store.find_records({"completed": {"$ne": None}})) == [
        "c1", "c2", "c3"]


def test_spilling_follows_completion_order(spilling):
    store = spilling(record_limit=2)
    store.add_record("a", _rec("a", 0))
    store.add_record("b", _rec("b", 1))
    store.update_record("b", {"completed": T0})  # b completes before a
    store.update_record("a", {"completed": T0})
    store.add_record("c", _rec("c", 2))
    assert not store.is_resident("b") and store.is_resident("a") and store.is_resident("c")


def test_pending_records_never_spill(spilling):
    store = spilling(record_limit=2, size_limit=10)
    for i in range(5):
        store.add_record(f"p{i}", _rec(f"p{i}", i, buffers=[b"x" * 8]))
    assert store.resident == 5
    assert store.nbytes == 40
    # the first one to complete is over the limits at once, and moves
    store.update_record("p2", {"completed": T0})
    assert not store.is_resident("p2") and store.resident == 4 and len(store) == 5
    assert store.get_record("p2")["buffers"] == [b"x" * 8]


def test_pending_again_stays_in_memory(spilling):
    store = spilling(record_limit=1)
    store.add_record("a", _rec("a", 0))
    store.update_record("a", {"completed": None, "engine_uuid": "e"})
    store.add_record("b", _rec("b", 1))
    assert store.is_resident("a") and store.is_resident("b")


def test_spills_by_bytes(spilling):
    store = spilling(size_limit=100)
    store.add_record("a", _rec("a", 0, completed=True, buffers=[b"x" * 40]))
    store.add_record("b", _rec("b", 1, buffers=[bytearray(30)]))
    store.add_record("c", _rec("c", 2, completed=True, result_buffers=[memoryview(b"y" * 20)]))
    assert store.nbytes == 90 and store.resident == 3
    # result buffers arriving on update count too
    store.update_record("b", {"result_buffers": [b"z" * 30], "completed": T0})
    assert store.nbytes == 80
    assert not store.is_resident("a") and store.is_resident("b") and store.is_resident("c")
    assert store.get_record("a")["buffers"] == [b"x" * 40]


def test_bytes_counted_with_nbytes_not_len():
    import array

    store = MemoryStore()
    store.add_record("a", _rec("a", buffers=[array.array("d", [1.0, 2.0])]))
    assert store.nbytes == 16


def test_update_replacing_buffers_adjusts_bytes():
    store = MemoryStore()
    store.add_record("a", _rec("a", buffers=[b"x" * 10]))
    store.update_record("a", {"buffers": [b"x" * 3]})
    assert store.nbytes == 3
    store.update_record("a", {"buffers": None})
    assert store.nbytes == 0


def test_spilled_records_can_be_updated_and_dropped(spilling):
    store = spilling(record_limit=0)
    store.add_record("a", _rec("a", 0, completed=True))
    store.update_record("a", {"resubmitted": "b"})
    assert store.get_record("a")["resubmitted"] == "b"
    with pytest.raises(KeyError, match="already stored"):
        store.add_record("a", _rec("a"))
    store.drop_record("a")
    assert "a" not in store and len(store) == 0


def test_many_records_stay_bounded_in_memory_and_all_stay_readable(spilling):
    store = spilling(record_limit=100)
    for i in range(10_000):
        store.add_record(f"m{i}", _rec(f"m{i}", i, completed=True))
    assert store.resident == 100 and len(store) == 10_000
    history = store.get_history()
    assert history[0] == "m0" and history[-1] == "m9999" and len(history) == 10_000
    assert store.get_record("m0")["msg_id"] == "m0"


def test_default_spill_file_is_private_and_removed_on_close():
    store = MemoryStore(record_limit=0)
    store.add_record("a", _rec("a", 0, completed=True))
    path = Path(store.spill.path)
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    store.close()
    assert not path.exists()


def test_only_the_private_spill_file_is_written_without_a_wal(tmp_path):
    """The private spill file is a cache (no WAL, no syncs); a spill file the user
    named and the SQLite store stay in WAL mode, which survives a crash."""
    import sqlite3

    def journal(path: Path) -> str:
        db = sqlite3.connect(path)
        try:
            return db.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            db.close()

    private, named = MemoryStore(record_limit=0), MemoryStore(record_limit=0, spill_path=tmp_path / "s.db")
    durable = SQLiteStore(tmp_path / "hub.db")
    for store in (private, named, durable):
        store.add_record("a", _rec("a", 0, completed=True))
        store.flush()
    assert journal(Path(private.spill.path)) == "delete"
    assert journal(tmp_path / "s.db") == journal(tmp_path / "hub.db") == "wal"
    assert private.get_record("a")["msg_id"] == "a"
    for store in (private, named, durable):
        store.close()


def test_negative_limits_rejected():
    with pytest.raises(ValueError):
        MemoryStore(record_limit=-1)
    with pytest.raises(ValueError):
        MemoryStore(size_limit=-1)


def test_updates_without_buffers_or_completion_keep_the_accounting(spilling):
    store = spilling(record_limit=2)
    store.add_record("a", _rec("a", 0, completed=True, buffers=[b"x" * 5]))
    store.update_record("a", {"engine_uuid": "e", "result_content": {"status": "ok"}})
    assert store.nbytes == 5
    store.add_record("b", _rec("b", 1))
    store.add_record("c", _rec("c", 2))  # over the limit: "a" is still the one to move
    assert not store.is_resident("a") and store.nbytes == 0
