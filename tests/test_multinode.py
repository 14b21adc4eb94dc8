"""Every cluster path across nodes that have their own names and addresses.

One cluster of two namespaced nodes (n0, n1) and a login namespace serves the whole module
(:mod:`multinode`); the client commands run on the login node, which has no default route,
like a login node inside a site's network. Each node has 1 CPU, so a 1-core job lands on each.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

import audiogen
from conftest import RAINFOREST, assert_same_tree
from multinode import MultiNode, available
from rainforest.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multinode]


@pytest.fixture(scope="module")
def nodes():
    missing = available()
    if missing:
        pytest.fail(f"the multi-node cluster is needed: {missing}")
    cluster = MultiNode(2).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multinode-songs")
    for index in range(6):
        audiogen.write_song(folder / f"song{index}.flac", seconds=1.0 + 0.2 * index,
                            rate=22050, channels=1 + index % 2, leading_silence=0.2,
                            trailing_silence=0.3, freq=200.0 + 50 * index, seed=index)
    return folder


@pytest.fixture(scope="module")
def local_dataset(songs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multinode-local") / "dataset"
    preprocess([str(songs)], str(out), cluster="sync", songs_per_shard=1, progress=False,
               log=lambda line: None)
    return out


def _env(nodes: MultiNode, **values) -> dict:
    return {**nodes.env, "VENV": str(VENV), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            **{k: str(v) for k, v in values.items()}}


def _shards_by_host(output: str) -> dict[str, int]:
    """The run's own account of where its shards ran: "worker tcp://HOST:PORT: N shard(s)"."""
    counts: dict[str, int] = {}
    for host, count in re.findall(r"worker tcp://([\d.]+):\d+: (\d+) shard", output):
        counts[host] = counts.get(host, 0) + int(count)
    return counts


@pytest.mark.parametrize("interface", [None, "eth0"], ids=["no-interface", "eth0"])
def test_cluster_slurm_from_the_login_node_uses_workers_on_both_nodes(interface, nodes, songs,
                                                                      local_dataset, tmp_path):
    out = tmp_path / "dataset"
    flags = ["--slurm-interface", interface] if interface else []
    result = _preprocess_on_slurm(nodes, songs, out, tmp_path, *flags)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "slurm: 2 worker(s) connected" in output, output
    used = _shards_by_host(output)
    assert set(used) == set(nodes.addresses.values()), output
    assert_same_tree(out, local_dataset)


def _preprocess_on_slurm(nodes: MultiNode, songs: Path, out: Path, folder: Path, *flags: str):
    return nodes.run(
        *RAINFOREST, "preprocess", str(songs), "--out", str(out), "--cluster", "slurm",
        "--no-progress", "--songs-per-shard", "1", "--slurm-cores", "1",
        "--slurm-memory", "500MB", "--slurm-walltime", "00:10:00", "--slurm-min-jobs", "2",
        "--slurm-max-jobs", "2", "--slurm-start-timeout", "60",
        f"--slurm-directive=--chdir={folder}", *flags,
        env=_env(nodes), check=False, cwd=folder, timeout=300)


def test_a_worker_job_that_fails_is_named_with_its_output_file(nodes, songs, local_dataset,
                                                               tmp_path):
    out = tmp_path / "dataset"
    result = _preprocess_on_slurm(nodes, songs, out, tmp_path,
                                  '--slurm-prologue=[ "$(hostname)" != n1 ] || exit 3')
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    failed = re.findall(r"worker job (\d+) \(\w+, exit code 3:0, on n1\) ended before its worker "
                        r"connected; its output: (\S+)", output)
    assert failed, output
    for job, log in failed:
        assert log == str(tmp_path / f"slurm-{job}.out"), output
    assert "slurm: 1 worker(s) connected" in output, output
    assert set(_shards_by_host(output)) == {nodes.addresses["n0"]}, output
    assert_same_tree(out, local_dataset)


def test_a_loopback_interface_for_remote_nodes_is_refused_before_any_job(nodes, songs,
                                                                         tmp_path):
    before = nodes.run("squeue", "-h", "-o", "%i").stdout.split()
    jobs_before = len(nodes.completed_jobs())
    result = _preprocess_on_slurm(nodes, songs, tmp_path / "dataset", tmp_path,
                                  "--slurm-interface", "lo")
    assert result.returncode != 0
    assert "--slurm-interface lo is loopback, and the node at 192.0.2.1" in result.stderr
    assert "nothing was submitted" in result.stderr and "eth0 (192.0.2.2" in result.stderr
    assert nodes.run("squeue", "-h", "-o", "%i").stdout.split() == before
    assert len(nodes.completed_jobs()) == jobs_before


def test_preprocess_sbatch_on_two_nodes_gives_the_dataset_of_a_local_run(nodes, songs,
                                                                        local_dataset, tmp_path):
    out, log = tmp_path / "dataset", tmp_path / "job.out"
    job = nodes.submit(str(REPO / "slurm/preprocess.sbatch"), "--nodes=2", "--ntasks=2",
                       "--mem-per-cpu=200M", f"--output={log}", f"--chdir={tmp_path}",
                       script_args=("--songs-per-shard", "1"),
                       env=_env(nodes, SONGS=songs, OUT=out, SHARED_TMP=tmp_path))
    state = nodes.wait(job, timeout=200)
    output = log.read_text() if log.exists() else "(no output file)"
    assert state == "COMPLETED", output
    assert "preflight: 2 worker(s)" in output, output
    assert set(_shards_by_host(output)) == set(nodes.addresses.values()), output
    assert_same_tree(out, local_dataset)
