"""Unit tests of the pure task scheduler state machine (no sockets, no clock)."""

from __future__ import annotations

import pytest

from ipyparallel_lite.controller.scheduler import (
    SCHEMES,
    Assign,
    Fail,
    Interrupt,
    TaskScheduler,
)

# ----------------------------------------------------------------------------- helpers


def assigned(actions: list) -> list[tuple[str, int]]:
    return [(a.msg_id, a.engine_id) for a in actions if isinstance(a, Assign)]


def failed(actions: list) -> dict[str, str]:
    return {a.msg_id: a.ename for a in actions if isinstance(a, Fail)}


def interrupts(actions: list) -> list[tuple[str, int, str]]:
    return [(a.msg_id, a.engine_id, a.ename) for a in actions if isinstance(a, Interrupt)]


def sched(n_engines: int = 0, scheme: str = "leastload", hwm: int = 1, seed: int | None = 0) -> TaskScheduler:
    s = TaskScheduler(scheme, hwm=hwm, seed=seed)
    for e in range(n_engines):
        assert s.add_engine(e) == []
    return s


def run(s: TaskScheduler, msg_id: str, **kw) -> int:
    """Submit a task that must be assigned at once; return its engine."""
    actions = s.submit(msg_id, now=kw.pop("now", 0.0), **kw)
    (a,) = assigned(actions)
    assert a[0] == msg_id
    return a[1]


def done(s: TaskScheduler, msg_id: str, engine: int, success: bool = True, **kw) -> list:
    return s.task_done(msg_id, engine, success=success, now=kw.pop("now", 0.0), **kw)


class ScriptedRng:
    """Stand-in for random.Random returning scripted randrange values."""

    def __init__(self, values: list[int]) -> None:
        self.values = list(values)

    def randrange(self, n: int) -> int:
        v = self.values.pop(0)
        assert v < n
        return v


# ----------------------------------------------------------------------------- construction


def test_unknown_scheme_names_the_valid_ones():
    with pytest.raises(ValueError) as exc:
        TaskScheduler("fastest")
    for name in SCHEMES:
        assert name in str(exc.value)


@pytest.mark.parametrize("hwm", [-1, 1.5, "2", True])
def test_bad_hwm_rejected(hwm):
    with pytest.raises(ValueError):
        TaskScheduler(hwm=hwm)


def test_defaults_and_scheme_attribute():
    s = TaskScheduler()
    assert s.scheme == "leastload" and s.hwm == 1
    assert s.engines == []
    assert s.next_deadline() is None


# ----------------------------------------------------------------------------- basics


def test_submit_assigns_immediately_with_free_engine():
    s = sched(2)
    assert s.submit("a", now=0.0) == [Assign("a", 0)]
    assert s.load(0) == 1 and s.load(1) == 0
    assert s.is_pending("a")
    assert done(s, "a", 0) == []
    assert not s.is_pending("a")
    assert s.load(0) == 0


def test_no_engines_task_waits_then_runs_when_engine_arrives():
    s = sched(0)
    assert s.submit("a", now=0.0) == []
    assert s.submit("b", now=0.0) == []
    assert s.queue_status() == {"unassigned": 2}
    assert s.add_engine(3) == [Assign("a", 3)]
    assert s.add_engine(4) == [Assign("b", 4)]
    assert s.queue_status() == {"unassigned": 0, 3: {"tasks": ["a"]}, 4: {"tasks": ["b"]}}


def test_add_engine_twice_is_idempotent_and_remove_unknown_is_noop():
    s = sched(1)
    assert s.add_engine(0) == []
    assert s.engines == [0]
    assert s.remove_engine(7, now=0.0) == []


def test_hwm1_queues_in_fifo_order():
    s = sched(1)
    assert run(s, "t0") == 0
    for i in range(1, 5):
        assert s.submit(f"t{i}", now=0.0) == []
    order = []
    current = "t0"
    for _ in range(4):
        (nxt,) = assigned(done(s, current, 0))
        order.append(nxt[0])
        current = nxt[0]
    assert order == ["t1", "t2", "t3", "t4"]


def test_hwm2_allows_two_outstanding_per_engine():
    s = sched(2, hwm=2)
    engines = [run(s, f"t{i}") for i in range(4)]
    assert sorted(engines) == [0, 0, 1, 1]
    assert s.submit("t4", now=0.0) == []
    assert s.load(0) == 2 and s.load(1) == 2
    assert assigned(done(s, "t1", engines[1])) == [("t4", engines[1])]


def test_hwm0_is_unlimited_and_leastload_spreads():
    s = sched(3, hwm=0)
    engines = [run(s, f"t{i}") for i in range(9)]
    assert [s.load(e) for e in range(3)] == [3, 3, 3]
    assert engines[:3] == [0, 1, 2]


def test_hwm0_with_no_engines_first_engine_takes_everything():
    s = sched(0, hwm=0)
    for i in range(5):
        s.submit(f"t{i}", now=0.0)
    assert len(assigned(s.add_engine(0))) == 5


def test_duplicate_msg_id_rejected():
    s = sched(1)
    s.submit("a", now=0.0)
    with pytest.raises(ValueError):
        s.submit("a", now=0.0)
    done(s, "a", 0)
    with pytest.raises(ValueError):
        s.submit("a", now=0.0)


@pytest.mark.parametrize("retries", [-1, 1.5, "3"])
def test_bad_retries_rejected(retries):
    with pytest.raises(ValueError):
        sched(1).submit("a", retries=retries, now=0.0)


def test_task_done_for_unknown_or_wrong_engine_is_ignored():
    s = sched(2)
    assert done(s, "nope", 0) == []
    e = run(s, "a")
    assert done(s, "a", 1 - e) == []
    assert s.is_pending("a")
    assert done(s, "a", e) == []
    assert done(s, "a", e) == []  # duplicate reply


def test_queue_status_and_load():
    s = sched(2)
    run(s, "a")
    run(s, "b")
    s.submit("c", now=0.0)
    st = s.queue_status()
    assert st["unassigned"] == 1
    assert st[0] == {"tasks": ["a"]} and st[1] == {"tasks": ["b"]}
    assert s.load(5) == 0


# ----------------------------------------------------------------------------- schemes


def test_leastload_picks_fewest_outstanding_ties_lowest_id():
    s = sched(3, hwm=0)
    # load engine 0 with 2 tasks, engine 1 with 1, engine 2 with 0 via targets
    run(s, "x0", targets=[0])
    run(s, "x1", targets=[0])
    run(s, "y0", targets=[1])
    assert run(s, "a") == 2
    # now loads 2,1,1 -> tie between 1 and 2 goes to the lowest id
    assert run(s, "b") == 1
    done(s, "x0", 0)
    done(s, "x1", 0)
    assert run(s, "c") == 0


def test_lru_picks_least_recently_used():
    s = sched(3, scheme="lru", hwm=0)
    assert [run(s, f"t{i}") for i in range(3)] == [0, 1, 2]
    # engine 0 used again via targets: now 1 is least recently used
    run(s, "pin", targets=[0])
    assert run(s, "a") == 1
    assert run(s, "b") == 2
    assert run(s, "c") == 0


def test_lru_new_engine_is_first_in_line():
    s = sched(2, scheme="lru", hwm=0)
    run(s, "a")
    run(s, "b")
    s.add_engine(9)
    assert run(s, "c") == 9


def test_lru_skips_full_engines():
    s = sched(2, scheme="lru", hwm=1)
    assert run(s, "a") == 0
    assert run(s, "b") == 1
    done(s, "a", 0)
    assert run(s, "c") == 0  # 1 is older but full


def test_plainrandom_reproducible_with_seed_and_covers_engines():
    def choices(seed):
        s = sched(4, scheme="plainrandom", hwm=0, seed=seed)
        return [run(s, f"t{i}") for i in range(40)]

    assert choices(5) == choices(5)
    assert set(choices(5)) == {0, 1, 2, 3}


def test_plainrandom_only_picks_engines_with_room():
    s = sched(3, scheme="plainrandom", hwm=1, seed=1)
    picked = {run(s, f"t{i}") for i in range(3)}
    assert picked == {0, 1, 2}
    assert s.submit("t3", now=0.0) == []


def test_twobin_takes_the_less_recently_used_of_two_draws():
    s = sched(3, scheme="twobin", hwm=0)
    # make last-use order 2 (oldest), 0, 1 (newest)
    run(s, "p2", targets=[2])
    run(s, "p0", targets=[0])
    run(s, "p1", targets=[1])
    free = list(s._chooser.free)  # engines with room, in the chooser's order
    i0, i1, i2 = free.index(0), free.index(1), free.index(2)
    s._rng = ScriptedRng([i1, i0, i0, i2, i1, i1])
    assert run(s, "a") == 0  # draws 1 and 0: 0 is older
    assert run(s, "b") == 2  # draws 0 (now newest) and 2
    assert run(s, "c") == 1  # same engine drawn twice


def test_weighted_strongly_prefers_idle_engines():
    for seed in range(20):
        s = sched(2, scheme="weighted", hwm=0, seed=seed)
        for i in range(3):
            run(s, f"busy{i}", targets=[0])
        # weights 1e6 (idle) vs 1/3: both draws land on the busy engine ~never
        assert run(s, "t") == 1


def test_weighted_takes_the_less_loaded_of_two_draws():
    s = sched(3, scheme="weighted", hwm=0, seed=0)
    for i in range(4):
        run(s, f"b0{i}", targets=[0])
    for i in range(2):
        run(s, f"b1{i}", targets=[1])
    run(s, "b2", targets=[2])
    picks = [s._chooser.pick_from([0, 1, 2]) for _ in range(300)]
    # loads 4, 2, 1: inverse-load draws favour engine 2, then 1
    assert picks.count(2) > picks.count(1) > picks.count(0)


def test_weighted_reproducible():
    def choices(seed):
        s = sched(3, scheme="weighted", hwm=0, seed=seed)
        return [run(s, f"t{i}") for i in range(30)]

    assert choices(11) == choices(11)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("hwm", [1, 2])
def test_every_scheme_respects_hwm_and_drains(scheme, hwm):
    s = sched(3, scheme=scheme, hwm=hwm, seed=7)
    pending = []
    for i in range(50):
        pending += assigned(s.submit(f"t{i}", now=0.0))
        assert all(s.load(e) <= hwm for e in range(3))
    finished = 0
    while pending:
        msg_id, e = pending.pop(0)
        pending += assigned(done(s, msg_id, e))
        assert all(s.load(e) <= hwm for e in range(3))
        finished += 1
    assert finished == 50
    assert s.queue_status()["unassigned"] == 0


# ----------------------------------------------------------------------------- after


def test_chain_with_after():
    s = sched(2)
    ea = run(s, "A")
    assert s.submit("B", after=["A"], now=0.0) == []
    assert s.submit("C", after=["B"], now=0.0) == []
    (b,) = assigned(done(s, "A", ea))
    assert b[0] == "B"
    (c,) = assigned(done(s, "B", b[1]))
    assert c[0] == "C"
    assert done(s, "C", c[1]) == []


def test_after_already_finished_runs_at_once():
    s = sched(1)
    done(s, "A", run(s, "A"))
    assert run(s, "B", after=["A"]) == 0


def test_fan_in_waits_for_all():
    s = sched(4, hwm=0)
    for n in "ABC":
        run(s, n)
    assert s.submit("D", after=["A", "B", "C"], now=0.0) == []
    assert done(s, "A", 0) == []
    assert done(s, "C", 2) == []
    assert assigned(done(s, "B", 1))[0][0] == "D"


def test_after_any_runs_after_first():
    s = sched(3, hwm=0)
    run(s, "A")
    run(s, "B")
    assert s.submit("C", after={"dependencies": ["A", "B"], "all": False}, now=0.0) == []
    assert assigned(done(s, "B", 1))[0][0] == "C"
    assert done(s, "A", 0) == []  # no double release


def test_failure_makes_default_dependents_impossible_and_propagates():
    s = sched(2)
    ea = run(s, "A")
    s.submit("B", after=["A"], now=0.0)
    s.submit("C", after=["B"], now=0.0)
    s.submit("D", after=["C"], now=0.0)
    out = done(s, "A", ea, success=False)
    assert failed(out) == {"B": "ImpossibleDependency", "C": "ImpossibleDependency",
                           "D": "ImpossibleDependency"}
    b_fail = next(a for a in out if a.msg_id == "B")
    assert "A" in b_fail.evalue and "failed" in b_fail.evalue
    assert not any(s.is_pending(m) for m in "BCD")


def test_failure_flag_runs_only_on_failure():
    s = sched(2)
    run(s, "A")
    run(s, "B")
    on_fail = {"dependencies": ["A"], "success": False, "failure": True}
    s.submit("onA", after=on_fail, now=0.0)
    s.submit("onB", after={"dependencies": ["B"], "success": False, "failure": True}, now=0.0)
    assert failed(done(s, "A", 0, success=True)) == {"onA": "ImpossibleDependency"}
    assert [m for m, _ in assigned(done(s, "B", 1, success=False))] == ["onB"]


def test_success_and_failure_both_count():
    s = sched(1)
    run(s, "A")
    s.submit("B", after={"dependencies": ["A"], "success": True, "failure": True}, now=0.0)
    assert assigned(done(s, "A", 0, success=False)) == [("B", 0)]


def test_any_with_one_failure_waits_for_the_other():
    s = sched(2)
    run(s, "A")
    run(s, "B")
    s.submit("C", after={"dependencies": ["A", "B"], "all": False}, now=0.0)
    assert done(s, "A", 0, success=False) == []
    assert s.is_pending("C")
    assert failed(done(s, "B", 1, success=False)) == {"C": "ImpossibleDependency"}


def test_propagated_failure_counts_for_failure_tolerant_grandchild():
    s = sched(1)
    run(s, "A")
    s.submit("B", after=["A"], now=0.0)
    s.submit("C", after={"dependencies": ["B"], "failure": True}, now=0.0)
    out = done(s, "A", 0, success=False)
    assert failed(out) == {"B": "ImpossibleDependency"}
    assert assigned(out) == [("C", 0)]


def test_dependency_already_failed_is_impossible_at_submit():
    s = sched(1)
    done(s, "A", run(s, "A"), success=False)
    out = s.submit("B", after=["A"], now=0.0)
    assert failed(out) == {"B": "ImpossibleDependency"}
    # B counts as failed for its own dependents
    assert failed(s.submit("C", after=["B"], now=0.0)) == {"C": "ImpossibleDependency"}


def test_after_with_targets_and_dependency():
    s = sched(2)
    run(s, "A")
    s.submit("B", after=["A"], targets=[1], now=0.0)
    assert assigned(done(s, "A", 0)) == [("B", 1)]


def test_long_failing_chain_does_not_recurse():
    s = sched(1)
    run(s, "t0")
    for i in range(1, 5000):
        s.submit(f"t{i}", after=[f"t{i - 1}"], now=0.0)
    out = done(s, "t0", 0, success=False)
    assert len(failed(out)) == 4999


def test_long_succeeding_chain():
    s = sched(2)
    run(s, "t0")
    for i in range(1, 2000):
        s.submit(f"t{i}", after=[f"t{i - 1}"], now=0.0)
    current, e = "t0", 0
    for i in range(1, 2000):
        ((current, e),) = assigned(done(s, current, e))
        assert current == f"t{i}"


# ----------------------------------------------------------------------------- invalid


def test_self_dependency_is_invalid():
    s = sched(1)
    out = s.submit("A", after=["A"], now=0.0)
    assert failed(out) == {"A": "InvalidDependency"}
    assert "itself" in out[0].evalue
    assert failed(sched(1).submit("A", follow=["A"], now=0.0)) == {"A": "InvalidDependency"}


def test_unknown_dependency_is_invalid():
    s = sched(1)
    out = s.submit("B", after=["ghost"], now=0.0)
    assert failed(out) == {"B": "InvalidDependency"}
    assert "ghost" in out[0].evalue
    assert not s.is_pending("B")
    # an invalid task counts as failed for later dependents
    assert failed(s.submit("C", after=["B"], now=0.0)) == {"C": "ImpossibleDependency"}


@pytest.mark.parametrize("spec", [
    {"dependencies": ["A"], "success": False, "failure": False},
    [1, 2],
    {"dependencies": 5},
    {"dependencies": ["A"], "all": "yes"},
])
def test_malformed_dependency_is_invalid(spec):
    s = sched(1)
    run(s, "A")
    assert failed(s.submit("B", after=spec, now=0.0)) == {"B": "InvalidDependency"}


def test_empty_dependency_is_met():
    s = sched(1)
    assert run(s, "B", after=[], follow={"dependencies": []}) == 0


def test_depend_on_direct_task_via_note_pending_and_record_result():
    s = sched(2)
    s.note_pending("direct")
    assert s.submit("B", after=["direct"], now=0.0) == []
    assert assigned(s.record_result("direct", 1, True)) == [("B", 0)]


def test_record_result_failure_makes_dependent_impossible():
    s = sched(2)
    s.note_pending("direct")
    s.submit("B", after=["direct"], now=0.0)
    assert failed(s.record_result("direct", 1, False)) == {"B": "ImpossibleDependency"}


def test_record_result_without_note_pending_is_a_known_dependency():
    s = sched(2)
    assert s.record_result("direct", 1, True) == []
    assert run(s, "B", follow=["direct"]) == 1
    assert s.record_result("direct", 1, True) == []  # duplicate ignored


def test_record_result_for_own_task_is_ignored():
    s = sched(1)
    run(s, "A")
    assert s.record_result("A", 0, True) == []
    assert s.is_pending("A")


def test_forget_makes_dependency_unknown():
    s = sched(1)
    done(s, "A", run(s, "A"))
    s.note_pending("direct")
    s.forget(["A", "direct"])
    assert failed(s.submit("B", after=["A"], now=0.0)) == {"B": "InvalidDependency"}
    assert failed(s.submit("C", after=["direct"], now=0.0)) == {"C": "InvalidDependency"}
    s.forget("never-existed")


def test_forget_does_not_touch_unfinished_tasks():
    s = sched(1)
    run(s, "A")
    s.forget(["A"])
    assert s.is_pending("A")
    assert s.submit("B", after=["A"], now=0.0) == []  # A is still a known dependency


# ----------------------------------------------------------------------------- follow


def test_follow_pins_to_the_engine_where_dependency_ran():
    s = sched(3)
    ea = run(s, "A", targets=[2])
    done(s, "A", ea)
    assert run(s, "B", follow=["A"]) == 2


def test_follow_waits_for_its_engine_even_if_others_are_free():
    s = sched(2)
    done(s, "A", run(s, "A", targets=[1]))
    run(s, "busy", targets=[1])
    assert s.submit("B", follow=["A"], now=0.0) == []
    assert s.queue_status()["unassigned"] == 1
    assert run(s, "other") == 0  # engine 0 still serves unconstrained tasks
    assert done(s, "other", 0) == []
    assert assigned(done(s, "busy", 1)) == [("B", 1)]


def test_follow_waits_for_dependency_to_finish():
    s = sched(2)
    run(s, "A", targets=[1])
    assert s.submit("B", follow=["A"], now=0.0) == []
    assert assigned(done(s, "A", 1)) == [("B", 1)]


def test_follow_all_on_different_engines_is_impossible():
    s = sched(2)
    done(s, "A", run(s, "A", targets=[0]))
    done(s, "B", run(s, "B", targets=[1]))
    out = s.submit("C", follow=["A", "B"], now=0.0)
    assert failed(out) == {"C": "ImpossibleDependency"}
    assert "different engines" in out[0].evalue


def test_follow_all_becomes_impossible_when_second_lands_elsewhere():
    s = sched(2, hwm=0)
    run(s, "A", targets=[0])
    run(s, "B", targets=[1])
    s.submit("C", follow=["A", "B"], now=0.0)
    assert done(s, "A", 0) == []
    assert failed(done(s, "B", 1)) == {"C": "ImpossibleDependency"}


def test_follow_all_same_engine_runs_there():
    s = sched(3, hwm=0)
    run(s, "A", targets=[1])
    run(s, "B", targets=[1])
    s.submit("C", follow=["A", "B"], now=0.0)
    done(s, "A", 1)
    assert assigned(done(s, "B", 1)) == [("C", 1)]


def test_follow_any_runs_where_one_ran():
    s = sched(3, hwm=0)
    done(s, "A", run(s, "A", targets=[1]))
    done(s, "B", run(s, "B", targets=[2]))
    e = run(s, "C", follow={"dependencies": ["A", "B"], "all": False})
    assert e in (1, 2)


def test_follow_failed_dependency_default_is_impossible():
    s = sched(2)
    done(s, "A", run(s, "A", targets=[1]), success=False)
    assert failed(s.submit("B", follow=["A"], now=0.0)) == {"B": "ImpossibleDependency"}


def test_follow_failed_dependency_with_failure_flag_runs_there():
    s = sched(2)
    done(s, "A", run(s, "A", targets=[1]), success=False)
    assert run(s, "B", follow={"dependencies": ["A"], "failure": True}) == 1


def test_follow_dependency_that_never_ran_has_no_location():
    s = sched(0)
    s.submit("A", now=0.0)
    s.abort(["A"], now=0.0)
    s.add_engine(0)
    out = s.submit("B", follow={"dependencies": ["A"], "failure": True}, now=0.0)
    assert failed(out) == {"B": "ImpossibleDependency"}
    # as a time dependency the same failure counts
    assert run(s, "C", after={"dependencies": ["A"], "failure": True}) == 0


def test_follow_and_targets_disjoint_is_impossible():
    s = sched(2)
    done(s, "A", run(s, "A", targets=[0]))
    assert failed(s.submit("B", follow=["A"], targets=[1], now=0.0)) == {"B": "ImpossibleDependency"}


def test_follow_to_dead_engine_at_submit_is_impossible():
    s = sched(2)
    done(s, "A", run(s, "A", targets=[1]))
    s.remove_engine(1, now=0.0)
    out = s.submit("B", follow=["A"], now=0.0)
    assert failed(out) == {"B": "ImpossibleDependency"}
    assert "live engines: [0]" in out[0].evalue


def test_waiting_follow_task_fails_when_its_engine_dies():
    s = sched(2)
    done(s, "A", run(s, "A", targets=[1]))
    run(s, "busy", targets=[1])
    s.submit("B", follow=["A"], now=0.0)
    out = s.remove_engine(1, now=0.0)
    assert failed(out) == {"B": "ImpossibleDependency", "busy": "EngineError"}


def test_follow_all_partially_done_on_dead_engine_fails_early():
    s = sched(2, hwm=0)
    done(s, "A", run(s, "A", targets=[1]))
    run(s, "B", targets=[0])
    s.submit("C", follow=["A", "B"], now=0.0)
    assert failed(s.remove_engine(1, now=0.0)) == {"C": "ImpossibleDependency"}


def test_follow_and_after_combined():
    s = sched(2, hwm=0)
    done(s, "A", run(s, "A", targets=[1]))
    run(s, "B", targets=[0])
    s.submit("C", follow=["A"], after=["B"], now=0.0)
    assert assigned(done(s, "B", 0)) == [("C", 1)]


# ----------------------------------------------------------------------------- targets


def test_targets_restrict_engines():
    s = sched(3)
    assert run(s, "a", targets=[2]) == 2
    assert run(s, "b", targets=[1, 2]) == 1


def test_targets_accept_numeric_strings_and_single_int():
    s = sched(3)
    assert run(s, "a", targets=["2"]) == 2
    assert run(s, "b", targets=1) == 1


@pytest.mark.parametrize("targets", [["x"], [None], "0", [1.5j]])
def test_bad_targets_rejected(targets):
    with pytest.raises(ValueError):
        sched(2).submit("a", targets=targets, now=0.0)


def test_empty_targets_means_any():
    assert run(sched(1), "a", targets=[]) == 0


def test_targets_not_registered_fail_with_live_ids():
    s = sched(2)
    out = s.submit("a", targets=[5, 6], now=0.0)
    assert failed(out) == {"a": "ImpossibleDependency"}
    assert "[5, 6]" in out[0].evalue and "[0, 1]" in out[0].evalue


def test_targets_with_no_engines_wait_for_that_engine():
    s = sched(0)
    assert s.submit("a", targets=[1], now=0.0) == []
    assert s.add_engine(0) == []
    assert s.add_engine(1) == [Assign("a", 1)]


def test_targeted_task_waits_for_busy_target_not_other_engines():
    s = sched(2)
    run(s, "busy", targets=[1])
    assert s.submit("a", targets=[1], now=0.0) == []
    assert s.submit("b", now=0.0) == [Assign("b", 0)]
    assert assigned(done(s, "b", 0)) == []
    assert assigned(done(s, "busy", 1)) == [("a", 1)]


def test_queued_tasks_keep_fifo_across_shared_and_engine_queues():
    s = sched(1)
    run(s, "first")
    s.submit("q1", now=0.0)
    s.submit("q2", targets=[0], now=0.0)
    s.submit("q3", now=0.0)
    order = []
    current = "first"
    for _ in range(3):
        ((current, _e),) = assigned(done(s, current, 0))
        order.append(current)
    assert order == ["q1", "q2", "q3"]


def test_waiting_task_targeting_only_dead_engine_fails():
    s = sched(2)
    run(s, "A", targets=[0])
    s.submit("B", after=["A"], targets=[1], now=0.0)
    out = s.remove_engine(1, now=0.0)
    assert failed(out) == {"B": "ImpossibleDependency"}


def test_queued_task_targeting_only_dead_engine_fails_even_if_no_engine_left():
    s = sched(1)
    run(s, "busy")
    s.submit("B", targets=[0], now=0.0)
    out = s.remove_engine(0, now=0.0)
    assert failed(out) == {"B": "ImpossibleDependency", "busy": "EngineError"}


def test_targeted_task_survives_death_of_one_target():
    s = sched(3)
    run(s, "b0", targets=[0])
    run(s, "b1", targets=[1])
    s.submit("a", targets=[0, 1], now=0.0)
    out = s.remove_engine(0, now=0.0)
    assert failed(out) == {"b0": "EngineError"}
    assert assigned(done(s, "b1", 1)) == [("a", 1)]


# ----------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("timeout", [-1, -0.5, float("nan"), "5"])
def test_bad_timeout_rejected(timeout):
    with pytest.raises(ValueError):
        sched(1).submit("a", timeout=timeout, now=0.0)


def test_zero_timeout_means_none():
    s = sched(0)
    s.submit("a", timeout=0, now=0.0)
    assert s.next_deadline() is None
    assert s.tick(1e9) == []


def test_waiting_task_times_out():
    s = sched(1)
    run(s, "A")
    s.submit("B", after=["A"], timeout=5, now=100.0)
    assert s.next_deadline() == 105.0
    assert s.tick(104.9) == []
    out = s.tick(105.0)
    assert failed(out) == {"B": "TaskTimeout"}
    assert "5s" in out[0].evalue and "dependencies" in out[0].evalue
    assert s.next_deadline() is None
    assert done(s, "A", 0) == []  # B is gone


def test_queued_task_times_out_waiting_for_engine():
    s = sched(0)
    s.submit("a", timeout=1.5, now=0.0)
    out = s.tick(2.0)
    assert failed(out) == {"a": "TaskTimeout"}
    assert "free engine" in out[0].evalue
    assert s.add_engine(0) == []


def test_timeout_of_waiting_task_propagates_to_dependents():
    s = sched(1)
    run(s, "A")
    s.submit("B", after=["A"], timeout=1, now=0.0)
    s.submit("C", after=["B"], now=0.0)
    assert failed(s.tick(1.0)) == {"B": "TaskTimeout", "C": "ImpossibleDependency"}


def test_running_task_timeout_interrupts_and_is_not_retried():
    s = sched(2)
    e = run(s, "a", timeout=2, retries=3, now=10.0)
    assert s.tick(11.0) == []
    assert interrupts(s.tick(12.0)) == [("a", e, "TaskTimeout")]
    assert s.tick(13.0) == []  # once only
    assert done(s, "a", e, success=False, now=12.1) == []
    assert not s.is_pending("a")


def test_deadline_of_finished_task_is_dropped():
    s = sched(1)
    done(s, "a", run(s, "a", timeout=5))
    assert s.next_deadline() is None
    assert s.tick(100.0) == []


def test_next_deadline_is_the_earliest():
    s = sched(0)
    s.submit("a", timeout=10, now=0.0)
    s.submit("b", timeout=3, now=1.0)
    s.submit("c", now=0.0)
    assert s.next_deadline() == 4.0
    s.abort(["b"], now=2.0)
    assert s.next_deadline() == 10.0


def test_interrupted_task_on_dying_engine_fails_with_its_reason():
    s = sched(1)
    run(s, "a", timeout=1)
    s.tick(1.0)
    assert failed(s.remove_engine(0, now=2.0)) == {"a": "TaskTimeout"}


# ----------------------------------------------------------------------------- abort


def test_abort_waiting_task_and_propagate():
    s = sched(1)
    run(s, "A")
    s.submit("B", after=["A"], now=0.0)
    s.submit("C", after=["B"], now=0.0)
    out = s.abort(["B"], now=0.0)
    assert failed(out) == {"B": "TaskAborted", "C": "ImpossibleDependency"}
    assert done(s, "A", 0) == []


def test_abort_queued_task_never_runs():
    s = sched(0)
    s.submit("a", now=0.0)
    s.submit("b", now=0.0)
    assert failed(s.abort("a", now=0.0)) == {"a": "TaskAborted"}
    assert s.add_engine(0) == [Assign("b", 0)]


def test_abort_running_task_interrupts_and_skips_retries():
    s = sched(2)
    e = run(s, "a", retries=2)
    assert interrupts(s.abort(["a"], now=0.0)) == [("a", e, "TaskAborted")]
    assert s.abort(["a"], now=0.0) == []  # already being stopped
    assert done(s, "a", e, success=False) == []
    assert not s.is_pending("a")


def test_abort_running_task_that_still_succeeds():
    s = sched(1)
    run(s, "A")
    s.submit("B", after=["A"], now=0.0)
    s.abort(["A"], now=0.0)
    assert assigned(done(s, "A", 0, success=True)) == [("B", 0)]


def test_abort_unknown_and_finished_ignored():
    s = sched(1)
    done(s, "a", run(s, "a"))
    assert s.abort(["a", "zzz"], now=0.0) == []


def test_aborted_running_task_reporting_unmet_fails_with_abort():
    s = sched(2)
    e = run(s, "a")
    s.abort(["a"], now=0.0)
    assert failed(done(s, "a", e, success=False, unmet=True)) == {"a": "TaskAborted"}


# ----------------------------------------------------------------------------- retries


def test_failed_task_retried_on_another_free_engine():
    s = sched(2)
    e = run(s, "a", retries=1)
    out = done(s, "a", e, success=False)
    assert assigned(out) == [("a", 1 - e)]
    assert s.is_pending("a")
    assert done(s, "a", 1 - e, success=False) == []
    assert not s.is_pending("a")


def test_retry_waits_for_other_engine_rather_than_same():
    s = sched(2)
    run(s, "a", retries=1)  # engine 0
    run(s, "busy")  # engine 1
    out = done(s, "a", 0, success=False)
    assert assigned(out) == []
    assert s.is_pending("a")
    assert run(s, "x") == 0  # engine 0 keeps serving other tasks
    assert assigned(done(s, "busy", 1)) == [("a", 1)]


def test_retry_on_single_engine_reruns_there():
    s = sched(1)
    run(s, "a", retries=2)
    assert assigned(done(s, "a", 0, success=False)) == [("a", 0)]
    assert assigned(done(s, "a", 0, success=False)) == [("a", 0)]
    assert done(s, "a", 0, success=False) == []
    assert not s.is_pending("a")


def test_dependents_wait_through_retries():
    s = sched(2)
    run(s, "A", retries=1)
    s.submit("B", after=["A"], now=0.0)
    out = done(s, "A", 0, success=False)
    assert assigned(out) == [("A", 1)]
    assert assigned(done(s, "A", 1)) == [("B", 0)]


def test_engine_death_retries_elsewhere():
    s = sched(2)
    run(s, "a", retries=1)
    out = s.remove_engine(0, now=0.0)
    assert assigned(out) == [("a", 1)]
    assert s.engines == [1]


def test_engine_death_without_retries_fails_with_engine_error_and_propagates():
    s = sched(2)
    run(s, "a")
    s.submit("b", after=["a"], now=0.0)
    out = s.remove_engine(0, now=0.0)
    assert failed(out) == {"a": "EngineError", "b": "ImpossibleDependency"}
    a_fail = next(x for x in out if x.msg_id == "a")
    assert "Engine 0" in a_fail.evalue and "retries" in a_fail.evalue


def test_engine_death_with_no_engine_left_waits_for_next():
    s = sched(1)
    run(s, "a", retries=1)
    assert s.remove_engine(0, now=0.0) == []
    assert s.is_pending("a")
    assert s.add_engine(1) == [Assign("a", 1)]


def test_late_reply_from_dead_engine_is_ignored():
    s = sched(2)
    run(s, "a", retries=1)
    s.remove_engine(0, now=0.0)
    assert done(s, "a", 0) == []
    assert s.is_pending("a")
    assert done(s, "a", 1) == []
    assert not s.is_pending("a")


def test_engine_death_frees_queue_for_others():
    s = sched(2)
    run(s, "a")
    run(s, "b")
    s.submit("c", now=0.0)
    out = s.remove_engine(0, now=0.0)
    assert failed(out) == {"a": "EngineError"}
    assert assigned(done(s, "b", 1)) == [("c", 1)]


# ----------------------------------------------------------------------------- unmet


def test_unmet_reschedules_on_other_engine_never_same():
    s = sched(3)
    e = run(s, "a")
    out = done(s, "a", e, success=False, unmet=True)
    ((_, e2),) = assigned(out)
    assert e2 != e
    out = done(s, "a", e2, success=False, unmet=True)
    ((_, e3),) = assigned(out)
    assert e3 not in (e, e2)
    out = done(s, "a", e3, success=False, unmet=True)
    assert failed(out) == {"a": "ImpossibleDependency"}
    assert "refused" in out[0].evalue


def test_is_pending_tells_whether_a_reply_was_final():
    s = sched(2)
    run(s, "a", retries=1)
    done(s, "a", 0, success=False, unmet=True)
    assert s.is_pending("a")  # rescheduled: the engine's reply is not final
    done(s, "a", 1, success=False)
    assert s.is_pending("a")  # retried
    out = done(s, "a", 1, success=False)
    assert out == [] and not s.is_pending("a")  # final: the caller relays the engine's reply


def test_unmet_does_not_consume_retries():
    s = sched(2)
    run(s, "a", retries=1)
    assert assigned(done(s, "a", 0, success=False, unmet=True)) == [("a", 1)]
    # the retry is still available: on failure it reruns (only engine 1 is allowed)
    assert assigned(done(s, "a", 1, success=False)) == [("a", 1)]


def test_unmet_on_all_targets_is_impossible():
    s = sched(3)
    run(s, "a", targets=[0, 1])
    done(s, "a", 0, success=False, unmet=True)
    assert failed(done(s, "a", 1, success=False, unmet=True)) == {"a": "ImpossibleDependency"}


def test_unmet_waits_for_busy_engine_and_new_engines():
    s = sched(2)
    run(s, "a")  # 0
    run(s, "busy")  # 1
    assert done(s, "a", 0, success=False, unmet=True) == []
    assert s.is_pending("a")
    assert run(s, "x") == 0  # engine 0 does not take "a" back
    assert s.add_engine(2) == [Assign("a", 2)]


def test_unmet_task_runs_on_other_engine_when_it_frees():
    s = sched(2)
    run(s, "a")
    run(s, "busy")
    done(s, "a", 0, success=False, unmet=True)
    assert assigned(done(s, "busy", 1)) == [("a", 1)]


def test_unmet_task_fails_when_last_acceptable_engine_dies():
    s = sched(2)
    run(s, "a")
    run(s, "busy")
    done(s, "a", 0, success=False, unmet=True)
    out = s.remove_engine(1, now=0.0)
    assert failed(out) == {"a": "ImpossibleDependency", "busy": "EngineError"}


def test_unmet_task_waits_if_all_engines_gone():
    s = sched(2)
    run(s, "a")
    run(s, "busy", retries=0)
    done(s, "a", 0, success=False, unmet=True)
    s.remove_engine(0, now=0.0)
    s.remove_engine(1, now=0.0)
    assert s.is_pending("a")
    assert s.add_engine(5) == [Assign("a", 5)]


# ----------------------------------------------------------------------------- scale


def test_20000_tasks_through_4_engines():
    s = sched(4)
    running: list = []
    for i in range(20000):
        running += s.submit(f"t{i}", now=0.0)
    assert len(running) == 4
    assert s.queue_status()["unassigned"] == 19996
    finished = 0
    while running:
        a = running.pop()
        finished += 1
        running += s.task_done(a.msg_id, a.engine_id, success=True, now=0.0)
    assert finished == 20000
    assert s.queue_status() == {"unassigned": 0, 0: {"tasks": []}, 1: {"tasks": []},
                                2: {"tasks": []}, 3: {"tasks": []}}


def test_many_targeted_tasks_do_not_leak_queue_entries():
    s = sched(2)
    running: list = []
    for i in range(3000):
        running += s.submit(f"t{i}", targets=[0, 1], now=0.0)
    while running:
        a = running.pop()
        running += s.task_done(a.msg_id, a.engine_id, success=True, now=0.0)
    assert not s.is_pending("t2999")
    assert all(len(q) <= 64 for q in s._engine_queues.values())
