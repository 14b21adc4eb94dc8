"""Training from an ``s3://`` dataset (moto's S3 server on 127.0.0.1), through its shard cache."""

from __future__ import annotations

import os

import pytest

import audiogen
from conftest import TINY_TRAINING, run_cli
from rainforest import checkpoint, storage
from rainforest.dataset import read_manifest
from rainforest.preprocess import preprocess
from test_s3 import BUCKET, s3_endpoint  # noqa: F401  (the moto server fixture)

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_train_from_s3_writes_a_checkpoint_and_reads_through_the_shard_cache(
        tmp_path, s3_endpoint):  # noqa: F811
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    audiogen.write_periodic_songs(tmp_path / "songs")
    remote = f"s3://{BUCKET}/datasets/periodic"
    preprocess([str(tmp_path / "songs")], remote, cluster="sync", songs_per_shard=3,
               progress=False, log=lambda line: None)
    shards = read_manifest(remote)["shards"]
    assert len(shards) == 2

    cache, run = tmp_path / "cache", tmp_path / "run"
    env = {**os.environ, "RAINFOREST_CACHE": str(cache)}
    first = run_cli("train", remote, "--run", run, *TINY_TRAINING, "--steps", "3",
                    "--val-every", "3", "--checkpoint-every", "3", env=env)
    assert f"training on {remote}" in first.stdout and "done: step 3" in first.stdout
    config = checkpoint.read_config(checkpoint.latest(str(run)))
    assert config["step"] == 3 and config["data"]["dataset"] == remote
    # Every shard was fetched once into the cache, named and checked by its sha256.
    cached = sorted(p.name for p in (cache / "shards").iterdir())
    assert cached == sorted(f"{s['sha256']}.npy" for s in shards)
    for shard in shards:
        assert storage.sha256_of(str(cache / "shards" / f"{shard['sha256']}.npy")) == \
            shard["sha256"]

    # With the shards gone from S3 (the manifest stays), training goes on from the cache.
    client = boto3.client("s3")
    for shard in shards:
        client.delete_object(Bucket=BUCKET, Key=f"datasets/periodic/{shard['path']}")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET,
                                                      Prefix="datasets/periodic/")["Contents"]}
    assert not {f"datasets/periodic/{s['path']}" for s in shards} & keys
    resumed = run_cli("train", remote, "--run", run, "--resume", "--steps", "5", env=env)
    assert "done: step 5" in resumed.stdout
    assert checkpoint.read_config(checkpoint.latest(str(run)))["step"] == 5


def _remote_dataset(tmp_path) -> tuple[str, list[dict]]:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    audiogen.write_periodic_songs(tmp_path / "songs")
    remote = f"s3://{BUCKET}/datasets/periodic"
    preprocess([str(tmp_path / "songs")], remote, cluster="sync", songs_per_shard=3,
               progress=False, log=lambda line: None)
    return remote, read_manifest(remote)["shards"]


def _damage(path) -> None:
    """Flip one bit of a file's codes, through the file system."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_the_shard_cache_serves_only_copies_verified_since_they_were_written(
        tmp_path, s3_endpoint, monkeypatch):  # noqa: F811
    """A cached copy changed on disk after its download (its stat changes) is hashed again,
    found wrong and downloaded again, with a warning; bit rot the stat cannot show (stood in
    for by a cache entry vouching for the damaged copy) is found by a full verification."""
    from rainforest.dataset import Dataset

    monkeypatch.setenv("RAINFOREST_CACHE", str(tmp_path / "cache"))
    remote, shards = _remote_dataset(tmp_path)
    dataset = Dataset(remote)
    dataset.verify_shards(dataset.shards)  # downloads and hashes each once
    copy = tmp_path / "cache" / "shards" / f"{shards[0]['sha256']}.npy"
    good = copy.read_bytes()

    _damage(copy)
    with pytest.warns(UserWarning, match="no longer matches its sha256"):
        Dataset(remote).verify_shards(dataset.shards)
    assert copy.read_bytes() == good

    _damage(copy)
    storage.remember_sha256(str(copy), shards[0]["sha256"])  # rot below the file system
    Dataset(remote).verify_shards(dataset.shards)  # the cache is believed, as documented
    assert copy.read_bytes() != good
    with pytest.warns(UserWarning, match="no longer matches its sha256"):
        Dataset(remote).verify_shards(dataset.shards, full=True)
    assert copy.read_bytes() == good
    codes = Dataset(remote).shard_codes(shards[0]["name"])
    assert codes.tobytes() == good[-codes.shape[0]:]


def test_train_verify_shards_hashes_the_s3_shards_themselves(tmp_path, s3_endpoint):  # noqa: F811
    """A shard replaced on S3 after preprocessing while the cache holds the good copy: plain
    training reads the verified cache; --verify-shards hashes the object on S3 and refuses."""
    import boto3

    cache = tmp_path / "cache"
    env = {**os.environ, "RAINFOREST_CACHE": str(cache)}
    remote, shards = _remote_dataset(tmp_path)
    common = [remote, *TINY_TRAINING, "--steps", "1", "--val-fraction", "0"]
    run_cli("train", *common, "--run", tmp_path / "first", env=env)
    key = f"datasets/periodic/{shards[0]['path']}"
    client = boto3.client("s3")
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-1] ^= 1
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    run_cli("train", *common, "--run", tmp_path / "trusted", env=env)
    full = run_cli("train", *common, "--run", tmp_path / "full", "--verify-shards", env=env,
                   check=False)
    assert full.returncode == 1, full.stdout + full.stderr
    assert f"{remote}/{shards[0]['path']} does not match the sha256 in manifest.json" \
        in full.stderr, full.stderr
    assert "Traceback" not in full.stderr and not (tmp_path / "full").exists()
