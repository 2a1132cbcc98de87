"""Every notebook in notebooks/ runs headlessly on a real kernel, and shows what it promises.

The kernel is "python3" resolved to the interpreter running the tests (a kernelspec in
a private JUPYTER_PATH, which Jupyter searches first). Processes the kernel starts are
noted after every cell and killed if the notebook leaves any behind.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.timeout(120)

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: what running a notebook may take, all cells together
BUDGET = 60


@pytest.fixture(scope="module", autouse=True)
def python3_kernel(tmp_path_factory):
    """A "python3" kernelspec that runs this interpreter, found before any other."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipyparallel_lite tests)",
        "language": "python",
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        yield spec


def run_notebook(path: Path) -> tuple[nbformat.NotebookNode, float]:
    """Execute a notebook; (the executed notebook, seconds taken). Fails on an error cell."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=BUDGET, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    started: dict[int, psutil.Process] = {}

    def note_processes(**_: object) -> None:
        pid = getattr(getattr(client.km, "provisioner", None), "pid", None)
        if pid is None:
            return
        try:
            for proc in psutil.Process(pid).children(recursive=True):
                started.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass

    client.on_cell_executed = note_processes
    start = time.monotonic()
    try:
        client.execute()
    finally:
        leftovers = [p for p in started.values() if _alive(p)]
        for proc in leftovers:
            proc.kill()
    assert not leftovers, f"{path.name} left processes running: {leftovers}"
    return nb, time.monotonic() - start


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def text_of(output: dict) -> str:
    """The readable text of one output, without terminal colours."""
    if output["output_type"] == "stream":
        text = output["text"]
    elif output["output_type"] == "error":
        text = "\n".join(output["traceback"])
    else:
        data = output.get("data", {})
        text = "\n".join(str(data.get(k, "")) for k in ("text/plain", "text/html"))
    return ANSI.sub("", text)


def cell_with(nb: nbformat.NotebookNode, snippet: str) -> dict:
    matches = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    assert len(matches) == 1, f"{len(matches)} cells contain {snippet!r}"
    return matches[0]


def output_text(nb: nbformat.NotebookNode, snippet: str) -> str:
    return "".join(text_of(o) for o in cell_with(nb, snippet).outputs)


@pytest.fixture(scope="module")
def executed() -> dict:
    """Notebooks run once each, by name, shared by the checks below."""
    return {}


def notebook(executed: dict, name: str) -> nbformat.NotebookNode:
    if name not in executed:
        executed[name] = run_notebook(NOTEBOOK_DIR / name)
    return executed[name][0]


# ---- every notebook ---------------------------------------------------------------------------


def test_there_are_example_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {
        "01-quickstart.ipynb", "02-task-farm.ipynb", "03-numpy-data-parallel.ipynb",
        "ipyparallel_tutorial.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_cleanly_and_quickly(executed, path):
    nb = notebook(executed, path.name)
    seconds = executed[path.name][1]
    assert seconds < BUDGET, f"{path.name} took {seconds:.1f}s"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, cell.source
        errors = [o for o in cell.outputs if o.output_type == "error"]
        expected = "raises-exception" in cell.metadata.get("tags", [])
        assert bool(errors) == expected, (cell.source, [text_of(o) for o in errors])
    assert "stop_cluster" in nb.cells[-1].source  # and it ran without error, as checked above


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


# ---- what each one shows ------------------------------------------------------------------------


def test_quickstart_outputs(executed):
    nb = notebook(executed, "01-quickstart.ipynb")
    hello = output_text(nb, "pid = os.getpid()")
    assert "[stdout:0] engine process" in hello and "[stdout:1] engine process" in hello
    results = output_text(nb, "%px 6 * 7")
    assert re.search(r"Out\[0:\d+\]: 42", results) and re.search(r"Out\[1:\d+\]: 42", results)
    rich = cell_with(nb, "display(HTML(")
    html = [o for o in rich.outputs if "text/html" in o.get("data", {})]
    assert len(html) == 2 and all("rich output" in o.data["text/html"] for o in html)
    assert sorted(o.metadata["engine"] for o in html) == [0, 1]
    assert "[output:0]" in output_text(nb, "display(HTML(")
    progress = output_text(nb, "clear_output(wait=True)")
    # each engine's last line stays, earlier ones were cleared by that engine only
    assert "[stdout:0] step 3 of 3" in progress and "[stdout:1] step 3 of 3" in progress, progress
    assert "step 1 of 3" not in progress and "step 2 of 3" not in progress, progress
    only = output_text(nb, "%%px -t 0")
    assert "[stdout:0] only engine 0" in only and "[stdout:1]" not in only
    assert "AsyncResult" in output_text(nb, "%%px -a -o nap")
    nap = output_text(nb, "%pxresult")
    assert "[stdout:0] done after a nap" in nap and "[stdout:1] done after a nap" in nap
    assert "every engine is done: True" in output_text(nb, "nap.elapsed")
    error = cell_with(nb, "1 / 0")
    (err,) = [o for o in error.outputs if o.output_type == "error"]
    shown = text_of(err)
    assert "2 engines raised ZeroDivisionError: division by zero (engines 0-1)" in shown
    assert shown.count("Traceback (most recent call last)") == 1
    assert "ipyparallel_lite/" not in shown


def test_task_farm_outputs(executed):
    nb = notebook(executed, "02-task-farm.ipynb")
    assert "106239 has the longest chain below 120000: 353 steps" in output_text(nb, "map_async(longest_chain, starts, stops)")
    shared = output_text(nb, "tasks per engine")
    counts = {int(k): int(v) for k, v in re.findall(r"(\d+): (\d+)", shared.split("\n")[0])}
    assert set(counts) == {0, 1} and sum(counts.values()) == 24
    assert "speed-up" in shared
    assert output_text(nb, "ordered=False").count("block done") == 8
    assert "the farm agrees" in output_text(nb, "assert lview.map_sync")


def test_numpy_outputs(executed):
    nb = notebook(executed, "03-numpy-data-parallel.ipynb")
    parts = output_text(nb, 'dview.scatter("x", x)')
    assert "[stdout:0] 500000 samples here" in parts and "[stdout:1] 500000 samples here" in parts
    assert "from 1000000 samples on 2 engines" in output_text(nb, 'dview.pull("part")')
    assert output_text(nb, 'dview.gather("y")').strip() == "(1000000,) True"
    assert output_text(nb, "A @ v").strip() == "(2000,) True"


def test_ipyparallel_tutorial_outputs(executed):
    nb = notebook(executed, "ipyparallel_tutorial.ipynb")
    assert output_text(nb, "rc.ids").strip().endswith("[0, 1]")
    # %%px without activate() or %load_ext: the first Client activated the magics
    px = output_text(nb, "print('sum of squares'")
    assert "[stdout:0] sum of squares 14" in px and "[stdout:1] sum of squares 14" in px
    assert output_text(nb, "dview.apply_sync(scaled_total)").strip() == "[140, 140]"
    references = output_text(nb, "ipp.Reference('part')")
    assert "sums: [10, 35]" in references and "nested: [2, 2]" in references
    assert "sorted: [[4, 3, 2, 1, 0], [9, 8, 7, 6, 5]]" in references
    remote = output_text(nb, "@ipp.remote(dview")
    assert "engine processes: 2" in remote
    assert "collatz steps: [0, 1, 7, 2, 5, 8, 16, 3, 19, 6]" in remote
    mapped = output_text(nb, "lview.map_sync")
    assert "odd squares: [1, 9, 25, 49]" in mapped and "lazily: [1, 2, 3, 4]" in mapped
    published = output_text(nb, "publish_data")
    assert "steps seen while running: [1, 2, 3] ..." in published and "finished" in published


def test_one_engines_clear_output_keeps_the_others_output(tmp_path):
    # engine 1 keeps redrawing its progress line after engine 0 finished: in a notebook its
    # clears must not wipe engine 0's last line, nor leave its own earlier lines behind
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        "import ipyparallel_lite as ipp\ncluster = ipp.Cluster(n=2)\nrc = cluster.start_and_connect_sync()\n"
        "dview = rc.activate()",
        "%%px\nimport time\nfrom IPython.display import clear_output\n"
        "me = get_ipython().kernel.engine_id\n"
        "for step in range(1, 3 + 5 * me):\n"
        "    clear_output(wait=True)\n"
        "    print(f'engine {me} at step {step}')\n"
        "    time.sleep(0.05)",
        "cluster.stop_cluster_sync()",
    )]
    path = tmp_path / "clear.ipynb"
    nbformat.write(nb, path)
    executed, _ = run_notebook(path)
    shown = "".join(text_of(o) for o in executed.cells[1].outputs)
    assert "[stdout:0] engine 0 at step 2" in shown, shown
    assert "[stdout:1] engine 1 at step 7" in shown, shown
    assert "step 1" not in shown and "step 6" not in shown, shown


WIDGET = "application/vnd.jupyter.widget-view+json"


def test_progress_and_reprs_outputs(executed):
    nb = notebook(executed, "04-progress-and-reprs.ipynb")
    # starting engines and wait_interactive() each show a progress widget...
    for snippet in ("start_and_connect_sync", "ar.wait_interactive()"):
        widgets = [o for o in cell_with(nb, snippet).outputs if WIDGET in o.get("data", {})]
        assert len(widgets) == 1, cell_with(nb, snippet).outputs
    # ...whose bars end on the right count
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    bars = sorted((m["state"]["value"], m["state"]["max"]) for m in state.values()
                  if m["model_name"] == "FloatProgressModel")
    assert bars == [(2, 2), (12, 12)], bars
    # rich views
    assert "<strong>Cluster</strong>" in output_text(nb, "rc = cluster.start_and_connect_sync")
    [client_cell] = [c for c in nb.cells if c.source == "rc"]
    assert "<strong>Client</strong>" in "".join(text_of(o) for o in client_cell.outputs)
    assert "<strong>LoadBalancedView</strong>" in output_text(nb, "lview = rc.load_balanced_view()")
    assert "<progress value='12' max='12'>" in output_text(nb, "ar.wait_interactive()")
    # an engine's tqdm bar: one final line per engine, labelled
    lines = [text_of(o) for o in cell_with(nb, "from tqdm import tqdm").outputs]
    assert len(lines) == 2, lines
    for eid in (0, 1):
        [mine] = [line for line in lines if line.startswith(f"[stderr:{eid}] work: 100%")]
        assert "6/6" in mine and "\r" not in mine
