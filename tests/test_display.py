"""Engine output redrawn with ``\\r`` (progress lines, tqdm bars) under ``%%px`` and
``display_outputs``, and the progress bars and reprs the client shows.

The terminal is emulated just enough to read what a person would see: ``\\r``,
``\\n``, "cursor up N lines" and "erase to end of line".
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from ipyparallel_lite.client.display import final_lines
from ipyparallel_lite.client.progress import Progress

pytestmark = pytest.mark.timeout(120)

PROGRESS_CELL = """%%px
import sys, time
from tqdm import tqdm
for i in range(1, 6):
    sys.stderr.write(f"\\rstep {i}/5 of engine {get_ipython().kernel.engine_id}")
    sys.stderr.flush()
    time.sleep(0.12)
sys.stderr.write("\\n")
for _ in tqdm(range(4), file=sys.stderr, ncols=50, mininterval=0, desc="bar"):
    time.sleep(0.12)
print("done")
"""


def screen(text: str) -> list[str]:
    """The lines a terminal shows after receiving ``text``."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[(\d*)([FK])|(\r)|(\n)|([^\x1b\r\n]+)", text):
        count, code, cr, nl, chars = token
        if code == "F":
            row, col = max(row - int(count), 0), 0
        elif code == "K":
            lines[row] = lines[row][:col]
        elif cr:
            col = 0
        elif nl:
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        else:
            line = lines[row]
            lines[row] = line[:col] + chars + line[col + len(chars):]
            col += len(chars)
    return [line for line in lines if line]


def test_screen_emulation():
    assert screen("a\rb\n") == ["b"]
    assert screen("x\ny\n\x1b[2Fp\x1b[K\nq\x1b[K\n") == ["p", "q"]


def test_px_progress_lines_update_in_place_one_per_engine(shell, rc):
    rc.activate()
    terminal = io.StringIO()  # stdout and stderr on one screen, as in a terminal
    with contextlib.redirect_stderr(terminal), contextlib.redirect_stdout(terminal):
        assert shell.run_cell(PROGRESS_CELL, store_history=False).success
    shown = screen(terminal.getvalue())
    for eid in (0, 1):
        mine = [line for line in shown if line.startswith(f"[stderr:{eid}] ")]
        # the \r line and the tqdm bar: each one line, in its final state
        assert len(mine) == 2, shown
        assert mine[0] == f"[stderr:{eid}] step 5/5 of engine {eid}", shown
        assert mine[1].startswith(f"[stderr:{eid}] bar: 100%") and "4/4" in mine[1], shown
    assert sorted(line for line in shown if line.startswith("[stdout:")) == [
        "[stdout:0] done", "[stdout:1] done"]
    assert len(shown) == 6, shown


def test_display_outputs_shows_final_state_of_redrawn_lines(rc, capsys):
    ar = rc[:].execute("import sys\nfor i in range(3):\n    sys.stdout.write(f'\\r{i} of 2')\n"
                       "sys.stdout.write('\\n')\nprint('after')", block=False)
    ar.get(timeout=30)
    capsys.readouterr()
    ar.display_outputs()
    assert capsys.readouterr().out == "[stdout:0] 2 of 2\nafter\n[stdout:1] 2 of 2\nafter\n"
    assert final_lines("a\rb\r\nc\rd") == "b\nd"


def test_progress_ends_on_the_last_count_given(capsys):
    # the last update comes faster than min_interval: it is still what the bar ends on
    with Progress(total=12, label="tasks", enabled=True, min_interval=60) as bar:
        bar.update(10)
        bar.update(12)
    shown = screen(capsys.readouterr().err)
    assert len(shown) == 1 and shown[0].startswith("tasks: 12/12 ") and "100%" in shown[0], shown
    with Progress(total=3, label="quiet", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_reprs(cluster, rc, lview):
    assert repr(rc) == "<Client(profile='default', cluster_id='session', engines=2)>"
    assert "2: 0-1" in rc._repr_html_() and "session" in rc._repr_html_()
    assert repr(cluster) == "<Cluster(cluster_id='session', profile='default', controller=running, engines=2)>"
    html = cluster._repr_html_()
    assert "running (pid" in html and "2 running of n=2" in html
    assert "engines 0-1" in rc[:]._repr_html_() and "engine 1<" in rc[1]._repr_html_()
    assert "all engines" in lview._repr_html_()
    assert lview._repr_html_().startswith("<div><strong>LoadBalancedView")
    ar = lview.map_async(abs, range(-4, 0))
    ar.get(timeout=30)
    assert "<progress value='4' max='4'>" in ar._repr_html_() and "finished" in ar._repr_html_()


def test_wait_interactive_ends_on_the_full_count_of_a_map(rc, capsys, monkeypatch):
    import ipyparallel_lite.client.progress as progress

    monkeypatch.setattr(progress, "is_interactive", lambda: True)  # a person is watching
    ar = rc[:].map_async(lambda x: __import__("time").sleep(0.3) or x, range(12))
    ar.wait_interactive()
    assert ar.get() == list(range(12))
    shown = screen(capsys.readouterr().err)
    assert shown and shown[-1].startswith("<lambda>: 12/12 ") and "100%" in shown[-1], shown
