"""Starting and stopping clusters: the Cluster API, launchers and the CLI."""

from ipyparallel_lite.cluster.cluster import Cluster, ClusterError

__all__ = ["Cluster", "ClusterError"]
