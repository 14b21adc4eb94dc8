"""``--cluster ec2``: a Dask scheduler and workers on EC2 VMs (dask-cloudprovider's ``EC2Cluster``).

Every VM runs a docker image with rainforest installed (build one from ``launch/Dockerfile``).
What this module adds to ``EC2Cluster``, and why:

- **Security groups are required.** dask-cloudprovider's own default-group creation fails
  in version 2025.9.0, so a run without one stops before any VM starts.
- **Every VM carries our run tag** (``rainforest-run``), applied by ``RunInstances`` itself
  through ``instance_tags``, and when the run ends (normally, on an error, a start timeout,
  Ctrl-C or SIGTERM) everything carrying that tag is terminated. ``EC2Cluster.close()`` alone
  is not enough: a start cancelled by a timeout leaves the scheduler VM running (SpecCluster
  catches ``Exception``, not ``CancelledError``), and a failure before ``RunInstances`` leaves
  the cluster in ``closing``, where a later ``close()`` never returns.
- **The start has a timeout**: a VM whose cloud-init fails is otherwise waited for forever.
- **The user data checks the image's rainforest version** before the scheduler or worker
  starts, and a VM whose image holds another version shuts itself down (and so terminates).

Settings left unset come from dask's config (``cloudprovider.ec2`` in ``cloudprovider.yaml``),
as dask-cloudprovider users expect; ``launch/cloudprovider.yaml`` is an example.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from rainforest import __version__
from rainforest.config import Config, documented, setting
from rainforest.errors import ParameterError, RainforestError
from rainforest.signals import graceful_stop

#: The tag key every VM of a run carries; its value is the run id.
RUN_TAG = "rainforest-run"
#: Seconds allowed for a started cluster to close before its VMs are terminated by tag.
CLOSE_SECONDS = 60
#: Seconds allowed for a cancelled start to unwind before the tag sweep.
SETTLE_SECONDS = 60
#: Seconds allowed for the tag sweep to see every VM of the run shutting down.
SWEEP_SECONDS = 120
#: dask-cloudprovider's default image, which has no rainforest.
_DASK_IMAGE = "daskdev/dask"


@documented
@dataclass(frozen=True)
class EC2Settings(Config):
    """VMs for ``--cluster ec2`` (dask-cloudprovider's ``EC2Cluster``).

    A setting left unset comes from dask's own configuration (``cloudprovider.ec2`` in
    ``~/.config/dask/cloudprovider.yaml``), as dask-cloudprovider users expect.
    """

    region: str | None = setting(None, "AWS region, e.g. eu-west-1 (default: the AWS "
                                 "environment's)", flag="--ec2-region")
    scheduler_instance_type: str | None = setting(None, "instance type of the scheduler VM, "
                                                  "e.g. t3.medium",
                                                  flag="--ec2-scheduler-type")
    worker_instance_type: str | None = setting(None, "instance type of each worker VM, e.g. "
                                               "c6i.2xlarge", flag="--ec2-worker-type")
    ami: str | None = setting(None, "AMI of every VM (a Debian-like image; docker is installed "
                              "on it unless bootstrap is off in cloudprovider.yaml)",
                              flag="--ec2-ami")
    docker_image: str | None = setting(None, "docker image every VM runs, with this rainforest "
                                       "version installed (build it from launch/Dockerfile)",
                                       flag="--ec2-docker-image")
    security_groups: tuple[str, ...] = setting((), "security group id of every VM (repeatable; "
                                               "required): it must let the members reach each "
                                               "other and this machine reach the scheduler port",
                                               flag="--ec2-security-group", repeat=True)
    subnet_id: str | None = setting(None, "subnet id (needed where the region has no default "
                                    "VPC)", flag="--ec2-subnet")
    vpc: str | None = setting(None, "VPC id (needed where the region has no default VPC)",
                              flag="--ec2-vpc")
    spot: bool = setting(False, "run the workers on spot instances (cheaper; may be reclaimed, "
                         "and Dask then reruns their tasks)", flag="--ec2-spot")
    filesystem_size: int | None = setting(None, "root volume of every VM in GB",
                                          flag="--ec2-filesystem-size", type=int)
    workers: int = setting(2, "worker VMs to start", flag="--ec2-workers")
    tls: bool = setting(True, "encrypt and authenticate Dask traffic with temporary TLS "
                        "certificates (they travel in the user data)", flag="--ec2-tls")
    private_ip: bool | None = setting(None, "reach the VMs by their private addresses (when "
                                      "this machine is inside the VPC)",
                                      flag="--ec2-private-ip", type=bool)
    scheduler_port: int = setting(8786, "port of the scheduler VM (the security group must "
                                  "open it to this machine)", flag="--ec2-scheduler-port")
    start_timeout: float = setting(900.0, "seconds to wait for the scheduler VM to answer (a "
                                   "failed cloud-init never does)", flag="--ec2-start-timeout")

    def __post_init__(self) -> None:
        object.__setattr__(self, "security_groups", tuple(self.security_groups))
        if self.workers < 0:
            raise ParameterError(f"--ec2-workers must be >= 0, got {self.workers}")
        if not self.start_timeout > 0:
            raise ParameterError(f"--ec2-start-timeout must be positive, got "
                                 f"{self.start_timeout}")
        if self.filesystem_size is not None and self.filesystem_size < 8:
            raise ParameterError(f"--ec2-filesystem-size must be >= 8 GB, got "
                                 f"{self.filesystem_size}")

    def cluster_arguments(self, run_id: str) -> dict:
        """Keyword arguments for ``EC2Cluster``: what was set, plus our tag and version check.

        Raises
        ------
        ParameterError
            When neither the settings nor cloudprovider.yaml give a security group or a
            rainforest docker image.
        """
        groups = self.security_groups or tuple(_configured("security_groups") or ())
        if not groups:
            raise ParameterError(
                "--cluster ec2 needs a security group: pass --ec2-security-group sg-... (or set "
                "security_groups in cloudprovider.yaml). It must allow all traffic between its "
                "members and the scheduler port from this machine; dask-cloudprovider's own "
                "group creation is unreliable, so rainforest does not use it")
        image = self.docker_image or _configured("docker_image")
        if not image or image.split(":")[0] == _DASK_IMAGE:
            raise ParameterError(
                f"--cluster ec2 needs a docker image with rainforest {__version__} installed "
                f"(dask's default {image!r} has none): build launch/Dockerfile, push it, and "
                "pass --ec2-docker-image or set docker_image in cloudprovider.yaml")
        arguments = {name: getattr(self, name)
                     for name in ("region", "scheduler_instance_type", "worker_instance_type",
                                  "ami", "subnet_id", "vpc", "filesystem_size")
                     if getattr(self, name) is not None}
        if self.private_ip is not None:
            arguments["use_private_ip"] = self.private_ip
        arguments.update(
            security_groups=list(groups), docker_image=image, spot=self.spot,
            n_workers=self.workers, security=self.tls,
            scheduler_options={"port": self.scheduler_port},
            instance_tags={RUN_TAG: run_id}, volume_tags={RUN_TAG: run_id},
            extra_bootstrap=[version_check(image)])
        return arguments


def version_check(image: str) -> str:
    """A user-data line that stops a VM whose image holds another rainforest than ours.

    The VMs are created with "terminate on shutdown", so the VM goes away, the start times
    out here and the run tag sweep finds nothing left to pay for.
    """
    check = f"import rainforest, sys; sys.exit(rainforest.__version__ != '{__version__}')"
    return f'docker run --rm {image} python -c "{check}" || shutdown -h now'


def _configured(key: str):
    import dask.config
    import dask_cloudprovider  # noqa: F401  (loads cloudprovider.yaml's defaults)

    return dask.config.get(f"cloudprovider.ec2.{key}", None)


def new_run_id() -> str:
    return f"rf-{uuid.uuid4().hex[:12]}"


# ----------------------------------------------------------------------------- teardown

def _ec2_client(region: str | None):
    import boto3

    return boto3.client("ec2", region_name=region or _configured("region"))


def _tagged(run_id: str, region: str | None, states: tuple[str, ...], tag_key: str
            ) -> list[dict]:
    """The described VMs whose ``tag_key`` tag is ``run_id``, in one of ``states``."""
    pages = _ec2_client(region).get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{tag_key}", "Values": [run_id]},
        {"Name": "instance-state-name", "Values": list(states)}])
    return [instance for page in pages for reservation in page["Reservations"]
            for instance in reservation["Instances"]]


def tagged_instances(run_id: str, *, region: str | None = None,
                     states: tuple[str, ...] = ("pending", "running", "stopping", "stopped")
                     ) -> list[str]:
    """Ids of the VMs carrying ``run_id`` in one of ``states``."""
    return sorted(instance["InstanceId"] for instance in _tagged(run_id, region, states, RUN_TAG))


def run_addresses(run_id: str, *, public: bool = False, region: str | None = None,
                  tag_key: str = RUN_TAG) -> list[str]:
    """The addresses of the run's running VMs, in numeric order: its ranks' host list.

    Private addresses by default (ranks talk inside the VPC).
    """
    key = "PublicIpAddress" if public else "PrivateIpAddress"
    addresses = {instance[key] for instance in _tagged(run_id, region, ("running",), tag_key)
                 if instance.get(key)}
    if not addresses:
        raise RainforestError(f"no running EC2 VM carries the tag {tag_key}={run_id}")
    return sorted(addresses, key=lambda ip: tuple(int(part) for part in ip.split(".")))


def terminate_tagged(run_id: str, *, region: str | None = None,
                     seconds: float = SWEEP_SECONDS) -> list[str]:
    """Terminate every VM of the run, until none is left alive; returns the ids terminated.

    It sweeps more than once, because a ``RunInstances`` call already under way when the run
    was stopped can still add a VM after the first look.
    """
    terminated: list[str] = []
    deadline = time.monotonic() + seconds
    quiet_sweeps = 0
    while quiet_sweeps < 2:
        alive = tagged_instances(run_id, region=region)
        if alive:
            _ec2_client(region).terminate_instances(InstanceIds=alive)
            terminated += alive
            quiet_sweeps = 0
        else:
            quiet_sweeps += 1
        if time.monotonic() > deadline:
            raise RainforestError(
                f"EC2 VMs tagged {RUN_TAG}={run_id} are still alive after {seconds:g} s: "
                f"{alive}. Terminate them by hand: aws ec2 terminate-instances --instance-ids "
                + " ".join(alive))
        time.sleep(1.0 if quiet_sweeps < 2 else 0)
    return terminated


# ----------------------------------------------------------------------------- the cluster

class _BackgroundLoop:
    """An asyncio loop on a daemon thread, where the asynchronous EC2Cluster lives.

    Running the start there lets this thread wait for it with a timeout and stop waiting on
    Ctrl-C, neither of which the synchronous ``EC2Cluster(...)`` constructor allows.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="rainforest-ec2")
        self.thread.start()

    def run(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _start(arguments: dict, quiet: bool):
    from dask_cloudprovider.aws import EC2Cluster

    cluster = EC2Cluster(asynchronous=True, silence_logs="error" if quiet else False,
                         **arguments)
    cluster.quiet = quiet
    await cluster
    return cluster


def _start_in(background: _BackgroundLoop, arguments: dict, timeout: float, quiet: bool):
    """Start the cluster; on a timeout or Ctrl-C, cancel the start and wait until it stopped."""
    future = asyncio.run_coroutine_threadsafe(_start(arguments, quiet),
                                              background.loop)
    try:
        return future.result(timeout)
    except BaseException as error:
        # Cancel every task of the start (the scheduler's and each worker's) and let them
        # unwind, so that no RunInstances is still on its way when the tag sweep looks. The
        # loop may be stuck in the blocking reachability probe; the sweep runs regardless.
        with contextlib.suppress(Exception):
            background.run(_cancel_all(), timeout=SETTLE_SECONDS)
        if isinstance(error, TimeoutError):
            raise RainforestError(
                f"--cluster ec2: the scheduler VM did not answer within {timeout:g} s; its "
                "cloud-init probably failed (wrong AMI or docker image, no route to the "
                "docker registry, or the security group blocks the scheduler port). See the "
                "VM's system log in the EC2 console; raise --ec2-start-timeout if it is just "
                "slow. Every VM of the run was terminated") from None
        if isinstance(error, Exception) and not isinstance(error, RainforestError):
            root = _root_cause(error)
            raise RainforestError(
                f"--cluster ec2 could not start: {type(root).__name__}: {root}. Check that the "
                "AMI, VPC, subnet and security groups exist in the region and that the VPC has "
                "a subnet (--ec2-ami, --ec2-vpc, --ec2-subnet, --ec2-security-group). Every VM "
                "of the run was terminated") from error
        raise


def _root_cause(error: BaseException) -> BaseException:
    """The first exception of a chain: EC2Cluster's own clean-up after a failure raises
    again (it closes a VM it never created), which hides the reason."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=SETTLE_SECONDS)


@contextlib.contextmanager
def ec2_cluster(settings: EC2Settings, *, quiet: bool = False) -> Iterator[object]:
    """Yield a started ``EC2Cluster``; every VM of it is terminated afterwards, whatever happens.

    Examples
    --------
    >>> settings = EC2Settings(security_groups=("sg-0123",), docker_image="me/rainforest:0.1.0")
    >>> with ec2_cluster(settings) as cluster:          # doctest: +SKIP
    ...     print(cluster.scheduler_address)
    """
    import dask.config
    import dask_cloudprovider.aws  # noqa: F401  (its config defaults and distributed's load)

    run_id = new_run_id()
    arguments = settings.cluster_arguments(run_id)  # refuses bad settings before any VM
    # EC2Cluster sets its TLS settings in dask's global config; they go with the cluster.
    saved_config = copy.deepcopy(dask.config.config)
    # Always said: it is what to look for should this process die without its teardown.
    print(f"starting EC2 VMs tagged {RUN_TAG}={run_id}", file=sys.stderr, flush=True)
    background = _BackgroundLoop()
    cluster, failed = None, False
    try:
        with graceful_stop(interrupt=True):  # SIGTERM tears the VMs down like Ctrl-C
            cluster = _start_in(background, arguments, settings.start_timeout, quiet)
            yield cluster
    except BaseException:
        failed = True
        raise
    finally:
        try:
            if cluster is not None:
                with contextlib.suppress(Exception):
                    background.run(cluster.close(), timeout=CLOSE_SECONDS)
        finally:
            background.stop()
            dask.config.config.clear()
            dask.config.config.update(saved_config)
            _sweep(run_id, arguments.get("region"), failed=failed)


def _sweep(run_id: str, region: str | None, *, failed: bool) -> None:
    """Terminate the run's VMs; when AWS cannot even be asked, say so without hiding the
    error that ended the run (no credentials, say, which also means no VM was started)."""
    import botocore.exceptions

    try:
        terminate_tagged(run_id, region=region)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        message = (f"could not look for EC2 VMs tagged {RUN_TAG}={run_id} ({error}); look in "
                   "the EC2 console and terminate any that are left")
        if not failed:
            raise RainforestError(message) from None
        print(f"warning: {message}", file=sys.stderr, flush=True)


def connect_client(cluster, timeout: float):
    """A ``distributed.Client`` for a started cluster, with its TLS credentials."""
    from distributed import Client

    return Client(cluster.scheduler_address, security=cluster.security,
                  timeout=f"{max(timeout, 30):g}s")
