"""`rainforest fetch` from and to S3, against moto's server on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
from test_fetch import HTML, song_bytes

import faultserver as fs
from rainforest.fetch import FetchConfig, Source, fetch, read_sources
from test_s3 import BUCKET, s3_endpoint  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_s3_prefix_copied_to_s3_server_side_and_resumed(s3_endpoint):  # noqa: F811
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3")
    bodies = {f"songs/genre/{i}.mp3": song_bytes(3000 + i, i) for i in range(3)}
    for key, body in bodies.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    client.put_object(Bucket=BUCKET, Key="songs/denied.mp3", Body=HTML)
    client.put_object(Bucket=BUCKET, Key="songs/notes.txt", Body=b"not a song")

    sources = read_sources([f"s3://{BUCKET}/songs/"])
    assert sorted(s.url for s in sources) == sorted(
        [f"s3://{BUCKET}/{k}" for k in bodies] + [f"s3://{BUCKET}/songs/denied.mp3"])
    out = f"s3://{BUCKET}/raw"
    config = FetchConfig(rate=50.0, retries=1, backoff=0.05)
    summary = fetch(sources, out, config=config, progress=False, log=lambda line: None)
    assert (summary["fetched"], summary["failed"]) == (3, 1)
    assert "not audio" in summary["failures"][0]["reason"]

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="raw/")["Contents"]}
    assert keys == {"raw/0.mp3", "raw/1.mp3", "raw/2.mp3", "raw/fetch.json"}
    for key, body in bodies.items():
        name = key.rsplit("/", 1)[1]
        assert client.get_object(Bucket=BUCKET, Key=f"raw/{name}")["Body"].read() == body
    record = json.loads(client.get_object(Bucket=BUCKET, Key="raw/fetch.json")["Body"].read())
    copied = [e for e in record["entries"] if e["status"] == "ok"]
    assert len(copied) == 3 and all(e["etag"] and e["bytes"] >= 3000 for e in copied)

    again = fetch(sources, out, config=config, progress=False, log=lambda line: None)
    assert (again["skipped"], again["fetched"]) == (3, 0)
    # A changed source object (new ETag) is copied again.
    client.put_object(Bucket=BUCKET, Key="songs/genre/1.mp3", Body=song_bytes(5000, 99))
    s3fs.S3FileSystem.clear_instance_cache()
    third = fetch(sources, out, config=config, progress=False, log=lambda line: None)
    assert (third["skipped"], third["fetched"]) == (2, 1)
    assert client.get_object(Bucket=BUCKET, Key="raw/1.mp3")["Body"].read() == song_bytes(5000, 99)


def test_http_to_s3_and_s3_to_local(s3_endpoint, tmp_path):  # noqa: F811
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3")
    with fs.FaultServer({"/a.mp3": fs.ok(song_bytes(4000, 1))}) as server:
        summary = fetch([Source(server.url("/a.mp3"), {"genre": "jazz"})],
                        f"s3://{BUCKET}/web", config=FetchConfig(rate=50.0), progress=False,
                        log=lambda line: None)
    assert summary["fetched"] == 1
    assert client.get_object(Bucket=BUCKET, Key="web/a.mp3")["Body"].read() == song_bytes(4000, 1)

    local = tmp_path / "local"
    back = fetch(read_sources([f"s3://{BUCKET}/web/"]), str(local),
                 config=FetchConfig(rate=50.0), progress=False, log=lambda line: None)
    assert back["fetched"] == 1 and (local / "a.mp3").read_bytes() == song_bytes(4000, 1)
    entry = json.loads((local / "fetch.json").read_text())["entries"][0]
    import hashlib

    assert entry["sha256"] == hashlib.sha256(song_bytes(4000, 1)).hexdigest()
    assert not [p for p in local.iterdir() if p.name.startswith(".")]
