"""Cluster.scale: add and remove engines of a running cluster."""

from __future__ import annotations

import pytest

import ipyparallel_lite as ipp
from ipyparallel_lite.cluster.cluster import ClusterError


def test_scale_up_and_down_is_done_when_it_returns():
    cluster = ipp.Cluster(n=1, cluster_id="scale")
    rc = cluster.start_and_connect_sync()
    try:
        first = rc[:].apply_sync(lambda: 1)
        assert first == [1]
        cluster.scale_sync(3)
        assert cluster.engine_count == 3 and cluster.n == 3
        rc.wait_for_engines(3, timeout=10)
        assert rc[:].apply_sync(lambda: 1) == [1, 1, 1]
        cluster.scale_sync(1)
        assert cluster.engine_count == 1
        with ipp.Client(cluster.connection_file("client")) as fresh:
            assert len(fresh.ids) == 1  # the controller dropped the two stopped engines
        # the cluster file records what runs now, for `ipcluster-lite list` and the panel
        again = ipp.Cluster.from_file(cluster.cluster_file)
        assert sum(len(v) for v in again.engines.values()) == 1 and again.n == 1
        with pytest.raises(ValueError, match="non-negative"):
            cluster.scale_sync(-1)
    finally:
        cluster.stop_cluster_sync()
    with pytest.raises(ClusterError, match="not running; start it"):
        cluster.scale_sync(2)
