"""The MPI launcher: engines started by one ``mpiexec -n N`` (``Cluster(engines="mpi")``).

One launcher runs the whole set: ``mpiexec`` is a child process of this machine whose
N ranks are engines. Each engine tells the controller its rank (from the
``OMPI_COMM_WORLD_RANK`` / ``PMI_RANK`` / ``PMIX_RANK`` variables the MPI runtime sets)
and the launcher's engine set id, and the Hub gives the set N consecutive engine ids
in rank order: engine ``first + r`` is rank ``r``, whatever the order they registered
in. ``mpi4py`` works on the engines as in any MPI program (``from mpi4py import MPI``).

Configured as in ipyparallel: ``c.MPILauncher.mpi_cmd = ["mpiexec"]``,
``c.MPILauncher.mpi_args = [...]``, ``c.MPIEngineLauncher.engine_args = [...]``.
OpenMPI runs more ranks than cores only when asked, and refuses to run as root unless
told twice: both are asked for through its environment variables, so other MPI
implementations see no unknown flag.
"""

from __future__ import annotations

import os
import secrets
import signal
from typing import Any

import psutil
from traitlets import List, Unicode

from ipyparallel_lite.cluster.launcher import LocalEngineLauncher, LocalProcessLauncher

#: what OpenMPI needs to run N ranks on fewer cores, and to run as root at all
OPENMPI_ENV = {"OMPI_MCA_rmaps_base_oversubscribe": "1"}
OPENMPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


class MPILauncher(LocalProcessLauncher):
    """A command run by ``mpiexec -n N``: one local child process, N ranks."""

    mpi_cmd = List(Unicode(), default_value=["mpiexec"], help="The mpiexec command.").tag(config=True)
    mpi_args = List(Unicode(), help="Extra arguments of mpiexec (hosts, binding, ...).").tag(
        config=True)

    def mpi_command(self, n: int, command: list[str]) -> list[str]:
        return [*self.mpi_cmd, "-n", str(n), *self.mpi_args, *command]

    def start(self) -> None:
        self.env = {**OPENMPI_ENV, **(OPENMPI_ROOT_ENV if os.geteuid() == 0 else {}), **self.env}
        super().start()

    def _ranks(self) -> list[psutil.Process]:
        """The processes mpiexec started (its descendants)."""
        if not self.running or self.pid is None:
            return []
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def signal(self, sig: int) -> None:
        """SIGTERM and SIGKILL go to mpiexec (which ends the job); other signals to the
        ranks themselves, since mpiexec ends the whole job at a SIGINT."""
        if sig in (signal.SIGTERM, signal.SIGKILL):
            super().signal(sig)
            return
        for rank in self._ranks():
            try:
                rank.send_signal(sig)
            except psutil.Error:
                pass

    def kill(self) -> None:
        """SIGKILL to the ranks and mpiexec: a killed mpiexec cannot end its ranks."""
        for rank in self._ranks():
            try:
                rank.kill()
            except psutil.Error:
                pass
        super().kill()


class MPIEngineLauncher(MPILauncher, LocalEngineLauncher):
    """N engines as the N ranks of one ``mpiexec``."""

    name = "mpi"
    max_engines = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        #: tells the Hub which engines are ranks of the same mpiexec
        self.engine_set = secrets.token_hex(8)

    def command_line(self, args: list[str]) -> list[str]:
        engine = LocalEngineLauncher.command_line(self, args)
        return self.mpi_command(self.n, [*engine, f"--IPEngine.engine_set={self.engine_set}"])
