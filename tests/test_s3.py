"""Songs read from and datasets written to S3, against moto's server on 127.0.0.1."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import free_port, run_cli
from rainforest.dataset import Dataset, read_manifest
from rainforest.preprocess import preprocess

pytestmark = [pytest.mark.s3, pytest.mark.slow]

BUCKET = "rainforest-test"


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 protocol server; the environment points boto3 and s3fs (and workers) at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    import boto3
    import requests
    import s3fs

    # moto's state is process-wide and outlives a server: start every test from nothing.
    requests.post(f"{endpoint}/moto-api/reset", timeout=30).raise_for_status()
    # fsspec caches filesystems: one made for an earlier test's server would still call it.
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def test_round_trip_through_s3(song_dir, tmp_path, s3_endpoint):
    import boto3

    client = boto3.client("s3")
    for path in sorted(song_dir.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"songs/{path.relative_to(song_dir)}")
    client.put_object(Bucket=BUCKET, Key="songs/broken.mp3", Body=b"<html>403</html>")

    remote = f"s3://{BUCKET}/datasets/v1"
    result = run_cli("preprocess", f"s3://{BUCKET}/songs", "--out", remote, "--cluster",
                     "local:2", "--songs-per-shard", "2", "--no-progress",
                     env={**os.environ}, expect_failed_songs=True)
    assert result.returncode == 3, result.stderr  # the broken page fails, the rest goes on
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="datasets/v1/")
            ["Contents"]}
    assert "datasets/v1/manifest.json" in keys and "datasets/v1/shards/part-00000.npy" in keys
    assert not [k for k in keys if ".tmp-" in k]

    manifest = read_manifest(remote)
    assert [f["source"] for f in manifest["failed"]] == [f"s3://{BUCKET}/songs/broken.mp3"]
    assert all(s["source"].startswith(f"s3://{BUCKET}/songs/") for s in manifest["songs"])

    # The same songs from the local disk give the same codes, song for song.
    preprocess([str(song_dir)], str(tmp_path / "local"), cluster="sync", songs_per_shard=2,
               progress=False, log=lambda line: None)
    data = Dataset(remote, cache_dir=str(tmp_path / "cache"))
    local_data = Dataset(str(tmp_path / "local"))
    local_by_id = {song.id: song for song in local_data.songs}
    assert sorted(local_by_id) == sorted(song.id for song in data.songs)
    for song in data.songs:
        np.testing.assert_array_equal(data.song_codes(song),
                                      local_data.song_codes(local_by_id[song.id]))

    again = run_cli("preprocess", f"s3://{BUCKET}/songs", "--out", remote, "--cluster", "sync",
                    "--no-progress", "--songs-per-shard", "2", "--json",
                    expect_failed_songs=True)  # the broken page is still a failed song
    assert '"processed_songs": 0' in again.stdout  # resumed on S3 too
