"""The EC2 recipe in launch/: the worker image, the example config and the host list."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rainforest.ec2 import RUN_TAG, EC2Settings

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_worker_image_is_built_by_the_install_script_with_its_venv_on_path():
    steps = _instructions((LAUNCH / "Dockerfile").read_text())
    kinds = [kind for kind, _ in steps]
    assert kinds[0] == "FROM" and "python:3.11" in steps[0][1]  # the client's Python
    assert "ENTRYPOINT" not in kinds  # dask-cloudprovider gives the command
    runs = [args for kind, args in steps if kind == "RUN"]
    [install] = [args for args in runs if "scripts/install.sh" in args]
    assert not [args for args in runs if "pip install" in args]  # one install recipe
    venv = re.search(r"VENV=(\S+)", install).group(1)
    [env] = [args for kind, args in steps if kind == "ENV"]
    assert env.startswith(f"PATH={venv}/bin:$PATH"), env
    copy = kinds.index("COPY")
    assert copy < kinds.index("RUN") and steps[copy][1] == ". ."
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".venv/" in ignored  # a host venv's stamps would skip the install


def test_example_cloudprovider_yaml_sets_what_ec2_needs_with_known_keys():
    import dask.config
    import dask_cloudprovider  # noqa: F401

    ours = yaml.safe_load((LAUNCH / "cloudprovider.yaml").read_text())["cloudprovider"]["ec2"]
    known = dask.config.get("cloudprovider.ec2")
    assert set(ours) <= set(known), set(ours) - set(known)  # no misspelt key
    with dask.config.set({"cloudprovider.ec2": {**known, **ours}}):
        arguments = EC2Settings().cluster_arguments("rf-x")  # refuses nothing
    assert arguments["security_groups"] == ours["security_groups"]
    assert arguments["docker_image"] == ours["docker_image"]
    assert ours["docker_image"].endswith(":0.1.0")


def _run_instances(client, ami, run, count):
    response = client.run_instances(
        ImageId=ami, MinCount=count, MaxCount=count, InstanceType="t3.micro",
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": RUN_TAG, "Value": run}]}])
    return [i["InstanceId"] for i in response["Instances"]]


def _ec2_hosts(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / "ec2-hosts.sh"), *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable})


def _hosts(*args) -> str:
    result = _ec2_hosts(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.ec2
def test_ec2_hosts_lists_the_running_vms_of_a_run(aws):
    import boto3

    client = boto3.client("ec2")
    ami = client.describe_images()["Images"][0]["ImageId"]
    ours = _run_instances(client, ami, "run-a", 3)
    _run_instances(client, ami, "run-b", 1)
    client.terminate_instances(InstanceIds=ours[:1])
    described = client.describe_instances(InstanceIds=ours[1:])["Reservations"]
    addresses = sorted((i["PrivateIpAddress"] for r in described for i in r["Instances"]),
                       key=lambda ip: tuple(map(int, ip.split("."))))
    assert _hosts("run-a", "4") == ",".join(f"{ip}:4" for ip in addresses)
    assert _hosts("run-a", "2", "--hostfile").splitlines() == [f"{ip} slots=2"
                                                                for ip in addresses]
    missing = _ec2_hosts("run-c")
    assert missing.returncode == 1 and f"{RUN_TAG}=run-c" in missing.stderr
