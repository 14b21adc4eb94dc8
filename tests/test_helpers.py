"""The test suite's own helpers: a weak helper silently weakens every test that uses it."""

from __future__ import annotations

import shutil

import pytest

from conftest import assert_same_tree


@pytest.fixture
def dataset_pair(periodic_dataset, tmp_path):
    """Two copies of a real dataset (manifest, plan and shards/ below the top folder)."""
    left, right = tmp_path / "left", tmp_path / "right"
    shutil.copytree(periodic_dataset, left)
    shutil.copytree(periodic_dataset, right)
    assert list((left / "shards").glob("*.npy"))
    return left, right


def test_identical_trees_pass(dataset_pair):
    assert_same_tree(*dataset_pair)


@pytest.mark.parametrize("name", ["part-99999.npy", ".tmp-part-00000.npy"])
def test_an_extra_file_in_the_right_trees_shards_fails(dataset_pair, name):
    left, right = dataset_pair
    (right / "shards" / name).write_bytes(b"\x93NUMPY")
    with pytest.raises(AssertionError, match=name.replace(".", r"\.")):
        assert_same_tree(left, right)
    with pytest.raises(AssertionError, match=name.replace(".", r"\.")):
        assert_same_tree(right, left)


def test_an_extra_empty_folder_fails(dataset_pair):
    left, right = dataset_pair
    (right / "shards" / ".tmp-abc").mkdir()
    with pytest.raises(AssertionError, match="tmp-abc"):
        assert_same_tree(left, right)


def test_different_bytes_below_the_top_fail(dataset_pair):
    left, right = dataset_pair
    shard = next((right / "shards").glob("*.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match=shard.name):
        assert_same_tree(left, right)


def test_kill_all_fails_when_processes_in_the_namespace_outlive_it(tmp_path):
    """A "power cut" that leaves processes running must fail the test that asked for it: here
    a spawner outside the namespace keeps starting processes inside it."""
    import os
    import secrets
    import subprocess

    import netns

    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.fail("network namespaces need root, ip and nsenter (scripts/install.sh)")
    namespace = f"rfkill{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    spawner = subprocess.Popen(
        ["bash", "-c", f"while true; do nsenter --net=/run/netns/{namespace} sleep 60 & "
                       "sleep 0.02; done"])
    try:
        while not netns.pids(namespace):  # the event itself: a process lives there
            assert spawner.poll() is None
        with pytest.raises(RuntimeError, match=rf"in namespace {namespace} survived.*sleep 60"):
            netns.kill_all(namespace, seconds=1)
        spawner.kill()
        spawner.wait()
        netns.kill_all(namespace)  # with nothing starting them, they all go
        assert netns.pids(namespace) == []
    finally:
        spawner.kill()
        spawner.wait()
        netns.kill_all(namespace)
        subprocess.run(["ip", "netns", "delete", namespace], check=False, capture_output=True)
