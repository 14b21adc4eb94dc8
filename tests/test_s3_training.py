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
