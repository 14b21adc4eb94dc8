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
