"""How ``--cluster slurm`` reaches its worker jobs, and what it says about each of them.

The Dask scheduler runs in this process, on the login node, and the worker jobs connect to it
from the compute nodes. So it must listen on the interface through which this machine reaches
those nodes. Left to itself, Dask takes the route to the internet, and on a machine with no
default route (usual for compute nodes, common for login nodes) it falls back on the address
of the hostname, often 127.0.1.1, or on 127.0.0.1: every remote worker then fails to connect.

- :func:`scheduler_interface` finds the interface from the route to the partition's node
  addresses (or the controller's), before any job is submitted, and stops with the interfaces
  to pass to ``--slurm-interface`` when it cannot tell.
  ``python -m rainforest.slurmjobs`` prints it, for batch scripts (``slurm/*.sbatch``).
- :func:`wait_for_worker_jobs` waits for the worker jobs the run asked for, and names each one
  that ended or never connected, with its job id, state and output file.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import time
from collections.abc import Callable

from rainforest.errors import ParameterError, SlurmError

#: Job states in which a worker job may still connect.
LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED")


def slurm_output(*command: str, timeout: float = 30) -> str:
    """A Slurm client command's output.

    Raises
    ------
    SlurmError
        Where it is not installed, times out or fails, with Slurm's own message.
    """
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{command[0]} is not on PATH: run this on a Slurm node") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(command)}` gave no answer in {timeout:g} s") from None
    if result.returncode != 0:
        said = result.stderr.strip() or f"exit status {result.returncode}"
        raise SlurmError(f"`{' '.join(command)}` failed: {said}", result.stderr)
    return result.stdout


def node_addresses(queue: str | None = None) -> list[str]:
    """The addresses Slurm reaches the partition's nodes at (else its controllers').

    Raises
    ------
    SlurmError
        Where neither ``sinfo`` nor ``scontrol show config`` answers, with what each said.
    """
    try:
        addresses = slurm_output("sinfo", "-h", "-N", "-o", "%o",
                                 *(["-p", queue] if queue else [])).split()
    except SlurmError as error:
        addresses, unanswered = [], str(error)
    else:
        unanswered = ""
    if addresses:
        return sorted(set(addresses))
    try:
        config = slurm_output("scontrol", "show", "config")
    except SlurmError as error:
        raise SlurmError(f"--cluster slurm: Slurm names no node: {unanswered or 'sinfo: none'}; "
                         f"{error}. Run this on a machine whose `sinfo` works (a login "
                         "node), or pick another --cluster") from None
    hosts = re.findall(r"^SlurmctldHost\[\d+\]\s*=\s*(\S+)", config, re.MULTILINE)
    # "name(address)" or "name"
    return [host.split("(", 1)[1].rstrip(")") if "(" in host else host for host in hosts]


def _source_address(host: str) -> str | None:
    """This machine's address on the route to ``host``; None without a route. A UDP
    connect() sends nothing: it only asks the kernel for the route."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, 6817, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            return sock.getsockname()[0]
    except OSError:
        return None


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def interfaces() -> dict[str, list[str]]:
    """This machine's interfaces and their IP addresses."""
    import psutil

    return {name: [a.address.split("%")[0] for a in found
                   if a.family in (socket.AF_INET, socket.AF_INET6)]
            for name, found in psutil.net_if_addrs().items()}


def _refuse(reason: str) -> ParameterError:
    choices = ", ".join(f"{name} ({', '.join(found)})" for name, found in interfaces().items()
                        if found and not all(_is_loopback(a) for a in found)) or "none"
    return ParameterError(
        f"--cluster slurm: {reason}, so the worker jobs could not reach this machine's Dask "
        f"scheduler; nothing was submitted. Pass --slurm-interface with the interface the "
        f"compute nodes reach this machine on; this machine has: {choices}")


def scheduler_interface(queue: str | None = None) -> str:
    """The interface through which this machine reaches the nodes of ``queue``.

    Raises
    ------
    ParameterError
        Where Slurm names no node, a node has no route, the nodes lie behind different
        interfaces, or only loopback reaches nodes that are not this machine.
    """
    targets = node_addresses(queue)
    if not targets:
        raise _refuse("neither `sinfo` nor `scontrol show config` names a node or controller")
    routes: dict[str, list[str]] = {}
    for target in targets:
        source = _source_address(target)
        if source is None:
            raise _refuse(f"this machine has no route to the node address {target}")
        routes.setdefault(source, []).append(target)
    if len(routes) > 1:
        raise _refuse("the nodes are reached through different addresses "
                      f"({', '.join(f'{s} for {t[0]}' for s, t in routes.items())})")
    (source, reached), = routes.items()
    names = [name for name, found in interfaces().items() if source in found]
    if not names:
        raise _refuse(f"no interface carries {source}, the address on the route to the nodes")
    if _is_loopback(source) and not all(_is_loopback(a) for a in _resolved(reached)):
        raise _refuse(f"the nodes' names ({', '.join(reached)}) resolve to loopback here")
    return names[0]


def _resolved(hosts: list[str]) -> list[str]:
    addresses = []
    for host in hosts:
        try:
            addresses.append(socket.getaddrinfo(host, None)[0][4][0])
        except OSError:
            addresses.append(host)
    return addresses


def check_interface(name: str, queue: str | None = None) -> None:
    """Refuse an interface that only loopback addresses carry when the nodes are remote."""
    found = interfaces().get(name)
    if found is None:
        raise _refuse(f"this machine has no interface {name!r}")
    if found and all(_is_loopback(a) for a in found):
        remote = [a for a in _resolved(node_addresses(queue)) if not _is_loopback(a)]
        if remote:
            raise _refuse(f"--slurm-interface {name} is loopback, and the node at {remote[0]} "
                          "is another machine")


# ----------------------------------------------------------------------------- worker jobs

def job_facts(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (empty once Slurm has forgotten the job).

    Raises
    ------
    SlurmError
        Where Slurm cannot say (its controller is unreachable, say), with its own message.
    """
    try:
        text = slurm_output("scontrol", "show", "job", "-o", str(job_id))
    except SlurmError as error:
        if "Invalid job id" in error.stderr:
            return {}
        raise
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def _describe(job_id: str, facts: dict[str, str], what: str) -> str:
    output = facts.get("StdOut") or f"slurm-{job_id}.out in the job's working folder"
    node = facts.get("NodeList") or "no node"
    status = facts.get("JobState", "gone") + (f", exit code {facts['ExitCode']}"
                                              if facts.get("ExitCode", "0:0") != "0:0" else "")
    return f"worker job {job_id} ({status}, on {node}) {what}; its output: {output}"


def _check_job(job_id: str, running_since: dict[str, float], connect_seconds: float,
               scheduler: str) -> str | None:
    """What is wrong with a worker job whose worker has not connected, if anything yet."""
    facts = job_facts(job_id)
    state = facts.get("JobState", "gone")
    if state not in LIVE_STATES:
        return _describe(job_id, facts, "ended before its worker connected")
    if state == "RUNNING":
        started = running_since.setdefault(job_id, time.monotonic())
        if time.monotonic() - started > connect_seconds:
            return _describe(job_id, facts, f"has run {connect_seconds:g} s, but its worker "
                             f"never connected to the scheduler at {scheduler}")
    return None


def wait_for_worker_jobs(cluster, client, *, jobs: int, workers_per_job: int, timeout: float,
                         connect_seconds: float, log: Callable[[str], None]) -> int:
    """Wait until the workers of ``jobs`` worker jobs have connected; returns how many did.

    Log every job that ended without connecting, or ran ``connect_seconds`` without
    connecting. Stop waiting ``timeout`` s after the start, or ``connect_seconds`` after the
    first worker connected (the jobs still queued join when they start).

    Raises
    ------
    ParameterError
        When no worker connected at all, naming each job and its output file.
    """
    started = time.monotonic()
    deadline = started + timeout
    running_since: dict[str, float] = {}
    reported: dict[str, str] = {}
    unanswered: set[str] = set()
    first_connected = None
    while True:
        names = {str(w["name"]) for w in client.scheduler_info(n_workers=-1)["workers"].values()}
        missing = {name: job.job_id for name, job in list(cluster.workers.items())
                   if getattr(job, "job_id", None) and not any(
                       w == name or w.startswith(f"{name}-") for w in names)}
        for job_id in missing.values():
            if job_id not in reported:
                try:
                    report = _check_job(job_id, running_since, connect_seconds,
                                        client.scheduler.address)
                except SlurmError as error:  # asked again next time round
                    if str(error) not in unanswered:
                        unanswered.add(str(error))
                        log(f"warning: cannot tell how worker job {job_id} is doing: {error}")
                    continue
                if report:
                    reported[job_id] = report
                    log(f"warning: {report}")
        now = time.monotonic()
        connected = len(names)
        if connected and first_connected is None:
            first_connected = now
        if connected >= jobs * workers_per_job or now > deadline or (connected and (
                (missing and all(job_id in reported for job_id in missing.values()))
                or now - first_connected > connect_seconds)):
            break
        time.sleep(0.5)
    if not connected:
        raise ParameterError(
            f"no Slurm worker connected within {timeout:g} s; see `squeue --me`"
            + "".join(f"\n  {line}" for line in reported.values()))
    pending = [job_id for job_id in missing.values() if job_id not in reported]
    if pending:
        log(f"warning: worker job(s) {', '.join(pending)} not connected after "
            f"{time.monotonic() - started:.0f} s; the run starts without them, and they join "
            "when they start")
    return connected


if __name__ == "__main__":
    import sys

    try:
        print(scheduler_interface(sys.argv[1] if len(sys.argv) > 1 else None))
    except ParameterError as error:
        sys.exit(f"error: {error}")
