"""MessageBuilder: the client's requests are signed Jupyter messages that
``jupyter_client.session.Session`` accepts, with the header ``Session.msg`` gives.

These tests also guard what the builder takes from jupyter_client (the wire layout of
``Session.serialize``, the header fields of ``Session.msg``, ``protocol_version``):
they fail when that library changes them.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone

import pytest
from jupyter_client.session import DELIM, Session, protocol_version

from ipyparallel_lite.client.message import MessageBuilder
from ipyparallel_lite.connection import make_session, new_key

KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def _receive(frames: list) -> tuple[list, dict]:
    """What a peer with the same key makes of ``frames``: idents and the message."""
    peer = make_session(KEY)
    idents, parts = peer.feed_identities(frames)
    return idents, peer.deserialize(parts)


def test_built_message_is_what_session_accepts() -> None:
    session = make_session(KEY)
    builder = MessageBuilder(session)
    before = datetime.now(timezone.utc)
    msg_id, frames = builder.build("execute_request", {"code": "a = 1", "silent": True},
                                   ident=[b"engine-uuid"], metadata={"targets": [0, 1], "label": None})
    idents, msg = _receive(frames + [b"a buffer"])
    assert idents == [b"engine-uuid"]
    reference = session.msg("execute_request")["header"]
    header = msg["header"]
    assert list(header) == list(reference)  # the same fields, in Session's order
    assert header["msg_id"] == msg_id == msg["msg_id"]
    assert header["msg_type"] == "execute_request"
    assert header["username"] == session.username and header["session"] == session.session
    assert header["version"] == protocol_version
    assert before <= header["date"] <= datetime.now(timezone.utc)
    assert msg["parent_header"] == {}
    assert msg["metadata"] == {"targets": [0, 1], "label": None}
    assert msg["content"] == {"code": "a = 1", "silent": True}
    assert [bytes(b) for b in msg["buffers"]] == [b"a buffer"]


def test_frames_have_session_serialize_layout() -> None:
    session = make_session(KEY)
    _, ours = MessageBuilder(session).build("apply_request", {}, ident=[b"e"], metadata={"retries": 0})
    theirs = session.serialize(session.msg("apply_request", {}, metadata={"retries": 0}), ident=[b"e"])
    assert len(ours) == len(theirs)
    assert ours[:2] == theirs[:2] == [b"e", b"<IDS|MSG>"]
    assert ours[4:] == theirs[4:]  # parent, metadata, content: the same bytes


def test_packed_metadata_is_the_same_message_part() -> None:
    builder = MessageBuilder(make_session(KEY))
    metadata = {"after": None, "follow": ["x"], "timeout": 1.5, "retries": 2, "targets": None}
    packed = builder.pack_metadata(metadata)
    _, from_dict = builder.build("apply_request", metadata=metadata)
    _, from_bytes = builder.build("apply_request", metadata=packed)
    assert from_dict[4] == from_bytes[4] == packed
    assert _receive(from_bytes)[1]["metadata"] == metadata
    assert builder.pack_metadata(None) == builder.pack_metadata({}) == b"{}"


def test_session_metadata_is_merged_under_the_message_metadata() -> None:
    session = make_session(KEY, metadata={"origin": "test", "label": "default"})
    _, frames = MessageBuilder(session).build("apply_request", metadata={"label": "mine"})
    assert _receive(frames)[1]["metadata"] == {"origin": "test", "label": "mine"}


def test_forged_or_replayed_message_is_refused() -> None:
    _, frames = MessageBuilder(make_session(KEY)).build("apply_request", metadata={"retries": 0})
    forged = list(frames)
    forged[4] = b'{"retries": 5}'
    with pytest.raises(ValueError, match="Invalid Signature"):
        _receive(forged)
    peer = make_session(KEY)
    peer.deserialize(peer.feed_identities(frames)[1])
    with pytest.raises(ValueError, match="Duplicate Signature"):
        peer.deserialize(peer.feed_identities(frames)[1])


def test_odd_names_stay_valid_json() -> None:
    session = make_session(KEY, username='an "odd" 100% user ✓')
    _, frames = MessageBuilder(session).build('weird_%s_"type"', {"k": "✓"})
    msg = _receive(frames)[1]
    assert msg["header"]["username"] == 'an "odd" 100% user ✓'
    assert msg["header"]["msg_type"] == 'weird_%s_"type"'
    assert msg["content"] == {"k": "✓"}


def test_msg_ids_unique_across_threads_and_distinct_from_the_session() -> None:
    session = make_session(KEY)
    builder = MessageBuilder(session)
    ids: list[str] = []

    def build_many() -> None:
        ids.extend(builder.build("apply_request")[0] for _ in range(2000))

    threads = [threading.Thread(target=build_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    own = [session.msg_id for _ in range(100)]
    assert len(set(ids)) == len(ids) == 8000
    assert not set(own) & set(ids)


def test_non_json_session_is_refused() -> None:
    with pytest.raises(ValueError, match="JSON"):
        MessageBuilder(Session(key=KEY.encode(), packer="pickle", unpacker="pickle"))


def test_content_and_metadata_pack_as_the_session_packs() -> None:
    """Our prebuilt encoder has json_packer's options; what it refuses (NaN, bytes,
    dates) goes through the session's packer and its fallbacks."""
    import math
    import warnings
    from datetime import datetime, timezone

    session = make_session(KEY)
    builder = MessageBuilder(session)
    for obj in ({"code": "print('✓ \\u2028')\n", "silent": False, "user_expressions": {}},
                {"targets": [0, 1], "timeout": 1.5, "label": None},
                {"when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "raw": b"\x00\x01"},
                {"t": math.nan}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jupyter_client's deprecation of NaN
            ours, theirs = builder.pack_metadata(obj), session.pack(obj)
            _, frames = builder.build("execute_request", obj)
        assert ours == theirs == frames[-1]


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
