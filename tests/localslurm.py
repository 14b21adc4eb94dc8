"""A real single-node Slurm (munged, slurmctld, slurmd) on 127.0.0.1, for tests.

Debian's Slurm 22.05 daemons run as root with all state, spool and logs in one temporary
folder and ports of their own, so the machine's configuration is untouched. The munge socket
folder and its parents must be world-searchable, hence a folder made in /tmp with mode 0755.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch")

#: What every test cluster sets alike: scheduling, requeue, accounting and timeouts.
SCHEDULING_CONF = """\
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MpiDefault=pmix
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
InactiveLimit=0
KillWait={kill_wait}
MinJobAge=300
SlurmdTimeout={slurmd_timeout}
Waittime=0
EnforcePartLimits=ALL
"""

_CONF = """\
ClusterName=test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge-run/munge.sock,cred_expire=10
StateSaveLocation={root}/spool/ctld
SlurmdSpoolDir={root}/spool/d
TmpFS={root}/tmp
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
{scheduling}CommunicationParameters=EnableIPv6
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def available() -> str | None:
    """None if the Slurm and munge programs are installed, else what is missing."""
    missing = [name for name in DAEMONS if shutil.which(name) is None
               and not os.path.exists(f"/usr/sbin/{name}")]
    return f"not installed: {', '.join(missing)} (scripts/install.sh installs them)" if missing \
        else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _program(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """Start with :meth:`start`, stop with :meth:`stop`; ``env`` is what clients need."""

    def __init__(self, *, cpus: int | None = None, kill_wait: int = 5) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rainforest-slurm-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        for sub in ("munge", "munge-run", "spool/ctld", "spool/d", "tmp", "run", "log"):
            (self.root / sub).mkdir(parents=True)
        os.chmod(self.root / "munge-run", 0o755)
        self.conf = self.root / "slurm.conf"
        scheduling = SCHEDULING_CONF.format(root=self.root, kill_wait=kill_wait,
                                            slurmd_timeout=30)
        self.conf.write_text(_CONF.format(root=self.root, ctld_port=_free_port(),
                                          d_port=_free_port(), cpus=cpus or os.cpu_count(),
                                          scheduling=scheduling))
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env["SLURM_CONF"] = str(self.conf)
        self._processes: list[subprocess.Popen] = []

    def _spawn(self, *command: str) -> None:
        log = open(self.root / "log" / f"{Path(command[0]).name}.stdout", "ab")
        self._processes.append(subprocess.Popen(command, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT))

    def start(self, timeout: float = 60) -> LocalSlurm:
        key = self.root / "munge" / "munge.key"
        subprocess.run([_program("mungekey"), "-c", "-k", str(key)], check=True,
                       capture_output=True)
        self._spawn(_program("munged"), "-F", f"--key-file={key}",
                    f"--socket={self.root}/munge-run/munge.sock",
                    f"--pid-file={self.root}/munge-run/munged.pid",
                    f"--seed-file={self.root}/munge/munged.seed")
        self._spawn(_program("slurmctld"), "-D", "-c")
        self._spawn(_program("slurmd"), "-D", "-N", "localhost")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return self
            if any(p.poll() is not None for p in self._processes):
                break
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Slurm did not come up (node state {state!r}); logs in "
                           f"{self.root}/log:\n{self.logs()}")

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, squeue, scontrol, ...) against this cluster."""
        return subprocess.run(command, env=kwargs.pop("env", self.env), capture_output=True,
                              text=True, check=check, **kwargs)

    def submit(self, script: str, *args: str, script_args=(), env: dict | None = None) -> str:
        """``sbatch --parsable ARGS SCRIPT SCRIPT_ARGS``; returns the job id."""
        result = self.run("sbatch", "--parsable", *args, script, *script_args,
                          env={**self.env, **(env or {})})
        return result.stdout.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        result = self.run("scontrol", "show", "job", job, "-o", check=False)
        for field in result.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job: str, name: str) -> str | None:
        result = self.run("scontrol", "show", "job", job, "-o", check=False)
        for field in result.stdout.split():
            if field.startswith(name + "="):
                return field.split("=", 1)[1]
        return None

    def wait(self, job: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED",
                                                    "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
             ) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout} s\n"
                           f"{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        if self._processes and self._processes[1].poll() is None:
            self.run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                queue = self.run("squeue", "-h", check=False).stdout.strip()
                if not queue:
                    break
                time.sleep(0.3)
        for process in reversed(self._processes):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
