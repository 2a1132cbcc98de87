"""The launcher seam: launchers selected by name, recorded in and restored from the cluster
file, and a failed launch reported with its command and output, nothing left running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import tomllib

import ipyparallel_lite as ipp
from ipyparallel_lite.cluster.launcher import (
    BUILTIN_LAUNCHERS,
    CONTROLLER_LAUNCHERS,
    ENGINE_LAUNCHERS,
    BaseLauncher,
    LauncherError,
    LocalEngineLauncher,
    find_launcher_class,
)
from ipyparallel_lite.cluster.mpi import MPIEngineLauncher

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_declares_the_builtin_launchers():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = project["project"]["entry-points"]
    assert declared[ENGINE_LAUNCHERS] == BUILTIN_LAUNCHERS[ENGINE_LAUNCHERS]
    assert declared[CONTROLLER_LAUNCHERS] == BUILTIN_LAUNCHERS[CONTROLLER_LAUNCHERS]


def test_launchers_by_name_path_and_class():
    assert find_launcher_class(ENGINE_LAUNCHERS, "local") is LocalEngineLauncher
    assert find_launcher_class(ENGINE_LAUNCHERS, "MPI") is MPIEngineLauncher
    path = "ipyparallel_lite.cluster.mpi:MPIEngineLauncher"
    assert find_launcher_class(ENGINE_LAUNCHERS, path) is MPIEngineLauncher
    assert find_launcher_class(ENGINE_LAUNCHERS, MPIEngineLauncher) is MPIEngineLauncher
    with pytest.raises(TypeError, match="must subclass BaseLauncher"):
        find_launcher_class(ENGINE_LAUNCHERS, dict)
    with pytest.raises(ValueError, match="cannot be loaded"):
        find_launcher_class(ENGINE_LAUNCHERS, "no_such_module:Launcher")


def test_unknown_launcher_name_lists_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown engine launcher 'mpii'; available: .*local, mpi"):
        ipp.Cluster(engines="mpii", profile_dir=tmp_path / "p", load_profile=False)
    with pytest.raises(ValueError, match=r"unknown controller launcher 'nope'; available: local"):
        ipp.Cluster(controller="nope", profile_dir=tmp_path / "p", load_profile=False)


def test_launcher_chosen_in_the_profile_config(tmp_path):
    profile = tmp_path / "profile_mpi"
    profile.mkdir()
    (profile / "ipcluster_config.py").write_text(
        "c.Cluster.engine_launcher_class = 'mpi'\n"
        "c.MPILauncher.mpi_args = ['--bind-to', 'none']\n")
    cluster = ipp.Cluster(profile_dir=profile)
    assert cluster.engine_launcher_class == "mpi"
    launcher = cluster._engine_launcher(MPIEngineLauncher, 3)
    assert launcher.command[:5] == ["mpiexec", "-n", "3", "--bind-to", "none"]
    assert any(a.startswith("--IPEngine.engine_set=") for a in launcher.command)


def test_cli_rejects_an_unknown_launcher(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ipyparallel_lite.cluster", "start", "--engines",
                          "bogus", "--ipython-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "unknown engine launcher 'bogus'; available:" in out.stderr and "mpi" in out.stderr


def test_cluster_file_records_launchers_and_restores_them(tmp_path):
    """A cluster file names each launcher's kind and class; from_file can stop them all."""
    cluster = ipp.Cluster(n=1, profile_dir=tmp_path / "p", load_profile=False, cluster_id="rec")
    cluster.start_cluster_sync()
    try:
        record = json.loads(cluster.cluster_file.read_text())
        [engines] = record["engines"].values()
        assert engines[0]["launcher"] == "local" and engines[0]["n"] == 1
        assert engines[0]["class"] == "ipyparallel_lite.cluster.launcher:LocalEngineLauncher"
        assert record["controller"]["class"].endswith(":LocalControllerLauncher")
        again = ipp.Cluster.from_file(cluster.cluster_file)
        assert isinstance(again.controller, BaseLauncher) and again.controller.running
        pids = [again.controller.pid] + [e.pid for v in again.engines.values() for e in v]
        assert again.engine_count == 1
        again.stop_cluster_sync()  # returns once they are gone (zombies of ours at most)
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in pids)
        assert not cluster.cluster_file.exists()
    finally:
        cluster.stop_cluster_sync()


def test_missing_engine_command_is_one_clear_error(tmp_path):
    cluster = ipp.Cluster(n=2, profile_dir=tmp_path / "p", load_profile=False)
    cluster.config.LocalEngineLauncher.engine_cmd = ["/nonexistent/ipengine"]
    cluster.start_controller_sync()
    try:
        with pytest.raises(LauncherError, match=r"the local launcher could not run "
                                                r"`/nonexistent/ipengine .*No such file"):
            cluster.start_engines_sync()
        assert cluster.engines == {} and cluster.controller.running
    finally:
        cluster.stop_cluster_sync()


class ProcessGroupLauncher(BaseLauncher):
    """A launcher written against BaseLauncher alone: n engines as one set of n processes."""

    name = "group"

    def __init__(self, args: list[str], log_file: str, n: int = 0, pids: list[int] | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.args, self.n, self.log_file = args, n, Path(log_file)
        self.pids = pids or []
        self.procs: list[subprocess.Popen] = []

    @classmethod
    def create(cls, context, n=0, **kwargs):
        log = context.log_dir / f"group-{context.cluster_id}.log"
        return cls([sys.executable, "-m", "ipyparallel_lite.engine", *context.args], str(log), n,
                   **kwargs)

    def start(self):
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.procs = [subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
                          for _ in range(self.n)]
        self.pids = [p.pid for p in self.procs]

    def _alive(self) -> list[psutil.Process]:
        for p in self.procs:
            p.poll()  # reap ours
        alive = []
        for pid in self.pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE and "ipyparallel_lite.engine" in proc.cmdline():
                    alive.append(proc)
            except psutil.Error:
                pass
        return alive

    def signal(self, sig):
        for proc in self._alive():
            proc.send_signal(sig)

    @property
    def running(self):
        return bool(self._alive())

    @property
    def exit_code(self):
        return None if self.running else 0

    def output(self, lines=20):
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def to_dict(self):
        return {**super().to_dict(), "args": self.args, "log_file": str(self.log_file),
                "pids": self.pids}

    @classmethod
    def from_dict(cls, d, **kwargs):
        return cls(d["args"], d["log_file"], d["n"], d["pids"], **kwargs)


def test_a_launcher_written_against_the_interface_alone(tmp_path):
    """Start, count, signal, record, find again and stop a third-party kind of launcher."""
    cluster = ipp.Cluster(n=3, engines=ProcessGroupLauncher, profile_dir=tmp_path / "p",
                          load_profile=False)
    with cluster as rc:
        [launchers] = cluster.engines.values()
        [group] = launchers
        assert group.n == 3 and cluster.engine_count == 3
        assert sorted(rc[:].apply_sync(__import__("os").getpid)) == sorted(group.pids)
        record = json.loads(cluster.cluster_file.read_text())
        [[recorded]] = record["engines"].values()
        assert recorded["launcher"] == "group" and recorded["class"].endswith(":ProcessGroupLauncher")
        assert record["cluster"]["engine_launcher"].endswith(":ProcessGroupLauncher")
        again = ipp.Cluster.from_file(cluster.cluster_file)
        [[found]] = again.engines.values()
        assert type(found).__name__ == "ProcessGroupLauncher" and found.running
        pids = list(found.pids)
        again.stop_engines_sync()
        assert psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                 timeout=10)[1] == []
        assert cluster.engine_count == 0
