"""The durable task-record store: SQLite, written in batches off the hot path.

:class:`SQLiteStore` keeps the records that changed since the last :meth:`flush` (and
those not completed yet) in memory, and writes them with one ``executemany`` per
flush. The controller flushes on a timer, so recording a task costs a dict update,
never a disk write; the store also flushes itself when ``batch_size`` records are
waiting, which bounds that memory. Reads see unflushed changes: lookups look in
memory first, queries flush first.

Each record key has its own column, so a query decodes only the columns it names.
Values are stored as: NULL, str, int and float as they are; a BLOB tagged raw for
bytes-like values (a reply's packed content); a framed BLOB for the buffer lists
(``"buffers"``, ``"result_buffers"``); a BLOB tagged JSON for everything else, with
datetimes and bytes marked inside so they come back as they went in (a header or
metadata as the JSON text the controller received, a :class:`~.store.JSONDict`,
which is written as it is: encoding it again was most of what a row cost); a UTC datetime
on its own (the record's dates) is a BLOB tagged date holding its fields, which costs
a fraction of formatting it. Keys outside :data:`RECORD_KEYS` share one JSON column.
Nothing here is ever unpickled.

A new record's msg_id must not be stored yet: :class:`SeenIds`, a Bloom filter of the
msg_ids this store ever held, answers "certainly not" without a SELECT for nearly every
new one.
"""

from __future__ import annotations

import base64
import itertools
import json
import sqlite3
import struct
from collections.abc import Iterable
from datetime import datetime, timezone
from operator import itemgetter
from pathlib import Path
from typing import Any

from ipyparallel_lite.controller.store import (
    BUFFER_KEYS,
    RECORD_KEYS,
    BaseStore,
    JSONDict,
    Record,
    RecordNotFound,
    compile_query,
    history_order,
    project,
)
from ipyparallel_lite.fastzmq import SIZED_BY_LEN

__all__ = ["SQLiteStore"]

#: columns after msg_id; "extra" holds keys outside RECORD_KEYS as one JSON object
COLUMNS = tuple(k for k in RECORD_KEYS if k != "msg_id")
_KEY_SET = frozenset(RECORD_KEYS)
_COLUMN_VALUES = itemgetter(*COLUMNS)
#: the columns a row writes, in order: a bit each in the mask of the columns not NULL
_WRITTEN = (*COLUMNS, "extra")
_COLUMN_BITS = tuple((1 << i, key in BUFFER_KEYS) for i, key in enumerate(COLUMNS))
_EXTRA_BIT = 1 << len(COLUMNS)
_LEN = struct.Struct("<Q")
#: a UTC datetime's fields: year, month, day, hour, minute, second, microsecond
_DATE = struct.Struct("<HBBBBBI")
_UTC = timezone.utc


# ---- value codec ----------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$date": value.isoformat()}
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    try:
        return {"$bytes": base64.b64encode(memoryview(value)).decode("ascii")}
    except TypeError:
        raise TypeError(f"a task record cannot hold {type(value).__name__} values") from None


def _json_hook(obj: dict) -> Any:
    """A tagged value back from JSON. A user's own one-key dict that only looks tagged
    (``{"$date": "soon"}`` in a client's metadata, stored as it came) stays a dict."""
    if len(obj) == 1:
        try:
            if "$date" in obj:
                return datetime.fromisoformat(obj["$date"])
            if "$bytes" in obj:
                return base64.b64decode(obj["$bytes"], validate=True)
        except (TypeError, ValueError):
            pass
    return obj


def _flat(buf: Any) -> Any:
    """``buf`` as a buffer of bytes (len() its size), without copying it."""
    # (a zmq Frame's .buffer costs ten times the concatenation: tested in test_store)
    if type(buf) in SIZED_BY_LEN:
        return buf
    return memoryview(buf.buffer if hasattr(buf, "buffer") else buf).cast("B")


def _is_buffer(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview)) or hasattr(value, "buffer")


_encode_json = json.JSONEncoder(default=_json_default, separators=(",", ":"),
                                check_circular=False).encode
#: BLOB prefixes: JSON text, raw bytes, or the fields of a UTC datetime. Blobs are made
#: as bytearrays: Python's sqlite3 binds a bytearray directly, where bytes (and None) go
#: through its adaptation protocol first, which costs ten times as much per value
#: (tested in test_store); SQLite reads them back as bytes.
_JSON, _RAW, _UTC_DATE = bytearray(b"\x00J"), bytearray(b"\x00B"), bytearray(b"\x00T")
#: JSON as it came on the wire (a JSONDict's text, such as a client's metadata): read
#: back without looking for tagged values, which only this module's encoder writes, so
#: a user's ``{"$date": "<ISO date>"}`` stays the dict it was (rows written with
#: ``_JSON`` by earlier versions read as before)
_WIRE = bytearray(b"\x00W")
_BLOBS = (bytes, bytearray)
_PLAIN = frozenset((str, int, float))  # a set: a type not in it costs no comparisons


def encode_value(value: Any) -> Any:
    """A record value as SQLite stores it: None, str, int and float as they are (the
    common case costs nothing), the rest as a tagged BLOB (a bytearray): raw bytes, a
    UTC datetime's fields, or JSON (other datetimes as ISO text)."""
    if value is None or type(value) in _PLAIN:
        return value
    if type(value) is JSONDict:  # headers and metadata as they came: no encoding
        return _WIRE + value.raw
    if type(value) is dict:
        return _JSON + _encode_json(value).encode()
    if isinstance(value, datetime):
        if value.tzinfo is _UTC:
            return _UTC_DATE + _DATE.pack(value.year, value.month, value.day, value.hour,
                                          value.minute, value.second, value.microsecond)
        return _JSON + b'{"$date":"%s"}' % value.isoformat().encode()
    if _is_buffer(value):
        return _RAW + _flat(value)
    return _JSON + _encode_json(value).encode()


def decode_value(stored: Any) -> Any:
    """A value as :func:`encode_value` wrote it (bytes as SQLite reads a BLOB back, or
    the bytearray it was written as)."""
    if type(stored) not in _BLOBS:
        return stored
    tag = stored[:2]
    if tag == _RAW:
        return bytes(stored[2:])
    if tag == _UTC_DATE:
        return datetime(*_DATE.unpack_from(stored, 2), tzinfo=_UTC)
    # read as the session reads a message: a signed header with bad UTF-8 in it was
    # accepted, and written as it came (JSONDict), so it must read back too
    text = stored[2:].decode("utf8", "replace")
    if tag == _WIRE:
        return json.loads(text)
    return json.loads(text, object_hook=_json_hook)


def encode_buffers(buffers: list | None) -> bytearray | None:
    """A list of buffers as one BLOB: each one's length, then its bytes."""
    if buffers is None:
        return None
    parts = []
    for buf in buffers:
        flat = _flat(buf)
        parts.append(_LEN.pack(len(flat)))
        parts.append(flat)
    return bytearray().join(parts)


def decode_buffers(blob: bytes | bytearray | None) -> list[bytes] | None:
    if blob is None:
        return None
    view, out, at = memoryview(blob), [], 0
    while at < len(view):
        (n,) = _LEN.unpack_from(view, at)
        at += _LEN.size
        out.append(bytes(view[at:at + n]))
        at += n
    return out


def _decode_column(key: str, stored: Any) -> Any:
    return decode_buffers(stored) if key in BUFFER_KEYS else decode_value(stored)


# ---- msg_ids seen -----------------------------------------------------------------------


class SeenIds:
    """A Bloom filter of msg_ids: ``msg_id in seen`` False means never added.

    Two bits per msg_id, from the halves of its (cached) str hash, so a test costs a
    few operations where a SELECT costs microseconds; a True may be false (about 1% at
    the fullest), and the store then asks SQLite. Once it holds ``bits // 16`` msg_ids
    it is ``full``: ``refill`` gives it every msg_id again, with room for twice as many,
    so its memory stays at 4-8 bytes per record and false positives stay rare. str
    hashes differ between processes, so a store fills its filter anew from its table
    when it opens.
    """

    def __init__(self, bits: int = 1 << 20) -> None:
        self._start(bits)

    def _start(self, bits: int) -> None:
        self._mask = bits - 1
        self._bits = bytearray(bits >> 3)
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count > (self._mask + 1) >> 4

    def add(self, msg_id: str) -> None:
        h = hash(msg_id)
        bits, mask = self._bits, self._mask
        i = h & mask
        bits[i >> 3] |= 1 << (i & 7)
        i = (h >> 32) & mask
        bits[i >> 3] |= 1 << (i & 7)
        self.count += 1

    def __contains__(self, msg_id: object) -> bool:
        h = hash(msg_id)
        bits, mask = self._bits, self._mask
        i = h & mask
        if not bits[i >> 3] & (1 << (i & 7)):
            return False
        i = (h >> 32) & mask
        return bool(bits[i >> 3] & (1 << (i & 7)))

    def refill(self, msg_ids: Iterable[str], count: int) -> None:
        """Start again with just ``msg_ids`` (about ``count`` of them, or fewer), with
        room for as many again. They are read one at a time: a list of them all would
        leave the process's memory that much bigger."""
        bits = 1 << 20
        while count > bits >> 5:
            bits <<= 1
        self._start(bits)
        for msg_id in msg_ids:
            self.add(msg_id)


# ---- the store ------------------------------------------------------------------------


class SQLiteStore(BaseStore):
    """Task records in an SQLite file (``":memory:"`` for a private in-memory database).

    ``table`` names the table, so several stores can share a file. The file is created
    with mode 0600: records hold the tasks' arguments and results. ``statement_cache``
    off: every statement is prepared anew (slower reads), and nothing written stays in
    memory once it is on disk. ``durable`` off: for a file nobody reads after a crash
    (the memory store's private spill file), written without a journal on disk or a
    sync (a rollback still works), which costs less per write than WAL.

    This store must be the only writer of its table while it is open (the controller's
    store is): it knows which msg_ids the table holds from what it wrote itself, and
    from the table as it was when the store opened.
    """

    def __init__(self, path: str | Path, table: str = "tasks", batch_size: int = 2000,
                 statement_cache: bool = True, durable: bool = True) -> None:
        if not table.isidentifier():
            raise ValueError(f"table must be a plain identifier, not {table!r}")
        self.path = str(path)
        self.table = table
        self.batch_size = batch_size
        if self.path != ":memory:" and not Path(self.path).exists():
            Path(self.path).touch(mode=0o600)
        # a cached statement keeps the values last bound to it: with the cache, the
        # buffers of the last record written stay in memory until the next write
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   cached_statements=128 if statement_cache else 0)
        if durable:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        else:  # a cache: the journal in memory (rollbacks still work), never a sync
            self._db.execute("PRAGMA journal_mode=MEMORY")
            self._db.execute("PRAGMA synchronous=OFF")
        columns = ", ".join(f"{c}" for c in (*COLUMNS, "extra"))
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} (msg_id TEXT PRIMARY KEY, {columns})")
        #: the upsert of each set of non-NULL columns (see _row), made when first needed
        self._upserts: dict[int, str] = {}
        #: records changed since the last flush, and records not completed yet
        self._live: dict[str, Record] = {}
        self._dirty: dict[str, None] = {}
        #: new pending records the last flush left for the next one
        self._held: dict[str, None] = {}
        #: every msg_id of the table or of _live (and some dropped since)
        self._seen = SeenIds()
        self._refill_seen()

    # ---- writing --------------------------------------------------------------------

    @staticmethod
    def _row(record: Record) -> tuple[int, list]:
        """The values of ``record`` to write: msg_id, then each column that is not NULL;
        and which columns those are, a bit per column of :data:`_WRITTEN` (an unbound
        column is NULL, and binding None costs as much as binding a blob)."""
        try:
            values = _COLUMN_VALUES(record)  # one C call: a Hub record has every key
            complete = len(record) == len(RECORD_KEYS)  # every record key, nothing else
        except KeyError:
            values = [record.get(key) for key in COLUMNS]
            complete = False
        row = [record["msg_id"]]
        append = row.append
        mask = 0
        # most of what a flush costs: plain values pass as they are, and what a Hub
        # record holds (headers as they came, frames, UTC dates) is written inline
        for (bit, buffers), value in zip(_COLUMN_BITS, values):
            if value is None:
                continue
            mask |= bit
            kind = type(value)
            if kind is JSONDict:
                append(_WIRE + value.raw)
            elif kind is datetime and value.tzinfo is _UTC:
                append(_UTC_DATE + _DATE.pack(value.year, value.month, value.day, value.hour,
                                              value.minute, value.second, value.microsecond))
            elif kind in _PLAIN:
                append(value)
            elif kind in SIZED_BY_LEN and not buffers:
                append(_RAW + value)
            else:
                append(encode_buffers(value) if buffers else encode_value(value))
        if not complete:
            extra = record.keys() - _KEY_SET
            if extra:
                mask |= _EXTRA_BIT
                append(encode_value({k: record[k] for k in extra}))
        return mask, row

    def _upsert(self, mask: int) -> str:
        """The statement writing a row of the columns in ``mask`` (see _row). A row that
        is there already is replaced whole: ``excluded`` holds NULL for the columns not
        named, so those are set to NULL."""
        sql = self._upserts.get(mask)
        if sql is None:
            names = ", ".join(["msg_id", *(c for i, c in enumerate(_WRITTEN) if mask >> i & 1)])
            marks = ", ".join("?" * (1 + mask.bit_count()))
            updates = ", ".join(f"{c}=excluded.{c}" for c in _WRITTEN)
            sql = self._upserts[mask] = (
                f"INSERT INTO {self.table} ({names}) VALUES ({marks}) "
                f"ON CONFLICT(msg_id) DO UPDATE SET {updates}")
        return sql

    def flush(self, everything: bool = False) -> int:
        """Write changed records in one transaction; how many were written.

        A record still pending that was added since the last flush waits for the next
        one (unless ``everything``): most tasks finish by then and are written once,
        not twice. Every pending task is on disk within two flushes.
        """
        if not self._dirty:
            return 0
        live = self._live
        held: dict[str, None] = {}
        # runs of rows with the same columns, each written by one executemany: the rows
        # stay in the order they came, which is the table's order (rowid)
        runs: list[tuple[int, list]] = []
        rows: list = []
        mask = -1
        completed = []  # written: they leave memory (a later update reads them back)
        row = self._row
        for msg_id in self._dirty:
            record = live[msg_id]
            if record.get("completed") is not None:
                completed.append(msg_id)
            elif not everything and msg_id not in self._held:
                held[msg_id] = None
                continue
            columns, values = row(record)
            if columns != mask:
                mask, rows = columns, []
                runs.append((mask, rows))
            rows.append(values)
        if runs:
            with self._db:
                self._db.execute("BEGIN")
                for columns, values in runs:
                    self._db.executemany(self._upsert(columns), values)
        for msg_id in completed:
            del live[msg_id]  # on disk now; pending records stay for their updates
        self._dirty, self._held = dict(held), held
        return sum(len(values) for _, values in runs)

    def _touched(self, msg_id: str) -> None:
        self._dirty[msg_id] = None
        if len(self._dirty) >= self.batch_size:
            self.flush()

    def add_record(self, msg_id: str, rec: Record) -> None:
        if rec.get("msg_id", msg_id) != msg_id:
            raise ValueError(f"record's msg_id {rec['msg_id']!r} is not {msg_id!r}")
        if msg_id in self:
            raise KeyError(f"a record with msg_id {msg_id!r} is already stored")
        record = dict(rec)
        record["msg_id"] = msg_id
        self._live[msg_id] = record
        self._note_new(msg_id)

    def adopt(self, msg_id: str, record: Record) -> None:
        """Store ``record`` itself, not a copy, unchecked: for a record the caller held
        until now (a memory store spilling it), so its ``msg_id`` key is set and new
        here. ``add_record`` is for everything else."""
        self._live[msg_id] = record
        self._note_new(msg_id)

    def _note_new(self, msg_id: str) -> None:
        seen = self._seen
        seen.add(msg_id)
        if seen.full:
            self._refill_seen()
        self._touched(msg_id)

    def update_record(self, msg_id: str, rec: Record) -> None:
        if rec.get("msg_id", msg_id) != msg_id:
            raise ValueError(f"cannot change msg_id {msg_id!r} to {rec['msg_id']!r}")
        record = self._live.get(msg_id)
        if record is None:
            record = self._live[msg_id] = self._load(msg_id)
        record.update(rec)
        self._touched(msg_id)

    def drop_record(self, msg_id: str) -> None:
        in_memory = self._live.pop(msg_id, None) is not None
        self._dirty.pop(msg_id, None)
        self._held.pop(msg_id, None)
        deleted = self._db.execute(f"DELETE FROM {self.table} WHERE msg_id=?", (msg_id,)).rowcount
        if not (in_memory or deleted):
            raise RecordNotFound(f"no record with msg_id {msg_id!r}")

    def drop_matching_records(self, query: dict) -> int:
        doomed = [rec["msg_id"] for rec in self.find_records(query, keys=["msg_id"])]
        for msg_id in doomed:
            self._live.pop(msg_id, None)  # flushed by find_records: none is dirty
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(f"DELETE FROM {self.table} WHERE msg_id=?", [(m,) for m in doomed])
        return len(doomed)

    # ---- reading --------------------------------------------------------------------

    def _load(self, msg_id: str) -> Record:
        names = ", ".join((*COLUMNS, "extra"))
        row = self._db.execute(f"SELECT {names} FROM {self.table} WHERE msg_id=?", (msg_id,)).fetchone()
        if row is None:
            raise RecordNotFound(f"no record with msg_id {msg_id!r}")
        record = {"msg_id": msg_id, **{k: _decode_column(k, v) for k, v in zip(COLUMNS, row)}}
        if row[-1] is not None:
            record.update(decode_value(row[-1]))
        return record

    def get_record(self, msg_id: str) -> Record:
        record = self._live.get(msg_id)
        if record is not None:
            return _decoded_copy(record)
        return self._load(msg_id)

    def get_value(self, msg_id: str, key: str) -> Any:
        record = self._live.get(msg_id)
        if record is not None:
            return record.get(key)
        return self._load(msg_id).get(key)

    def _rows(self, keys: Iterable[str]) -> Iterable[Record]:
        """Every stored record, oldest first, holding ``msg_id`` and ``keys`` only."""
        self.flush(everything=True)
        keys = list(dict.fromkeys(k for k in keys if k != "msg_id"))
        columns = [k for k in keys if k in COLUMNS]
        need_extra = any(k not in COLUMNS for k in keys)
        names = ", ".join(("msg_id", *columns, *(["extra"] if need_extra else [])))
        for row in self._db.execute(f"SELECT {names} FROM {self.table} ORDER BY rowid"):
            record = {"msg_id": row[0], **{k: _decode_column(k, v) for k, v in zip(columns, row[1:])}}
            if need_extra and row[-1] is not None:
                extra = decode_value(row[-1])
                record.update({k: extra[k] for k in keys if k in extra})
            yield record

    def find_records(self, query: dict, keys: Iterable[str] | None = None) -> list[Record]:
        matcher = compile_query(query)
        matched = [rec["msg_id"] for rec in self._rows(query) if matcher(rec)]
        wanted = list(keys) if keys else None
        if wanted == ["msg_id"]:
            return [{"msg_id": m} for m in matched]
        out = []
        for msg_id in matched:
            record = self._load(msg_id)
            out.append(project(record, wanted))
        return out

    def get_history(self) -> list[str]:
        dated = [(rec["submitted"], rec["msg_id"]) for rec in self._rows(["submitted"])
                 if rec["submitted"] is not None]
        return history_order(dated)

    def __len__(self) -> int:
        self.flush(everything=True)
        return self._db.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0]

    def _refill_seen(self) -> None:
        """Fill the filter of msg_ids anew from ``_live`` and the table."""
        count = len(self._live) + self._db.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0]
        rows = self._db.execute(f"SELECT msg_id FROM {self.table}")
        self._seen.refill(itertools.chain(self._live, (msg_id for (msg_id,) in rows)), count)

    def __contains__(self, msg_id: object) -> bool:
        if msg_id in self._live:
            return True
        if msg_id not in self._seen:
            return False
        row = self._db.execute(f"SELECT 1 FROM {self.table} WHERE msg_id=?", (msg_id,)).fetchone()
        return row is not None

    def close(self) -> None:
        try:
            self.flush(everything=True)
        finally:
            self._db.close()


def _decoded_copy(record: Record) -> Record:
    """A record from memory as it would read back from disk (buffers as bytes)."""
    out = {}
    for key, value in record.items():
        if key in BUFFER_KEYS:
            out[key] = decode_buffers(encode_buffers(value))
        elif _is_buffer(value):
            out[key] = bytes(memoryview(value.buffer if hasattr(value, "buffer") else value))
        else:
            out[key] = decode_value(encode_value(value))
    return out
