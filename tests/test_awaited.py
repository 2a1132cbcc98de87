"""The controller's table of work held until requests arrive (controller.awaited): fed
holds, arrivals and times, checked by what it releases. No I/O."""

from __future__ import annotations

from ipyparallel_lite.controller.awaited import Awaited


def _work(log: list, name: str):
    return lambda: log.append(name)


def _run(callbacks) -> None:
    for go in callbacks:
        go()


def test_work_goes_when_its_last_request_arrives():
    awaited, log = Awaited(), []
    awaited.hold(["a", "b"], 1.0, _work(log, "query"))
    _run(awaited.arrived("a"))
    assert log == [] and awaited.waiting()
    _run(awaited.arrived("b"))
    assert log == ["query"]
    assert not awaited.waiting()
    assert awaited.next_deadline() is None
    assert awaited.due(5.0) == []  # released once only


def test_one_arrival_releases_every_work_waiting_for_it():
    awaited, log = Awaited(), []
    awaited.hold(["a"], 1.0, _work(log, "task"))
    awaited.hold(["a", "c"], 1.5, _work(log, "query"))
    awaited.hold(["a"], 2.0, _work(log, "other"))
    _run(awaited.arrived("a"))
    assert log == ["task", "other"]
    assert awaited.next_deadline() == 1.5
    _run(awaited.arrived("zzz"))  # nobody waits for it
    assert log == ["task", "other"]


def test_past_its_deadline_work_goes_with_what_is_known_and_is_forgotten():
    awaited, log = Awaited(), []
    awaited.hold(["late", "never"], 1.0, _work(log, "first"))
    awaited.hold(["never"], 3.0, _work(log, "second"))
    _run(awaited.arrived("late"))
    assert awaited.due(0.5) == []
    _run(awaited.due(1.0))
    assert log == ["first"]
    assert awaited.next_deadline() == 3.0 and awaited.waiting()
    _run(awaited.due(3.5))
    assert log == ["first", "second"]
    assert not awaited.waiting() and awaited.next_deadline() is None
    _run(awaited.arrived("never"))  # arriving after all: nothing left to release
    assert log == ["first", "second"]


def test_deadlines_release_in_their_order_whatever_the_order_held():
    awaited, log = Awaited(), []
    awaited.hold(["x"], 2.0, _work(log, "b"))
    awaited.hold(["y"], 1.0, _work(log, "a"))
    awaited.hold(["z"], 2.0, _work(log, "c"))
    assert awaited.next_deadline() == 1.0
    _run(awaited.due(10.0))
    assert log == ["a", "b", "c"]


def test_work_released_by_arrival_no_longer_sets_the_next_deadline():
    awaited, log = Awaited(), []
    awaited.hold(["a"], 1.0, _work(log, "early"))
    awaited.hold(["b"], 2.0, _work(log, "late"))
    _run(awaited.arrived("a"))
    assert awaited.next_deadline() == 2.0
