"""Tests of ipyparallel_lite.error: hierarchy, wire round trip, display."""

from __future__ import annotations

import builtins
import inspect
import json
import os
import pickle

import pytest

import ipyparallel_lite
from ipyparallel_lite import error
from ipyparallel_lite.error import (
    AlreadyDisplayedError,
    CompositeError,
    DependencyTimeout,
    EngineError,
    ImpossibleDependency,
    InvalidDependency,
    IPythonError,
    KernelError,
    NoEnginesRegistered,
    RemoteError,
    TaskAborted,
    TaskRejectError,
    TaskTimeout,
    UnmetDependency,
    collect_exceptions,
    unwrap_exception,
    wrap_exception,
)

ENGINE = {"engine_id": 3, "engine_uuid": "abc", "method": "apply"}


def _divide(a, b):
    return a / b


def _caught(func, *args, engine_info=None) -> dict:
    try:
        func(*args)
    except Exception:
        return wrap_exception(engine_info)
    raise AssertionError("func did not raise")


def _remote(ename="ZeroDivisionError", evalue="division by zero", engine_id=0, tb="tb"):
    info = {"engine_id": engine_id, "method": "apply"} if engine_id is not None else {}
    return RemoteError(ename, evalue, tb, info)


# ---- hierarchy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, parent",
    [
        (KernelError, IPythonError),
        (EngineError, KernelError),
        (NoEnginesRegistered, KernelError),
        (TaskAborted, KernelError),
        (TaskTimeout, KernelError),
        (TaskRejectError, KernelError),
        (UnmetDependency, KernelError),
        (ImpossibleDependency, UnmetDependency),
        (DependencyTimeout, ImpossibleDependency),
        (InvalidDependency, ImpossibleDependency),
        (RemoteError, KernelError),
        (CompositeError, RemoteError),
        (AlreadyDisplayedError, RemoteError),
    ],
)
def test_hierarchy(cls, parent):
    assert cls.__bases__ == (parent,)


def test_timeout_error_is_builtin():
    assert error.TimeoutError is builtins.TimeoutError


def test_all_names_exported():
    for name in error.__all__:
        assert hasattr(error, name)


def test_no_engines_registered_message():
    assert "wait_for_engines" in str(NoEnginesRegistered())
    assert str(NoEnginesRegistered("custom")) == "custom"


# ---- wrap / unwrap ------------------------------------------------------------------


def test_wrap_exception_content_is_json():
    content = _caught(_divide, 1, 0, engine_info=ENGINE)
    assert json.loads(json.dumps(content)) == content
    assert content["status"] == "error"
    assert content["ename"] == "ZeroDivisionError"
    assert content["evalue"] == "division by zero"
    assert content["engine_info"] == ENGINE
    assert all(isinstance(line, str) and "\n" not in line for line in content["traceback"])


def test_wrap_exception_traceback_has_file_and_line():
    content = _caught(_divide, 1, 0)
    text = "\n".join(content["traceback"])
    line = inspect.getsourcelines(_divide)[1] + 1
    assert f'File "{__file__}", line {line}, in _divide' in text
    assert "return a / b" in text
    assert content["traceback"][-1] == "ZeroDivisionError: division by zero"
    assert content["engine_info"] == {}


def test_wrap_exception_with_explicit_exception():
    try:
        _divide(1, 0)
    except ZeroDivisionError as e:
        exc = e
    content = wrap_exception({"engine_id": 1}, exc=exc)
    assert content["ename"] == "ZeroDivisionError"
    assert "_divide" in "\n".join(content["traceback"])


def test_wrap_exception_outside_except_does_not_raise():
    content = wrap_exception()
    assert content["status"] == "error"
    assert content["ename"] == "RuntimeError"


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def test_wrap_exception_never_raises_on_bad_str():
    def boom():
        raise _Unprintable()

    content = _caught(boom)
    assert content["ename"] == "_Unprintable"
    assert "unprintable" in content["evalue"]
    assert json.dumps(content)
    assert any("boom" in line for line in content["traceback"])


# Code compiled with a file name inside the package stands for the engine: it catches
# what the user's code raises and wraps it.
_FAKE_ENGINE = os.path.join(os.path.dirname(ipyparallel_lite.__file__), "engine", "fake.py")
_FAKE_ENGINE_SOURCE = """
def run(f, *args):
    try:
        return f(*args)
    except Exception:
        return wrap_exception()
"""


def _fake_engine_run(func, *args) -> dict:
    namespace: dict = {"wrap_exception": wrap_exception}
    exec(compile(_FAKE_ENGINE_SOURCE, _FAKE_ENGINE, "exec"), namespace)
    return namespace["run"](func, *args)


def test_wrap_exception_drops_leading_package_frames():
    text = "\n".join(_fake_engine_run(_divide, 1, 0)["traceback"])
    assert _FAKE_ENGINE not in text
    assert "in _divide" in text


def test_wrap_exception_keeps_frames_when_all_are_ours():
    text = "\n".join(_fake_engine_run(int, "not a number")["traceback"])
    assert f'File "{_FAKE_ENGINE}", line 4, in run' in text
    assert text.endswith("ValueError: invalid literal for int() with base 10: 'not a number'")


def test_round_trip():
    content = _caught(_divide, 1, 0, engine_info=ENGINE)
    err = unwrap_exception(json.loads(json.dumps(content)))
    assert type(err) is RemoteError
    assert (err.ename, err.evalue, err.engine_info) == (
        "ZeroDivisionError",
        "division by zero",
        ENGINE,
    )
    assert isinstance(err.traceback, str)
    assert __file__ in err.traceback and "line" in err.traceback
    assert str(err) == "[3:apply]: ZeroDivisionError: division by zero"


def test_unwrap_accepts_ipyparallel_style_traceback_chunks():
    content = {
        "ename": "ValueError",
        "evalue": "x",
        "traceback": [
            "Traceback (most recent call last):\n",
            '  File "a.py", line 1\n',
            "ValueError: x\n",
        ],
    }
    err = unwrap_exception(content)
    assert err.traceback.splitlines() == [
        "Traceback (most recent call last):",
        '  File "a.py", line 1',
        "ValueError: x",
    ]
    assert err.engine_info == {}
    assert str(err) == "ValueError: x"


def test_unwrap_tolerates_sparse_content():
    err = unwrap_exception({})
    assert isinstance(err, RemoteError)
    assert err.traceback is None
    assert err.render_traceback()[-1] == "UnknownError: "


SCHEDULER_ERRORS = [
    TaskTimeout,
    TaskAborted,
    ImpossibleDependency,
    InvalidDependency,
    DependencyTimeout,
    EngineError,
    UnmetDependency,
    NoEnginesRegistered,
]


@pytest.mark.parametrize("cls", SCHEDULER_ERRORS)
def test_scheduler_errors_keep_their_class(cls):
    def scheduler():
        raise cls("task abc: no luck")

    content = _caught(scheduler)
    err = unwrap_exception(json.loads(json.dumps(content)))
    assert isinstance(err, cls)
    assert isinstance(err, RemoteError)
    assert type(err).__name__ == cls.__name__
    assert err.ename == cls.__name__
    assert err.evalue == "task abc: no luck"
    assert "scheduler" in err.traceback
    assert str(err) == f"{cls.__name__}: task abc: no luck"
    with pytest.raises(cls):
        raise err


def test_scheduler_error_variants_pickle():
    err = unwrap_exception(
        {"ename": "TaskTimeout", "evalue": "late", "traceback": ["tb"], "engine_info": ENGINE}
    )
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, TaskTimeout) and isinstance(again, RemoteError)
    assert (again.evalue, again.traceback, again.engine_info) == ("late", "tb", ENGINE)


def test_other_kernel_errors_stay_plain_remote_errors():
    err = unwrap_exception({"ename": "TaskRejectError", "evalue": "", "traceback": []})
    assert type(err) is RemoteError


def test_public_scheduler_classes_unchanged_by_variants():
    # raising them locally stays plain: not a RemoteError
    assert not issubclass(TaskTimeout, RemoteError)
    assert str(TaskTimeout("late")) == "late"


# ---- RemoteError display ------------------------------------------------------------


def test_remote_error_str_and_repr():
    err = _remote(engine_id=3)
    assert str(err) == "[3:apply]: ZeroDivisionError: division by zero"
    assert repr(err) == "<RemoteError[3]:ZeroDivisionError(division by zero)>"
    assert str(RemoteError("E", "v")) == "E: v"
    assert str(RemoteError("E", "v", None, {"engine_id": 2})) == "[2]: E: v"


def test_remote_error_pickles():
    err = _remote(engine_id=3)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is RemoteError
    assert (again.ename, again.evalue, again.traceback, again.engine_info) == (
        err.ename,
        err.evalue,
        err.traceback,
        err.engine_info,
    )


def test_render_traceback_shows_remote_traceback():
    err = unwrap_exception(_caught(_divide, 1, 0, engine_info=ENGINE))
    lines = err.render_traceback()
    assert lines[0] == "[3:apply]:"
    assert lines[1:] == err.traceback.splitlines()
    assert err._render_traceback_() == lines


def test_render_traceback_without_traceback():
    lines = RemoteError("KeyError", "'x'").render_traceback()
    assert lines == ["[remote error]:", error.NO_TRACEBACK, "KeyError: 'x'"]


def test_print_traceback(capsys):
    _remote(tb="line one\nline two").print_traceback()
    assert capsys.readouterr().out == "[0:apply]:\nline one\nline two\n"


def test_ipython_displays_remote_traceback(shell):
    """IPython shows _render_traceback_(), not our local frames."""
    shown: list = []
    original = shell._showtraceback
    shell._showtraceback = lambda etype, evalue, stb: shown.append(stb)
    try:
        err = unwrap_exception(_caught(_divide, 1, 0, engine_info=ENGINE))
        shell.user_ns["err"] = err
        shell.run_cell("raise err")
    finally:
        shell._showtraceback = original
        shell.user_ns.pop("err", None)
    assert shown == [err.render_traceback()]


# ---- CompositeError ------------------------------------------------------------------


def test_composite_basics():
    errors = [_remote(engine_id=i, tb=f"tb{i}") for i in range(3)]
    comp = CompositeError("failed", errors)
    assert len(comp) == 3
    assert list(comp) == comp.elist
    assert comp.elist[1] == (
        "ZeroDivisionError",
        "division by zero",
        "tb1",
        {"engine_id": 1, "method": "apply"},
    )
    assert isinstance(comp, RemoteError)
    assert comp.ename == "CompositeError"
    assert repr(comp) == "CompositeError(3)"


def test_composite_groups_identical_errors():
    comp = CompositeError("failed", [_remote(engine_id=i) for i in range(4)])
    text = str(comp)
    assert text.splitlines()[0] == "failed"
    assert "4 engines raised ZeroDivisionError: division by zero (engines 0-3)" in text
    assert text.count("ZeroDivisionError") == 1


def test_composite_summary_of_mixed_errors():
    errors = [
        _remote(engine_id=0),
        _remote("ValueError", "bad", engine_id=1),
        _remote(engine_id=2),
        _remote(engine_id=5),
        _remote(engine_id=3),
    ]
    lines = str(CompositeError("in: apply", errors)).splitlines()
    assert lines == [
        "in: apply",
        "4 engines raised ZeroDivisionError: division by zero (engines 0, 2-3, 5)",
        "[1:apply]: ValueError: bad",
    ]


def test_composite_summary_repeats_on_same_engine_and_scheduler_errors():
    errors = [_remote(engine_id=i % 2) for i in range(6)] + [
        _remote("TaskTimeout", "late", engine_id=None),
        _remote("TaskTimeout", "late", engine_id=None),
    ]
    lines = str(CompositeError("m", errors)).splitlines()
    assert lines[1] == "6 tasks raised ZeroDivisionError: division by zero (on engines 0-1)"
    assert lines[2] == "2 tasks raised TaskTimeout: late"


def test_composite_summary_is_bounded():
    errors = [_remote("ValueError", f"bad {i}", engine_id=i) for i in range(10)]
    lines = str(CompositeError("m", errors)).splitlines()
    assert len(lines) == 1 + CompositeError.tb_limit + 1
    assert lines[-1] == "... and 6 more errors of 6 other kinds"


def test_composite_render_traceback():
    errors = [_remote(engine_id=i, tb=f"tb{i}") for i in range(3)]
    comp = CompositeError("failed", errors)
    lines = comp.render_traceback()
    assert lines[0] == "failed"
    assert "tb0" in lines and "tb1" not in lines
    assert comp._render_traceback_() == lines
    assert comp.render_traceback(2) == ["[2:apply]:", "tb2"]
    with pytest.raises(IndexError):
        comp.render_traceback(7)


def test_composite_print_traceback(capsys):
    comp = CompositeError("failed", [_remote(engine_id=1, tb="tb1")])
    comp.print_traceback(0)
    assert capsys.readouterr().out == "[1:apply]:\ntb1\n"


def test_composite_raise_exception():
    errors = [_remote(engine_id=0), _remote("TaskTimeout", "late", engine_id=None, tb=None)]
    comp = CompositeError("failed", errors)
    with pytest.raises(RemoteError) as info:
        comp.raise_exception()
    assert str(info.value) == "[0:apply]: ZeroDivisionError: division by zero"
    with pytest.raises(TaskTimeout):
        comp.raise_exception(1)
    with pytest.raises(IndexError):
        comp.raise_exception(2)


def test_composite_accepts_tuples_and_pickles():
    comp = CompositeError("m", [("KeyError", "'a'", None, None)])
    assert comp.elist == [("KeyError", "'a'", None, {})]
    again = pickle.loads(pickle.dumps(comp))
    assert again.elist == comp.elist and again.msg == "m"


def test_already_displayed_error():
    comp = CompositeError("m", [_remote(engine_id=i) for i in range(3)])
    shown = AlreadyDisplayedError(comp)
    assert str(shown) == "3 errors"
    assert shown.render_traceback() == ["3 errors"]
    assert shown._render_traceback_() == ["3 errors"]
    assert pickle.loads(pickle.dumps(shown)).n == 3


# ---- collect_exceptions --------------------------------------------------------------


def test_collect_exceptions_passthrough():
    results = [1, "two", None]
    assert collect_exceptions(results, "apply") is results
    rdict = {0: 1, 1: 2}
    assert collect_exceptions(rdict) is rdict


def test_collect_exceptions_single_error_is_composite():
    with pytest.raises(CompositeError) as info:
        collect_exceptions([1, _remote(engine_id=2)], "apply")
    assert len(info.value) == 1
    assert str(info.value).splitlines()[0] == "one or more exceptions raised in: apply"


def test_collect_exceptions_dict_and_flattening():
    inner = CompositeError("inner", [_remote(engine_id=0), _remote(engine_id=1)])
    timeout = unwrap_exception({"ename": "TaskTimeout", "evalue": "late", "traceback": []})
    with pytest.raises(CompositeError) as info:
        collect_exceptions({0: inner, 1: 5, 2: _remote(engine_id=2), 3: timeout}, "execute")
    comp = info.value
    assert [e[3].get("engine_id") for e in comp.elist] == [0, 1, 2, None]
    assert "3 engines raised ZeroDivisionError" in str(comp)
    with pytest.raises(TaskTimeout):
        comp.raise_exception(3)
