"""Host lists for ``horovodrun`` and ``mpirun``: the nodes of a Slurm job, or a run's EC2 VMs.

``rainforest hosts slurm`` (inside a job) and ``rainforest hosts ec2 RUN`` print them in the
form each launcher reads; ``launch/slurm-hosts.sh``, ``launch/slurm-discover.sh`` and
``launch/ec2-hosts.sh`` are these commands under the names the recipes use.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from rainforest.errors import ParameterError, RainforestError
from rainforest.slurmjobs import slurm_output

#: How a host list is printed: ``horovodrun -H`` (a,b), one per line
#: (``--host-discovery-script``), or an OpenMPI hostfile.
FORMATS = ("horovod", "lines", "hostfile")
#: A file of nodes (one per line) that elastic discovery leaves out as well.
EXCLUDE_VARIABLE = "SLURM_DISCOVER_EXCLUDE"
#: The folder holding rainforest's ``ssh`` with keepalives; launchers put it first on PATH.
KEEPALIVE_DIR = Path(__file__).resolve().parent / "keepalive"


def local_gloo_launcher(ranks: int) -> list[str]:
    """``horovodrun`` for ``ranks`` ranks over Gloo on this host, or ``[]`` when absent.

    The ``horovodrun`` beside this Python (the venv) comes first, then any on ``PATH``.
    """
    import shutil
    import sys

    beside = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    found = beside if os.path.exists(beside) else shutil.which("horovodrun")
    return [found, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo"] if found else []


def render(hosts: Sequence[str], slots: int, form: str) -> str:
    """``hosts`` with ``slots`` ranks each, as ``form`` (one of :data:`FORMATS`) wants them."""
    if form == "hostfile":
        return "\n".join(f"{host} slots={slots}" for host in hosts)
    joiner = "," if form == "horovod" else "\n"
    return joiner.join(f"{host}:{slots}" for host in hosts)


def tasks_per_node(environ: Mapping[str, str]) -> int:
    """Ranks per node of a Slurm job; Slurm writes "2(x3)" for 2 tasks on each of 3 nodes."""
    value = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_NTASKS") or "1"
    match = re.match(r"\d+", value)
    if not match:
        raise ParameterError(f"cannot read tasks per node from {value!r}")
    return int(match.group())


def slurm_job_nodes(environ: Mapping[str, str], *, current: bool) -> list[str]:
    """The job's nodes: as allocated at its start, or (``current``) as Slurm holds them now."""
    if "SLURM_JOB_ID" not in environ:
        raise ParameterError("no SLURM_JOB_ID: run `rainforest hosts slurm` inside a Slurm job")
    nodes = environ.get("SLURM_JOB_NODELIST", "")
    if current:  # a node taken from the job or added to it shows here, not in the variable
        found = re.search(r"^\s*NodeList=(\S+)", slurm_output("scontrol", "show", "job",
                                                        environ["SLURM_JOB_ID"]), re.M)
        nodes = found.group(1) if found and found.group(1) != "(null)" else nodes
    if not nodes:
        raise RainforestError(f"no node list for Slurm job {environ['SLURM_JOB_ID']}")
    return slurm_output("scontrol", "show", "hostnames", nodes).split()


def left_out_nodes(environ: Mapping[str, str]) -> set[str]:
    """Nodes Slurm drains (or has drained), and those named in ``$SLURM_DISCOVER_EXCLUDE``."""
    left_out = set(slurm_output("sinfo", "-h", "-N", "-t", "drain", "-o", "%N").split())
    exclude = environ.get(EXCLUDE_VARIABLE)
    if exclude and os.access(exclude, os.R_OK):
        with open(exclude) as handle:
            left_out.update(line.strip() for line in handle if line.strip())
    return left_out


def slurm_hosts(environ: Mapping[str, str], *, discover: bool) -> list[str]:
    """The job's hosts; ``discover`` gives elastic discovery's view: now, less drained nodes."""
    nodes = slurm_job_nodes(environ, current=discover)
    if not discover:
        return nodes
    left_out = left_out_nodes(environ)
    return [node for node in nodes if node not in left_out]


def keepalive_path(environ: Mapping[str, str]) -> str:
    """``PATH`` with :data:`KEEPALIVE_DIR` first: the ``ssh`` that horovodrun and mpirun then
    start ends a session to a node that lost power within 15 s instead of never."""
    rest = [d for d in environ.get("PATH", "").split(os.pathsep) if d and d != str(KEEPALIVE_DIR)]
    return os.pathsep.join([str(KEEPALIVE_DIR), *rest])


def ssh_keepalive_seconds(host: str, environ: Mapping[str, str]) -> int:
    """How long the ``ssh`` on ``environ``'s PATH waits on a silent ``host`` (0: forever).

    ``ssh -G`` prints the settings ssh would use, options and ``~/.ssh/config`` applied,
    without connecting.
    """
    try:
        result = subprocess.run(["ssh", "-G", host], capture_output=True, text=True, timeout=30,
                                env=dict(environ), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RainforestError(f"cannot run `ssh -G {host}` ({error})") from None
    if result.returncode != 0:
        raise RainforestError(f"`ssh -G {host}` failed: {result.stderr.strip()}")
    settings = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    return int(settings.get("serveraliveinterval", 0)) * int(settings.get("serveralivecountmax", 3))


def check_ssh_keepalive(hosts: Sequence[str], environ: Mapping[str, str]) -> None:
    """Refuse hosts that horovodrun would reach by an ssh that never gives up on them.

    Raises
    ------
    ParameterError
        Naming the first such host, and the two ways to give ssh keepalives.
    """
    here = {socket.gethostname().split(".")[0], "localhost", "127.0.0.1"}
    for host in hosts:
        if host.split(".")[0] in here or ssh_keepalive_seconds(host, environ) > 0:
            continue
        raise ParameterError(
            f"ssh to {host} has no keepalives (ServerAliveInterval 0), so horovodrun would wait "
            "forever on a node that loses power. Start horovodrun with rainforest's ssh first on "
            f"PATH (PATH={KEEPALIVE_DIR}:$PATH horovodrun ...; `rainforest hosts keepalive` "
            "prints the folder), or add to ~/.ssh/config on this node:\n"
            "  Host *\n    ServerAliveInterval 5\n    ServerAliveCountMax 3")
