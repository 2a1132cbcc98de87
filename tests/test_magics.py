"""The IPython magics (%px, %%px, %autopx, %pxresult, %pxconfig) in a real IPython shell.

One 2-engine cluster serves the module; it is started with
``start_and_connect(activate=True)``, so that path is exercised too. Each test gets
the magics back in their default state (all engines, blocking, streaming).
"""

from __future__ import annotations

import _thread
import base64
import contextlib
import io
import re
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
from IPython.utils.capture import capture_output

import ipyparallel_lite as ipp
from ipyparallel_lite.magics import ParallelMagics, activate_view, get_magics
from ipyparallel_lite.magics import px as pxmod

pytestmark = pytest.mark.timeout(120)


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def px_rc(shell):
    """A client of a fresh 2-engine cluster whose magics were bound by start_and_connect."""
    cluster = ipp.Cluster(n=2)
    rc = cluster.start_and_connect_sync(activate=True)
    try:
        for eid in rc.ids:
            rc[eid]["eid"] = eid  # each engine knows its id, for output checks
        yield rc
    finally:
        cluster.stop_cluster_sync()


@pytest.fixture
def magics(shell, px_rc) -> ParallelMagics:
    """The unsuffixed magics, reset to the state rc.activate() leaves them in."""
    m = get_magics(shell, "")
    if m._autopx is not None:
        m._disable_autopx()
    view = px_rc.activate()
    m.verbose, m.stream, m.progress_after = False, True, 2.0
    m.signal_on_interrupt, m.groupby = pxmod.signal.SIGINT, "type"
    assert m.view is view
    yield m
    if m._autopx is not None:
        m._disable_autopx()


@pytest.fixture
def rc(px_rc):
    """This module's client, so that conftest's ``dv`` views its engines."""
    return px_rc


def run(shell, cell: str):
    """Run a cell; (result, captured stdout/stderr/displays)."""
    with capture_output() as io_:
        result = shell.run_cell(cell, store_history=False)
    return result, io_


@contextlib.contextmanager
def one_stream():
    """stdout and stderr into one buffer (displays print their text/plain there too)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf


def run_combined(shell, cell: str) -> tuple:
    with one_stream() as buf:
        result = shell.run_cell(cell, store_history=False)
    return result, buf.getvalue()


class TimedWriter(io.StringIO):
    """A stream noting when each piece of text was written."""

    def __init__(self):
        super().__init__()
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        return super().write(text)

    def when(self, needle: str) -> float:
        return next(t for t, text in self.writes if needle in text)


def tiny_png() -> bytes:
    """A valid 1x1 PNG, built by hand."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def interrupt_after(seconds: float) -> threading.Timer:
    """Ctrl-C for the main thread after ``seconds``, as a terminal or Jupyter would send."""
    timer = threading.Timer(seconds, _thread.interrupt_main)
    timer.start()
    return timer


# ---- registration -----------------------------------------------------------------------------


def test_import_does_not_load_the_magics():
    code = "import sys, ipyparallel_lite; print('ipyparallel_lite.magics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_load_ext_registers_every_magic(shell, magics):
    result, _ = run(shell, "%load_ext ipyparallel_lite")
    assert result.success
    lines = shell.magics_manager.magics["line"]
    for name in ("px", "autopx", "pxresult", "pxconfig", "result"):
        assert getattr(lines[name], "__self__", None) is magics, name
    assert shell.magics_manager.magics["cell"]["px"].__self__ is magics
    assert magics.view is not None  # loading again keeps the bound view


def test_start_and_connect_activate_binds_a_blocking_view(magics, px_rc):
    assert magics.view.client is px_rc
    assert magics.view.block is True and magics.view.targets == "all"


def test_client_activate_returns_the_view(shell, px_rc):
    view = px_rc.activate(targets=[0], suffix="_zero")
    assert isinstance(view, ipp.DirectView) and view.block and view.targets == [0]
    assert get_magics(shell, "_zero").view is view
    for name in ("px_zero", "autopx_zero", "pxresult_zero", "pxconfig_zero"):
        assert name in shell.magics_manager.magics["line"]
    assert "px_zero" in shell.magics_manager.magics["cell"]
    _, out = run_combined(shell, "%px_zero print('zero only')")
    assert "[stdout:0] zero only" in out and "[stdout:1]" not in out


def test_view_activate_with_suffix(shell, px_rc, magics):
    view = px_rc[1]
    view.activate("_one")
    _, out = run_combined(shell, "%%px_one\nprint('from one')")
    # a non-blocking view: the cell returns its AsyncResult; %pxresult_one shows output
    assert "AsyncResult" in out
    _, out = run_combined(shell, "%pxresult_one")
    assert "[stdout:1] from one" in out and "[stdout:0]" not in out
    _, out = run_combined(shell, "%px print('from all')")  # the unsuffixed magics are untouched
    assert "[stdout:0] from all" in out and "[stdout:1] from all" in out


def test_activate_outside_ipython_only_warns(px_rc, monkeypatch):
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    with pytest.warns(RuntimeWarning, match="only work inside IPython"):
        assert activate_view(px_rc[:], "_nowhere") is None


# ---- running code --------------------------------------------------------------------------------


def test_px_line_runs_on_every_engine(shell, magics, dv):
    result, io_ = run(shell, "%px value = eid * 10")
    assert result.success and io_.stdout == ""
    assert dv.pull("value") == [0, 10]
    _, io_ = run(shell, "%px print('value is', value)")
    assert "[stdout:0] value is 0" in io_.stdout
    assert "[stdout:1] value is 10" in io_.stdout


def test_px_line_flags_come_first(shell, magics):
    _, io_ = run(shell, "%px -t 1 --no-stream print('one', eid)")
    assert io_.stdout.strip() == "[stdout:1] one 1"
    _, out = run_combined(shell, "%px -- -eid")  # code starting with a dash
    assert re.search(r"Out\[1:\d+\]: -1", out), out


def test_cell_px_runs_the_cell(shell, magics):
    result, io_ = run(shell, "%%px\ntotal = 0\nfor i in range(4):\n    total += i\nprint('total', total)")
    assert result.success
    assert "[stdout:0] total 6" in io_.stdout and "[stdout:1] total 6" in io_.stdout


def test_ipython_syntax_in_the_cell_reaches_the_engines(shell, magics):
    result, io_ = run(shell, "%px %time timed = 1")
    assert result.success, io_.stdout
    assert "[stdout:0] CPU times" in io_.stdout or "Wall time" in io_.stdout
    pxmod.check_syntax("import asyncio\nawait asyncio.sleep(0)")  # top-level await parses


def test_top_level_await_on_the_engines(shell, magics):
    result, _ = run(shell, "%%px -a -t 0 -o awaited\nimport asyncio\nawait asyncio.sleep(0.01)")
    assert result.success
    assert shell.user_ns["awaited"].wait(5)


def test_execute_result_shows_per_engine(shell, magics):
    _, out = run_combined(shell, "%px 6 * 7 + eid")
    lines = [line for line in out.splitlines() if line.startswith("Out[")]
    assert re.fullmatch(r"Out\[0:\d+\]: 42", lines[0]) and re.fullmatch(r"Out\[1:\d+\]: 43", lines[1])


def test_rich_display_is_republished(shell, magics, dv):
    dv.push({"png": tiny_png()})
    code = ("%%px\nfrom IPython.display import HTML, Image, display\n"
            "display(HTML(f'<b>engine {eid}</b>'))\ndisplay(Image(data=png))")
    result, io_ = run(shell, code)
    assert result.success
    html = [o for o in io_.outputs if "text/html" in o.data]
    assert sorted(o.data["text/html"] for o in html) == ["<b>engine 0</b>", "<b>engine 1</b>"]
    assert {o.metadata["engine"] for o in html} == {0, 1}
    images = [o for o in io_.outputs if "image/png" in o.data]
    assert len(images) == 2
    assert all(base64.b64decode(o.data["image/png"]) == tiny_png() for o in images)
    assert "[output:0]" in io_.stdout and "[output:1]" in io_.stdout


def test_display_updates_are_republished(shell, magics):
    result, io_ = run(shell, "%%px -t 0\nh = display('first', display_id=True)\nh.update('second')")
    assert result.success
    updates = [o for o in io_.outputs if o.update]
    assert [o.data["text/plain"] for o in updates] == ["'second'"]
    first = next(o for o in io_.outputs if not o.update)
    assert first.transient["display_id"] == updates[0].transient["display_id"]


# ---- streaming and grouping ----------------------------------------------------------------------


def test_stream_shows_output_as_it_arrives(shell, magics):
    writer = TimedWriter()
    cell = "%%px -t 0\nimport time\nprint('first', flush=True)\ntime.sleep(1.0)\nprint('second')"
    with contextlib.redirect_stdout(writer):
        shell.run_cell(cell, store_history=False)
        done = time.monotonic()
    assert writer.when("second") - writer.when("first") > 0.7
    assert done - writer.when("first") > 0.7
    assert writer.getvalue() == "[stdout:0] first\nsecond\n"


def test_stream_notes_each_failing_engine_as_it_fails(shell, magics):
    # engine 1 fails at once, engine 0 a second later: the first failure is told while
    # engine 0 still runs, and the compact summary comes at the end as without streaming
    writer = TimedWriter()
    cell = "%%px\nimport time\ntime.sleep(1.0 - eid)\n{}['missing'] if eid else 1 / eid"
    with contextlib.redirect_stderr(writer), contextlib.redirect_stdout(io.StringIO()):
        result = shell.run_cell(cell, store_history=False)
        done = time.monotonic()
    assert not result.success
    assert "[1:execute] KeyError: 'missing'\n" in writer.getvalue()
    assert done - writer.when("[1:execute] KeyError") > 0.6
    assert "[0:execute] ZeroDivisionError: division by zero\n" in writer.getvalue()


def test_engine_clear_output_clears_its_output(shell, magics, dv):
    # in a terminal the clear passes through (it erases the current line); the result
    # keeps what each engine showed after its last clear, as a notebook cell would
    cell = ("%%px\nfrom IPython.display import clear_output\nprint('before')\n"
            "clear_output()\nprint('after')\nclear_output(wait=True)\nprint('last')\n"
            "clear_output(wait=True)")
    result, text = run_combined(shell, cell)
    assert result.success
    assert "[stdout:0] before" in text and "[stdout:1] last" in text
    ar = magics.last_result
    assert ar.stdout == ["last\n", "last\n"]
    ar = dv.execute("print('kept')\nfrom IPython.display import clear_output, display\n"
                    "display('gone')\nclear_output(wait=True)\nprint('shown')", block=False)
    ar.get(timeout=10)
    assert ar.stdout == ["shown\n", "shown\n"]
    assert [o["header"]["msg_type"] for o in ar.metadata[0]["outputs"]] == []


def test_no_stream_shows_output_at_the_end(shell, magics):
    writer = TimedWriter()
    cell = "%%px -t 0 --no-stream\nimport time\nprint('first', flush=True)\ntime.sleep(0.8)\nprint('second')"
    with contextlib.redirect_stdout(writer):
        shell.run_cell(cell, store_history=False)
    assert writer.when("second") - writer.when("first") < 0.3
    assert writer.getvalue() == "[stdout:0] first\nsecond\n"


GROUP_CELL = """\
import sys
from IPython.display import display
print(f"out{eid}")
print(f"err{eid}", file=sys.stderr)
display(f"d1-{eid}")
display(f"d2-{eid}")
eid + 100
"""


def shown_sequence(text: str) -> list[str]:
    """The interesting lines of grouped output, in order."""
    return [line for line in text.splitlines() if line]


def test_group_outputs_by_type(shell, magics):
    _, out = run_combined(shell, "%%px --no-stream --group-outputs type\n" + GROUP_CELL)
    seq = [re.sub(r"Out\[(\d):\d+\]", r"Out[\1]", line) for line in shown_sequence(out)]
    assert seq == ["[stdout:0] out0", "[stdout:1] out1", "[stderr:0] err0", "[stderr:1] err1",
                   "[output:0]", "'d1-0'", "'d2-0'", "[output:1]", "'d1-1'", "'d2-1'",
                   "Out[0]: 100", "Out[1]: 101"]


def test_group_outputs_by_engine(shell, magics):
    for flag in ("--group-outputs engine", "-e"):
        _, out = run_combined(shell, f"%%px --no-stream {flag}\n" + GROUP_CELL)
        seq = [re.sub(r"Out\[(\d):\d+\]", r"Out[\1]", line) for line in shown_sequence(out)]
        assert seq == ["[stdout:0] out0", "[stderr:0] err0", "[output:0]", "'d1-0'", "'d2-0'",
                       "Out[0]: 100", "[stdout:1] out1", "[stderr:1] err1", "[output:1]",
                       "'d1-1'", "'d2-1'", "Out[1]: 101"], flag


def test_group_outputs_in_order(shell, magics):
    for flag in ("--group-outputs order", "-r"):
        _, out = run_combined(shell, f"%%px --no-stream {flag}\n" + GROUP_CELL)
        seq = shown_sequence(out)
        displays = [line for line in seq if line.startswith(("'", "[output"))]
        assert displays == ["[output:0]", "'d1-0'", "[output:1]", "'d1-1'",
                            "[output:0]", "'d2-0'", "[output:1]", "'d2-1'"], flag


# ---- blocking, saving, local, verbose, progress ------------------------------------------------


def test_noblock_returns_the_result_and_pxresult_shows_it(shell, magics):
    result, io_ = run(shell, "%%px -a\nimport time\ntime.sleep(0.3)\nprint('later', eid)")
    ar = result.result
    assert isinstance(ar, ipp.AsyncResult) and not ar.done()
    assert "[stdout" not in io_.stdout
    _, io_ = run(shell, "%pxresult")
    assert ar.done()
    assert "[stdout:0] later 0" in io_.stdout and "[stdout:1] later 1" in io_.stdout
    _, io_ = run(shell, "%pxresult --group-outputs engine")  # shown again on demand
    assert "[stdout:0] later 0" in io_.stdout
    assert run(shell, "%result")[1].stdout == io_.stdout  # IPython parallel's old name


def test_block_flag_overrides_the_view(shell, magics):
    run(shell, "%pxconfig --noblock")
    assert magics.view.block is False
    result, _ = run(shell, "%px nb = 1")
    assert isinstance(result.result, ipp.AsyncResult)
    result.result.get(timeout=10)
    result, io_ = run(shell, "%px -b print('blocked')")
    assert result.result is None and "[stdout:0] blocked" in io_.stdout


def test_out_saves_the_async_result(shell, magics):
    result, _ = run(shell, "%%px -o saved\nprint('kept')")
    assert result.success
    saved = shell.user_ns["saved"]
    assert isinstance(saved, ipp.AsyncResult) and saved.done()
    assert saved.stdout == ["kept\n", "kept\n"]
    run(shell, "%pxresult -o again")
    assert shell.user_ns["again"] is saved
    run(shell, "%px --out line_saved 1")
    assert isinstance(shell.user_ns["line_saved"], ipp.AsyncResult)


def test_local_runs_here_too(shell, magics, dv):
    shell.user_ns.pop("both_sides", None)
    result, io_ = run(shell, "%%px --local\nboth_sides = 40 + 2\nprint('ran', both_sides)")
    assert result.success
    assert shell.user_ns["both_sides"] == 42
    assert dv.pull("both_sides") == [42, 42]
    assert "ran 42" in io_.stdout and "[stdout:0] ran 42" in io_.stdout


def test_verbose(shell, magics):
    _, io_ = run(shell, "%px --verbose v = 1")
    assert io_.stdout.startswith("Parallel execution on engine(s): all")
    _, io_ = run(shell, "%px -a --verbose -t 0 v = 1")
    assert io_.stdout.startswith("Async parallel execution on engine(s): [0]")
    run(shell, "%pxconfig --verbose")
    assert "Parallel execution" in run(shell, "%px v = 2")[1].stdout
    run(shell, "%pxconfig --no-verbose")
    assert "Parallel execution" not in run(shell, "%px v = 3")[1].stdout


def test_progress_after(shell, magics, monkeypatch):
    import ipyparallel_lite.client.progress as progress

    monkeypatch.setattr(progress, "is_interactive", lambda: True)  # a person is watching
    _, io_ = run(shell, "%%px --progress-after 0\nimport time\ntime.sleep(0.4)")
    assert "%px: 2/2 engines" in io_.stderr
    _, io_ = run(shell, "%%px --progress-after -1\nimport time\ntime.sleep(0.3)")
    assert "%px:" not in io_.stderr
    _, io_ = run(shell, "%%px --progress-after 5\nimport time\ntime.sleep(0.2)")
    assert "%px:" not in io_.stderr  # done before the progress line was due


# ---- %pxconfig ------------------------------------------------------------------------------


def test_pxconfig_sets_defaults(shell, magics):
    run(shell, "%px import sys")
    run(shell, "%pxconfig -t 1")
    assert magics.view.targets == 1
    _, io_ = run(shell, "%px print('where', eid)")
    assert io_.stdout.strip() == "[stdout:1] where 1"
    run(shell, "%pxconfig -t ::1 --no-stream --progress-after 7 --signal-on-interrupt KILL")
    assert magics.view.targets == [0, 1]
    assert magics.stream is False and magics.progress_after == 7
    assert magics.signal_on_interrupt == pxmod.signal.SIGKILL
    _, io_ = run(shell, "%pxconfig")
    assert "stream=False" in io_.stdout and "signal_on_interrupt=SIGKILL" in io_.stdout
    run(shell, "%pxconfig --stream -t all --group-outputs engine")
    assert magics.stream is True and magics.view.targets == "all" and magics.groupby == "engine"
    _, out = run_combined(shell, "%px --no-stream print('grouped'); print('e', file=sys.stderr)")
    assert shown_sequence(out) == ["[stdout:0] grouped", "[stderr:0] e",
                                   "[stdout:1] grouped", "[stderr:1] e"]
    # an invalid option changes nothing
    usage_error(shell, "%pxconfig --verbose --signal-on-interrupt SIGNOPE")
    assert magics.signal_on_interrupt == pxmod.signal.SIGKILL and magics.verbose is False


# ---- errors ---------------------------------------------------------------------------------------


def no_internals(text: str) -> None:
    """Nothing of our own code in what the user sees."""
    assert "ipyparallel_lite/" not in text and "site-packages" not in text, text


def test_remote_errors_show_a_summary_and_one_traceback(shell, magics):
    result, io_ = run(shell, "%px 1 / 0")
    err = result.error_in_exec
    assert isinstance(err, ipp.CompositeError) and len(err.elist) == 2
    out = io_.stdout
    assert "2 engines raised ZeroDivisionError: division by zero (engines 0-1)" in out
    assert out.count("Traceback (most recent call last)") == 1
    assert "[0:execute]" in out and ".print_traceback(i)" in out
    no_internals(out)
    # every traceback stays available
    assert "[1:execute]" in "\n".join(err.render_traceback(1))
    with pytest.raises(ipp.RemoteError, match="ZeroDivisionError"):
        err.raise_exception(1)


def test_error_on_one_engine_is_a_remote_error(shell, magics):
    result, io_ = run(shell, "%%px\nif eid == 1:\n    raise ValueError('only here')\nprint('fine', eid)")
    err = result.error_in_exec
    assert isinstance(err, ipp.CompositeError) and len(err.elist) == 1
    assert "[stdout:0] fine 0" in io_.stdout and "ValueError: only here" in io_.stdout
    result, io_ = run(shell, "%px -t 0 undefined_name")
    assert isinstance(result.error_in_exec, ipp.RemoteError)
    assert not isinstance(result.error_in_exec, ipp.CompositeError)
    assert "[0:execute]" in io_.stdout and "NameError" in io_.stdout
    no_internals(io_.stdout)


def test_non_remote_failures_are_one_line(shell, magics):
    ar = ipp.AsyncResult(magics.view.client, ["m1"], single=True)
    # what the client's I/O thread hands over for a request aborted before it ran
    ar._receive("m1", {"content": {"status": "aborted"}, "metadata": {}, "buffers": []})
    with pytest.raises(pxmod.ParallelMagicError) as info:
        pxmod.raise_remote_errors(ar)
    assert info.value._render_traceback_() == ["TaskAborted: Task m1 was aborted before it ran."]


def test_syntax_error_is_short_and_not_sent(shell, magics, dv):
    result, io_ = run(shell, "%%px\nnot_sent = 1\nx = = 2")
    assert isinstance(result.error_in_exec, pxmod.CellSyntaxError)
    assert "SyntaxError: invalid syntax" in io_.stdout and 'File "<%px cell>", line 2' in io_.stdout
    assert "Traceback" not in io_.stdout
    no_internals(io_.stdout)
    ar = dv.execute("print('not_sent' in dir())", block=False)
    ar.get(timeout=10)
    assert ar.stdout == ["False\n", "False\n"]
    result, io_ = run(shell, "%px if True")
    assert isinstance(result.error_in_exec, pxmod.CellSyntaxError)


def usage_error(shell, cell: str) -> str:
    """Run a cell that must fail with a UsageError; what it printed."""
    result, io_ = run(shell, cell)
    assert type(result.error_in_exec).__name__ == "UsageError", (cell, io_.stdout, io_.stderr)
    assert "Traceback" not in io_.stdout + io_.stderr
    return io_.stderr


def test_unknown_flag_is_a_usage_error(shell, magics):
    err = usage_error(shell, "%px --bogus a = 1")
    assert "unrecognized arguments: --bogus" in err and "%px [" in err
    err = usage_error(shell, "%%px --nope\na = 1")
    assert "unrecognized arguments: --nope" in err
    err = usage_error(shell, "%%px --group-outputs sideways\na = 1")
    assert "invalid choice: 'sideways'" in err
    err = usage_error(shell, "%pxresult --frobnicate")
    assert "unrecognized arguments" in err
    err = usage_error(shell, "%pxconfig --progress-after soon")
    assert "invalid float value" in err
    err = usage_error(shell, "%%px --signal-on-interrupt SIGFOO\na = 1")
    assert "unknown signal 'SIGFOO'" in err


def test_missing_targets_are_a_usage_error(shell, magics):
    assert "No engine with id 7" in usage_error(shell, "%px -t 7 a = 1")
    assert "No engine with id 5" in usage_error(shell, "%%px -t 0,5\na = 1")
    assert "bad targets" in usage_error(shell, "%px -t engines a = 1")
    assert "No engine with id 9" in usage_error(shell, "%pxconfig -t 9")
    assert magics.view.targets == "all"


def test_no_active_view(shell, magics):
    magics.view = None
    for cell in ("%px a = 1", "%%px\na = 1", "%autopx", "%pxconfig -t 0"):
        err = usage_error(shell, cell)
        assert "No active view" in err and "rc.activate()" in err, cell
    run(shell, "%load_ext ipyparallel_lite")  # loading the extension binds nothing
    assert "No active view" in usage_error(shell, "%px a = 1")


def test_pxresult_without_a_result(shell, px_rc):
    px_rc.activate(suffix="_fresh")
    assert "there is none yet" in usage_error(shell, "%pxresult_fresh")


def test_px_without_code(shell, magics):
    assert "needs code to run" in usage_error(shell, "%px")
    assert "needs code to run" in usage_error(shell, "%px -t 0")


def test_closed_client(shell, px_rc):
    other = ipp.Client(connection_info=px_rc.connection_info)
    other.activate(suffix="_closed")
    other.close()
    assert "closed" in usage_error(shell, "%px_closed a = 1")


# ---- Ctrl-C -----------------------------------------------------------------------------------


def test_ctrl_c_interrupts_the_engines(shell, magics):
    cell = "%%px -o slow\nimport time\nprint('started', flush=True)\ntime.sleep(30)\nprint('never')"
    timer = interrupt_after(1.0)
    start = time.monotonic()
    result, io_ = run(shell, cell)
    timer.join()
    assert time.monotonic() - start < 1.0 + pxmod.INTERRUPT_GRACE + 2
    assert result.success  # the magic returns; the interrupt is no error of the cell
    assert "sent SIGINT to engine(s) [0, 1]" in io_.stderr
    assert "[stdout:0] started" in io_.stdout and "never" not in io_.stdout
    slow = shell.user_ns["slow"]
    assert slow.wait(5)
    with pytest.raises(ipp.CompositeError, match="KeyboardInterrupt"):
        slow.get()
    _, io_ = run(shell, "%px print('still alive')")  # the engines survive
    assert "[stdout:1] still alive" in io_.stdout


def test_ctrl_c_with_signal_0_leaves_the_engines_running(shell, magics):
    cell = "%%px --signal-on-interrupt 0\nimport time\ntime.sleep(1.5)\nprint('finished anyway')"
    timer = interrupt_after(0.5)
    result, io_ = run(shell, cell)
    timer.join()
    assert result.success and "keep running" in io_.stderr
    assert "finished anyway" not in io_.stdout
    _, io_ = run(shell, "%pxresult")
    assert "[stdout:0] finished anyway" in io_.stdout


# ---- %autopx --------------------------------------------------------------------------------------


def test_autopx_sends_every_cell(shell, magics, dv):
    shell.user_ns.pop("auto_value", None)
    _, io_ = run(shell, "%autopx")
    assert "%autopx enabled" in io_.stdout
    # typed input is still judged complete on its own code
    assert shell.input_transformer_manager.check_complete("for i in range(3):")[0] == "incomplete"
    result, io_ = run(shell, "auto_value = 3 + eid\nprint('auto', auto_value)")
    assert result.success
    assert "[stdout:0] auto 3" in io_.stdout and "[stdout:1] auto 4" in io_.stdout
    assert "auto_value" not in shell.user_ns
    result, io_ = run(shell, "1 / 0")  # an error keeps autopx on
    assert isinstance(result.error_in_exec, ipp.CompositeError)
    _, io_ = run(shell, "%autopx")
    assert "%autopx disabled" in io_.stdout
    result, io_ = run(shell, "auto_here = 5")
    assert shell.user_ns["auto_here"] == 5
    assert dv.pull("auto_value") == [3, 4]


def test_autopx_leaves_our_magics_alone(shell, magics, dv):
    shell.user_ns.pop("auto_local", None)
    run(shell, "%autopx")
    try:
        result, _ = run(shell, "%%px --local\nauto_local = 8")  # runs here and there
        assert result.success
        result, io_ = run(shell, "%px -t 1 print('explicit', eid)")
        assert io_.stdout.strip() == "[stdout:1] explicit 1"
        run(shell, "%pxconfig --verbose")
        assert magics.verbose
        result, io_ = run(shell, "%pxresult")
        assert "[stdout:1] explicit 1" in io_.stdout
    finally:
        run(shell, "%autopx")
    assert magics._autopx is None
    assert shell.user_ns["auto_local"] == 8 and dv.pull("auto_local") == [8, 8]


# ---- pieces ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, argv, code", [
    ("a = 1", [], "a = 1"),
    ("-t 0 a = 1", ["-t", "0"], "a = 1"),
    ("--targets=0,1 --no-stream print(1)", ["--targets=0,1", "--no-stream"], "print(1)"),
    ("-a -o res x", ["-a", "-o", "res"], "x"),
    ("-t0 x", ["-t0"], "x"),
    ("-1 + a", [], "-1 + a"),
    ("-- -a", [], "-a"),
    ("--bogus x", ["--bogus"], "x"),
    ("%time x = 1", [], "%time x = 1"),
    ("  a = 1  ", [], "a = 1"),
    ("  -t 0 a", ["-t", "0"], "a"),
])
def test_split_line_flags(line, argv, code):
    assert pxmod.split_line_flags(line) == (argv, code)


def test_check_syntax_remembers_only_valid_cells():
    pxmod.check_syntax("remembered = 1")
    assert "remembered = 1" in pxmod._valid_cells
    for _ in range(2):  # an error is found every time
        with pytest.raises(pxmod.CellSyntaxError):
            pxmod.check_syntax("x = = 2")
    assert "x = = 2" not in pxmod._valid_cells
    pxmod.check_syntax("%time y = 1")  # valid only once transformed: not remembered
    assert "%time y = 1" not in pxmod._valid_cells


def test_options_without_flags_are_fresh_defaults(magics):
    parser = magics.px.parser
    first = pxmod._parse(parser, [])
    assert vars(first) == vars(parser.parse_args([]))
    first.targets = "changed"
    assert pxmod._parse(parser, []).targets is None
    assert pxmod._parse(magics.cell_px.parser, "  ").targets is None


def test_parse_targets(px_rc):
    assert pxmod.parse_targets("all", px_rc) == "all"
    assert pxmod.parse_targets("1", px_rc) == 1
    assert pxmod.parse_targets("-1", px_rc) == -1
    assert pxmod.parse_targets("0,1", px_rc) == [0, 1]
    assert pxmod.parse_targets("[1]", px_rc) == [1]
    assert pxmod.parse_targets("::2", px_rc) == [0]
    assert pxmod.parse_targets("1:", px_rc) == [1]
    with pytest.raises(pxmod.UsageError, match="slice"):
        pxmod.parse_targets("a:b", px_rc)


def test_parse_signal():
    signal = pxmod.signal
    assert pxmod.parse_signal("SIGINT") == signal.SIGINT
    assert pxmod.parse_signal("term") == signal.SIGTERM
    assert pxmod.parse_signal("9") == signal.SIGKILL
    assert pxmod.parse_signal("0") == 0
    with pytest.raises(pxmod.UsageError, match="unknown signal"):
        pxmod.parse_signal("999")
