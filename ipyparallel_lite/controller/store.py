"""The Hub's task-record store, and the Mongo-style queries clients run against it.

A task record is a dict keyed by the task's ``msg_id``; its values may be str, int,
float, bool, None, datetime, dicts, lists, or buffers (``"buffers"`` and
``"result_buffers"`` are lists of bytes-like objects, which the store counts but
never looks into).

Queries (``match``, ``compile_query``) support a subset of MongoDB's language:
``{"key": value}`` for equality and ``{"key": {"$op": operand, ...}}`` with the
operators in ``OPERATORS``. A missing key reads as None. Naive datetimes, in records
or queries, are taken as local time so they compare with aware ones.
"""

from __future__ import annotations

import abc
import fnmatch
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "OPERATORS",
    "BaseStore",
    "MemoryStore",
    "QueryError",
    "RecordNotFound",
    "compile_query",
    "match",
]

Record = dict[str, Any]
Matcher = Callable[[Record], bool]
_Test = Callable[[Any], bool]

#: record keys holding lists of buffers, counted against ``size_limit``
BUFFER_KEYS = ("buffers", "result_buffers")


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


def _buffer_bytes(record: Record) -> int:
    total = 0
    for key in BUFFER_KEYS:
        for buf in record.get(key) or ():
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


class MemoryStore(BaseStore):
    """Records in a dict, bounded in count and in buffer bytes.

    When there are more than ``record_limit`` records, or their buffers hold more
    than ``size_limit`` bytes, the records completed longest ago are evicted until
    both limits hold again. A record is completed once its ``"completed"`` value is
    not None; pending records are never evicted, so the limits may be exceeded while
    only pending records remain. Each eviction is O(1).
    """

    #: how many evicted msg_ids are remembered, to explain a later lookup
    evicted_memory = 10_000

    def __init__(self, record_limit: int = 1024, size_limit: int = 1 << 30) -> None:
        if record_limit < 0 or size_limit < 0:
            raise ValueError(
                f"limits must be >= 0, got record_limit={record_limit}, size_limit={size_limit}"
            )
        self.record_limit = record_limit
        self.size_limit = size_limit
        self._records: dict[str, Record] = {}
        self._nbytes: dict[str, int] = {}  # buffer bytes of each record
        self._total_bytes = 0
        # completed msg_ids, in order of completion: eviction pops from the front
        self._completed: OrderedDict[str, None] = OrderedDict()
        self._evicted: OrderedDict[str, None] = OrderedDict()

    @property
    def nbytes(self) -> int:
        """Total bytes of the stored records' buffers."""
        return self._total_bytes

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._records

    def _missing(self, msg_id: str) -> RecordNotFound:
        if msg_id in self._evicted:
            return RecordNotFound(
                f"record {msg_id!r} was evicted to keep the store within its limits"
                f" (record_limit={self.record_limit}, size_limit={self.size_limit} bytes)"
            )
        return RecordNotFound(f"no record with msg_id {msg_id!r}")

    def _stored(self, msg_id: str) -> Record:
        try:
            return self._records[msg_id]
        except KeyError:
            raise self._missing(msg_id) from None

    def _account(self, msg_id: str, record: Record, changed: Record | None = None) -> None:
        """Refresh the byte count and completion state of a stored record.

        ``changed``: the update just applied, when only its keys can have changed them.
        """
        if changed is None or any(key in changed for key in BUFFER_KEYS):
            nbytes = _buffer_bytes(record)
            self._total_bytes += nbytes - self._nbytes.get(msg_id, 0)
            self._nbytes[msg_id] = nbytes
        if changed is not None and "completed" not in changed:
            return
        if record.get("completed") is None:
            self._completed.pop(msg_id, None)  # pending (again): not evictable
        elif msg_id not in self._completed:
            self._completed[msg_id] = None

    def _forget(self, msg_id: str) -> None:
        del self._records[msg_id]
        self._total_bytes -= self._nbytes.pop(msg_id)
        self._completed.pop(msg_id, None)

    def _evict(self) -> None:
        """Evict the oldest completed records while over a limit."""
        while self._completed and (
            len(self._records) > self.record_limit or self._total_bytes > self.size_limit
        ):
            msg_id, _ = self._completed.popitem(last=False)
            self._forget(msg_id)
            self._evicted[msg_id] = None
            if len(self._evicted) > self.evicted_memory:
                self._evicted.popitem(last=False)

    def add_record(self, msg_id: str, rec: Record) -> None:
        if msg_id in self._records:
            raise KeyError(f"a record with msg_id {msg_id!r} is already stored")
        if rec.get("msg_id", msg_id) != msg_id:
            raise ValueError(f"record's msg_id {rec['msg_id']!r} is not {msg_id!r}")
        # shallow: the store owns what it is given (see BaseStore.add_record); a deep
        # copy of every header on the hot path costs more than the rest of the record
        record = dict(rec)
        record["msg_id"] = msg_id
        self._records[msg_id] = record
        self._evicted.pop(msg_id, None)
        self._account(msg_id, record)
        self._evict()

    def update_record(self, msg_id: str, rec: Record) -> None:
        record = self._stored(msg_id)
        if rec.get("msg_id", msg_id) != msg_id:
            raise ValueError(f"cannot change msg_id {msg_id!r} to {rec['msg_id']!r}")
        record.update(rec)
        self._account(msg_id, record, rec)
        self._evict()

    def get_record(self, msg_id: str) -> Record:
        return _copy(self._stored(msg_id))

    def find_records(self, query: dict, keys: Iterable[str] | None = None) -> list[Record]:
        matcher = compile_query(query)
        matched = [rec for rec in self._records.values() if matcher(rec)]
        wanted = list(keys) if keys else None
        if not wanted:
            return [_copy(rec) for rec in matched]
        return [
            {"msg_id": rec["msg_id"], **{k: _copy(rec.get(k)) for k in wanted}} for rec in matched
        ]

    def get_history(self) -> list[str]:
        dated = [
            (rec["submitted"], msg_id)
            for msg_id, rec in self._records.items()
            if rec.get("submitted") is not None
        ]
        # sorted() is stable: equal times keep the order they were added in
        dated.sort(key=lambda pair: _history_key(pair[0]))
        return [msg_id for _, msg_id in dated]

    def drop_record(self, msg_id: str) -> None:
        self._stored(msg_id)
        self._forget(msg_id)

    def drop_matching_records(self, query: dict) -> int:
        matcher = compile_query(query)
        doomed = [msg_id for msg_id, rec in self._records.items() if matcher(rec)]
        for msg_id in doomed:
            self._forget(msg_id)
        return len(doomed)
