"""``ipcluster-lite``: start/stop/list run in subprocesses against a private IPython dir.

Every test gets its own ``--ipython-dir`` (and ``IPYTHONDIR``) under ``tmp_path``; a
finally kills whatever process still names that directory on its command line.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import ipcluster as cli

import ipyparallel_lite as ipp

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "ipyparallel_lite.cluster"]


def _processes_using(ipython_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if ipython_dir in " ".join(proc.cmdline()) and proc.pid != os.getpid():
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def ipdir(tmp_path: Path):
    """A private IPython dir; anything still running from it afterwards is killed."""
    d = str(tmp_path.resolve() / "ipython")
    try:
        yield d
    finally:
        strays = _processes_using(d)
        for proc in strays:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(strays, timeout=5)
        assert not [p for p in strays if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def listed(ipdir: str, *args: str) -> list[dict]:
    out = cli(ipdir, "list", "-o", "json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def assert_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"still running: {alive}")


def test_daemonized_start_client_list_stop(ipdir):
    t0 = time.monotonic()
    out = cli(ipdir, "start", "-n", "2", "--daemonize", "--profile", "clitest")
    assert out.returncode == 0, out.stderr
    assert "(profile clitest): 2 engines ready in" in out.stdout
    print(f"start -n 2 --daemonize took {time.monotonic() - t0:.2f}s: {out.stdout.splitlines()[0]}")

    # the default cluster id is '': a plain Client(profile=...) finds it
    rc = ipp.Client(profile="clitest", ipython_dir=ipdir)
    try:
        rc.wait_for_engines(2, timeout=30)
        assert len(rc.ids) == 2
        assert rc[:].apply_sync(lambda x: x * 2, 21) == [42, 42]
    finally:
        rc.close()

    [row] = listed(ipdir)
    assert (row["profile"], row["cluster_id"], row["engines"]) == ("clitest", "", 2)
    pids = [row["controller_pid"], *row["engine_pids"]]
    assert all(psutil.pid_exists(p) for p in pids)
    text = cli(ipdir, "list", "--profile", "clitest")
    assert text.returncode == 0
    assert "CLUSTER ID" in text.stdout and str(row["controller_pid"]) in text.stdout

    again = cli(ipdir, "start", "-n", "1", "--daemonize", "--profile", "clitest")
    assert again.returncode == 10 and "already running" in again.stderr

    stop = cli(ipdir, "stop", "--profile", "clitest")
    assert stop.returncode == 0, stop.stderr
    assert "Stopped cluster '' (profile clitest): 2 engines and the controller" in stop.stdout
    assert_gone(pids)
    security = Path(ipdir, "profile_clitest", "security")
    assert not list(security.glob("*.json")), list(security.iterdir())
    assert listed(ipdir) == []


def _read_lines(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def test_foreground_start_then_sigint(ipdir):
    proc = subprocess.Popen([*CLI, "start", "-n", "2", "--cluster-id", "fg", "--ipython-dir", ipdir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "IPYTHONDIR": ipdir})
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
        line = lines.get(timeout=90)
        assert line and "Cluster fg (profile default): 2 engines ready" in line, proc.stderr.read()
        [row] = listed(ipdir)
        assert row["cluster_id"] == "fg" and row["engines"] == 2
        pids = [row["controller_pid"], *row["engine_pids"]]

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        rest = []
        while (line := lines.get(timeout=5)) is not None:
            rest.append(line)
        assert any("Stopped cluster fg" in line for line in rest), rest
        assert_gone(pids)
        assert listed(ipdir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_failed_start_reports_log_and_leaves_nothing(ipdir, tmp_path):
    broken = tmp_path / "broken"
    (broken / "ipykernel").mkdir(parents=True)
    (broken / "ipykernel" / "__init__.py").write_text("raise ImportError('sabotaged engine')\n")
    out = cli(ipdir, "start", "-n", "2", "--daemonize", env={"PYTHONPATH": str(broken)})
    assert out.returncode == 1
    assert "engines exited" in out.stderr and "sabotaged engine" in out.stderr
    assert out.stdout == ""
    assert not _processes_using(ipdir)
    assert not list(Path(ipdir, "profile_default", "security").glob("*.json"))


def test_stop_without_cluster(ipdir):
    out = cli(ipdir, "stop", "--cluster-id", "nope")
    assert out.returncode == 11
    assert "no cluster nope in profile default" in out.stderr
    out = cli(ipdir, "stop", "--all")
    assert out.returncode == 0 and "No running clusters" in out.stdout


def test_stale_cluster_file_is_pruned_and_recycled_pid_spared(ipdir):
    """A cluster file whose pids now belong to other programs: nothing is signalled."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        security = Path(ipdir, "profile_default", "security")
        security.mkdir(parents=True)
        record = {"args": [sys.executable, "-m", "ipyparallel_lite.controller"],
                  "log_file": str(security / "x.log"), "pid": bystander.pid, "daemonize": True}
        cluster = {"cluster": {"cluster_id": "stale", "profile": "default", "n": 1,
                               "ipython_dir": ipdir},
                   "controller": record, "engines": {"s": [record]}}
        path = security / "cluster-stale.json"
        path.write_text(json.dumps(cluster))
        out = cli(ipdir, "stop", "--cluster-id", "stale")
        assert out.returncode == 11 and "not running" in out.stderr
        assert not path.exists()
        path.write_text(json.dumps(cluster))
        assert listed(ipdir) == []
        assert not path.exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_usage_errors_and_help(ipdir):
    out = cli(ipdir, "start", "--bogus")
    assert out.returncode == 2
    assert "usage: ipcluster-lite start" in out.stderr
    assert "unrecognized arguments: --bogus" in out.stderr
    assert cli(ipdir, "stop", "--all", "--cluster-id", "x").returncode == 2
    assert cli(ipdir, "start", "-n", "many").returncode == 2
    assert subprocess.run(CLI, capture_output=True).returncode == 2
    for command in ("start", "stop", "list", "engines", "clean"):
        out = cli(ipdir, command, "--help")
        assert out.returncode == 0 and f"usage: ipcluster-lite {command}" in out.stdout
    script = shutil.which("ipcluster-lite", path=os.path.dirname(sys.executable))
    if script:
        out = subprocess.run([script, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "{start,stop,list,engines,clean}" in out.stdout
