"""The dask.distributed bridge on a real cluster: ``rc.become_dask()`` starts a scheduler in
the controller's process and a worker in each engine, and ``rc.stop_distributed()`` stops
them while the engines go on serving IPython parallel requests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest

pytestmark = pytest.mark.timeout(180)


def dask_worker_in_namespace() -> bool:
    return "dask_worker" in globals()


def test_become_dask_computes_a_dask_array_sum_and_stop_leaves_engines_usable(own_cluster):
    import dask.array as da

    cluster, rc = own_cluster(2)
    engine_pids = set(rc[:].apply_sync(os.getpid))
    client = rc.become_dask()
    try:
        info = client.scheduler_info()
        workers = info["workers"]
        assert len(workers) == 2
        # the scheduler listens in the controller's process, on its interface
        assert info["address"].startswith("tcp://127.0.0.1:")
        port = int(info["address"].rsplit(":", 1)[1])
        controller = psutil.Process(cluster.controller.pid)
        assert port in {c.laddr.port for c in controller.net_connections() if c.status == "LISTEN"}
        # the workers live in the engines' processes, one thread each
        assert set(client.run(os.getpid).values()) == engine_pids
        assert all(w["nthreads"] == 1 for w in workers.values())
        assert rc[:].apply_sync(dask_worker_in_namespace) == [True, True]

        x = np.arange(1_000_000, dtype="float64").reshape(1000, 1000)
        total = da.from_array(x, chunks=(250, 250)).sum().compute()
        assert total == x.sum()
        # both APIs at once: an IPython parallel request while dask holds workers
        assert rc[:].apply_sync(lambda: 6 * 7) == [42, 42]
        # a second call reuses the scheduler and the running workers
        again = rc.become_dask()
        assert again.scheduler_info()["address"] == info["address"]
        client = again
    finally:
        rc.stop_distributed()

    assert client.status == "closed"
    assert rc[:].apply_sync(dask_worker_in_namespace) == [False, False]
    controller_ports = {c.laddr.port for c in controller.net_connections() if c.status == "LISTEN"}
    assert port not in controller_ports
    assert rc[:].apply_sync(lambda x: x + 1, 1) == [2, 2]
    assert rc.load_balanced_view().map_sync(lambda x: x * x, range(10)) == [i * i for i in range(10)]
    # and the cluster can become a dask cluster again
    client = rc.become_dask(nthreads=2)
    try:
        assert sorted(w["nthreads"] for w in client.scheduler_info()["workers"].values()) == [2, 2]
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
    finally:
        rc.stop_distributed()


def test_become_dask_without_distributed_says_which_extra_to_install():
    code = textwrap.dedent("""
        import sys
        sys.modules["distributed"] = None  # as if distributed were not installed
        import ipyparallel_lite as ipp
        with ipp.Cluster(n=1) as rc:
            try:
                rc.become_dask()
            except ImportError as e:
                print("ImportError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "ImportError: become_dask needs the 'distributed' package in this client's" in out.stdout, out.stderr
    assert "pip install 'ipyparallel_lite[dask]'" in out.stdout


def test_become_dask_with_nanny_runs_each_worker_in_a_child_of_its_engine(own_cluster):
    _, rc = own_cluster(2)
    engines = [psutil.Process(pid) for pid in rc[:].apply_sync(os.getpid)]
    client = rc.become_dask(nanny=True)
    try:
        worker_pids = set(client.run(os.getpid).values())
        children = {child.pid for engine in engines for child in engine.children()}
        assert len(worker_pids) == 2 and worker_pids <= children
        assert client.submit(lambda x: x + 1, 1).result(timeout=60) == 2
    finally:
        rc.stop_distributed()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in worker_pids)
    assert rc[:].apply_sync(lambda: "still here") == ["still here"] * 2


def test_become_dask_with_a_controller_without_distributed_says_which_extra(tmp_path, monkeypatch):
    # the controller's environment cannot import distributed; this client's can
    (tmp_path / "distributed.py").write_text("raise ImportError('no distributed here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    import ipyparallel_lite as ipp

    cluster = ipp.Cluster(n=0)
    cluster.start_controller_sync()
    try:
        with cluster.connect_client_sync() as rc, pytest.raises(ImportError) as info:
            rc.become_dask()
        assert "in the controller's environment" in str(info.value)
        assert "pip install 'ipyparallel_lite[dask]'" in str(info.value)
        assert cluster.controller.running  # and it goes on serving
    finally:
        cluster.stop_cluster_sync()


def test_a_worker_left_from_a_stopped_scheduler_serves_the_next_one(own_cluster):
    _, rc = own_cluster(2)
    rc.become_dask()
    rc.stop_distributed(targets=[0])  # the scheduler stops; engine 1 keeps its worker
    client = rc.become_dask()  # a new scheduler, on another port
    try:
        assert len(client.scheduler_info()["workers"]) == 2
        assert client.submit(sum, [1, 2]).result(timeout=60) == 3
    finally:
        rc.stop_distributed()
