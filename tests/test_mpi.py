"""The MPI launcher against the real ``mpiexec`` (Debian's OpenMPI) and mpi4py on the engines.

One ``mpiexec -n 4`` runs four engines; a ``%%px`` cell in a real IPython shell calls
``comm.allreduce``, and engine ids follow MPI ranks. A missing or failing ``mpiexec``
is one clear error naming the launcher and the command, and leaves nothing running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import psutil
import pytest
from conftest import ipcluster
from IPython.utils.capture import capture_output

import ipyparallel_lite as ipp
from ipyparallel_lite.cluster.launcher import LauncherError
from ipyparallel_lite.magics import get_magics

pytestmark = pytest.mark.timeout(180)


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE}


def _wait_gone(pids: set[int], timeout: float = 20) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.1)
    return alive


def _ids_become(rc: ipp.Client, n: int, timeout: float = 30) -> bool:
    """Whether ``rc`` sees ``n`` engines within ``timeout`` (its notifications may lag)."""
    deadline = time.monotonic() + timeout
    while len(rc.ids) != n and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(rc.ids) == n


@pytest.fixture(scope="module")
def mpi_cluster(tmp_path_factory):
    cluster = ipp.Cluster(n=4, engines="mpi", profile_dir=tmp_path_factory.mktemp("mpi") / "p",
                          load_profile=False, engine_timeout=120)
    rc = cluster.start_and_connect_sync()
    try:
        yield cluster, rc
    finally:
        cluster.stop_cluster_sync()


def test_one_mpiexec_runs_the_engine_set(mpi_cluster):
    cluster, rc = mpi_cluster
    [launchers] = cluster.engines.values()
    [mpiexec] = launchers
    assert mpiexec.n == 4 and cluster.engine_count == 4
    assert mpiexec.command[:3] == ["mpiexec", "-n", "4"]
    engine_pids = set(rc[:].apply_sync(os.getpid))
    assert engine_pids <= {p.pid for p in psutil.Process(mpiexec.pid).children(recursive=True)}


def test_engine_ids_follow_mpi_ranks(mpi_cluster):
    _, rc = mpi_cluster
    assert len(rc.ids) == 4
    ranks = rc[:].apply_sync(lambda: int(__import__("os").environ["OMPI_COMM_WORLD_RANK"]))
    first = min(rc.ids)
    assert ranks == [eid - first for eid in rc.ids]
    assert [rc.engine_info()[eid]["mpi_rank"] for eid in rc.ids] == ranks


def test_px_cell_allreduce_with_mpi4py(mpi_cluster, shell):
    _, rc = mpi_cluster
    rc.activate(suffix="mpi")
    magics = get_magics(shell, "mpi")
    magics.verbose, magics.stream = False, False
    shell.run_cell_magic("pxmpi", "", "from mpi4py import MPI\n"
                                      "comm = MPI.COMM_WORLD\n"
                                      "total = comm.allreduce(comm.Get_rank() + 1, op=MPI.SUM)\n"
                                      "rank = comm.Get_rank()\n")
    assert rc[:]["total"] == [10, 10, 10, 10]
    assert rc[:]["rank"] == [eid - min(rc.ids) for eid in rc.ids]
    with capture_output() as out:
        shell.run_cell_magic("pxmpi", "", "print(comm.allreduce(rank, op=MPI.MAX))")
    assert out.stdout.splitlines() == [f"[stdout:{eid}] 3" for eid in rc.ids]


def test_interrupting_mpi_engines_keeps_the_job(mpi_cluster):
    """SIGINT reaches the ranks (mpiexec itself would end the job at a SIGINT)."""
    cluster, rc = mpi_cluster
    ar = rc[:].apply_async(time.sleep, 60)
    time.sleep(1.0)
    cluster.signal_engines_sync(signal.SIGINT)
    with pytest.raises(ipp.error.CompositeError, match="KeyboardInterrupt"):
        ar.get(30)
    assert cluster.engine_count == 4 and rc[:].apply_sync(lambda: 1) == [1] * 4


def test_scaling_adds_and_removes_whole_mpiexec_sets(mpi_cluster):
    cluster, rc = mpi_cluster
    cluster.scale_sync(6)  # one more mpiexec, of 2
    assert _ids_become(rc, 6) and len(cluster.engines) == 2
    with pytest.raises(ipp.ClusterError, match="runs 2 engines that stop together"):
        cluster.scale_sync(5)
    assert cluster.engine_count == 6 and cluster.n == 6
    cluster.scale_sync(4)
    assert cluster.engine_count == 4 and _ids_become(rc, 4)
    assert rc[:].apply_sync(lambda: 1) == [1] * 4


def test_missing_mpiexec_is_one_clear_error(tmp_path):
    cluster = ipp.Cluster(n=2, engines="mpi", profile_dir=tmp_path / "p", load_profile=False)
    cluster.config.MPILauncher.mpi_cmd = ["/nonexistent/mpiexec"]
    before = _descendants()
    with pytest.raises(LauncherError) as e:
        cluster.start_cluster_sync()
    message = str(e.value)
    assert "the mpi launcher could not run `/nonexistent/mpiexec -n 2" in message
    assert "No such file" in message
    assert not _wait_gone(_descendants() - before)
    assert not cluster.cluster_file.exists()


def test_failing_mpiexec_names_the_launcher_command_and_output(tmp_path):
    cluster = ipp.Cluster(n=2, engines="mpi", profile_dir=tmp_path / "p", load_profile=False)
    cluster.config.MPILauncher.mpi_args = ["--no-such-mpiexec-option"]
    before = _descendants()
    with pytest.raises(ipp.ClusterError) as e:
        cluster.start_and_connect_sync()
    message = str(e.value)
    assert "engines exited before registering" in message
    assert "the mpi launcher `mpiexec -n 2 --no-such-mpiexec-option" in message
    assert "no-such-mpiexec-option" in message.split("Output of", 1)[1].split("\n", 1)[1]
    assert not _wait_gone(_descendants() - before)


def test_mpi_engines_exit_with_their_owner(tmp_path):
    """kill -9 of the process that started the cluster: the ranks under mpiexec go too."""
    script = (
        "import os, sys, ipyparallel_lite as ipp\n"
        f"c = ipp.Cluster(n=2, engines='mpi', profile_dir={str(tmp_path / 'p')!r}, "
        "load_profile=False)\n"
        "rc = c.start_and_connect_sync()\n"
        "print(*rc[:].apply_sync(os.getpid), flush=True)\n"
        "sys.stdin.read()\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    pids: set[int] = set()
    try:
        pids = {int(p) for p in owner.stdout.readline().split()}
        assert len(pids) == 2
        pids |= {psutil.Process(p).ppid() for p in pids}  # mpiexec
        assert len(pids) == 3
        owner.kill()
        owner.wait(10)
        assert not _wait_gone(pids, timeout=20)
    finally:
        owner.kill()
        owner.wait(10)
        for pid in _wait_gone(pids, timeout=0.1):
            os.kill(pid, signal.SIGKILL)


def test_cli_starts_lists_and_stops_an_mpi_cluster(tmp_path):
    """``ipcluster-lite start --engines mpi -n 2``; ``engines`` adds an mpiexec set; ``stop``
    finds both through the cluster file and ends every rank."""
    ipdir = str(tmp_path / "ipython")
    cli = partial(ipcluster, ipdir, timeout=120)

    out = cli("start", "--engines", "mpi", "-n", "2", "--daemonize")
    assert out.returncode == 0, out.stderr
    pids: set[int] = set()
    try:
        out = cli("engines", "-n", "2")
        assert out.returncode == 0 and "4 engines now" in out.stdout, out.stderr
        [row] = json.loads(cli("list", "-o", "json").stdout)
        assert row["engines"] == 4 and len(row["engine_pids"]) == 2  # two mpiexec
        for pid in row["engine_pids"]:
            pids |= {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
        pids.add(row["controller_pid"])
        assert len(pids) == 7
        out = cli("stop")
        assert out.returncode == 0 and "4 engines and the controller" in out.stdout, out.stderr
        assert not _wait_gone(pids)
    finally:
        cli("stop")
        for pid in _wait_gone(pids, timeout=0.1):
            os.kill(pid, signal.SIGKILL)
