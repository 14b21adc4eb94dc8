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
    result = nodes.run(
        *RAINFOREST, "preprocess", str(songs), "--out", str(out), "--cluster", "slurm",
        "--no-progress", "--songs-per-shard", "1", "--slurm-cores", "1",
        "--slurm-memory", "500MB", "--slurm-walltime", "00:10:00", "--slurm-min-jobs", "2",
        "--slurm-max-jobs", "2", "--slurm-start-timeout", "60",
        f"--slurm-directive=--chdir={tmp_path}", *flags,
        env=_env(nodes), check=False, cwd=tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "2 worker(s)" in output, output
    used = _shards_by_host(output)
    assert set(used) == set(nodes.addresses.values()), output
    assert_same_tree(out, local_dataset)
