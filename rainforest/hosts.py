"""Host lists for ``horovodrun`` and ``mpirun``: the nodes of a Slurm job, or a run's EC2 VMs.

``rainforest hosts slurm`` (inside a job) and ``rainforest hosts ec2 RUN`` print them in the
form each launcher reads; ``launch/slurm-hosts.sh``, ``launch/slurm-discover.sh`` and
``launch/ec2-hosts.sh`` are these commands under the names the recipes use.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence

from rainforest.errors import ParameterError, RainforestError

#: How a host list is printed: ``horovodrun -H`` (a,b), one per line
#: (``--host-discovery-script``), or an OpenMPI hostfile.
FORMATS = ("horovod", "lines", "hostfile")
#: A file of nodes (one per line) that elastic discovery leaves out as well.
EXCLUDE_VARIABLE = "SLURM_DISCOVER_EXCLUDE"


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


def _slurm(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise RainforestError(f"{command[0]} is not on PATH: run this on a Slurm node") from None
    except subprocess.CalledProcessError as error:
        raise RainforestError(f"{' '.join(command)} failed: {error.stderr.strip()}") from None


def slurm_job_nodes(environ: Mapping[str, str], *, current: bool) -> list[str]:
    """The job's nodes: as allocated at its start, or (``current``) as Slurm holds them now."""
    if "SLURM_JOB_ID" not in environ:
        raise ParameterError("no SLURM_JOB_ID: run `rainforest hosts slurm` inside a Slurm job")
    nodes = environ.get("SLURM_JOB_NODELIST", "")
    if current:  # a node taken from the job or added to it shows here, not in the variable
        found = re.search(r"^\s*NodeList=(\S+)", _slurm("scontrol", "show", "job",
                                                        environ["SLURM_JOB_ID"]), re.M)
        nodes = found.group(1) if found and found.group(1) != "(null)" else nodes
    if not nodes:
        raise RainforestError(f"no node list for Slurm job {environ['SLURM_JOB_ID']}")
    return _slurm("scontrol", "show", "hostnames", nodes).split()


def left_out_nodes(environ: Mapping[str, str]) -> set[str]:
    """Nodes Slurm drains (or has drained), and those named in ``$SLURM_DISCOVER_EXCLUDE``."""
    left_out = set(_slurm("sinfo", "-h", "-N", "-t", "drain", "-o", "%N").split())
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
