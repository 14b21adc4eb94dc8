"""Where the Dask work runs, and the preflight that checks the workers before any song.

``--cluster`` takes:

- ``local`` (default) or ``local:N``: a LocalCluster of N single-threaded worker processes;
- ``tcp://host:port`` (or ``tls://``): a ``dask scheduler`` you already run;
- ``scheduler-file:PATH``: a scheduler that wrote its address to PATH (common on HPC, and what
  ``slurm/preprocess.sbatch`` does inside one allocation);
- ``slurm``: worker jobs submitted with ``sbatch`` from a login node by dask-jobqueue's
  ``SLURMCluster``, scaled adaptively (:class:`SlurmSettings`);
- ``ec2``: a scheduler and workers on EC2 VMs started by dask-cloudprovider's ``EC2Cluster``
  and terminated when the run ends (:mod:`rainforest.ec2`);
- ``sync``: no cluster, everything in this process (for debugging and profiling).

Whatever the cluster, :func:`preflight` runs on every worker before any work: the worker must
run the same rainforest, numpy and numba as this process, and be able to read every input and
write the output. Most failed cluster runs fail on exactly these two things.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from rainforest.config import Config, documented, setting
from rainforest.errors import ParameterError

CLUSTER_HELP = (
    "where to run: 'local' (default, one worker process per core), 'local:N' (N workers), "
    "'tcp://HOST:PORT' (a running `dask scheduler`), 'scheduler-file:PATH', 'slurm' (worker "
    "jobs submitted with sbatch; see the --slurm-* options), 'ec2' (VMs started for the run and "
    "terminated after it; see the --ec2-* options), or 'sync' (in this process, for debugging)"
)

#: Seconds to wait for the first worker of a cluster we did not start ourselves.
WORKER_WAIT_SECONDS = 60
#: Seconds a running Slurm worker job gets to connect before it is reported; also how long
#: the run waits for the rest of its worker jobs once the first one has connected.
WORKER_CONNECT_SECONDS = 120


@documented
@dataclass(frozen=True)
class SlurmSettings(Config):
    """Worker jobs for ``--cluster slurm`` (dask-jobqueue's ``SLURMCluster``).

    A setting left unset comes from dask's own configuration (``jobqueue.slurm`` in
    ``~/.config/dask/jobqueue.yaml``), as dask-jobqueue users expect.
    """

    queue: str | None = setting(None, "partition to submit worker jobs to",
                                flag="--slurm-queue")
    account: str | None = setting(None, "account to charge", flag="--slurm-account")
    cores: int | None = setting(None, "cores per worker job", flag="--slurm-cores", type=int)
    memory: str | None = setting(None, "memory per worker job in Dask units, e.g. 4GB (Slurm "
                                 "gets it in MiB)", flag="--slurm-memory")
    walltime: str | None = setting(None, "time limit per worker job, e.g. 01:00:00",
                                   flag="--slurm-walltime")
    processes: int | None = setting(None, "worker processes per job (default: one per core, "
                                    "single-threaded)", flag="--slurm-processes", type=int)
    directives: tuple[str, ...] = setting((), "an extra #SBATCH directive, written with '=', "
                                          "e.g. --slurm-directive=--constraint=skylake "
                                          "(repeatable)",
                                          flag="--slurm-directive", repeat=True)
    skip_directives: tuple[str, ...] = setting((), "a generated #SBATCH directive to leave out, "
                                               "e.g. --slurm-skip-directive=--mem where the "
                                               "site sets memory itself (repeatable)",
                                               flag="--slurm-skip-directive", repeat=True)
    prologue: tuple[str, ...] = setting((), "a shell line run before each worker starts, e.g. "
                                        "'module load python/3.11' or 'source ~/venv/bin/"
                                        "activate' (repeatable)", flag="--slurm-prologue",
                                        repeat=True)
    interface: str | None = setting(None, "network interface of the scheduler and workers, "
                                    "e.g. ib0 (login and compute nodes often differ)",
                                    flag="--slurm-interface")
    lifetime: str | None = setting(None, "restart each worker after this long, e.g. 55m, "
                                   "shorter than the walltime, so a walltime kill never lands "
                                   "mid-task", flag="--slurm-lifetime")
    min_jobs: int = setting(1, "fewest worker jobs kept while the run lasts",
                            flag="--slurm-min-jobs")
    max_jobs: int = setting(4, "most worker jobs the adaptive cluster submits",
                            flag="--slurm-max-jobs")
    start_timeout: float = setting(600.0, "seconds to wait for the first worker job to start "
                                   "(the queue may be busy)", flag="--slurm-start-timeout")

    def __post_init__(self) -> None:
        object.__setattr__(self, "directives", tuple(self.directives))
        object.__setattr__(self, "skip_directives", tuple(self.skip_directives))
        object.__setattr__(self, "prologue", tuple(self.prologue))
        if not 0 <= self.min_jobs <= self.max_jobs or self.max_jobs < 1:
            raise ParameterError(
                f"need 0 <= --slurm-min-jobs <= --slurm-max-jobs and --slurm-max-jobs >= 1, "
                f"got {self.min_jobs} and {self.max_jobs}")

    def cluster_arguments(self, scheduler_interface: str | None = None) -> dict:
        """Keyword arguments for ``SLURMCluster``: only what was set, so jobqueue.yaml fills
        the rest. ``scheduler_interface``, used when ``interface`` is unset, is for the
        scheduler only: each worker then takes its route to the scheduler."""
        arguments = {name: getattr(self, name)
                     for name in ("queue", "account", "cores", "memory", "walltime", "interface")
                     if getattr(self, name) is not None}
        processes = self.processes if self.processes is not None else self.cores
        if processes is not None:
            arguments["processes"] = processes
        if self.directives:
            arguments["job_extra_directives"] = list(self.directives)
        if self.skip_directives:
            arguments["job_directives_skip"] = list(self.skip_directives)
        if self.prologue:
            arguments["job_script_prologue"] = list(self.prologue)
        if self.lifetime:
            arguments["worker_extra_args"] = ["--lifetime", self.lifetime,
                                              "--lifetime-stagger", "1m"]
        scheduler = {"dashboard_address": ":0"}
        if self.interface or scheduler_interface:
            scheduler["interface"] = self.interface or scheduler_interface
        arguments["scheduler_options"] = scheduler
        return arguments


def slurm_cluster(settings: SlurmSettings, *, quiet: bool = False):
    """An adaptive ``SLURMCluster`` for ``settings`` (its worker jobs are submitted lazily)."""
    if shutil.which("sbatch") is None:
        raise ParameterError(
            "--cluster slurm needs Slurm's sbatch, which is not on PATH: run on a login node "
            "of the cluster, or inside an allocation use slurm/preprocess.sbatch "
            "(--cluster scheduler-file:...)")
    import dask.config
    from dask_jobqueue import SLURMCluster

    from rainforest.slurmjobs import check_interface, scheduler_interface

    # Where the scheduler listens must be known before the first job is submitted.
    chosen = None
    if settings.interface:
        check_interface(settings.interface, settings.queue)
    elif not dask.config.get("jobqueue.slurm.interface", None):
        chosen = scheduler_interface(settings.queue)
    try:
        cluster = SLURMCluster(**settings.cluster_arguments(chosen),
                               silence_logs="error" if quiet else "warning")
    except ValueError as error:
        raise ParameterError(
            f"--cluster slurm: {error}. Give --slurm-cores and --slurm-memory, or set "
            "jobqueue.slurm in ~/.config/dask/jobqueue.yaml") from None
    cluster.adapt(minimum_jobs=settings.min_jobs, maximum_jobs=settings.max_jobs)
    return cluster


def _local_workers(spec: str) -> int:
    if spec == "local":
        return os.cpu_count() or 1
    try:
        workers = int(spec.split(":", 1)[1])
    except ValueError:
        workers = 0
    if workers < 1:
        raise ParameterError(f"--cluster {spec!r}: the worker count must be >= 1")
    return workers


@contextlib.contextmanager
def connect(spec: str = "local", *, settings: Config | None = None, quiet: bool = False,
            log: Callable[[str], None] = print) -> Iterator[object | None]:
    """Yield a ``distributed.Client`` for ``spec`` (None for ``sync``), closed afterwards.

    ``settings`` are the spec's own (a :class:`SlurmSettings` for ``slurm``); ``log`` gets
    what the user must know about the cluster (worker jobs that failed, how many joined).

    Examples
    --------
    >>> with connect("local:2") as client:        # doctest: +SKIP
    ...     print(client.dashboard_link)
    """
    spec = spec.strip()
    if spec == "sync":
        yield None
        return
    from distributed import Client, LocalCluster

    if spec == "local" or spec.startswith("local:"):
        cluster = LocalCluster(
            n_workers=_local_workers(spec), threads_per_worker=1, processes=True,
            dashboard_address=":0", silence_logs=40 if quiet else 30,
        )
        with cluster, Client(cluster) as client:
            yield client
        return
    if spec == "slurm":
        settings = settings if isinstance(settings, SlurmSettings) else SlurmSettings()
        with slurm_cluster(settings, quiet=quiet) as cluster, Client(cluster) as client:
            from rainforest.slurmjobs import wait_for_worker_jobs

            workers = wait_for_worker_jobs(
                cluster, client, jobs=settings.min_jobs or 1,
                workers_per_job=settings.processes or settings.cores or 1,
                timeout=settings.start_timeout, connect_seconds=WORKER_CONNECT_SECONDS, log=log)
            log(f"slurm: {workers} worker(s) connected to the scheduler at "
                f"{client.scheduler.address}")
            yield client
        return
    if spec == "ec2":
        from rainforest.ec2 import EC2Settings, connect_client, ec2_cluster

        settings = settings if isinstance(settings, EC2Settings) else EC2Settings()
        with ec2_cluster(settings, quiet=quiet) as cluster, \
                connect_client(cluster, settings.start_timeout) as client:
            _wait_for_a_worker(client, settings.start_timeout,
                               "no EC2 worker VM joined; see their system logs in the EC2 "
                               "console")
            yield client
        return
    if spec.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        try:  # gives up after Dask's distributed.comm.timeouts.connect (30 s by default)
            client = Client(spec)
        except OSError as error:
            raise ParameterError(
                f"cannot reach the Dask scheduler at {spec}: {error}. Is `dask scheduler` "
                "running there, and does this machine reach that port? (A slow network may "
                "need a longer DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT.)"
            ) from None
        with client:
            _wait_for_a_worker(client, WORKER_WAIT_SECONDS,
                               f"the scheduler at {spec} has no workers; start some with "
                               f"`dask worker {spec}`")
            yield client
        return
    if spec.startswith("scheduler-file:"):
        path = spec.split(":", 1)[1]
        if not os.path.exists(path):
            raise ParameterError(f"scheduler file {path} does not exist")
        with Client(scheduler_file=path) as client:
            _wait_for_a_worker(client, WORKER_WAIT_SECONDS,
                               f"the scheduler in {path} has no workers; start some with "
                               f"`dask worker --scheduler-file {path}`")
            yield client
        return
    raise ParameterError(f"unknown --cluster {spec!r}; {CLUSTER_HELP}")


def _wait_for_a_worker(client, seconds: float, message: str) -> None:
    try:
        client.wait_for_workers(1, timeout=seconds)
    except TimeoutError:
        raise ParameterError(f"{message} (waited {seconds:g} s)") from None


# ----------------------------------------------------------------------------- preflight

#: Packages whose versions must agree between this process and every worker.
CHECKED_PACKAGES = ("rainforest", "numpy", "numba")

def _probe_by_value():
    """The probe, registered so that workers receive its code, not a reference to rainforest."""
    import cloudpickle

    from rainforest import preflight_probe

    cloudpickle.register_pickle_by_value(preflight_probe)
    return preflight_probe.probe


def local_versions() -> dict[str, str]:
    import importlib

    return {name: getattr(importlib.import_module(name), "__version__", "?")
            for name in CHECKED_PACKAGES}


def preflight(client, *, reads: Sequence[str], write: str) -> dict[str, str]:
    """Check every worker before any work; returns where each one runs, by address
    ("on n1, Slurm job 14"), so that a worker lost later can be named.

    Raises
    ------
    ParameterError
        Naming each worker that runs other package versions (or lacks a package), or cannot
        read an input or write the output, and what to do about it.
    """
    if client is None:
        return {}
    ours = local_versions()
    reports = client.run(_probe_by_value(), list(CHECKED_PACKAGES), list(reads), write)
    problems = []
    for worker, report in sorted(reports.items()):
        for name, error in report["missing"].items():
            problems.append(f"{worker} cannot import {name} ({error}) with {report['python']}")
        for name, version in report["versions"].items():
            if version != ours[name]:
                problems.append(f"{worker} runs {name} {version}, this process {ours[name]}")
        problems += [f"{worker} cannot {what}" for what in report["cannot"]]
    if problems:
        raise ParameterError(
            "the workers are not ready for this run, so nothing was processed:\n  "
            + "\n  ".join(problems)
            + f"\nWorkers need the same environment as this process ({sys.executable}: "
            + ", ".join(f"{k} {v}" for k, v in ours.items())
            + "), e.g. activate its venv in the job prologue (--slurm-prologue), and need to "
            "see the inputs and output on a shared filesystem or s3://.")
    return {worker: _place(report) for worker, report in reports.items()}


def _place(report: dict) -> str:
    job = report.get("slurm_job")
    return f"on {report.get('host', '?')}" + (f", Slurm job {job}" if job else "")


# ----------------------------------------------------------------------------- lost workers


def lost_workers(client, *, since: float, places: dict[str, str]) -> list[dict]:
    """Workers the scheduler removed unasked (died, or became unreachable) since ``since``
    (seconds since the epoch), from its event log: address, where it ran (from
    :func:`preflight`), when it was removed, and how many tasks it had been given.

    A worker that retires when asked (adaptive scale-down, ``--slurm-lifetime``) is not lost.
    """
    if client is None:
        return []
    lost = []
    for stamp, event in client.get_events("all"):
        if not (isinstance(event, dict) and event.get("action") == "remove-worker"
                and not event.get("expected") and stamp >= since):
            continue
        address = event["worker"]
        lost.append({"address": address, "place": places.get(address, "not seen at preflight"),
                     "removed_at": stamp, "running": len(event.get("processing-tasks") or ()),
                     "results_lost": len(event.get("lost-computed-tasks") or ())})
    return lost


def describe_lost_worker(worker: dict) -> str:
    """One line for a lost worker, saying when the scheduler gave up on it."""
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(worker["removed_at"], UTC)
    line = (f"lost worker {worker['address']} ({worker['place']}) mid-run: the scheduler "
            f"removed it at {when.isoformat(timespec='milliseconds')}; the "
            f"{worker['running']} task(s) it had been given were run again on the others")
    if worker["results_lost"]:
        line += f", and the {worker['results_lost']} result(s) it held were computed again"
    return line
