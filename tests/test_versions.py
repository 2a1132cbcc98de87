"""Version skew between processes is caught at registration, naming both sides."""

from __future__ import annotations

import uuid

import pytest
import zmq

from ipyparallel_lite.connection import load_connection_file, make_session
from ipyparallel_lite.controller.hub import Hub, RegistrationError
from ipyparallel_lite.versions import conflicts, versions

MINE = {"python": "3.11.7", "cloudpickle": "3.1.0", "ipyparallel_lite": "0.4.2", "pickle_protocol": 5}


@pytest.mark.parametrize("theirs, expected", [
    ({**MINE, "python": "3.11.2", "cloudpickle": "3.1.1", "ipyparallel_lite": "0.4.9"}, []),
    ({"python": "3.11.0"}, []),  # an older engine that reports less
    ({**MINE, "python": "3.10.12"}, ["python 3.10.12 there, 3.11.7 here"]),
    ({**MINE, "cloudpickle": "2.2.1"}, ["cloudpickle 2.2.1 there, 3.1.0 here"]),
    ({**MINE, "ipyparallel_lite": "0.5.0"}, ["ipyparallel_lite 0.5.0 there, 0.4.2 here"]),
    ({**MINE, "pickle_protocol": 4}, ["pickle protocol 4 there, 5 needed"]),
    ({**MINE, "pickle_protocol": "5"}, ["pickle protocol 5 there, 5 needed"]),
])
def test_conflicts_are_the_differences_that_break_unpickling(theirs, expected):
    assert conflicts(MINE, theirs) == expected


def old_engine() -> dict:
    return {**versions(), "python": "2.7.18", "hostname": "old-box"}


def test_the_hub_refuses_a_skewed_engine_or_admits_it_with_a_warning():
    with pytest.raises(RegistrationError, match=r"python 2\.7\.18 there, 3\.\d+\.\d+ here"):
        Hub().register("u1", None, old_engine(), 0.0)
    engine = Hub(version_check="warn").register("u1", None, old_engine(), 0.0)
    assert engine.info["version_conflicts"][0].startswith("python 2.7.18 there")
    assert "version_conflicts" not in Hub(version_check="off").register("u1", None, old_engine(), 0).info
    assert "version_conflicts" not in Hub().register("u2", None, versions(), 0.0).info
    with pytest.raises(ValueError, match="version_check must be"):
        Hub(version_check="maybe")


def test_a_skewed_engine_is_refused_at_registration_and_others_see_versions(cluster, rc):
    info = load_connection_file(cluster.connection_file("engine"))
    session = make_session(info["key"])
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"{info['interface']}:{info['ports']['registration']}")
        session.send(sock, "registration_request", {"uuid": str(uuid.uuid4()), "info": old_engine()})
        assert sock.poll(10_000)
        _, reply = session.recv(sock, mode=0)
    finally:
        ctx.destroy(linger=0)
    content = reply["content"]
    assert content["status"] == "error" and content["ename"] == "RegistrationError"
    assert "python 2.7.18 there" in content["evalue"] and "version_check='warn'" in content["evalue"]
    assert rc.ids == [0, 1]
    for eid, einfo in rc.engine_info().items():
        assert {k: einfo[k] for k in versions()} == versions(), eid
        assert einfo["pid"] > 0 and einfo["hostname"]
