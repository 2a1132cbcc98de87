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
        again.stop_cluster_sync()
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in pids)
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
