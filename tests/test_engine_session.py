"""The engine's lean ``Session.send`` writes exactly what jupyter_client's would.

Each message the lean path sends is read back by a stock ``Session`` (signature
checked), serialized again by jupyter_client itself, and compared byte for byte: a
jupyter_client that changes its header, its JSON or its signing fails here.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from jupyter_client.session import DELIM, Session

from ipyparallel_lite.connection import make_session
from ipyparallel_lite.engine.session import EngineSession

KEY = "k" * 64


class Capture:
    """A stand-in for a socket: keeps what is sent (``Session.send`` needs only this)."""

    def __init__(self) -> None:
        self.sent: list[tuple[list, bool]] = []

    def send_multipart(self, frames: list, copy: bool = True, **kwargs: object) -> None:
        self.sent.append((list(frames), copy))


@pytest.fixture
def engine_session() -> EngineSession:
    session = make_session(KEY, session_class=EngineSession)
    session.session = "engine-uuid-\"quoted\\"  # escaping in the header template
    session.username = "us\u00e9r"
    return session


def _reread(frames: list) -> tuple[list, dict, list]:
    """(idents, message, jupyter_client's own serialization of it) of sent ``frames``."""
    stock = make_session(KEY, session_class=Session)
    idents, rest = stock.feed_identities(frames)
    msg = stock.deserialize(rest)  # checks the signature
    again = stock.serialize(msg, idents)
    return idents, msg, again


def test_frames_are_jupyter_clients_own(engine_session, monkeypatch):
    def stock_send(*args: object, **kwargs: object) -> None:
        raise AssertionError("the lean send fell back on Session.send")

    monkeypatch.setattr(Session, "send", stock_send)
    stream = Capture()
    parent = {"header": {"msg_id": "req-1", "msg_type": "apply_request", "username": "u",
                         "session": "s", "date": "2026-01-01T00:00:00.000001Z", "version": "5.4"}}
    now = datetime.now(timezone.utc)
    metadata = {"started": now, "engine_id": 3, "status": "ok", "run_time": 1.5e-05,
                "note": "caf\u00e9 \u2603"}
    content = {"status": "ok", "text": "line\nbreak \"q\" \u2603", "n": [1, 2.5, None, True]}
    buffers = [b"raw-bytes", memoryview(b"a view")]
    msg = engine_session.send(stream, "apply_reply", content, parent=parent,
                              ident=[b"m", b"client"], buffers=buffers, metadata=metadata)
    (frames, copy), = stream.sent
    assert copy  # all small
    idents, reread, again = _reread(frames)
    assert idents == [b"m", b"client"]
    assert frames[: len(again)] == again  # DELIM, signature, header, parent, metadata, content
    assert frames[len(again):] == buffers
    assert reread["header"]["msg_type"] == "apply_reply"
    assert reread["parent_header"]["msg_id"] == "req-1"
    assert reread["content"] == content
    assert reread["header"]["session"] == engine_session.session
    # the returned message is Session.msg's shape
    assert set(msg) == {"header", "msg_id", "msg_type", "parent_header", "content", "metadata",
                        "tracker"}
    assert msg["header"]["msg_id"] == reread["header"]["msg_id"] == msg["msg_id"]
    assert msg["header"]["date"] == reread["header"]["date"]
    assert list(msg["header"]) == list(json.loads(frames[4]))
    # what jupyter_client builds for the same header, byte for byte
    stock = make_session(KEY, session_class=Session)
    stock.session, stock.username = engine_session.session, engine_session.username
    assert list(stock.msg_header("apply_reply")) == list(msg["header"])
    built = stock.msg("apply_reply", content, parent=parent, header=msg["header"], metadata=metadata)
    assert stock.serialize(built, [b"m", b"client"]) + buffers == frames
    assert msg["metadata"] == metadata and msg["metadata"] is not metadata


def test_ids_stay_unique_between_lean_and_stock_sends(engine_session):
    stream = Capture()
    engine_session.send(stream, "status", {"execution_state": "idle"})
    engine_session.send(stream, "status", {"execution_state": "idle"}, track=True)  # stock path
    engine_session.send(stream, "stream", {"name": "stdout", "text": "x"}, ident=b"topic")
    ids = [_reread(frames)[1]["header"]["msg_id"] for frames, _ in stream.sent]
    assert len(set(ids)) == 3
    assert stream.sent[2][0][0] == b"topic" and stream.sent[2][0][1] == DELIM


def test_big_parts_go_zero_copy_and_bad_buffers_are_refused(engine_session):
    stream = Capture()
    big = bytearray(engine_session.copy_threshold)
    engine_session.send(stream, "apply_reply", {"status": "ok"}, buffers=[big])
    engine_session.send(stream, "execute_reply", {"status": "ok", "x": "y" * 100_000})
    assert [copy for _, copy in stream.sent] == [False, False]
    with pytest.raises(ValueError, match="not contiguous"):
        engine_session.send(stream, "apply_reply", {}, buffers=[memoryview(b"abcdef")[::2]])


def test_messages_for_a_counted_request_are_counted(engine_session):
    stream = Capture()
    engine_session.count_for("req-7")
    for _ in range(3):
        engine_session.send(stream, "stream", {"name": "stdout", "text": "x"},
                            parent={"header": {"msg_id": "req-7"}})
    engine_session.send(stream, "status", {}, parent={"header": {"msg_id": "other"}}, track=True)
    engine_session.send(stream, "status", {}, parent={"header": {"msg_id": "req-7"}}, track=True)
    assert engine_session.take_count("req-7") == 4
    assert engine_session.take_count("req-7") is None
