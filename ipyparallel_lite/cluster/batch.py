"""Batch launchers: engines as a job of a batch system (``Cluster(engines="slurm")``,
``"pbs"``).

One mechanism for every batch system, :class:`BatchEngineSetLauncher`: the engine set is
one job (or one job array) whose script is rendered from a template with ``str.format``,
written to the profile's ``log/`` folder and handed to the system's submit command
(``sbatch``, ``qsub``). The job id is read from what that command prints; polling runs
the queue command (``squeue``, ``qstat``) at most once per ``poll_interval``; stopping
cancels the job (``scancel``, ``qdel``); signals go through the system
(``scancel --signal``, ``qsig``). ``to_dict()`` records the job id, so
``ipcluster-lite stop`` (another process) cancels the job too.

A subclass says only what differs between systems: the commands, the default template,
how a queue, an account and a wall time are written as directives, how a job array is
asked for, and how the queue command's output says whether the job still runs.

Templates (``batch_template``, or a file named by ``batch_template_file``) may use these
variables, and no others (an unknown one is an error listing them):

``{n}`` engines; ``{nodes}`` nodes asked for; ``{engines_per_node}``; ``{queue}``,
``{account}``, ``{walltime}`` (as configured, may be empty); ``{directives}`` (the
system's directive lines for the queue, account, wall time, job array and ``options``
that are set); ``{job_name}``; ``{cluster_id}``; ``{profile_dir}``; ``{engine_command}``
(the engine's command line, shell-quoted); ``{connection_file}`` (the controller's engine
connection file, which the engines read: the profile folder must be on a file system the
nodes share); ``{output_file}`` (where the job's output goes).

Engines in a batch job are not children of the Python process that started the cluster,
so they do not watch it: the cluster's stop (or ``ipcluster-lite stop``) cancels the job.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from traitlets import Bool, Float, Integer, List, Unicode

from ipyparallel_lite.cluster.launcher import (
    PARENT_PID_ENV,
    BaseLauncher,
    LaunchContext,
    LauncherError,
)

#: the variables a batch template may use
TEMPLATE_VARIABLES = ("n", "nodes", "engines_per_node", "queue", "account", "walltime",
                      "directives", "job_name", "cluster_id", "profile_dir", "engine_command",
                      "connection_file", "output_file")


class BatchEngineSetLauncher(BaseLauncher):
    """N engines as one job (or one job array) of a batch system, from a script template."""

    max_engines: ClassVar[int | None] = None
    #: the directive prefix of a job script (``#SBATCH``, ``#PBS``)
    directive_prefix: ClassVar[str] = ""
    #: the file name pattern part a job array's element puts in its output file name
    array_index_pattern: ClassVar[str] = ""
    #: the system's name for messages (``Slurm``, ``PBS``)
    system: ClassVar[str] = "batch"

    engine_cmd = List(Unicode(), default_value=[sys.executable, "-m", "ipyparallel_lite.engine"],
                      help="Command that starts an engine (on the compute nodes).").tag(config=True)
    engine_args = List(Unicode(), help="Arguments added to every engine's command line.").tag(
        config=True)
    submit_command = List(Unicode(), help="Command that submits a job script (its path is "
                          "appended); prints the job id.").tag(config=True)
    delete_command = List(Unicode(), help="Command that cancels a job (its id is appended).").tag(
        config=True)
    poll_command = List(Unicode(), help="Command that shows a job's state (its id is "
                        "appended).").tag(config=True)
    job_id_regexp = Unicode(r"\d+", help="Regular expression whose first match in the submit "
                            "command's output is the job id.").tag(config=True)
    batch_template = Unicode("", help="The job script template (str.format; see the module "
                             "documentation for its variables). Empty: the launcher's default, "
                             "or batch_template_file.").tag(config=True)
    batch_template_file = Unicode("", help="A file with the job script template (used when "
                                  "batch_template is empty).").tag(config=True)
    queue = Unicode("", help="The queue (Slurm: partition) to submit to; empty: the system's "
                    "default.").tag(config=True)
    account = Unicode("", help="The account the job is charged to; empty: the default.").tag(
        config=True)
    walltime = Unicode("", help="The job's wall time limit, as the system writes it "
                       "(HH:MM:SS); empty: the default.").tag(config=True)
    engines_per_node = Integer(0, help="Engines per node in one job (0: let the system place "
                               "them).").tag(config=True)
    job_array = Bool(False, help="Submit a job array of N one-engine jobs instead of one job "
                     "of N engines.").tag(config=True)
    options = List(Unicode(), help="More directive lines' options, e.g. ['--qos=low'] (written "
                   "after the directive prefix).").tag(config=True)
    submit_timeout = Float(60.0, help="Seconds the submit and cancel commands may take.").tag(
        config=True)
    poll_interval = Float(1.0, help="Seconds a job state read from the queue command is "
                          "trusted before asking again.").tag(config=True)

    def __init__(self, context: LaunchContext | None = None, n: int = 0, *,
                 job_id: str = "", **kwargs: Any):
        super().__init__(**kwargs)
        self.n = n
        self.context = context
        self.job_id = job_id
        self.batch_file: Path | None = None
        self._known_running = bool(job_id)
        #: the job's states (one per array element) the queue command showed last
        self.states: list[str] = []
        self._polled_at = -math.inf

    # ---- rendering -------------------------------------------------------------------

    @classmethod
    def create(cls, context: LaunchContext, n: int = 0, **kwargs: Any) -> BatchEngineSetLauncher:
        launcher = cls(context, n, **kwargs)
        name = f"ipengine-{context.cluster_id}-{cls.name or 'batch'}-{secrets.token_hex(4)}"
        launcher.batch_file = context.log_dir / f"{name}.sh"
        launcher.log_file = context.log_dir / f"{name}.log"
        return launcher

    def default_template(self) -> str:
        """The job script of this system when no template is configured."""
        raise NotImplementedError

    def directive_lines(self) -> list[str]:
        """The system's directives for what is configured (queue, account, ...), unprefixed."""
        raise NotImplementedError

    def template(self) -> str:
        if self.batch_template:
            return self.batch_template
        if self.batch_template_file:
            try:
                return Path(self.batch_template_file).expanduser().read_text()
            except OSError as e:
                raise LauncherError(f"{self.describe()} cannot read its batch_template_file: {e}") \
                    from None
        return self.default_template()

    @property
    def output_file(self) -> Path:
        """Where the job writes its output (an array's elements: one file each)."""
        assert self.log_file is not None
        if not self.job_array:
            return self.log_file
        return self.log_file.with_name(f"{self.log_file.stem}-{self.array_index_pattern}.log")

    def template_variables(self) -> dict[str, Any]:
        context = self.context
        assert context is not None, "only a launcher made by create() renders a job script"
        per_node = self.engines_per_node
        return dict(
            n=self.n, nodes=math.ceil(self.n / per_node) if per_node else 1,
            engines_per_node=per_node or self.n, queue=self.queue, account=self.account,
            walltime=self.walltime,
            directives="\n".join(f"{self.directive_prefix} {line}" for line in self.directive_lines()),
            job_name=f"ipengine-{context.cluster_id}" if context.cluster_id else "ipengine",
            cluster_id=context.cluster_id, profile_dir=str(context.profile_dir),
            engine_command=shlex.join([*self.engine_cmd, *context.args, *self.engine_args]),
            connection_file=str(context.connection_file("engine")), output_file=str(self.output_file),
        )

    def render(self) -> str:
        """The job script, from the template and this launcher's settings."""
        try:
            return self.template().format_map(self.template_variables())
        except KeyError as e:
            raise LauncherError(
                f"{self.describe()}: its batch template uses {{{e.args[0]}}}, which is not a "
                f"template variable; there are: {', '.join(TEMPLATE_VARIABLES)}") from None
        except (ValueError, IndexError) as e:
            raise LauncherError(f"{self.describe()}: its batch template is not a valid "
                                f"str.format template ({e}); write literal braces as {{{{ }}}}") \
                from None

    # ---- the job ---------------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        return [*self.submit_command, str(self.batch_file)]

    def _run(self, command: list[str], what: str) -> subprocess.CompletedProcess:
        """Run a command of the batch system; raise LauncherError naming it when it fails."""
        env = dict(os.environ)
        env.pop(PARENT_PID_ENV, None)  # the job's engines cannot watch this process
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, env=env, timeout=self.submit_timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LauncherError(f"{self.describe()} could not {what}: `{shlex.join(command)}` "
                                f"failed: {e}") from None
        if done.returncode != 0:
            said = (done.stdout + done.stderr).strip() or "(no output)"
            raise LauncherError(f"{self.describe()} could not {what}: `{shlex.join(command)}` "
                                f"exited with code {done.returncode}:\n{said}")
        return done

    def start(self) -> None:
        assert self.batch_file is not None, "only a launcher made by create() starts"
        script = self.render()
        self.batch_file.parent.mkdir(parents=True, exist_ok=True)
        self.batch_file.write_text(script)
        done = self._run(self.command, f"submit its {self.system} job")
        submitted = (done.stdout + done.stderr).strip()
        found = re.search(self.job_id_regexp, done.stdout)
        if not found:
            raise LauncherError(
                f"{self.describe()} found no job id (job_id_regexp {self.job_id_regexp!r}) in "
                f"what `{shlex.join(self.command)}` printed:\n{submitted or '(nothing)'}")
        self.job_id = found.group(0)
        self._known_running = True
        self._polled_at = -math.inf
        self.log.debug("submitted %s job %s: %s", self.system, self.job_id, self.batch_file)

    #: states of a job that ended well, and of one that ended otherwise
    completed_states: ClassVar[frozenset[str]] = frozenset()
    failed_states: ClassVar[frozenset[str]] = frozenset()

    def job_states(self, output: str) -> list[str]:
        """The job's states (one per array element) in the queue command's output."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.refresh()

    def refresh(self) -> bool:
        """Whether the job is still there, and its ``states``: from the queue command,
        at most once per ``poll_interval``."""
        if not self.job_id or not self._known_running:
            return False
        if time.monotonic() - self._polled_at < self.poll_interval:
            return self._known_running
        command = [*self.poll_command, self.job_id]
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=self.submit_timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.log.warning("%s: `%s` failed (%s); job %s taken as still there", self.describe(),
                             shlex.join(command), e, self.job_id)
            return True
        self._polled_at = time.monotonic()
        # a job the system no longer knows has gone: the queue command fails for it
        states = self.job_states(done.stdout) if done.returncode == 0 else []
        self.states = states or self.states
        ended = self.completed_states | self.failed_states
        self._known_running = any(state not in ended for state in states)
        return self._known_running

    @property
    def exit_code(self) -> int | None:
        """0 for a job that completed, 1 for one that failed, was cancelled or timed out
        (the queue commands do not say how its engines exited); None while it runs or
        when its end was not seen."""
        if self.running or not self.states:
            return None
        return 0 if all(state in self.completed_states for state in self.states) else 1

    def signal(self, sig: int) -> None:
        self._while_running(self.signal_command(signal.Signals(sig).name.removeprefix("SIG")),
                            f"signal its {self.system} job")

    def signal_command(self, name: str) -> list[str]:
        """The command that sends signal ``name`` (``INT``) to the job's engines."""
        raise NotImplementedError

    def begin_stop(self) -> None:
        """Cancel the job."""
        self.stop_requested = True
        self._while_running([*self.delete_command, self.job_id], f"cancel its {self.system} job")

    def kill(self) -> None:
        """SIGKILL to the job's engines, and cancel it (again)."""
        self._while_running(self.signal_command("KILL"), f"kill its {self.system} job")
        self.begin_stop()

    def _while_running(self, command: list[str], what: str) -> None:
        """Run ``command`` on the job if it is still there; its failure is an error only
        while the job is: a job that ended meanwhile makes scancel / qdel fail."""
        if not self.running:
            return
        try:
            self._run(command, what)
        except LauncherError:
            self._polled_at = -math.inf
            if self.running:
                raise
        self._polled_at = -math.inf

    def output(self, lines: int = 20) -> str:
        if self.log_file is None:
            return ""
        texts = []
        for path in sorted(self.log_file.parent.glob(f"{self.log_file.stem}*.log")):
            try:
                texts.append(path.read_text(errors="replace"))
            except OSError:
                pass
        if not texts and self.job_id:  # the job has not run (yet): what the queue says
            self.refresh()
            texts = [f"{self.system} job {self.job_id}: {', '.join(self.states) or 'not in the queue'}"]
        text = "\n".join(texts)
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        return f"the {self.name or type(self).__name__} engine launcher"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "job_id": self.job_id,
                "batch_file": str(self.batch_file) if self.batch_file else None,
                "log_file": str(self.log_file) if self.log_file else None,
                "job_array": self.job_array}

    @classmethod
    def from_dict(cls, d: dict, **kwargs: Any) -> BatchEngineSetLauncher:
        launcher = cls(None, d.get("n", 0), job_id=d.get("job_id") or "", **kwargs)
        launcher.job_array = d.get("job_array", False)
        launcher.batch_file = Path(d["batch_file"]) if d.get("batch_file") else None
        launcher.log_file = Path(d["log_file"]) if d.get("log_file") else None
        return launcher


class SlurmEngineSetLauncher(BatchEngineSetLauncher):
    """Engines as a Slurm job: ``sbatch``, ``squeue``, ``scancel``."""

    name = "slurm"
    system = "Slurm"
    directive_prefix = "#SBATCH"
    array_index_pattern = "%a"

    submit_command = List(Unicode(), default_value=["sbatch", "--parsable"]).tag(config=True)
    delete_command = List(Unicode(), default_value=["scancel"]).tag(config=True)
    # every state, not squeue's default of pending and running only: a job that failed at
    # once (engines that cannot start) would otherwise leave no state to report
    poll_command = List(Unicode(), default_value=["squeue", "--noheader", "--format=%T",
                                                  "--states=all", "--job"]).tag(config=True)

    def directive_lines(self) -> list[str]:
        lines = [f"--partition={self.queue}"] * bool(self.queue)
        lines += [f"--account={self.account}"] * bool(self.account)
        lines += [f"--time={self.walltime}"] * bool(self.walltime)
        if self.job_array:
            lines += [f"--array=0-{self.n - 1}", "--ntasks=1"]
        else:
            lines += [f"--ntasks={self.n}"]
            if self.engines_per_node:
                lines += [f"--ntasks-per-node={self.engines_per_node}"]
        return [*lines, *self.options]

    def default_template(self) -> str:
        # one engine per task; srun starts them on the job's nodes and ends them at scancel
        return ("#!/bin/sh\n#SBATCH --job-name={job_name}\n#SBATCH --output={output_file}\n"
                "{directives}\nexec srun --kill-on-bad-exit=0 {engine_command}\n")

    completed_states = frozenset({"COMPLETED"})
    failed_states = frozenset({"CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                               "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})

    def job_states(self, output: str) -> list[str]:
        return output.split()

    def signal_command(self, name: str) -> list[str]:
        return ["scancel", f"--signal={name}", self.job_id]


class PBSEngineSetLauncher(BatchEngineSetLauncher):
    """Engines as a PBS job (PBS Pro / OpenPBS syntax): ``qsub``, ``qstat``, ``qdel``.

    The engines of one job are started by ``mpiexec -n {n}`` on the job's nodes (PBS has
    no portable per-task launcher of its own); a job array's elements run one engine each.
    """

    name = "pbs"
    system = "PBS"
    directive_prefix = "#PBS"
    array_index_pattern = "^array_index^"

    submit_command = List(Unicode(), default_value=["qsub"]).tag(config=True)
    delete_command = List(Unicode(), default_value=["qdel"]).tag(config=True)
    poll_command = List(Unicode(), default_value=["qstat"]).tag(config=True)
    job_id_regexp = Unicode(r"[^\s]+").tag(config=True)

    def directive_lines(self) -> list[str]:
        per_node = self.engines_per_node or self.n
        nodes = math.ceil(self.n / per_node) if per_node else 1
        lines = [f"-q {self.queue}"] * bool(self.queue)
        lines += [f"-A {self.account}"] * bool(self.account)
        lines += [f"-l walltime={self.walltime}"] * bool(self.walltime)
        if self.job_array:
            lines += [f"-J 0-{self.n - 1}", "-l select=1:ncpus=1"]
        else:
            lines += [f"-l select={nodes}:ncpus={per_node}:mpiprocs={per_node}"]
        return [*lines, *self.options]

    def default_template(self) -> str:
        run = "{engine_command}" if self.job_array else "mpiexec -n {n} {engine_command}"
        return ("#!/bin/sh\n#PBS -N {job_name}\n#PBS -j oe\n#PBS -o {output_file}\n"
                f"{{directives}}\ncd \"$PBS_O_WORKDIR\"\nexec {run}\n")

    # qstat's plain table does not tell a finished job's exit status: F/C count as ended
    completed_states = frozenset({"F", "C"})

    def job_states(self, output: str) -> list[str]:
        # qstat's table: "Job id  Name  User  Time Use  S  Queue"
        job = self.job_id.split(".")[0]
        return [fields[4] for fields in map(str.split, output.splitlines())
                if len(fields) >= 6 and fields[0].split(".")[0] == job]

    def signal_command(self, name: str) -> list[str]:
        return ["qsig", "-s", name, self.job_id]

