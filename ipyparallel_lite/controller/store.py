"""The Hub's task-record stores, and the Mongo-style queries clients run against it.

A task record is a dict keyed by the task's ``msg_id`` with the keys in
:data:`RECORD_KEYS`; its values may be str, int, float, bool, None, datetime, dicts,
lists, or buffers (``"buffers"`` and ``"result_buffers"`` are lists of bytes-like
objects, which the store counts but never looks into). A header or metadata the
controller received is a :class:`JSONDict`: the dict, and the JSON text it arrived as,
which a store writes as it is.

Stores: :class:`MemoryStore` (the default; bounded, spilling its oldest completed
records to SQLite when full), :class:`~.sqlitestore.SQLiteStore` (durable, for a
controller restart), and :class:`NoStore` (keeps nothing). :func:`make_store` builds
one by name, as the controller's ``store_class`` setting names it.

Queries (``match``, ``compile_query``) support a subset of MongoDB's language:
``{"key": value}`` for equality and ``{"key": {"$op": operand, ...}}`` with the
operators in ``OPERATORS``. A missing key reads as None. Naive datetimes, in records
or queries, are taken as local time so they compare with aware ones.
"""

from __future__ import annotations

import abc
import fnmatch
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipyparallel_lite.fastzmq import SIZED_BY_LEN, frame_bytes

if TYPE_CHECKING:
    from ipyparallel_lite.controller.sqlitestore import SQLiteStore

__all__ = [
    "OPERATORS",
    "RECORD_KEYS",
    "BaseStore",
    "JSONDict",
    "MemoryStore",
    "NoStore",
    "QueryError",
    "RecordNotFound",
    "compile_query",
    "make_store",
    "match",
]

Record = dict[str, Any]
Matcher = Callable[[Record], bool]
_Test = Callable[[Any], bool]

#: the keys of a Hub task record, as ipyparallel's users query them
RECORD_KEYS = (
    "msg_id", "header", "metadata", "content", "buffers", "submitted", "client_uuid",
    "engine_uuid", "started", "completed", "resubmitted", "received", "result_header",
    "result_metadata", "result_content", "result_buffers", "queue", "execute_input",
    "execute_result", "error", "stdout", "stderr", "label",
)

#: record keys holding lists of buffers, counted against ``size_limit``
BUFFER_KEYS = ("buffers", "result_buffers")
#: record keys holding text an engine printed or ran, also counted against ``size_limit``
TEXT_KEYS = ("stdout", "stderr", "execute_input")
#: what changes a record's size
SIZED_KEYS = frozenset((*BUFFER_KEYS, *TEXT_KEYS))
_SIZED_ORDER = (*BUFFER_KEYS, *TEXT_KEYS)


class JSONDict(dict):
    """A dict that arrived as JSON text (a message's header or metadata): ``raw`` holds
    that text, verified, so that a store writes it as it is instead of encoding the dict
    again. Make it with :meth:`of`; a copy (what a store's reads return) is a plain dict.
    """

    __slots__ = ("raw",)
    raw: bytes

    @classmethod
    def of(cls, value: Any, raw: Any) -> Any:
        """``value`` with ``raw``, the JSON text it was read from (bytes or a zmq Frame),
        when ``value`` is a dict and ``raw`` is not None; ``value`` itself otherwise."""
        if raw is None or type(value) is not dict:
            return value
        wire = cls(value)
        wire.raw = frame_bytes(raw)  # a zmq Frame keeps the bytes its verification read
        return wire


class QueryError(ValueError):
    """A query that cannot be run; the message says what is wrong with it."""


class RecordNotFound(KeyError):
    """No record with this msg_id (never added, dropped, or evicted)."""

    # KeyError's str() is the repr of its argument: quotes around a sentence
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "record not found"


# ---- queries ------------------------------------------------------------------------


def _aware(value: Any) -> Any:
    """Naive datetimes as aware local time; anything else unchanged."""
    if isinstance(value, datetime) and value.tzinfo is None:
        try:
            return value.astimezone()
        except (OverflowError, OSError, ValueError):
            # outside the platform's local-time range: UTC is the best guess left
            return value.replace(tzinfo=timezone.utc)
    return value


def _equal_test(operand: Any) -> _Test:
    operand = _aware(operand)
    if isinstance(operand, datetime):
        return lambda value: _aware(value) == operand
    return lambda value: value == operand


def _not_equal_test(operand: Any) -> _Test:
    equal = _equal_test(operand)
    return lambda value: not equal(value)


def _order_test(name: str, compare: Callable[[Any, Any], bool]) -> Callable[[Any], _Test]:
    def build(operand: Any) -> _Test:
        if operand is None or isinstance(operand, (dict, set, frozenset)):
            raise QueryError(f"{name} needs a value that can be ordered, got {operand!r}")
        operand = _aware(operand)

        def test(value: Any) -> bool:
            if value is None:
                return False
            try:
                return bool(compare(_aware(value), operand))
            except TypeError:  # e.g. a str against a number: no order, no match
                return False

        return test

    return build


def _need_list(name: str, operand: Any) -> list:
    if not isinstance(operand, (list, tuple, set, frozenset)):
        raise QueryError(f"{name} needs a list, got {operand!r}")
    return [_aware(item) for item in operand]


def _membership(items: list) -> _Test:
    """``value in items``, by hash when every item is hashable."""
    try:
        lookup: Any = frozenset(items)
    except TypeError:
        lookup = items
    has_dates = any(isinstance(item, datetime) for item in items)

    def test(value: Any) -> bool:
        if has_dates:
            value = _aware(value)
        try:
            return value in lookup
        except TypeError:  # an unhashable value equals none of the hashable items
            return False

    return test


def _in_test(operand: Any) -> _Test:
    return _membership(_need_list("$in", operand))


def _nin_test(operand: Any) -> _Test:
    is_in = _membership(_need_list("$nin", operand))
    return lambda value: not is_in(value)


def _all_test(operand: Any) -> _Test:
    wanted = _need_list("$all", operand)

    def test(value: Any) -> bool:
        if not wanted or not isinstance(value, (list, tuple, set, frozenset)):
            return False  # like MongoDB, an empty $all matches nothing
        have = [_aware(item) for item in value]
        return all(item in have for item in wanted)

    return test


def _exists_test(operand: Any) -> _Test:
    if not isinstance(operand, bool):
        raise QueryError(f"$exists needs True or False, got {operand!r}")
    # As in ipyparallel, a key holding None does not "exist": Hub records carry
    # every key, with None until it is known.
    return lambda value: (value is not None) is operand


def _glob_test(operand: Any) -> _Test:
    if not isinstance(operand, str):
        raise QueryError(f"$glob needs a str pattern, got {operand!r}")
    # case-sensitive on every platform, unlike fnmatch.fnmatch
    pattern = re.compile(fnmatch.translate(operand))
    return lambda value: isinstance(value, str) and pattern.match(value) is not None


def _mod_test(operand: Any) -> _Test:
    if (
        not isinstance(operand, (list, tuple))
        or len(operand) != 2
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in operand)
        or operand[0] == 0
    ):
        raise QueryError(f"$mod needs [divisor, remainder] with divisor != 0, got {operand!r}")
    divisor, remainder = operand

    def test(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return value % divisor == remainder

    return test


#: operator -> builder of a test of one value against the validated operand
OPERATORS: dict[str, Callable[[Any], _Test]] = {
    "$eq": _equal_test,
    "$ne": _not_equal_test,
    "$lt": _order_test("$lt", lambda a, b: a < b),
    "$lte": _order_test("$lte", lambda a, b: a <= b),
    "$gt": _order_test("$gt", lambda a, b: a > b),
    "$gte": _order_test("$gte", lambda a, b: a >= b),
    "$in": _in_test,
    "$nin": _nin_test,
    "$all": _all_test,
    "$exists": _exists_test,
    "$glob": _glob_test,
    "$mod": _mod_test,
}


def _key_test(key: str, condition: Any) -> _Test:
    """The test of one record value for ``{key: condition}``."""
    if not isinstance(condition, dict) or not condition:
        return _equal_test(condition)
    operators = [k for k in condition if isinstance(k, str) and k.startswith("$")]
    if not operators:
        return _equal_test(condition)  # a plain dict: equality, as in MongoDB
    if len(operators) != len(condition):
        raise QueryError(f"condition on {key!r} mixes operators and plain keys: {condition!r}")
    tests = []
    for op, operand in condition.items():
        builder = OPERATORS.get(op)
        if builder is None:
            known = ", ".join(sorted(OPERATORS))
            raise QueryError(f"unknown operator {op!r} on {key!r}; known: {known}")
        tests.append(builder(operand))
    if len(tests) == 1:
        return tests[0]
    return lambda value: all(test(value) for test in tests)


def compile_query(query: dict) -> Matcher:
    """Validate ``query`` once; return a fast ``record -> bool`` matcher.

    Raises QueryError for a query that is not a dict, a non-str key, an unknown
    operator, or an operand of the wrong type (e.g. ``"$in needs a list, got 3"``).
    """
    if not isinstance(query, dict):
        raise QueryError(f"a query is a dict, got {query!r}")
    tests: list[tuple[str, _Test]] = []
    for key, condition in query.items():
        if not isinstance(key, str):
            raise QueryError(f"query keys are str, got {key!r}")
        tests.append((key, _key_test(key, condition)))

    def matcher(record: Record) -> bool:
        get = record.get
        for key, test in tests:
            if not test(get(key)):
                return False
        return True

    return matcher


def match(query: dict, record: Record) -> bool:
    """Whether ``record`` matches ``query``. Use ``compile_query`` for many records."""
    return compile_query(query)(record)


# ---- stores -------------------------------------------------------------------------


def _copy(value: Any) -> Any:
    """Copy dicts and lists recursively; share everything else.

    Leaves are immutable (str, numbers, datetimes) or buffers, which are never
    copied: they can be large, and nothing mutates them.
    """
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def project(record: Record, keys: list[str] | None) -> Record:
    """A copy of ``record`` with only ``keys`` (None where absent) and ``msg_id``;
    the whole record when ``keys`` is None or empty, as in ipyparallel."""
    if not keys:
        return _copy(record)
    return {"msg_id": record["msg_id"], **{k: _copy(record.get(k)) for k in keys}}


def _buffer_bytes(record: Record, keys: Iterable[str] = _SIZED_ORDER) -> int:
    """Bytes of a record's buffers, plus the length of its output text (of ``keys``)."""
    total = 0
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        if key in TEXT_KEYS:
            if isinstance(value, str):
                total += len(value)
            continue
        for buf in value:
            if type(buf) in SIZED_BY_LEN:
                total += len(buf)
                continue
            try:
                total += memoryview(buf).nbytes
            except TypeError:  # not a buffer after all: count what we can
                total += len(buf) if hasattr(buf, "__len__") else 0
    return total


class BaseStore(abc.ABC):
    """What the Hub needs from a record store (in memory, SQLite...).

    Records are dicts keyed by ``msg_id``; every stored record has a ``"msg_id"``
    key. Records given to and returned by a store are the caller's: the store keeps
    its own copies, so mutating them afterwards does not change the store.
    Queries are those of ``compile_query``; a bad one raises QueryError.
    """

    @abc.abstractmethod
    def add_record(self, msg_id: str, rec: Record) -> None:
        """Store a new record. KeyError if ``msg_id`` is already stored.

        The store takes ownership of the nested values of ``rec`` (headers, metadata):
        the caller must not mutate them afterwards. Reads return copies.
        """

    @abc.abstractmethod
    def update_record(self, msg_id: str, rec: Record) -> None:
        """Merge the keys of ``rec`` into the record (taking ownership of its values, as
        :meth:`add_record` does). RecordNotFound if missing."""

    @abc.abstractmethod
    def get_record(self, msg_id: str) -> Record:
        """A copy of the record. RecordNotFound (a KeyError) if missing."""

    def get_value(self, msg_id: str, key: str) -> Any:
        """One value of a record (None if the record lacks the key), without copying
        the record: for immutable values such as the output text the Hub appends to.
        RecordNotFound if missing."""
        return self.get_record(msg_id).get(key)

    @abc.abstractmethod
    def find_records(self, query: dict, keys: Iterable[str] | None = None) -> list[Record]:
        """Copies of the matching records, oldest added first.

        With ``keys``, each record holds only those keys (None where absent) plus
        ``"msg_id"``; None or empty means whole records, as in ipyparallel.
        """

    @abc.abstractmethod
    def get_history(self) -> list[str]:
        """msg_ids of records with a ``"submitted"`` time, oldest submitted first."""

    @abc.abstractmethod
    def drop_record(self, msg_id: str) -> None:
        """Remove a record. RecordNotFound if missing."""

    def drop_matching_records(self, query: dict) -> int:
        """Remove the records matching ``query``; return how many were removed."""
        matched = self.find_records(query, keys=["msg_id"])
        for rec in matched:
            self.drop_record(rec["msg_id"])
        return len(matched)

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of stored records."""

    @abc.abstractmethod
    def __contains__(self, msg_id: object) -> bool:
        """Whether a record with this msg_id is stored."""

    def flush(self, everything: bool = False) -> int:
        """Write what waits to be written (the controller calls this on a timer, off the
        hot path); how many records were written. Without ``everything``, records of
        tasks that just started pending may wait for the next call. Nothing to do by
        default."""
        return 0

    def close(self) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """Release resources (files, connections). The store is unusable afterwards."""


def _history_key(value: Any) -> tuple:
    """Sort key of "submitted" values that never raises on mixed types."""
    value = _aware(value)
    if isinstance(value, datetime):
        return (0, value.timestamp(), "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def history_order(dated: list[tuple[Any, str]]) -> list[str]:
    """msg_ids of ``(submitted, msg_id)`` pairs, oldest submitted first; ties keep
    their order (sorted() is stable)."""
    dated.sort(key=lambda pair: _history_key(pair[0]))
    return [msg_id for _, msg_id in dated]


class NoStore(BaseStore):
    """Keeps no records (``store_class = "none"``): queries find nothing.

    For clusters where nobody queries the Hub and every byte counts; results still
    reach the clients that asked for them.
    """

    def add_record(self, msg_id: str, rec: Record) -> None:
        pass

    def update_record(self, msg_id: str, rec: Record) -> None:
        pass

    def get_record(self, msg_id: str) -> Record:
        raise RecordNotFound(
            f"no record with msg_id {msg_id!r}: this controller keeps no task records "
            "(store_class='none'); start it with the memory or sqlite store to query them"
        )

    def find_records(self, query: dict, keys: Iterable[str] | None = None) -> list[Record]:
        compile_query(query)  # a bad query is still an error
        return []

    def get_history(self) -> list[str]:
        return []

    def drop_record(self, msg_id: str) -> None:
        self.get_record(msg_id)

    def __len__(self) -> int:
        return 0

    def __contains__(self, msg_id: object) -> bool:
        return False


class MemoryStore(BaseStore):
    """Records in a dict, bounded in count and in bytes, spilling to SQLite.

    When there are more than ``record_limit`` records in memory, or their buffers and
    output text (:data:`TEXT_KEYS`) hold more than ``size_limit`` bytes, the records
    completed longest ago move to an SQLite file (``spill_path``; a private temporary file by default, made at the
    first spill) until both limits hold again. Spilled records stay readable and
    queryable: nothing is dropped, so a client waiting on an old result still gets it.
    Pending records never spill, so the limits may be exceeded while only pending
    records remain. Moving a record is O(1); the spill file is written in batches by
    :meth:`flush`.
    """

    def __init__(self, record_limit: int = 1024, size_limit: int = 1 << 30,
                 spill_path: str | Path | None = None) -> None:
        if record_limit < 0 or size_limit < 0:
            raise ValueError(
                f"limits must be >= 0, got record_limit={record_limit}, size_limit={size_limit}"
            )
        self.record_limit = record_limit
        self.size_limit = size_limit
        self.spill_path = spill_path
        self._spill: SQLiteStore | None = None
        self._spill_dir: tempfile.TemporaryDirectory | None = None
        self._records: dict[str, Record] = {}
        self._nbytes: dict[str, int] = {}  # buffer and text bytes of each record
        self._total_bytes = 0
        # completed msg_ids, in order of completion: spilling pops from the front
        self._completed: OrderedDict[str, None] = OrderedDict()

    @property
    def nbytes(self) -> int:
        """Total bytes of the buffers of the records in memory."""
        return self._total_bytes

    @property
    def resident(self) -> int:
        """Number of records in memory (the rest are spilled)."""
        return len(self._records)

    def is_resident(self, msg_id: str) -> bool:
        return msg_id in self._records

    @property
    def spill(self) -> SQLiteStore:
        """The SQLite store spilled records go to, made on first use."""
        if self._spill is None:
            from ipyparallel_lite.controller.sqlitestore import SQLiteStore

            path = self.spill_path
            if path is None:
                self._spill_dir = tempfile.TemporaryDirectory(prefix="ipp-lite-spill-")
                path = Path(self._spill_dir.name) / "records.db"
            # records spill because their buffers are big: none may stay in memory
            # bound to a cached statement once it is on disk. A private file is removed
            # on exit, and nobody reads it after a crash: it need not be durable.
            self._spill = SQLiteStore(path, table="spilled", statement_cache=False,
                                      durable=self.spill_path is not None)
        return self._spill

    def __len__(self) -> int:
        return len(self._records) + (len(self._spill) if self._spill is not None else 0)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._records or (self._spill is not None and msg_id in self._spill)

    def _completion(self, msg_id: str, record: Record) -> None:
        """Note whether a stored record is completed (it may spill) or pending."""
        if record.get("completed") is None:
            self._completed.pop(msg_id, None)  # pending (again): stays in memory
        elif msg_id not in self._completed:
            self._completed[msg_id] = None

    def _forget(self, msg_id: str) -> Record:
        record = self._records.pop(msg_id)
        self._total_bytes -= self._nbytes.pop(msg_id)
        self._completed.pop(msg_id, None)
        return record

    def _spill_over(self) -> None:
        """Move the oldest completed records to the spill file while over a limit."""
        while self._completed and (
            len(self._records) > self.record_limit or self._total_bytes > self.size_limit
        ):
            msg_id = next(iter(self._completed))
            # checked when it came in: a record is either in memory or spilled
            self.spill.adopt(msg_id, self._forget(msg_id))

    def add_record(self, msg_id: str, rec: Record) -> None:
        if rec.get("msg_id", msg_id) != msg_id:
            raise ValueError(f"record's msg_id {rec['msg_id']!r} is not {msg_id!r}")
        if msg_id in self._records or (self._spill is not None and msg_id in self._spill):
            raise KeyError(f"a record with msg_id {msg_id!r} is already stored")
        # shallow: the store owns what it is given (see BaseStore.add_record); a deep
        # copy of every header on the hot path costs more than the rest of the record
        record = dict(rec)
        record["msg_id"] = msg_id
        self._records[msg_id] = record
        nbytes = self._nbytes[msg_id] = _buffer_bytes(record)
        self._total_bytes += nbytes
        self._completion(msg_id, record)
        self._spill_over()

    def update_record(self, msg_id: str, rec: Record) -> None:
        if rec.get("msg_id", msg_id) != msg_id:
            raise ValueError(f"cannot change msg_id {msg_id!r} to {rec['msg_id']!r}")
        record = self._records.get(msg_id)
        if record is None:
            self._spilled(msg_id).update_record(msg_id, rec)
            return
        sized = rec.keys() & SIZED_KEYS
        if sized:  # the sizes of what changes, before and after: counted once
            delta = _buffer_bytes(rec, sized) - _buffer_bytes(record, sized)
            self._nbytes[msg_id] += delta
            self._total_bytes += delta
        record.update(rec)
        if "completed" in rec:
            self._completion(msg_id, record)
        elif not sized:
            return  # nothing that makes records spill changed
        self._spill_over()

    def _spilled(self, msg_id: str) -> BaseStore:
        """The spill store, if it holds ``msg_id``; RecordNotFound otherwise."""
        if self._spill is None or msg_id not in self._spill:
            raise RecordNotFound(f"no record with msg_id {msg_id!r}")
        return self._spill

    def get_record(self, msg_id: str) -> Record:
        record = self._records.get(msg_id)
        if record is None:
            return self._spilled(msg_id).get_record(msg_id)
        return _copy(record)

    def get_value(self, msg_id: str, key: str) -> Any:
        record = self._records.get(msg_id)
        if record is None:
            return self._spilled(msg_id).get_value(msg_id, key)
        return record.get(key)

    def find_records(self, query: dict, keys: Iterable[str] | None = None) -> list[Record]:
        matcher = compile_query(query)
        wanted = list(keys) if keys else None
        older = self._spill.find_records(query, wanted) if self._spill is not None else []
        return older + [project(rec, wanted) for rec in self._records.values() if matcher(rec)]

    def get_history(self) -> list[str]:
        dated = [
            (rec["submitted"], msg_id)
            for msg_id, rec in self._records.items()
            if rec.get("submitted") is not None
        ]
        if self._spill is not None:
            dated = [(rec["submitted"], rec["msg_id"])
                     for rec in self._spill.find_records({"submitted": {"$exists": True}},
                                                         ["submitted"])] + dated
        return history_order(dated)

    def drop_record(self, msg_id: str) -> None:
        if msg_id in self._records:
            self._forget(msg_id)
        else:
            self._spilled(msg_id).drop_record(msg_id)

    def drop_matching_records(self, query: dict) -> int:
        matcher = compile_query(query)
        doomed = [msg_id for msg_id, rec in self._records.items() if matcher(rec)]
        for msg_id in doomed:
            self._forget(msg_id)
        spilled = self._spill.drop_matching_records(query) if self._spill is not None else 0
        return len(doomed) + spilled

    def flush(self, everything: bool = False) -> int:
        return self._spill.flush(everything) if self._spill is not None else 0

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
        if self._spill_dir is not None:
            self._spill_dir.cleanup()


#: the names ``store_class`` accepts
STORE_CLASSES = ("memory", "sqlite", "none")


def make_store(kind: str, *, path: str | Path | None = None, record_limit: int = 1024,
               size_limit: int = 1 << 30) -> BaseStore:
    """The store ``store_class`` names: ``memory`` (spilling to ``path``, a temporary
    file by default), ``sqlite`` (the records in ``path``, required) or ``none``."""
    if kind == "memory":
        return MemoryStore(record_limit=record_limit, size_limit=size_limit, spill_path=path)
    if kind == "sqlite":
        if path is None:
            raise ValueError("the sqlite store needs a database path")
        from ipyparallel_lite.controller.sqlitestore import SQLiteStore

        return SQLiteStore(path)
    if kind == "none":
        return NoStore()
    raise ValueError(f"unknown store_class {kind!r}; choose one of {', '.join(STORE_CLASSES)}")
