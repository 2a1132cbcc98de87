"""Configuration, options and logs of every command, on real clusters.

A profile's ``ipcluster_config.py``, ``ipcontroller_config.py``, ``ipengine_config.py``
and ``startup/`` files reach the running cluster; ``--Class.trait=value`` works on the
command line; logs are at INFO with timestamps, one file per process; a broken config
file stops the start with one message naming its file and line, and leaves nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import our_processes

import ipyparallel_lite as ipp
from ipyparallel_lite.cluster.app import main as ipcluster_main
from ipyparallel_lite.config import ConfigFileError
from ipyparallel_lite.processes import pid_running

pytestmark = pytest.mark.timeout(120)

TIMESTAMPED_INFO = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[(ipcontroller-lite|ipengine-lite) \d+\] INFO \| ")


def write_profile(ipython_dir: str, name: str, files: dict[str, str]) -> Path:
    folder = Path(ipython_dir, f"profile_{name}")
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def new_processes(before: set[int]) -> list[psutil.Process]:
    return [p for p in our_processes()
            if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def command(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def test_each_profile_config_file_reaches_the_running_cluster(ipython_dir):
    write_profile(ipython_dir, "configured", {
        "ipcluster_config.py": "c = get_config()\nc.Cluster.n = 3\n",
        "ipcontroller_config.py": "c = get_config()\nc.TaskScheduler.scheme_name = 'lru'\n",
        "ipengine_config.py": "c = get_config()\nc.IPEngine.startup_command = 'from_config = 42'\n",
        "startup/00-answer.py": "from_startup = 'startup file ran'\n",
    })
    cluster = ipp.Cluster(profile="configured")
    assert cluster.n == 3
    with cluster as rc:
        assert len(rc.ids) == 3
        assert rc.connection_info["task_scheme"] == "lru"
        dv = rc[:]
        assert dv.pull("from_config", block=True) == [42, 42, 42]
        assert dv.pull("from_startup", block=True) == ["startup file ran"] * 3
    # keyword arguments win over the file
    assert ipp.Cluster(profile="configured", n=1).n == 1
    assert ipp.Cluster(profile="configured", load_profile=False).n == (os.cpu_count() or 1)


def test_class_trait_options_on_the_command_line(own_cluster):
    cluster, rc = own_cluster(1, controller_args=["--TaskScheduler.scheme_name=weighted"],
                              engine_args=["--IPEngine.startup_command=from_cli = 'yes'"])
    assert rc.connection_info["task_scheme"] == "weighted"
    assert rc[0].pull("from_cli", block=True) == "yes"


def test_ipcluster_start_options_debug_and_clean(ipython_dir, capsys):
    """``ipcluster-lite start --Cluster.n=1 --debug``: one engine, everything at DEBUG,
    a log file per process; ``clean`` then removes the logs of processes that are gone."""
    ipdir = str(Path(ipython_dir, "cli-debug"))
    args = ["--ipython-dir", ipdir, "--profile", "dbg", "--cluster-id", "d1"]
    try:
        assert ipcluster_main(["start", "--daemonize", "--Cluster.n=1", "--debug", *args]) == 0
        assert "(profile dbg): 1 engines ready" in capsys.readouterr().out
        rc = ipp.Client(profile="dbg", cluster_id="d1", ipython_dir=ipdir)
        try:
            assert rc.ids == [0]
            rc[0].apply_sync(abs, -1)
        finally:
            rc.close()
        logs = Path(ipdir, "profile_dbg", "log")
        [controller_log] = logs.glob("ipcontroller-d1-*.log")
        [engine_log] = logs.glob("ipengine-d1-*.log")
        assert " DEBUG | " in controller_log.read_text()
        assert " DEBUG | " in engine_log.read_text()
    finally:
        assert ipcluster_main(["stop", *args]) == 0
    deadline = time.monotonic() + 10
    while any(pid_running(int(p.stem.rsplit("-", 1)[1])) for p in logs.glob("*.log")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    stray = logs / "ipengine-old-999999999.log"
    stray.write_text("from a process long gone\n")
    capsys.readouterr()
    assert ipcluster_main(["clean", "--ipython-dir", ipdir, "--profile", "dbg"]) == 0
    assert "Removed 3 log files" in capsys.readouterr().out
    assert list(logs.iterdir()) == []


def test_logs_are_info_with_timestamps_one_file_per_process(cluster, rc):
    """The session cluster, started plainly: INFO lines with time, command and pid."""
    rc[:].apply_sync(abs, -1)  # every engine is through its start-up
    logs = cluster.profile_dir / "log"
    pids = [cluster.controller.pid] + [e.pid for v in cluster.engines.values() for e in v]
    for pid, prefix in zip(pids, ["ipcontroller"] + ["ipengine"] * (len(pids) - 1)):
        path = logs / f"{prefix}-{cluster.cluster_id}-{pid}.log"
        lines = path.read_text().splitlines()
        info = [line for line in lines if TIMESTAMPED_INFO.match(line)]
        assert info, (path, lines)
        assert all(f" {pid}] " in line for line in info)
        assert not any(" DEBUG | " in line for line in lines)


def test_help_of_each_command_lists_its_own_options():
    engine = command("ipyparallel_lite.engine", "--help")
    assert engine.returncode == 0
    for option in ("--file", "--profile", "--profile-dir", "--cluster-id", "--debug", "--timeout"):
        assert option in engine.stdout
    # not the kernel's: no connection ports, no `install` subcommand
    for foreign in ("--shell=", "--hb=", "--transport", "install"):
        assert foreign not in engine.stdout
    controller = command("ipyparallel_lite.controller", "--help")
    assert controller.returncode == 0
    for option in ("--ip", "--scheme", "--hwm", "--profile", "--cluster-id", "--debug"):
        assert option in controller.stdout
    start = command("ipyparallel_lite.cluster", "start", "--help")
    assert start.returncode == 0
    for option in ("-n", "--daemonize", "--profile", "--cluster-id", "--debug", "--ip"):
        assert option in start.stdout


def test_engine_without_controller_says_so_in_one_line(tmp_path):
    (tmp_path / "profile_default").mkdir()  # else IPython logs that it created it
    out = command("ipyparallel_lite.engine", "--timeout=0.5", "--ipython-dir", str(tmp_path))
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "no controller" in out.stderr and "ipcontroller-engine.json" in out.stderr


@pytest.mark.parametrize("name, text, line, says", [
    ("ipcluster_config.py", "c = get_config()\nc.Cluster.n = (3\n", 2, "syntax error"),
    ("ipcluster_config.py", "c = get_config()\n\nc.Cluster.nn = 3\n", 3, "Cluster has no setting 'nn'; did you mean Cluster.n?"),
    ("ipcontroller_config.py", "c = get_config()\nc.TaskScheduler.scheme = 'lru'\n", 2, "TaskScheduler has no setting 'scheme'"),
    ("ipengine_config.py", "c = get_config()\nc.IPEngine.startup_command = 'x = 1'\n1 / 0\n", 3, "ZeroDivisionError"),
])
def test_broken_config_file_named_with_line_and_nothing_starts(ipython_dir, name, text, line, says):
    profile = f"broken-{name.split('_')[0]}-{line}"
    folder = write_profile(ipython_dir, profile, {name: text})
    before = {p.pid for p in our_processes()}
    with pytest.raises(ConfigFileError) as info:
        ipp.Cluster(n=1, profile=profile).start_cluster_sync()
    assert str(info.value).startswith(f"{folder / name}, line {line}: ")
    assert says in str(info.value)
    assert not new_processes(before)
    assert not list((folder / "security").glob("*.json"))


def test_ipcluster_start_with_broken_config_exits_1_and_leaves_nothing(ipython_dir, capsys):
    ipdir = str(Path(ipython_dir, "cli-broken"))
    folder = write_profile(ipdir, "default", {
        "ipengine_config.py": "c = get_config()\nc.IPEngine.startup_comand = 'x = 1'\n"})
    before = {p.pid for p in our_processes()}
    assert ipcluster_main(["start", "-n", "1", "--ipython-dir", ipdir]) == 1
    err = capsys.readouterr().err
    assert (f"ipcluster-lite start: error in config file {folder / 'ipengine_config.py'}, line 2: "
            "IPEngine has no setting 'startup_comand'; did you mean IPEngine.startup_command?") in err
    assert not new_processes(before)
    assert not list((folder / "security").glob("*.json"))


def test_start_controller_returns_when_a_client_can_connect(ipython_dir):
    cluster = ipp.Cluster(n=0, profile="early", cluster_id="")
    try:
        cluster.start_controller_sync()
        rc = ipp.Client(profile="early")  # right away: no FileNotFoundError
        rc.close()
        rc = cluster.connect_client_sync()
        assert rc.ids == []
    finally:
        cluster.stop_cluster_sync()


def test_cluster_api_engine_sets_files_signals_and_restart(ipython_dir):
    cluster = ipp.Cluster(n=1, profile="api", engine_timeout=60)
    try:
        rc = cluster.start_and_connect_sync()
        first = next(iter(cluster.engines))
        second = cluster.start_engines_sync(1)
        cluster.wait_for_engines(rc, 2)
        assert cluster.engine_count == 2 and set(cluster.engines) == {first, second}

        # another process's view of the cluster, from its file
        d = cluster.to_dict()
        assert d["cluster"]["cluster_id"] == cluster.cluster_id and d["cluster"]["n"] == 1
        again = ipp.Cluster.from_file(profile="api", cluster_id=cluster.cluster_id)
        assert again.engine_count == 2 and again.controller.pid == cluster.controller.pid
        assert json.loads(cluster.cluster_file.read_text()) == d

        [victim] = cluster.engines[second]
        cluster.signal_engines_sync(signal.SIGKILL, second)
        assert psutil.Process(victim.pid).wait(10) == -signal.SIGKILL
        cluster.restart_engines_sync(second)
        assert cluster.engine_count == 2
        cluster.wait_for_engines(rc, 2)  # the restarted engine registered
        deadline = time.monotonic() + 20
        while len(rc.ids) != 2:  # the killed one is noticed and removed
            assert time.monotonic() < deadline, rc.ids
            time.sleep(0.05)
        cluster.stop_engines_sync(second)
        assert set(cluster.engines) == {first}
        with pytest.raises(KeyError, match="no engine set 'nope'"):
            cluster.stop_engines_sync("nope")
    finally:
        cluster.stop_cluster_sync()
    assert not cluster.cluster_file.exists()


def test_ipcluster_engines_adds_to_a_running_cluster(ipython_dir, capsys):
    ipdir = str(Path(ipython_dir, "cli-engines"))
    args = ["--ipython-dir", ipdir, "--cluster-id", "grow"]
    try:
        assert ipcluster_main(["start", "-n", "1", "--daemonize", *args]) == 0
        assert ipcluster_main(["engines", "-n", "1", *args]) == 0
        assert "Added 1 engines to cluster grow (profile default): 2 engines now." in capsys.readouterr().out
        rc = ipp.Client(cluster_id="grow", ipython_dir=ipdir)
        try:
            rc.wait_for_engines(2, timeout=30)
            assert len(rc.ids) == 2
        finally:
            rc.close()
    finally:
        assert ipcluster_main(["stop", *args]) == 0
    assert "2 engines and the controller" in capsys.readouterr().out
    assert ipcluster_main(["engines", "-n", "1", *args]) == 11


def test_cluster_left_running_is_stopped_when_the_process_exits(tmp_path):
    """``shutdown_atexit`` (default): a script that forgets stop_cluster leaves nothing."""
    script = ("import ipyparallel_lite as ipp\n"
              "c = ipp.Cluster(n=1, cluster_id='forgotten')\n"
              "rc = c.start_and_connect_sync()\n"
              "print(c.controller.pid, *[e.pid for v in c.engines.values() for e in v])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90,
                         env={**os.environ, "IPYTHONDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2 and not any(pid_running(p) for p in pids)
    assert not list(Path(tmp_path, "profile_default", "security").glob("*.json"))


def test_commands_started_by_hand_use_the_named_profile(ipython_dir):
    """``ipcontroller-lite --profile P`` and ``ipengine-lite --profile P``: that profile's
    config files and startup files, not profile_default's."""
    write_profile(ipython_dir, "byhand", {
        "ipcontroller_config.py": "c = get_config()\nc.TaskScheduler.scheme_name = 'twobin'\n",
        "ipengine_config.py": "c = get_config()\nc.EngineApp.startup_command = 'via = \"EngineApp\"'\n",
        "startup/10-here.py": "profile_seen = 'byhand'\n",
    })
    args = ["--profile", "byhand", "--cluster-id", "h", "--ipython-dir", ipython_dir]
    controller = subprocess.Popen([sys.executable, "-m", "ipyparallel_lite.controller", *args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = subprocess.Popen([sys.executable, "-m", "ipyparallel_lite.engine", *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        security = Path(ipython_dir, "profile_byhand", "security", "ipcontroller-h-client.json")
        deadline = time.monotonic() + 30
        while not security.exists():
            assert time.monotonic() < deadline and controller.poll() is None
            time.sleep(0.05)
        rc = ipp.Client(profile="byhand", cluster_id="h")
        try:
            rc.wait_for_engines(1, timeout=60)
            assert rc.connection_info["task_scheme"] == "twobin"
            assert rc[0].pull(["via", "profile_seen"], block=True) == ["EngineApp", "byhand"]
        finally:
            rc.close()
    finally:
        for proc in (engine, controller):
            proc.terminate()
            proc.wait(10)
