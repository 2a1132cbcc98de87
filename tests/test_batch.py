"""The batch launchers: Slurm against a real single-node Slurm, PBS by its rendered script.

The session's Slurm is Debian's ``slurm-wlm`` and ``munge``, started here as root: a
fresh munge key and ``munged`` on a private socket, a ``slurm.conf`` in a temporary
folder (this host as the only node, free ports, state and logs in that folder), then
``slurmctld -D`` and ``slurmd -D``; ``SLURM_CONF`` points the client commands at it. No
command of Slurm is faked: ``sbatch``, ``squeue`` and ``scancel`` are the real ones.

PBS is not packaged in Debian: its tests check the script it would submit (directives,
``bash -n``) and the ``qsub`` command line, not a run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from functools import partial
from pathlib import Path

import psutil
import pytest
from conftest import free_port, ipcluster, wait_gone
from traitlets.config import Config

import ipyparallel_lite as ipp
from ipyparallel_lite.cluster.batch import PBSEngineSetLauncher, SlurmEngineSetLauncher
from ipyparallel_lite.cluster.launcher import LaunchContext, LauncherError

pytestmark = pytest.mark.timeout(240)
#: engines a single node of the test Slurm takes at once (slurmd told to trust slurm.conf)
SLURM_CPUS = 8



class Slurm:
    """munged, slurmctld and slurmd for one node, in ``folder``."""

    def __init__(self, folder: Path):
        if os.geteuid() != 0:
            raise RuntimeError("the Slurm tests start slurmd, which runs as root: run them as root")
        self.folder = folder
        munge = folder / "munge"
        munge.mkdir(mode=0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = munge / "socket"
        self.processes: list[subprocess.Popen] = []
        self._start(["munged", "--foreground", "--force", f"--key-file={key}",
                     f"--socket={self.munge_socket}", f"--pid-file={munge / 'pid'}",
                     f"--log-file={munge / 'log'}", f"--seed-file={munge / 'seed'}"], "munged")
        self._wait(lambda: self.munge_socket.exists(), "munged made no socket", munge / "log")
        host = socket.gethostname().split(".")[0]
        self.conf = folder / "slurm.conf"
        for sub in ("state", "spool"):
            (folder / sub).mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=ipplite", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            # this machine has 2 cores; engines mostly wait, so let the node take 8 of them
            "SlurmdParameters=config_overrides", "ReturnToService=2", "KillWait=5",
            f"NodeName={host} CPUs={SLURM_CPUS} RealMemory=1000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._start(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
        self._start(["slurmd", "-D", "-f", str(self.conf)], "slurmd")
        self._wait(lambda: self.run("sinfo", "--noheader", "--format=%t").stdout.strip() == "idle",
                   "the node did not become idle", folder / "slurmd.log", folder / "slurmctld.log")

    def _start(self, command: list[str], name: str) -> None:
        log = open(self.folder / f"{name}.out", "wb")  # noqa: SIM115 -- the daemon keeps it
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               env=getattr(self, "env", None)))

    def _wait(self, ready, what: str, *logs: Path) -> None:
        deadline = time.monotonic() + 60
        while not ready():
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                said = "\n".join(f"--- {log}:\n{log.read_text()[-3000:] if log.exists() else ''}"
                                 for log in [*logs, *self.folder.glob("*.out")])
                raise RuntimeError(f"Slurm could not start here: {what} (exited: {dead})\n{said}")
            time.sleep(0.2)

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

    def jobs(self) -> list[str]:
        """Every job the queue still shows: ``"id state"``."""
        return self.run("squeue", "--noheader", "--format=%i %T").stdout.split("\n")[:-1]

    def stepd_descendants(self, job: str | None = None) -> set[int]:
        """Processes Slurm runs for jobs (slurmstepd and what it starts); of job ``job``
        only, when given (its slurmstepd is named "slurmstepd: [<job>.<step>]")."""
        found = set()
        for proc in psutil.process_iter(["name", "cmdline"]):
            if proc.info["name"] == "slurmstepd" and (
                    job is None or f"[{job}." in " ".join(proc.info["cmdline"] or ())):
                found |= {p.pid for p in proc.children(recursive=True)}
        return found

    def stop(self) -> None:
        for job in self.jobs():
            self.run("scancel", job.split()[0])
        for proc in reversed(self.processes):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # the launcher's sbatch/squeue/scancel
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def _no_job_left(slurm: Slurm, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while (jobs := slurm.jobs()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return jobs


# ---- Slurm, for real ------------------------------------------------------------------


def test_slurm_cluster_runs_engines_in_a_job_and_stop_cancels_it(slurm, tmp_path):
    cluster = ipp.Cluster(n=2, engines="slurm", profile_dir=tmp_path / "p", load_profile=False,
                          engine_timeout=120)
    with cluster as rc:
        [[launcher]] = cluster.engines.values()
        assert isinstance(launcher, SlurmEngineSetLauncher) and launcher.n == 2
        assert launcher.running and [f"{launcher.job_id} RUNNING"] == slurm.jobs()
        pids = set(rc[:].apply_sync(os.getpid))
        assert len(pids) == 2
        # run by Slurm's job steps, not by this process
        assert pids <= slurm.stepd_descendants()
        assert not pids & {p.pid for p in psutil.Process().children(recursive=True)}
        assert rc[:].apply_sync(lambda x: x * 2, 21) == [42, 42]
        assert sorted(rc.load_balanced_view().map_sync(lambda x: x * x, range(20))) == [
            x * x for x in range(20)]
        script = launcher.batch_file.read_text()
        assert "#SBATCH --ntasks=2" in script and "srun" in script
        recorded = json.loads(cluster.cluster_file.read_text())
        assert recorded["engines"][next(iter(cluster.engines))][0]["job_id"] == launcher.job_id
    assert _no_job_left(slurm) == []
    assert not wait_gone(pids)


def test_interrupt_reaches_the_engines_of_a_slurm_job(slurm, tmp_path):
    cluster = ipp.Cluster(n=2, engines="slurm", profile_dir=tmp_path / "p", load_profile=False,
                          engine_timeout=120)
    with cluster as rc:
        ar = rc[:].apply_async(time.sleep, 60)
        time.sleep(1.0)
        cluster.signal_engines_sync(signal.SIGINT)  # scancel --signal=INT
        with pytest.raises(ipp.error.CompositeError, match="KeyboardInterrupt"):
            ar.get(30)
        assert rc[:].apply_sync(lambda: 1) == [1, 1]
    assert _no_job_left(slurm) == []


def test_slurm_job_array_of_engines(slurm, tmp_path):
    config = Config()
    config.SlurmEngineSetLauncher.job_array = True
    cluster = ipp.Cluster(n=2, engines="slurm", profile_dir=tmp_path / "p", load_profile=False,
                          engine_timeout=120, config=config)
    with cluster as rc:
        [[launcher]] = cluster.engines.values()
        jobs = slurm.jobs()
        assert sorted(jobs) == [f"{launcher.job_id}_0 RUNNING", f"{launcher.job_id}_1 RUNNING"]
        pids = set(rc[:].apply_sync(os.getpid))
        assert len(pids) == 2 and pids <= slurm.stepd_descendants()
        assert "#SBATCH --array=0-1" in launcher.batch_file.read_text()
    assert _no_job_left(slurm) == []
    assert not wait_gone(pids)


def test_rejected_slurm_job_is_one_clear_error_and_leaves_nothing(slurm, tmp_path):
    config = Config()
    config.SlurmEngineSetLauncher.queue = "no-such-partition"
    cluster = ipp.Cluster(n=2, engines="slurm", profile_dir=tmp_path / "p", load_profile=False,
                          config=config)
    with pytest.raises(LauncherError) as e:
        cluster.start_cluster_sync()
    message = str(e.value)
    assert message.startswith("the slurm engine launcher could not submit its Slurm job: "
                              "`sbatch --parsable ")
    assert "exited with code 1" in message and "invalid partition" in message.lower()
    assert slurm.jobs() == []
    assert cluster.controller is not None and not cluster.controller.running


def test_slurm_job_whose_engines_cannot_start_is_reported_with_its_output(slurm, tmp_path):
    config = Config()
    config.SlurmEngineSetLauncher.engine_cmd = [str(tmp_path / "no-such-python")]
    cluster = ipp.Cluster(n=2, engines="slurm", profile_dir=tmp_path / "p", load_profile=False,
                          engine_timeout=120, config=config)
    try:
        with pytest.raises(ipp.ClusterError) as e, cluster:
            pass
    finally:
        cluster.stop_cluster_sync()
    message = str(e.value)
    assert "2 of 2 engines exited before registering" in message
    assert "the slurm engine launcher exited with code 1" in message
    assert "no-such-python" in message and "No such file or directory" in message
    assert slurm.jobs() == []


def test_slurm_job_that_stays_queued_times_out_and_is_cancelled(slurm, tmp_path):
    config = Config()
    config.SlurmEngineSetLauncher.options = ["--begin=now+1hour"]  # eligible in an hour
    cluster = ipp.Cluster(n=2, engines="slurm", profile_dir=tmp_path / "p", load_profile=False,
                          engine_timeout=5, config=config)
    with pytest.raises(ipp.ClusterError) as e, cluster:
        pass
    message = str(e.value)
    assert "only 0 of 2 engines registered within 5s" in message
    assert re.search(r"Slurm job \d+: PENDING", message), message
    assert slurm.jobs() == []


def test_cli_starts_8_slurm_engines_and_stop_cancels_the_job(slurm, tmp_path):
    """``ipcluster-lite start --engines slurm -n 8 --daemonize``; ``stop`` (another
    process, through the cluster file) cancels the job and every engine ends."""
    ipdir = str(tmp_path / "ipython")
    cli = partial(ipcluster, ipdir, timeout=180)

    pids: set[int] = set()
    try:
        out = cli("start", "--engines", "slurm", "-n", str(SLURM_CPUS), "--daemonize")
        assert out.returncode == 0, out.stdout + out.stderr
        [job] = slurm.jobs()
        assert job.endswith(" RUNNING")
        [row] = json.loads(cli("list", "-o", "json").stdout)
        assert row["engines"] == SLURM_CPUS
        # this job's: an earlier test's engines may still be on their way out
        pids = slurm.stepd_descendants(job.split()[0])
        # a child an engine forks (jupyter_client runs `ip addr` to list this host's
        # addresses) carries the engine's command line until it execs: not an engine
        engine_parents = {}
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if proc.cmdline()[1:3] == ["-m", "ipyparallel_lite.engine"]:
                    engine_parents[pid] = proc.ppid()
            except psutil.NoSuchProcess:
                pass  # such a child, gone already
        engines = {pid for pid, parent in engine_parents.items() if parent not in engine_parents}
        assert len(engines) == SLURM_CPUS
        out = cli("stop")
        assert out.returncode == 0, out.stdout + out.stderr
        assert _no_job_left(slurm) == []
        assert not wait_gone(engines)
    finally:
        cli("stop")
        for pid in wait_gone(pids, timeout=0.1):
            os.kill(pid, signal.SIGKILL)


# ---- templates (no batch system needed) -----------------------------------------------


def _context(tmp_path: Path) -> LaunchContext:
    return LaunchContext(profile_dir=tmp_path / "profile", cluster_id="c1",
                         args=("--profile-dir=/some where", "--cluster-id=c1"))


def test_user_template_gets_the_documented_variables(tmp_path):
    launcher = SlurmEngineSetLauncher.create(_context(tmp_path), 4)
    launcher.batch_template = ("{n}|{nodes}|{engines_per_node}|{queue}|{account}|{walltime}|"
                               "{job_name}|{cluster_id}|{profile_dir}|{connection_file}|"
                               "{output_file}\n{engine_command}\n{directives}")
    launcher.queue, launcher.account, launcher.walltime = "gpu", "proj1", "01:00:00"
    launcher.engines_per_node = 2
    first, command, *directives = launcher.render().splitlines()
    profile = tmp_path / "profile"
    assert first.split("|") == [
        "4", "2", "2", "gpu", "proj1", "01:00:00", "ipengine-c1", "c1", str(profile),
        str(profile / "security" / "ipcontroller-c1-engine.json"), str(launcher.log_file)]
    assert command.endswith("-m ipyparallel_lite.engine '--profile-dir=/some where' --cluster-id=c1")
    assert directives == ["#SBATCH --partition=gpu", "#SBATCH --account=proj1",
                          "#SBATCH --time=01:00:00", "#SBATCH --ntasks=4",
                          "#SBATCH --ntasks-per-node=2"]


def test_template_file_and_unknown_variable(tmp_path):
    template = tmp_path / "job.tmpl"
    template.write_text("#!/bin/sh\n{directives}\n{engine_command} --{nodez}\n")
    launcher = SlurmEngineSetLauncher.create(_context(tmp_path), 2)
    launcher.batch_template_file = str(template)
    with pytest.raises(LauncherError, match=r"uses \{nodez\}, which is not a template variable; "
                                            r"there are: n, nodes, "):
        launcher.render()
    launcher.batch_template_file = str(tmp_path / "missing.tmpl")
    with pytest.raises(LauncherError, match="cannot read its batch_template_file"):
        launcher.render()


def test_pbs_script_and_qsub_command(tmp_path):
    launcher = PBSEngineSetLauncher.create(_context(tmp_path), 8)
    launcher.queue, launcher.account, launcher.walltime = "batch", "proj1", "00:30:00"
    launcher.engines_per_node = 4
    launcher.options = ["-l place=scatter"]
    script = launcher.render()
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh"
    for directive in ["#PBS -N ipengine-c1", "#PBS -j oe", f"#PBS -o {launcher.log_file}",
                      "#PBS -q batch", "#PBS -A proj1", "#PBS -l walltime=00:30:00",
                      "#PBS -l select=2:ncpus=4:mpiprocs=4", "#PBS -l place=scatter"]:
        assert directive in lines
    assert lines[-1].startswith("exec mpiexec -n 8 ") and "ipyparallel_lite.engine" in lines[-1]
    launcher.batch_file.parent.mkdir(parents=True, exist_ok=True)
    launcher.batch_file.write_text(script)
    parsed = subprocess.run(["bash", "-n", str(launcher.batch_file)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    assert launcher.command == ["qsub", str(launcher.batch_file)]
    launcher.job_array = True
    array = launcher.render().splitlines()
    assert "#PBS -J 0-7" in array and f"#PBS -o {launcher.output_file}" in array
    assert "^array_index^" in str(launcher.output_file) and "mpiexec" not in array[-1]


def test_pbs_reads_the_job_state_from_qstat():
    launcher = PBSEngineSetLauncher(None, 2, job_id="1234.head")
    table = ("Job id            Name             User              Time Use S Queue\n"
             "----------------  ---------------- ----------------  -------- - -----\n"
             "1234.head         ipengine-c1      alice             00:00:01 {} batch\n")
    assert launcher.job_states(table.format("R")) == ["R"]
    assert launcher.job_states(table.format("Q")) == ["Q"]
    assert launcher.job_states(table.replace("1234.head", "999.head").format("R")) == []
