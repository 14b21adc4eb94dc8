"""``--cluster ec2`` against moto's EC2 API on 127.0.0.1.

dask-cloudprovider's real ``EC2Cluster`` makes its real AWS calls (``RunInstances``,
``CreateTags``, ``DescribeInstances``, ``TerminateInstances``) to moto; nothing in them is
patched. moto's VMs do not boot, so where a test needs a VM to answer, it runs the VM's own
container command, read from its user data (TLS certificates included), in this venv instead
of the docker image, in a network namespace at the private address moto gave that VM
(tests/vmnet.py): the client, the scheduler's VM and the worker's VM each talk through their
own address, across a real network boundary. Nothing is stubbed, not even the
scheduler-reachability probe that the architecture notes expected to stub: it really
connects, and where nothing answers, it really fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import RAINFOREST, assert_same_tree, free_port, run_cli
from interrupt import signal_when, when
from rainforest import __version__
from rainforest.ec2 import RUN_TAG, EC2Settings, ec2_cluster
from rainforest.errors import ParameterError, RainforestError
from vmnet import VMNetwork

pytestmark = [pytest.mark.ec2, pytest.mark.slow]

IMAGE = "registry.example/rainforest:" + __version__
SCHEDULER_TYPE, WORKER_TYPE = "t3.small", "c5.large"


@pytest.fixture
def network(aws):
    """A VPC, its subnet held on this machine by a VMNetwork (each VM that a test runs gets a
    namespace at its private address), a security group and an AMI, in fresh moto state."""
    import boto3

    client = boto3.client("ec2")
    vpc = client.create_vpc(CidrBlock="198.18.0.0/16")["Vpc"]["VpcId"]
    block = random.randrange(256)  # two test runs on one machine rarely share a subnet
    subnet = client.create_subnet(VpcId=vpc, CidrBlock=f"198.18.{block}.0/24")["Subnet"]
    group = client.create_security_group(GroupName="rainforest-test", Description="test",
                                         VpcId=vpc)["GroupId"]
    ami = client.describe_images()["Images"][0]["ImageId"]
    vms = VMNetwork(subnet["CidrBlock"]).start()
    try:
        yield {"client": client, "vpc": vpc, "subnet": subnet["SubnetId"], "group": group,
               "ami": ami, "vms": vms}
    finally:
        vms.stop()


def _settings(network, **changes) -> EC2Settings:
    values = dict(scheduler_instance_type=SCHEDULER_TYPE, worker_instance_type=WORKER_TYPE,
                  ami=network["ami"], docker_image=IMAGE, security_groups=(network["group"],),
                  subnet_id=network["subnet"], vpc=network["vpc"], filesystem_size=50,
                  private_ip=True, scheduler_port=free_port(), workers=1, start_timeout=10.0)
    return EC2Settings(**{**values, **changes})


def _flags(settings: EC2Settings) -> list[str]:
    """The command-line spelling of ``settings``."""
    flags = ["--cluster", "ec2", "--ec2-scheduler-type", settings.scheduler_instance_type,
             "--ec2-worker-type", settings.worker_instance_type, "--ec2-ami", settings.ami,
             "--ec2-docker-image", settings.docker_image, "--ec2-subnet", settings.subnet_id,
             "--ec2-vpc", settings.vpc, "--ec2-filesystem-size", str(settings.filesystem_size),
             "--ec2-private-ip", "--ec2-scheduler-port", str(settings.scheduler_port),
             "--ec2-workers", str(settings.workers),
             "--ec2-start-timeout", str(settings.start_timeout)]
    for group in settings.security_groups:
        flags += ["--ec2-security-group", group]
    return flags + ([] if settings.tls else ["--no-ec2-tls"])


def _ours(client, *states) -> list[dict]:
    """Every VM carrying our run tag (in ``states``, if given)."""
    filters = [{"Name": "tag-key", "Values": [RUN_TAG]}]
    if states:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    return [instance for reservation in client.describe_instances(Filters=filters)
            ["Reservations"] for instance in reservation["Instances"]]


def _assert_nothing_left_running(client) -> None:
    instances = _ours(client)
    assert instances, "no VM was ever requested"
    assert {i["State"]["Name"] for i in instances} == {"terminated"}, [
        (i["InstanceId"], i["State"]["Name"]) for i in instances]


def _wait_for(what, seconds=120.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class _Helper(threading.Thread):
    """A helper thread whose failure (an assertion, a timeout) fails the test at ``join``
    instead of being lost on the thread and surfacing later as an unrelated timeout."""

    def __init__(self, target, *args) -> None:
        super().__init__(daemon=True)
        self._call, self.error = (target, args), None

    def run(self) -> None:
        target, args = self._call
        try:
            target(*args)
        except BaseException as error:  # noqa: BLE001 (carried to join)
            self.error = error

    def join(self, timeout: float = 120.0) -> None:
        super().join(timeout)
        assert not self.is_alive(), f"{self._call[0].__name__} still running after {timeout} s"
        if self.error is not None:
            raise AssertionError(f"{self._call[0].__name__} failed") from self.error


def _user_data(client, instance_id: str) -> str:
    value = client.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(value["UserData"]["Value"]).decode()


def test_a_missing_security_group_stops_before_any_vm(network, song_dir, tmp_path):
    settings = _settings(network, security_groups=())
    with pytest.raises(ParameterError, match="needs a security group"), \
            ec2_cluster(settings, quiet=True):
        pass
    flags = _flags(settings)
    result = run_cli("preprocess", song_dir, "--out", tmp_path / "out", *flags, check=False)
    assert result.returncode == 1
    assert "--ec2-security-group sg-" in result.stderr, result.stderr
    assert _ours(network["client"]) == []
    assert network["client"].describe_instances()["Reservations"] == []


def test_dask_default_image_is_refused_before_any_vm(network):
    with pytest.raises(ParameterError, match=f"rainforest {__version__} installed"), \
            ec2_cluster(_settings(network, docker_image="daskdev/dask:latest"), quiet=True):
        pass
    assert network["client"].describe_instances()["Reservations"] == []


def test_requested_vm_carries_the_settings_and_a_start_timeout_terminates_it(network):
    """Nothing answers at the scheduler VM's address, so the start times out."""
    client, settings = network["client"], _settings(network, start_timeout=8.0)
    seen: dict = {}

    def record_the_scheduler_vm():  # read while it runs: volumes go with termination
        [instance] = _wait_for(lambda: _ours(client))
        seen["instance"] = instance
        seen["user_data"] = _user_data(client, instance["InstanceId"])
        seen["volumes"] = client.describe_volumes(Filters=[
            {"Name": "attachment.instance-id", "Values": [instance["InstanceId"]]}])["Volumes"]

    recorder = _Helper(record_the_scheduler_vm)
    recorder.start()
    with pytest.raises(RainforestError, match="did not answer within 8 s"), \
            ec2_cluster(settings, quiet=True):
        pass
    recorder.join(60)
    instance = seen["instance"]
    assert instance["InstanceType"] == SCHEDULER_TYPE and instance["ImageId"] == network["ami"]
    assert [g["GroupId"] for g in instance["NetworkInterfaces"][0]["Groups"]] == [
        network["group"]]
    assert instance["SubnetId"] == network["subnet"] and instance["VpcId"] == network["vpc"]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags[RUN_TAG].startswith("rf-")
    assert [v["Size"] for v in seen["volumes"]] == [50]
    user_data = seen["user_data"]
    # AWS refuses more than 16 KiB of user data; the TLS certificates travel in it.
    assert len(user_data.encode()) <= 16384, len(user_data.encode())
    assert f"docker run --net=host   {IMAGE} env DASK_INTERNAL_INHERIT_CONFIG" in user_data
    assert "python -m distributed.cli.dask_scheduler --port " \
           f"{settings.scheduler_port}" in user_data
    assert (f"docker run --rm {IMAGE} python -c \"import rainforest, sys; "
            f"sys.exit(rainforest.__version__ != '{__version__}')\" || shutdown -h now"
            ) in user_data
    _assert_nothing_left_running(client)


def test_a_failure_before_any_vm_is_a_clear_error_and_returns(network):
    """A VPC without subnets: EC2Cluster fails before RunInstances, where its own close()
    would never return."""
    import boto3

    empty = boto3.client("ec2").create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    with pytest.raises(RainforestError, match="could not start: IndexError.*has a subnet"), \
            ec2_cluster(_settings(network, vpc=empty, subnet_id=None), quiet=True):
        pass
    assert network["client"].describe_instances()["Reservations"] == []


def test_no_aws_credentials_is_a_clear_error(network, song_dir, tmp_path):

    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("AWS_ACCESS_KEY") and name != "AWS_SECRET_ACCESS_KEY"}
    environment.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                       AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    result = run_cli("preprocess", song_dir, "--out", tmp_path / "out", *_flags(
        _settings(network)), check=False, env=environment, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "could not start: NoCredentialsError: Unable to locate credentials" in result.stderr
    assert f"could not look for EC2 VMs tagged {RUN_TAG}=rf-" in result.stderr
    assert "Traceback" not in result.stderr
    assert network["client"].describe_instances()["Reservations"] == []


def _container_command(user_data: str) -> list[str]:
    """What the VM's user data runs inside the image, with this venv's python for its own."""
    [line] = [c for c in yaml.safe_load(user_data)["runcmd"]
              if c.startswith("docker run --net=host")]
    words = shlex.split(line)
    command = words[words.index(IMAGE) + 1:]
    return [sys.executable if word == "python" else word for word in command]


def _run_like_the_vm(network, instance: dict) -> subprocess.Popen:
    """The VM's command, as its user data has it, in a namespace at the VM's private address
    and in a session of its own: a nanny and the worker it starts go together when the test
    kills the process group, even if the nanny was SIGKILLed."""
    command = _container_command(_user_data(network["client"], instance["InstanceId"]))
    vm = network["vms"].boot(instance["PrivateIpAddress"])
    return subprocess.Popen([*vm, *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stand_in_for_the_vms(network, processes: list, worker_joins: bool = True) -> None:
    """Run each VM's own container command (from its user data, TLS certificates and all) at
    its own address as soon as moto holds the VM; with ``worker_joins`` false, the worker VM
    stays silent (its cloud-init failed, say)."""
    client = network["client"]
    [scheduler] = _wait_for(lambda: [i for i in _ours(client)
                                     if i["InstanceType"] == SCHEDULER_TYPE])
    processes.append(_run_like_the_vm(network, scheduler))
    [worker] = _wait_for(lambda: [i for i in _ours(client) if i["InstanceType"] == WORKER_TYPE])
    if worker_joins:
        processes.append(_run_like_the_vm(network, worker))


def _in_session(session: int) -> list[int]:
    """Live processes of a session (a zombie has already let go of everything)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended while we looked
        if int(fields[3]) == session and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            members.append(int(entry))
    return members


def _stop_stand_ins(processes: list[subprocess.Popen]) -> None:
    """Kill each stand-in's whole session, and check that none of its processes lives on."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    for process in processes:
        with contextlib.suppress(AssertionError):
            _wait_for(lambda session=process.pid: not _in_session(session), seconds=30)
        left = _in_session(process.pid)
        assert not left, f"stand-in processes outlived their VM: {left}"


def test_the_stand_in_check_sees_what_a_killed_parent_leaves_behind():
    """What _stop_stand_ins relies on: a child outlives its SIGKILLed parent in the session,
    and only killing the process group ends it."""
    parent = subprocess.Popen(["sh", "-c", "sleep 300 & echo started; wait"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout.readline().strip() == "started"
        parent.kill()  # the parent alone, as a SIGKILLed nanny
        parent.wait(30)
        assert _in_session(parent.pid), "the orphan was not seen"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
    _wait_for(lambda: not _in_session(parent.pid), seconds=30)


def test_preprocess_on_ec2_runs_on_the_vms_and_leaves_nothing_running(network, song_dir,
                                                                      tmp_path):
    """With TLS, as users get it: the VMs' commands carry the certificates, and the worker's
    command, run as it is, joins the scheduler's over tls://."""
    client, settings = network["client"], _settings(network, start_timeout=120.0)
    processes: list[subprocess.Popen] = []
    helper = _Helper(_stand_in_for_the_vms, network, processes)
    helper.start()
    try:
        result = run_cli("preprocess", song_dir, "--out", tmp_path / "ec2", "--no-progress",
                         "--songs-per-shard", "2", *_flags(settings), check=False, timeout=600)
        helper.join(60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"starting EC2 VMs tagged {RUN_TAG}=rf-" in result.stderr
        assert "preflight: 1 worker(s) run this environment" in result.stdout
    finally:
        _stop_stand_ins(processes)
    [scheduler] = [i for i in _ours(client) if i["InstanceType"] == SCHEDULER_TYPE]
    [worker] = [i for i in _ours(client) if i["InstanceType"] == WORKER_TYPE]
    command = _container_command(_user_data(client, worker["InstanceId"]))
    assert command[0] == "env" and command[1].startswith("DASK_INTERNAL_INHERIT_CONFIG=")
    assert command[3:7] == ["-m", "distributed.cli.dask_spec", f"tls://"
                            f"{scheduler['PrivateIpAddress']}:{settings.scheduler_port}", "--spec"]
    # The shards were built in the worker VM's namespace, reached at its own address.
    assert re.search(rf"worker tls://{re.escape(worker['PrivateIpAddress'])}:\d+: \d+ shard",
                     result.stdout), result.stdout
    _assert_nothing_left_running(client)
    run_cli("preprocess", song_dir, "--out", tmp_path / "local", "--cluster", "sync",
            "--songs-per-shard", "2", "--no-progress")
    assert_same_tree(tmp_path / "ec2", tmp_path / "local")


def test_an_error_while_the_vms_are_up_terminates_every_vm(network):
    """The run's own code fails inside the ``with`` block, with the cluster started."""
    client, settings = network["client"], _settings(network, start_timeout=120.0)
    processes: list[subprocess.Popen] = []
    helper = _Helper(_stand_in_for_the_vms, network, processes)
    helper.start()
    try:
        with pytest.raises(ZeroDivisionError, match="the run's own failure"), \
                ec2_cluster(settings, quiet=True) as cluster:
            [vm] = [i for i in _ours(client) if i["InstanceType"] == SCHEDULER_TYPE]
            assert cluster.scheduler_address.startswith(f"tls://{vm['PrivateIpAddress']}:")
            assert len(_ours(client, "pending", "running")) == 2  # both VMs up
            raise ZeroDivisionError("the run's own failure")
        helper.join(60)
    finally:
        _stop_stand_ins(processes)
    _assert_nothing_left_running(client)


def test_a_worker_vm_that_never_joins_is_a_clear_error_and_terminates_every_vm(
        network, song_dir, tmp_path):
    """The scheduler VM answers; the worker VM never starts its worker. The start timeout
    also bounds the scheduler stand-in's start, so it is generous for a loaded machine."""
    client, settings = network["client"], _settings(network, start_timeout=30.0)
    processes: list[subprocess.Popen] = []
    helper = _Helper(_stand_in_for_the_vms, network, processes, False)
    helper.start()
    try:
        result = run_cli("preprocess", song_dir, "--out", tmp_path / "out", "--no-progress",
                         *_flags(settings), check=False, timeout=600)
        helper.join(60)
    finally:
        _stop_stand_ins(processes)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no EC2 worker VM joined" in result.stderr and "waited 30 s" in result.stderr
    assert "Traceback" not in result.stderr
    _assert_nothing_left_running(client)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_start_terminates_every_vm(network, song_dir, tmp_path, stop):
    client = network["client"]
    settings = _settings(network, start_timeout=600.0)
    process = subprocess.Popen([*RAINFOREST, "preprocess", str(song_dir), "--out",
                                str(tmp_path / "out"), *_flags(settings)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = signal_when(process, when(lambda: _ours(client, "pending", "running")), stop)
    assert process.returncode == 130, err.decode(errors="replace")
    assert b"interrupted" in err
    _assert_nothing_left_running(client)


def test_rendered_cloud_init_runs_the_image_after_checking_its_version(network):
    """dask-cloudprovider's own renderer, which needs a running event loop."""
    import dask.config
    from dask_cloudprovider.aws import EC2Cluster

    arguments = _settings(network, tls=False).cluster_arguments("rf-test")

    async def render() -> str:
        return EC2Cluster.get_cloud_init(**arguments)

    with dask.config.set({}):
        text = asyncio.run(render())
    assert text.startswith("#cloud-config")
    commands = yaml.safe_load(text)["runcmd"]
    check = commands.index(f"docker run --rm {IMAGE} python -c \"import rainforest, sys; "
                           f"sys.exit(rainforest.__version__ != '{__version__}')\" || "
                           "shutdown -h now")
    runs = [i for i, c in enumerate(commands) if c.startswith("docker run --net=host")]
    assert runs and all(i > check for i in runs)  # the check comes first
    assert IMAGE in commands[runs[0]]
    assert commands.index("apt-get install -y docker-ce docker-ce-cli containerd.io") < check
