"""Host lists (rainforest hosts): the forms each launcher reads, and Slurm's tasks per node.

The commands themselves run against real services elsewhere: `hosts slurm --discover` in a
real Slurm job (test_elastic.py), `hosts ec2` against moto's EC2 (test_launch.py).
"""

from __future__ import annotations

import pytest

from conftest import run_cli
from rainforest.errors import ParameterError
from rainforest.hosts import render, tasks_per_node


def test_each_form_is_what_its_launcher_reads():
    hosts = ["n0", "10.0.0.2"]
    assert render(hosts, 4, "horovod") == "n0:4,10.0.0.2:4"
    assert render(hosts, 4, "lines") == "n0:4\n10.0.0.2:4"
    assert render(hosts, 2, "hostfile") == "n0 slots=2\n10.0.0.2 slots=2"


@pytest.mark.parametrize(("environ", "expected"), [
    ({"SLURM_NTASKS_PER_NODE": "2(x3)", "SLURM_NTASKS": "6"}, 2),
    ({"SLURM_NTASKS_PER_NODE": "4"}, 4),
    ({"SLURM_NTASKS": "3"}, 3),
    ({}, 1),
])
def test_tasks_per_node_reads_slurms_forms(environ, expected):
    assert tasks_per_node(environ) == expected


def test_unreadable_tasks_per_node_is_a_clear_error():
    with pytest.raises(ParameterError, match="tasks per node"):
        tasks_per_node({"SLURM_NTASKS_PER_NODE": "(x3)"})


def test_outside_a_slurm_job_the_command_says_where_to_run_it(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    result = run_cli("hosts", "slurm", check=False)
    assert result.returncode != 0
    assert "inside a Slurm job" in result.stderr and "Traceback" not in result.stderr
