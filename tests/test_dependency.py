"""Tests of dependency specs (user-facing and scheduler-side) and @depend / @require."""

from __future__ import annotations

import json
import pickle
import sys
import types

import cloudpickle
import pytest

from ipyparallel_lite.controller.dependency import (
    IMPOSSIBLE,
    MET,
    WAITING,
    DependencySpecError,
    DepSpec,
    DepTracker,
    parse_dependency,
)
from ipyparallel_lite.dependency import Dependency, depend, dependent, require, required
from ipyparallel_lite.error import UnmetDependency

# ----------------------------------------------------------------------------- Dependency


class FakeAsyncResult:
    def __init__(self, *msg_ids):
        self.msg_ids = list(msg_ids)


def test_dependency_defaults_and_as_dict():
    d = Dependency(["b", "a"])
    assert d == {"a", "b"}
    assert (d.all, d.success, d.failure) == (True, True, False)
    assert d.as_dict() == {"dependencies": ["a", "b"], "all": True, "success": True, "failure": False}
    json.dumps(d.as_dict())


def test_dependency_from_str_asyncresult_and_mix():
    assert Dependency("x") == {"x"}
    assert Dependency(FakeAsyncResult("a", "b")) == {"a", "b"}
    assert Dependency(["c", FakeAsyncResult("a")]) == {"a", "c"}


def test_dependency_roundtrips_through_as_dict():
    d = Dependency(["a"], all=False, success=False, failure=True)
    d2 = Dependency(d.as_dict())
    assert d2 == d and (d2.all, d2.success, d2.failure) == (False, False, True)


def test_dependency_rejects_bad_input():
    with pytest.raises(TypeError):
        Dependency([1])
    with pytest.raises(ValueError):
        Dependency(["a"], success=False, failure=False)


@pytest.mark.parametrize("all_, success, failure, completed, failed, met, unreachable", [
    (True, True, False, {"a", "b"}, set(), True, False),
    (True, True, False, {"a"}, set(), False, False),
    (True, True, False, {"a"}, {"b"}, False, True),
    (False, True, False, {"a"}, {"b"}, True, False),
    (False, True, False, set(), {"a", "b"}, False, True),
    (True, False, True, set(), {"a", "b"}, True, False),
    (True, False, True, {"a"}, set(), False, True),
    (True, True, True, {"a"}, {"b"}, True, False),
])
def test_dependency_check_and_unreachable(all_, success, failure, completed, failed, met, unreachable):
    d = Dependency(["a", "b"], all=all_, success=success, failure=failure)
    assert d.check(completed, failed) is met
    assert d.unreachable(completed, failed) is unreachable


def test_empty_dependency_is_always_met():
    d = Dependency()
    assert d.check(set()) and not d.unreachable(set(), {"x"})


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_dependency_pickles_with_flags(dumps):
    d = Dependency(["a", "b"], all=False, success=True, failure=True)
    d2 = pickle.loads(dumps(d))
    assert d2 == d and (d2.all, d2.success, d2.failure) == (False, True, True)


# ----------------------------------------------------------------------------- parse_dependency


def test_parse_none_and_empty():
    assert parse_dependency(None) is None
    assert parse_dependency([]) is None
    assert parse_dependency({"dependencies": []}) is None
    assert parse_dependency(Dependency()) is None


def test_parse_list_str_and_dict():
    assert parse_dependency(["a", "b", "a"]) == DepSpec(frozenset({"a", "b"}))
    assert parse_dependency("a") == DepSpec(frozenset({"a"}))
    spec = parse_dependency({"dependencies": ["a"], "all": False, "success": False, "failure": True})
    assert spec == DepSpec(frozenset({"a"}), all=False, success=False, failure=True)


def test_parse_dependency_object_keeps_flags():
    spec = parse_dependency(Dependency(["a"], all=False, failure=True))
    assert spec == DepSpec(frozenset({"a"}), all=False, success=True, failure=True)


@pytest.mark.parametrize("raw", [
    5,
    [1],
    b"abc",
    {"dependencies": ["a"], "success": False, "failure": False},
    {"dependencies": ["a"], "all": "no"},
    {"dependencies": {"a": 1}},
])
def test_parse_rejects_malformed(raw):
    with pytest.raises(DependencySpecError):
        parse_dependency(raw)


def test_dependency_spec_error_is_a_value_error():
    assert issubclass(DependencySpecError, ValueError)


# ----------------------------------------------------------------------------- DepTracker


def tracker(ids, location=False, **flags):
    return DepTracker(DepSpec(frozenset(ids), **flags), location=location)


def test_tracker_all_success():
    t = tracker("ab")
    assert t.observe(True, 0, "a") is WAITING
    assert t.observe(True, 1, "b") is MET


def test_tracker_all_failure_is_impossible_with_culprit():
    t = tracker("ab")
    assert t.observe(False, 0, "a") is IMPOSSIBLE
    assert t.culprit == "a"
    assert t.observe(True, 0, "b") is IMPOSSIBLE  # terminal


def test_tracker_any():
    t = tracker("ab", all=False)
    assert t.observe(False, 0, "a") is WAITING
    assert t.observe(True, 0, "b") is MET
    t = tracker("ab", all=False)
    t.observe(False, 0, "a")
    assert t.observe(False, 0, "b") is IMPOSSIBLE


def test_tracker_failure_only():
    t = tracker("a", success=False, failure=True)
    assert t.observe(False, None, "a") is MET
    t = tracker("a", success=False, failure=True)
    assert t.observe(True, 0, "a") is IMPOSSIBLE


def test_location_tracker_all_needs_one_engine():
    t = tracker("ab", location=True)
    t.observe(True, 2, "a")
    assert t.observe(True, 2, "b") is MET
    assert t.engines == {2}
    t = tracker("ab", location=True)
    t.observe(True, 2, "a")
    assert t.observe(True, 3, "b") is IMPOSSIBLE
    assert t.culprit == "b"


def test_location_tracker_any_collects_engines():
    t = tracker("abc", location=True, all=False)
    assert t.observe(True, 1, "a") is MET
    t.observe(True, 2, "b")
    t.observe(False, 3, "c")
    assert t.engines == {1, 2}


def test_location_tracker_needs_an_engine():
    t = tracker("a", location=True, failure=True)
    assert t.observe(False, None, "a") is IMPOSSIBLE
    t = tracker("a", location=False, failure=True)
    assert t.observe(False, None, "a") is MET


def test_tracker_describe():
    text = tracker("ab", all=False, failure=True).describe()
    assert "any" in text and "a, b" in text and "failure" in text


# ----------------------------------------------------------------------------- @depend


def _true(*args, **kwargs):
    return True


def _is_platform(name):
    return sys.platform == name


def test_depend_runs_when_condition_holds():
    @depend(_is_platform, sys.platform)
    def f(x, y=1):
        """doc of f"""
        return x + y

    assert isinstance(f, dependent)
    assert f(1, y=2) == 3
    assert f.__name__ == "f" and f.__doc__ == "doc of f"


@pytest.mark.parametrize("result", [False, None, 0, ""])
def test_depend_raises_unmet_when_condition_is_falsy(result):
    calls = []

    @depend(lambda: result)
    def f():
        calls.append(1)

    with pytest.raises(UnmetDependency):
        f()
    assert calls == []


def test_depend_passes_args_and_kwargs_to_condition():
    seen = {}

    def cond(a, b=None):
        seen.update(a=a, b=b)
        return True

    @depend(cond, 1, b=2)
    def f():
        return "ran"

    assert f() == "ran"
    assert seen == {"a": 1, "b": 2}


def test_depend_wrapper_is_cloudpicklable():
    def make():
        def cond(n):
            return n > 0

        @depend(cond, 1)
        def ok(x):
            return x * 2

        @depend(cond, 0)
        def never(x):
            return x

        return ok, never

    ok, never = make()
    ok2, never2 = cloudpickle.loads(cloudpickle.dumps((ok, never)))
    assert ok2(21) == 42
    with pytest.raises(UnmetDependency):
        never2(1)


# ----------------------------------------------------------------------------- @require


def _fresh_function(src: str, name: str = "f"):
    """A function with its own globals, like a function cloudpickle rebuilds on an engine."""
    module_name = "interactive_ns_for_tests"
    ns = {"__name__": module_name}
    exec(src, ns)
    return ns[name], ns


def test_require_imports_module_into_function_globals():
    f, ns = _fresh_function("def f(x):\n    return json.dumps(x)\n")
    g = require("json")(f)
    assert isinstance(g, required) and isinstance(g, dependent)
    assert "json" not in ns
    assert g([1]) == "[1]"
    assert ns["json"] is sys.modules["json"]


def test_require_accepts_module_objects_and_dotted_names():
    f, ns = _fresh_function("def f():\n    return os.path.join('a', 'b'), types.SimpleNamespace\n")
    g = require("os.path", types)(f)
    assert g() == (sys.modules["os"].path.join("a", "b"), types.SimpleNamespace)
    assert ns["os"] is sys.modules["os"]


def test_require_missing_module_raises_unmet():
    f, _ = _fresh_function("def f():\n    return 1\n")
    g = require("no_such_module_ipp_lite_xyz")(f)
    with pytest.raises(UnmetDependency, match="no_such_module_ipp_lite_xyz"):
        g()


def test_require_binds_functions_and_keyword_objects():
    def helper(x):
        return x + 1

    f, ns = _fresh_function("def f(x):\n    return helper(x) * factor + len(js.dumps([]))\n")
    g = require(helper, factor=10, js=json)(f)
    assert g(1) == 22
    assert ns["helper"] is helper and ns["factor"] == 10 and ns["js"] is json


def test_require_rejects_unnamed_positional_objects():
    with pytest.raises(TypeError):
        require(42)


def test_require_wrapper_survives_cloudpickle_and_injects_on_the_other_side():
    f, _ = _fresh_function("def f(x):\n    return json.dumps(x)\n")
    g = require("json")(f)
    g2 = cloudpickle.loads(cloudpickle.dumps(g))
    assert g2({"a": 1}) == '{"a": 1}'
    assert g2.__name__ == "f"


def test_require_stacked_with_depend():
    f, ns = _fresh_function("def f():\n    return json.dumps(1)\n")
    g = depend(_true)(require("json")(f))
    g2 = cloudpickle.loads(cloudpickle.dumps(g))
    assert g2() == "1"
    h = depend(lambda: False)(require("json")(f))
    with pytest.raises(UnmetDependency):
        h()
