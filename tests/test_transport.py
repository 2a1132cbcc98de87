"""The client transport's own pieces: its message builder and JSON unpacker against
``jupyter_client``'s (whose internals they lean on), and one client shared by several
threads, on a real cluster.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone

import pytest
from jupyter_client.session import DELIM, json_unpacker

from ipyparallel_lite.client.message import MessageBuilder
from ipyparallel_lite.client.transport import unpack_json
from ipyparallel_lite.connection import make_session, new_key

MESSAGES = [
    ("apply_request", None, None, None),
    ("apply_request", {}, {"after": [], "follow": [], "timeout": None, "retries": 0, "targets": None},
     [b"engine-uuid"]),
    ("execute_request", {"code": "print('é €')\n", "silent": False, "user_expressions": {}}, {}, None),
    ("queue_request", {"targets": [0, 1], "verbose": True}, {"when": datetime.now(timezone.utc)}, None),
    ("db_request", {"query": {"completed": {"$ne": None}}, "keys": ["msg_id"]}, None, [b"a", b"b"]),
]


@pytest.mark.parametrize("msg_type, content, metadata, ident", MESSAGES)
def test_the_builder_writes_what_session_serialize_writes(msg_type, content, metadata, ident):
    session = make_session(new_key())
    msg_id, frames = MessageBuilder(session).build(msg_type, content, ident=ident, metadata=metadata)
    at = frames.index(DELIM)
    assert frames[:at] == (ident or [])
    header = json.loads(frames[at + 2])
    # the header jupyter_client makes: its keys in its order, its msg_id and date forms
    reference = session.msg_header(msg_type)
    assert list(header) == list(reference)
    assert {k: header[k] for k in ("msg_type", "username", "session", "version")} == {
        k: reference[k] for k in ("msg_type", "username", "session", "version")}
    assert header["msg_id"] == msg_id
    assert msg_id.rpartition("_")[0].endswith(f"_{os.getpid()}")
    assert json.loads(session.pack(reference))["date"].endswith("Z")
    assert datetime.fromisoformat(header["date"].replace("Z", "+00:00")).tzinfo is not None
    # every frame, byte for byte, as Session.serialize writes the same message
    expected = session.serialize(session.msg(msg_type, content, header=header, metadata=metadata), ident=ident)
    assert frames == expected
    # and a peer's Session takes it
    peer = make_session(session.key)
    assert peer.deserialize(peer.feed_identities(frames)[1])["header"]["msg_id"] == msg_id


def test_the_builder_keeps_the_session_s_default_metadata():
    session = make_session(new_key())
    session.metadata = {"origin": "here", "n": 1}
    _, frames = MessageBuilder(session).build("apply_request", {}, metadata={"n": 2})
    assert json.loads(frames[frames.index(DELIM) + 4]) == {"origin": "here", "n": 2}


@pytest.mark.parametrize("data", [
    b"{}", b'{"a": [1, 2.5, null, true, false], "b": {"c": "d"}}', b' {"a": 1} ', b'{"a": 1}\n',
    b'"text"', b"[1, 2]", b"3", '{"é": "€ \\u00e9"}'.encode(), b'{"a": "\xff"}',
])
def test_the_unpacker_reads_what_json_unpacker_reads(data):
    assert unpack_json(data) == json_unpacker(data)


@pytest.mark.parametrize("data", [b"", b"{", b'{"a": 1} x', b'{"a": 1}{}', b"nope", b"\n"])
def test_the_unpacker_refuses_what_json_unpacker_refuses(data):
    with pytest.raises(json.JSONDecodeError):
        json_unpacker(data)
    with pytest.raises(json.JSONDecodeError):
        unpack_json(data)


def test_threads_waiting_on_lone_requests_and_a_burst_share_one_client(rc, lview):
    # blocking calls from several threads while a burst's replies stream in: every
    # reply reaches its request
    errors: list[BaseException] = []

    def lone(k: int) -> None:
        try:
            view = rc[k % len(rc.ids)]
            for i in range(150):
                assert view.apply_sync(abs, -i - k) == i + k
                assert lview.apply_sync(abs, -i) == i
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=lone, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    burst = [lview.apply_async(abs, -i) for i in range(1500)]
    assert [ar.get(timeout=120) for ar in burst] == list(range(1500))
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert rc.queue_status()["unassigned"] == 0


def test_a_lone_query_and_a_closed_client(cluster):
    client = cluster.connect_client_sync()
    try:
        assert client.queue_status() is not None  # a query, answered while nothing else waits
    finally:
        client.close()
    assert client.transport.closed
    with pytest.raises(RuntimeError, match="closed"):
        client.transport.build("apply_request")
