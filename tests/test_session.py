"""The lean session chores (``ipyparallel_lite/session.py``) against jupyter_client's own.

They lean on jupyter_client's header layout, packer options and HMAC: these tests fail
when that library changes what they copy, before the wire does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import datetime, timezone

import pytest
from jupyter_client.session import Session, json_packer, json_unpacker

from ipyparallel_lite import session as lean
from ipyparallel_lite.connection import make_session, new_key
from ipyparallel_lite.session import LeanSession


@pytest.mark.parametrize("scheme", ["hmac-sha256", "hmac-sha512"])
@pytest.mark.parametrize("key_length", [1, 32, 64, 65, 128, 129, 300])
def test_signatures_are_hmacs(scheme, key_length):
    key = bytes(range(256))[:key_length] if key_length <= 256 else b"x" * key_length
    session = LeanSession(key=key, signature_scheme=scheme)
    parts = [b'{"msg_id": "a"}', b"{}", memoryview(b'{"k": 1}'), "caf\u00e9".encode()]
    digest = getattr(hashlib, scheme.split("-")[1])
    assert session.sign(parts) == hmac.new(key, b"".join(parts), digest).hexdigest().encode()
    assert session.sign(parts) == Session(key=key, signature_scheme=scheme).sign(parts)


def test_a_new_key_or_none_signs_anew():
    session = LeanSession(key=b"first")
    parts = [b"{}", b"{}", b"{}", b"{}"]
    first = session.sign(parts)
    session.key = b"second"
    assert session.sign(parts) == hmac.new(b"second", b"{}" * 4, hashlib.sha256).hexdigest().encode() != first
    session.signature_scheme = "hmac-sha512"
    assert session.sign(parts) == hmac.new(b"second", b"{}" * 4, hashlib.sha512).hexdigest().encode()
    session.auth = None
    assert session.sign(parts) == b""


def test_the_json_encoder_is_the_stdlibs_c_one_writing_as_json_packer():
    assert json.encoder.c_make_encoder is not None  # else pack makes one per call
    for obj in ({"a": [1, 2.5e-07, None, True, {"b": "\u2603 \"q\" \n"}]}, {}, {"t": datetime.now(timezone.utc)},
                {"huge": 10**30, "neg": -0.0}):
        assert lean.pack(obj) == json_packer(obj)
    with pytest.warns(UserWarning, match="not JSON compliant"):  # json_packer's fallback
        assert lean.pack({"nan": float("nan")}) == json_packer({"nan": float("nan")})
    looped: dict = {}
    looped["self"] = looped
    with pytest.raises((ValueError, RecursionError)):  # as json_packer
        lean.pack(looped)


def test_empty_parts_read_as_new_dicts():
    first, second = lean.unpack(b"{}"), lean.unpack(memoryview(b"{}"))
    assert first == second == {} and first is not second
    assert lean.unpack(b'{"a": [1, "\\u2603"]}') == {"a": [1, "\u2603"]}
    assert lean.unpack(b" {} ") == {}


@pytest.mark.parametrize("data", [
    b"{}", b'{"a": [1, 2.5, null, true, false], "b": {"c": "d"}}', b' {"a": 1} ', b'{"a": 1}\n',
    b'"text"', b"[1, 2]", b"3", '{"é": "€ \\u00e9"}'.encode(), b'{"a": "\xff"}',
])
def test_the_unpacker_reads_what_json_unpacker_reads(data):
    assert lean.unpack(data) == json_unpacker(data)


@pytest.mark.parametrize("data", [b"", b"{", b'{"a": 1} x', b'{"a": 1}{}', b"nope", b"\n"])
def test_the_unpacker_refuses_what_json_unpacker_refuses(data):
    with pytest.raises(json.JSONDecodeError):
        json_unpacker(data)
    with pytest.raises(json.JSONDecodeError):
        lean.unpack(data)


@pytest.mark.parametrize("username, msg_type", [
    ("ipp-lite", "apply_request"), ('us\u00e9r "q" 100%', 'weird_%s_"type"'), ("a\\b", "status"),
])
def test_a_header_from_its_template_is_what_session_writes(username, msg_type):
    session = make_session(new_key(), username=username)
    assert isinstance(session, LeanSession)
    msg_id, date = session.msg_id, lean.now_date()
    session.session = 'sess-"quoted\\-%s'  # escaped in the header, not in the msg_id
    msg_id = session.msg_id
    written = session.header(msg_type, msg_id, date)
    stock = Session(key=session.key, username=username, session=session.session)
    header = stock.msg_header(msg_type)
    header.update(msg_id=msg_id, date=datetime.fromisoformat(date.replace("Z", "+00:00")))
    assert written == json_packer(header)


def test_dates_are_utc_with_microseconds():
    date = lean.now_date()
    parsed = datetime.fromisoformat(date.replace("Z", "+00:00"))
    assert date.endswith("Z") and len(date) == len("2026-12-01T09:07:39.885483Z")
    assert abs((datetime.now(timezone.utc) - parsed).total_seconds()) < 5
    assert lean.json_date(parsed) == json.loads(json_packer({"d": parsed}))["d"]


def test_a_time_is_written_as_a_date_with_microseconds():
    # engines write a task's started and completed from time.time(), as headers' dates
    assert lean.date_text(1764666459.5) == "2025-12-02T09:07:39.500000Z"
    assert lean.date_text(1764666459.0) == "2025-12-02T09:07:39.000000Z"
    now = time.time()
    parsed = datetime.fromisoformat(lean.date_text(now).replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - now) < 2e-6
    for t in (now, 1764666459.9999996, 1764666459.2126355):
        # the microsecond datetime.fromtimestamp gives: engines send both forms of a date
        assert datetime.fromisoformat(lean.date_text(t).replace("Z", "+00:00")) == \
            datetime.fromtimestamp(t, timezone.utc)
    assert lean.date_text(now + 3600).startswith(
        lean.json_date(datetime.fromtimestamp(int(now) + 3600, timezone.utc))[:19])


def test_msg_ids_stay_unique_across_threads():
    session = make_session(new_key())
    ids: list[str] = []

    def take() -> None:
        ids.extend(session.msg_id for _ in range(5000))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 20_000
    assert all(i.startswith(f"{session.session}_") for i in ids)


def test_the_replay_window_is_exactly_the_last_signatures():
    from ipyparallel_lite.connection import unpack_message

    key = new_key()
    sender, receiver = make_session(key), make_session(key)
    receiver.digest_history_size = 5
    messages = [sender.serialize(sender.msg("apply_request", {"n": i}))[1:] for i in range(8)]
    for frames in messages:
        unpack_message(receiver, frames)
    assert len(receiver.digest_history) == 5
    for frames in messages[3:]:  # the last five: refused as replays
        with pytest.raises(ValueError, match="Duplicate Signature"):
            unpack_message(receiver, frames)
    assert unpack_message(receiver, messages[0])["content"] == {"n": 0}  # forgotten: oldest first


def test_session_deserialize_remembers_signatures_through_our_window():
    # jupyter_client's deserialize (what ipykernel's engines use) must call _add_digest,
    # which LeanSession overrides; if it stops doing so, the window is not ours any more
    key = new_key()
    sender, receiver = make_session(key), make_session(key)
    frames = sender.serialize(sender.msg("execute_request", {"code": "a=1"}))[1:]
    receiver.deserialize(frames)
    assert list(receiver._digest_order) == [frames[0]]
    with pytest.raises(ValueError, match="Duplicate Signature"):
        receiver.deserialize(frames)


def test_parts_read_without_copy_may_be_bytes_or_frames_alike():
    # a batch delivers its small parts as bytes and its large ones as zmq Frames
    import zmq

    writer, reader = make_session("k" * 64), make_session("k" * 64)
    big = b"B" * 10_000
    msg = writer.msg("execute_request", {"code": "a=1"}, metadata={"m": 1})
    frames = writer.serialize(msg, ident=[b"client"]) + [b"small", big]
    mixed = [f if i % 2 else zmq.Frame(f) for i, f in enumerate(frames[:-1])] + [zmq.Frame(big)]
    idents, rest = reader.feed_identities(mixed, copy=False)
    assert idents == [b"client"]
    got = reader.deserialize(rest, copy=False)
    assert got["content"] == {"code": "a=1"} and got["metadata"] == {"m": 1}
    assert [bytes(b) for b in got["buffers"]] == [b"small", big]
    with pytest.raises(ValueError, match="Duplicate"):
        reader.deserialize(rest, copy=False)
    with pytest.raises(ValueError, match="DELIM"):
        reader.feed_identities([b"a", zmq.Frame(b"b")], copy=False)
