"""Unit tests of adaptive prefetch and work stealing in the pure task scheduler.

Events in (submit, task_done with the engine's run time, tick, stolen), actions out
(Assign, Steal, Interrupt, Fail); no sockets, no clock. Times are binary fractions so
that the estimates come out exact.
"""

from __future__ import annotations

import pytest

from ipyparallel_lite.connection import STEAL_WINDOW
from ipyparallel_lite.controller.scheduler import (
    ANSWER_WAIT_MAX,
    LONG_MIN,
    PREFETCH_MAX,
    SCHEMES,
    Assign,
    Fail,
    Interrupt,
    Steal,
    TaskScheduler,
)

# A task assigned to an idle engine at t and answered at t + TRIP_AND_RUN, having run
# RUN seconds there: round trip 7 x RUN, so the engine may hold hwm + 7. Both are short
# enough that a task counts as long after LONG_MIN.
RUN = 2.0**-10
TRIP_AND_RUN = 8 * RUN
FAST_LIMIT = 1 + 7


def assigned(actions: list) -> list[tuple[str, int]]:
    return [(a.msg_id, a.engine_id) for a in actions if isinstance(a, Assign)]


def steals(actions: list) -> list[tuple[tuple[str, ...], int]]:
    return [(a.msg_ids, a.engine_id) for a in actions if isinstance(a, Steal)]


def failed(actions: list) -> dict[str, str]:
    return {a.msg_id: a.ename for a in actions if isinstance(a, Fail)}


def warmed(n_engines: int = 2, scheme: str = "leastload", fresh: int = 0, **kw) -> TaskScheduler:
    """A scheduler whose engines have each answered one fast task (they may prefetch),
    plus ``fresh`` engines that have answered nothing (they hold ``hwm``)."""
    s = TaskScheduler(scheme, seed=0, **kw)
    for e in range(n_engines):
        s.add_engine(e, now=0.0)
    for e in range(n_engines):
        assert assigned(s.submit(f"warm{e}", targets=[e], now=0.0)) == [(f"warm{e}", e)]
    for e in range(n_engines):
        s.task_done(f"warm{e}", e, success=True, now=TRIP_AND_RUN, run_time=RUN)
    for e in range(n_engines, n_engines + fresh):
        s.add_engine(e, now=TRIP_AND_RUN)
    return s


def submit_many(s: TaskScheduler, names: list[str], now: float) -> list[tuple[str, int]]:
    out = []
    for name in names:
        out += assigned(s.submit(name, now=now))
    return out


def long_task_with_prefetch_behind(now: float = 1.0) -> tuple[TaskScheduler, list[str]]:
    """Fast engine 0 runs "long" with p0..p6 prefetched behind it; fresh engine 1 runs "a"."""
    s = warmed(1, fresh=1)
    assert submit_many(s, ["long", "a"], now) == [("long", 0), ("a", 1)]
    behind = [f"p{i}" for i in range(FAST_LIMIT - 1)]
    assert submit_many(s, behind, now) == [(m, 0) for m in behind]
    assert s.queue_status()[0]["tasks"] == ["long", *behind]
    return s, behind


# ----------------------------------------------------------------------------- prefetch


def test_prefetch_grows_with_fast_tasks():
    s = TaskScheduler(seed=0)
    s.add_engine(0, now=0.0)
    assert assigned(s.submit("t0", now=0.0)) == [("t0", 0)]
    assert submit_many(s, [f"q{i}" for i in range(20)], 0.0) == []  # hwm=1: all wait here
    actions = s.task_done("t0", 0, success=True, now=TRIP_AND_RUN, run_time=RUN)
    assert [m for m, _ in assigned(actions)] == [f"q{i}" for i in range(FAST_LIMIT)]
    assert s.load(0) == FAST_LIMIT and s.queue_status()["unassigned"] == 20 - FAST_LIMIT


def test_prefetch_is_capped():
    s = TaskScheduler(seed=0)
    s.add_engine(0, now=0.0)
    s.submit("t0", now=0.0)
    submit_many(s, [f"q{i}" for i in range(PREFETCH_MAX + 10)], 0.0)
    s.task_done("t0", 0, success=True, now=1.0, run_time=0.0)  # instant tasks
    assert s.load(0) == 1 + PREFETCH_MAX


def test_prefetch_shrinks_and_stops_on_slow_tasks():
    s = warmed(1)
    submit_many(s, [f"q{i}" for i in range(30)], 1.0)
    assert s.load(0) == FAST_LIMIT
    # the head took a whole second: the EWMA is no longer under a quarter round trip
    actions = s.task_done("q0", 0, success=True, now=2.0, run_time=1.0)
    assert assigned(actions) == []  # the freed slot is not refilled
    assert s.load(0) == FAST_LIMIT - 1
    for i in range(1, FAST_LIMIT):  # it drains down to hwm before getting more
        actions = s.task_done(f"q{i}", 0, success=True, now=2.0 + i, run_time=1.0)
        assert len(assigned(actions)) == (1 if i == FAST_LIMIT - 1 else 0)
    assert s.load(0) == 1


@pytest.mark.parametrize("kw", [{"prefetch": False}, {"hwm": 0}])
def test_no_prefetch_when_off_or_unlimited(kw):
    s = warmed(1, **kw)
    submit_many(s, [f"q{i}" for i in range(30)], 1.0)
    assert s.load(0) == (30 if kw.get("hwm") == 0 else 1)
    assert not s.prefetch


def test_no_prefetch_without_run_times():
    s = TaskScheduler(seed=0)
    s.add_engine(0, now=0.0)
    s.submit("t0", now=0.0)
    submit_many(s, [f"q{i}" for i in range(5)], 0.0)
    for bad in (None, "fast", -1.0, float("nan"), True):
        s.task_done(s.queue_status()[0]["tasks"][0], 0, success=True, now=1.0, run_time=bad)
        assert s.load(0) == 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_prefetches_within_the_limit(scheme):
    s = warmed(2, scheme=scheme)
    submit_many(s, [f"q{i}" for i in range(40)], 1.0)
    assert s.load(0) == s.load(1) == FAST_LIMIT


# ----------------------------------------------------------------------------- stealing


def test_long_running_head_hands_back_its_prefetch():
    s, behind = long_task_with_prefetch_behind()
    due = s.next_deadline()
    assert due == pytest.approx(1.0 + LONG_MIN)
    assert s.tick(due - 0.001) == []
    actions = s.tick(due)
    assert steals(actions) == [(tuple(behind), 0)]
    assert s.tick(due + 1) == [] and s.next_deadline() is None  # asked once
    # the engine hands them all back: they wait here, ahead of anything newer, and
    # none goes back behind the long task (engine 0 holds hwm until it is done)
    actions = s.stolen(0, behind, now=due + 0.001)
    assert assigned(actions) == []
    assert s.queue_status()[0]["tasks"] == ["long"]
    assert submit_many(s, ["later"], due + 0.002) == []
    # engine 1's first answer shows it fast: it takes them all, oldest first
    actions = s.task_done("a", 1, success=True, now=due + 0.003, run_time=RUN)
    assert assigned(actions) == [(m, 1) for m in [*behind, "later"]]


def test_idle_engine_steals_half_of_what_waits_elsewhere_as_it_has_room():
    s = warmed(2)
    assert submit_many(s, ["x", "y"], 1.0) == [("x", 0), ("y", 1)]
    more = [f"q{i}" for i in range(8)]
    placed = submit_many(s, more, 1.0)
    on0 = [m for m, e in placed if e == 0]
    on1 = [m for m, e in placed if e == 1]
    assert len(on0) == len(on1) == 4
    # engine 1 finishes everything it holds soon (nothing has run long), nothing is queued
    actions = []
    for m in ["y", *on1]:
        actions = s.task_done(m, 1, success=True, now=1.001, run_time=RUN)
    assert steals(actions) == [(tuple(on0[-2:]), 0)]  # half of the 4 not begun, from the tail
    actions = s.stolen(0, on0[-2:], now=1.002)
    assert assigned(actions) == [(m, 1) for m in on0[-2:]]
    assert s.queue_status()[0]["tasks"] == ["x", *on0[:2]]


def test_idle_engine_takes_everything_behind_a_long_task():
    s, behind = long_task_with_prefetch_behind()
    s2, _ = long_task_with_prefetch_behind()
    # engine 1 (room for hwm=1) goes idle before the long task counts as long: one task
    assert steals(s2.task_done("a", 1, success=True, now=1.001, run_time=RUN)) == [((behind[-1],), 0)]
    # and after: all of them, and the long task's engine gets no more prefetch
    actions = s.task_done("a", 1, success=True, now=1.0 + LONG_MIN, run_time=RUN)
    assert steals(actions) == [(tuple(behind), 0)]
    assert assigned(s.stolen(0, behind, now=1.0 + LONG_MIN)) == [(m, 1) for m in behind]
    submit_many(s, ["more"], 1.0 + LONG_MIN)
    assert s.queue_status()[0]["tasks"] == ["long"]


def test_new_engine_steals_for_itself():
    s = warmed(1)
    s.submit("long", now=1.0)
    submit_many(s, [f"p{i}" for i in range(4)], 1.0)
    assert s.load(0) == 5
    actions = s.add_engine(7, now=1.001)
    assert steals(actions) == [(("p3",), 0)]  # as many as the new engine has room for (hwm)
    assert assigned(s.stolen(0, ["p3"], now=1.002)) == [("p3", 7)]


def test_steal_answer_keeps_begun_tasks_where_they_are():
    s, behind = long_task_with_prefetch_behind()
    (ids, _), = steals(s.tick(s.next_deadline()))
    first, rest = ids[0], list(ids[1:])
    s.stolen(0, rest, kept=[first], now=2.0)
    assert s.queue_status()[0]["tasks"] == ["long", first]
    # the handed-back ones wait here (engine 1 still holds "a"): aborting one needs no steal
    assert [type(a) for a in s.abort([rest[0]], now=2.1)] == [Fail]
    s.task_done("long", 0, success=True, now=3.0, run_time=2.0)
    s.task_done(first, 0, success=True, now=3.1, run_time=RUN)
    assert not s.is_pending(first)
    assert first == behind[0]


def test_a_task_is_never_both_run_and_stolen():
    s, behind = long_task_with_prefetch_behind()
    (ids, _), = steals(s.tick(s.next_deadline()))
    victim, other = ids[0], ids[1]
    # handed back and placed on engine 1 once it has room: a reply from engine 0 for it
    # (impossible from a correct engine) cannot count
    s.stolen(0, [victim], kept=[m for m in ids if m not in (victim, other)], now=2.0)
    assert [m for m, _ in assigned(s.task_done("a", 1, success=True, now=2.01, run_time=RUN))] == [victim]
    assert s.task_done(victim, 0, success=True, now=2.1, run_time=RUN) == []
    assert s.is_pending(victim) and s.queue_status()[1]["tasks"] == [victim]
    # a task that ran (its reply came first) is not placed again by a late steal answer
    s.task_done("long", 0, success=True, now=2.2, run_time=1.0)
    s.task_done(other, 0, success=True, now=2.3, run_time=RUN)
    assert not s.is_pending(other)
    assert s.stolen(0, [other], now=2.4) == []
    # nor is an id never asked for, or unknown
    asked_not = ids[2]  # kept above: no steal pending for it any more
    assert s.stolen(0, [asked_not, "nonsense"], now=2.5) == []
    assert s.queue_status()[0]["tasks"][0] == asked_not


def test_a_steal_answer_waits_for_the_replies_of_tasks_the_engine_forgot():
    # engine 0 ran "long", p0 and p1 (tasks 2 to 4 it began; "warm0" was 1), but their
    # replies are still on their way here when it answers; it remembers only its last
    # task (p1), so it names p0 among those it hands back, with p2..p6 (never begun)
    s, behind = long_task_with_prefetch_behind()
    (ids, _), = steals(s.tick(s.next_deadline()))
    assert list(ids) == behind
    p0, p1, rest = behind[0], behind[1], behind[2:]
    assert s.stolen(0, [p0, *rest], kept=[p1], now=2.0, begun=4, window=1) == []
    assert s.queue_status()[0]["tasks"] == ["long", *behind]  # nothing moves yet
    s.task_done("warm0", 0, success=True, now=2.1, run_time=RUN)  # a late duplicate: ignored
    assert s.replied(0, 1, now=2.1) == []
    # p0's reply overtakes the long task's (they come by two ways): still waiting for it
    s.task_done(p0, 0, success=True, now=2.2, run_time=RUN)
    assert s.replied(0, 3, now=2.2) == []
    assert s.task_done("long", 0, success=True, now=2.3, run_time=1.0) == []
    actions = s.replied(0, 2, now=2.3)
    # every reply of a task begun before the engine's window is in: p0 ran (done here),
    # p2..p6 did not, and go to engine 1 as soon as it has room
    assert not s.is_pending(p0) and assigned(actions) == []
    assert s.queue_status()[0]["tasks"] == [p1]
    assert assigned(s.task_done("a", 1, success=True, now=2.4, run_time=RUN)) == [(m, 1) for m in rest]


def test_a_steal_answer_does_not_wait_for_replies_for_ever():
    s, behind = long_task_with_prefetch_behind()
    s.tick(s.next_deadline())
    assert s.stolen(0, behind, now=2.0, begun=1_000, window=10) == []
    assert s.next_deadline() == 2.0 + ANSWER_WAIT_MAX
    assert s.tick(2.0 + ANSWER_WAIT_MAX - 0.5) == []
    s.tick(2.0 + ANSWER_WAIT_MAX)  # a reply lost: taken as it is
    assert s.queue_status()[0]["tasks"] == ["long"]
    assert s.queue_status()["unassigned"] == len(behind)
    assert s.next_deadline() is None


def test_a_steal_answer_is_taken_at_once_when_the_replies_are_in():
    s, behind = long_task_with_prefetch_behind()
    s.tick(s.next_deadline())
    s.replied(0, 1, now=1.9)
    s.stolen(0, behind, now=2.0, begun=2, window=1)  # "warm0" replied; "long" is remembered
    assert s.queue_status()[0]["tasks"] == ["long"]


def test_a_reply_that_never_comes_holds_answers_only_until_the_window_has_passed_it():
    s, behind = long_task_with_prefetch_behind()
    s.tick(s.next_deadline())
    for seq in range(2, 2 + STEAL_WINDOW):  # every reply but the first
        s.replied(0, seq, now=1.5)
    assert s.stolen(0, behind, now=2.0, begun=2 + STEAL_WINDOW, window=2) == []  # waits
    s.replied(0, 2 + STEAL_WINDOW, now=2.1)  # one more: reply 1 is given up
    assert s.queue_status()[0]["tasks"] == ["long"]


def test_constrained_tasks_are_stolen_only_by_engines_they_may_run_on():
    s = warmed(1, fresh=1)
    assert submit_many(s, ["long", "a"], 1.0) == [("long", 0), ("a", 1)]
    for i in range(3):
        assert assigned(s.submit(f"pinned{i}", targets=[0], now=1.0)) == [(f"pinned{i}", 0)]
    assert submit_many(s, ["free"], 1.0) == [("free", 0)]
    actions = s.task_done("a", 1, success=True, now=1.0 + LONG_MIN, run_time=RUN)
    assert steals(actions) == [(("free",), 0)]  # idle engine 1 may run only that one


@pytest.mark.parametrize("how", ["abort", "timeout"])
def test_stopping_a_prefetched_task_asks_for_it_back_first(how):
    s, behind = long_task_with_prefetch_behind()
    if how == "abort":
        target, ename = behind[-1], "TaskAborted"
        actions = s.abort([target], now=1.001)
    else:
        s.task_done(behind[0], 0, success=True, now=1.001, run_time=RUN)  # room for one more
        target, ename = "timed", "TaskTimeout"
        assert assigned(s.submit("timed", timeout=0.01, now=1.002)) == [("timed", 0)]
        actions = s.tick(1.012)
    assert [type(a) for a in actions] == [Steal, Interrupt]  # it cannot start after the interrupt
    assert steals(actions) == [((target,), 0)]
    assert failed(s.stolen(0, [target], now=1.02)) == {target: ename}
    assert not s.is_pending(target)


def test_stopping_a_begun_prefetched_task_interrupts_it():
    s, behind = long_task_with_prefetch_behind()
    actions = s.abort([behind[0]], now=1.001)
    assert [type(a) for a in actions] == [Steal, Interrupt]
    assert s.stolen(0, [], kept=[behind[0]], now=1.002) == []
    # the engine's reply to the interrupted task finishes it (no retry)
    s.task_done("long", 0, success=True, now=1.003, run_time=1.0)
    s.task_done(behind[0], 0, success=False, now=1.004, run_time=RUN)
    assert not s.is_pending(behind[0])


def test_stopping_the_head_only_interrupts():
    s, _ = long_task_with_prefetch_behind()
    assert [type(a) for a in s.abort(["long"], now=1.001)] == [Interrupt]


def test_prefetched_tasks_of_a_dead_engine_retry_or_fail_like_its_running_one():
    s = warmed(1, fresh=1)
    assert submit_many(s, ["long", "a"], 1.0) == [("long", 0), ("a", 1)]
    retried = [f"r{i}" for i in range(3)]
    for m in retried:
        assert assigned(s.submit(m, retries=1, now=1.0)) == [(m, 0)]
    plain = "plain"
    assert submit_many(s, [plain], 1.0) == [(plain, 0)]
    actions = s.remove_engine(0, now=1.5)
    # begun or not, nobody can tell once the engine is gone: retries decide
    assert failed(actions) == {"long": "EngineError", plain: "EngineError"}
    assert all(s.is_pending(m) for m in retried)
    assert assigned(actions) == []  # engine 1 is full; they wait for it
    s.task_done("a", 1, success=True, now=1.6, run_time=RUN)
    assert s.queue_status()[1]["tasks"][0] == retried[0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_idle_engine_goes_before_a_prefetch_place_in_every_scheme(scheme):
    s = warmed(2, scheme=scheme)
    assert len(submit_many(s, ["x"], 1.0)) == 1
    busy = 0 if s.queue_status()[0]["tasks"] else 1
    idle = 1 - busy
    for i in range(5):
        # the busy engine has prefetch room, the other one has nothing: it gets the task
        assert submit_many(s, [f"t{i}"], 1.0) == [(f"t{i}", idle)]
        s.task_done(f"t{i}", idle, success=True, now=1.0, run_time=RUN)
    pinned = assigned(s.submit("pinned", targets=[0, 1], now=1.0))
    assert pinned == [("pinned", idle)]


def test_handed_back_constrained_tasks_keep_their_constraints():
    s = warmed(1, fresh=1)
    assert submit_many(s, ["long", "a"], 1.0) == [("long", 0), ("a", 1)]
    both = [f"both{i}" for i in range(3)]
    for m in both:
        assert assigned(s.submit(m, targets=[0, 1], now=1.0)) == [(m, 0)]
    assert assigned(s.submit("only0", targets=[0], now=1.0)) == [("only0", 0)]
    (ids, _), = steals(s.tick(s.next_deadline()))
    assert list(ids) == [*both, "only0"]
    assert s.stolen(0, list(ids), now=1.1) == []  # nobody has room: they wait here
    actions = s.task_done("a", 1, success=True, now=1.2, run_time=RUN)
    assert assigned(actions) == [(m, 1) for m in both]  # "only0" may not run on engine 1
    actions = s.task_done("long", 0, success=True, now=2.0, run_time=1.0)
    assert assigned(actions) == [("only0", 0)]


# ---- claims: tasks a client sent straight to an engine it believed idle ----------------


def test_a_claim_runs_where_it_went_and_counts_there():
    s = warmed(2)
    assert s.takes_claims
    assert s.claim("c1", 1, now=1.0) == []  # no Assign: the engine has it already
    assert s.load(1) == 1
    assert assigned(s.submit("t1", now=1.0)) == [("t1", 0)]  # least load: not engine 1
    assert s.task_done("c1", 1, success=True, now=1.1, run_time=RUN) == []
    assert s.load(1) == 0 and not s.is_pending("c1")
    with pytest.raises(ValueError, match="already submitted"):
        s.claim("t1", 1, now=1.2)
    with pytest.raises(ValueError, match="not live"):
        s.claim("c2", 7, now=1.2)


def test_a_claim_that_meets_other_tasks_asks_them_all_back_and_places_those_not_begun():
    s = warmed(2)
    assert assigned(s.submit("t1", now=1.0)) == [("t1", 0)]
    assert steals(s.claim("c1", 0, now=1.0)) == [(("t1", "c1"), 0)]
    # engine 0 had begun the claim: the other task goes to the idle engine
    assert assigned(s.stolen(0, ["t1"], kept=["c1"], now=1.1)) == [("t1", 1)]
    assert s.load(0) == 1 and s.load(1) == 1


def test_queued_claims_stack_on_an_engine_until_its_head_runs_long():
    """A client places queued claims behind its own (lone=False): nothing is asked back
    until the engine's head task has run long; then everything not begun is, and so is
    each claim that lands there while that task runs."""
    s = warmed(2)
    assert s.claim("long", 0, now=1.0) == []
    assert s.claim("q1", 0, now=1.0, lone=False) == []
    assert s.claim("q2", 0, now=1.0, lone=False) == []
    assert s.load(0) == 3
    due = s.next_deadline()
    assert due == pytest.approx(1.0 + LONG_MIN)
    assert steals(s.tick(due)) == [(("q1", "q2"), 0)]
    assert assigned(s.stolen(0, ["q1", "q2"], now=due)) == [("q1", 1), ("q2", 1)]
    assert steals(s.claim("q3", 0, now=due, lone=False)) == [(("long", "q3"), 0)]
    assert assigned(s.stolen(0, ["q3"], kept=["long"], now=due)) == [("q3", 1)]
    assert s.load(0) == 1 and s.load(1) == 3


def test_claims_have_the_schedulers_hwm():
    assert TaskScheduler().claim_hwm == 1
    assert TaskScheduler(hwm=2).claim_hwm == 2
    assert TaskScheduler("lru").claim_hwm == 0


def test_claims_only_with_least_load_and_stealing():
    assert not TaskScheduler("lru").takes_claims
    assert not TaskScheduler(hwm=0).takes_claims
    assert not TaskScheduler(prefetch=False).takes_claims
