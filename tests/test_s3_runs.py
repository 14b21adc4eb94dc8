"""Training and generation with an ``s3://`` run folder, against moto's S3 on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import NO_TRIAL, RAINFOREST, TINY_TRAINING, moto_requests, run_cli
from rainforest import checkpoint, runlog, storage

pytestmark = [pytest.mark.s3, pytest.mark.slow]

BUCKET = "rainforest-runs"


@pytest.fixture
def bucket(aws):
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


def _keys(client, prefix="") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _latest_step(client) -> int:
    try:
        body = client.get_object(Bucket=BUCKET, Key="run/checkpoints/latest")["Body"].read()
    except client.exceptions.NoSuchKey:
        return -1
    return int(body.decode().strip().split("-")[1])


def _assert_every_named_checkpoint_is_whole(client, run: str) -> list[str]:
    """Each step-* prefix that shows its config.json holds every file it lists, intact."""
    folders = checkpoint.list_checkpoints(run)
    assert folders
    for folder in folders:
        checkpoint.verify(folder, checkpoint.read_config(folder))
    assert checkpoint.latest(run) in folders
    return folders


def test_train_kill_resume_and_generate_from_s3(periodic_dataset, bucket, tmp_path):
    run = f"s3://{BUCKET}/run"
    process = subprocess.Popen(
        [*RAINFOREST, "train", str(periodic_dataset), "--run", run, *TINY_TRAINING,
         *NO_TRIAL, "--steps", "100000", "--checkpoint-every", "2", "--keep", "2",
         "--val-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while _latest_step(bucket) < 6:  # checkpoints are being uploaded all the time now
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint reached S3"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        process.kill()
    folders = _assert_every_named_checkpoint_is_whole(bucket, run)
    killed_at = int(folders[-1].rsplit("-", 1)[1])
    # What a kill during an upload or a copy leaves, whenever it lands: a temporary prefix,
    # and a step prefix without its config.json. Neither is taken for a checkpoint.
    bucket.put_object(Bucket=BUCKET, Key=f"run/checkpoints/.step-000099999{storage.TEMP_MARKER}"
                                         "0123456789ab/model.weights.h5", Body=b"partial")
    bucket.put_object(Bucket=BUCKET, Key="run/checkpoints/step-000099999/model.weights.h5",
                      Body=b"partial")
    assert checkpoint.list_checkpoints(run) == folders

    resumed = run_cli("train", periodic_dataset, "--run", run, *TINY_TRAINING, "--resume",
                      "--steps", str(killed_at + 4), "--checkpoint-every", "2", "--keep", "2",
                      "--val-every", "0")
    assert f"resuming {run}/checkpoints/step-{killed_at:09d} at step {killed_at}" \
           in resumed.stdout
    assert f"done: step {killed_at + 4}" in resumed.stdout

    keys = _keys(bucket)
    assert not [key for key in keys if storage.TEMP_MARKER in key], keys
    assert not [key for key in keys if "step-000099999" in key]
    assert _latest_step(bucket) == killed_at + 4
    assert [f.rsplit("/", 1)[1] for f in _assert_every_named_checkpoint_is_whole(bucket, run)] \
        == [f"step-{killed_at + 2:09d}", f"step-{killed_at + 4:09d}"]  # --keep 2
    # The logs: the resumed run appended to what the killed one had uploaded.
    steps = [row["step"] for row in runlog.read_metrics(run)]
    assert steps == sorted(set(steps)) and steps[0] == 1
    assert steps[-4:] == list(range(killed_at + 1, killed_at + 5))
    assert len([k for k in keys if k.startswith("run/tensorboard/events.out.tfevents.")]) == 2
    assert storage.read_bytes(f"{run}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "generated"
    generated = run_cli("generate", run, "--out", out, "--seconds", "0.05", "--no-progress")
    assert "done:" in generated.stdout
    summary = json.loads((out / "generation.json").read_text())
    assert summary["checkpoint"] == f"{run}/checkpoints/step-{killed_at + 4:09d}"
    assert (out / "stream-000.wav").read_bytes()[:4] == b"RIFF"
    assert not [key for key in _keys(bucket) if storage.TEMP_MARKER in key]

    # The report of an s3:// run draws its curves from the metrics on S3.
    run_cli("report", run, "--out", tmp_path / "report", "--generated", out)
    page = (tmp_path / "report" / "index.html").read_text()
    assert '<img class="plot" src="bits.png"' in page
    assert f"<tr><th>last step logged</th><td>{killed_at + 4}</td></tr>" in page
    assert (tmp_path / "report" / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_prefix_without_checkpoints_is_a_clear_error(bucket, tmp_path):
    result = run_cli("generate", f"s3://{BUCKET}/nothing", "--out", tmp_path, check=False)
    assert result.returncode == 1
    assert f"run folder s3://{BUCKET}/nothing does not exist" in result.stderr


def test_a_folder_whose_upload_fails_leaves_nothing_on_s3(bucket, tmp_path):
    url = f"s3://{BUCKET}/folders/checkpoint"
    staged = storage.Staged(url, folder=True, marker="config.json")
    for name in ("a.h5", "config.json"):
        (Path(staged.path) / name).write_bytes(b"x" * 1000)
    (Path(staged.path) / "b.h5").symlink_to(tmp_path / "gone")  # its upload fails midway
    with pytest.raises(OSError):
        staged.commit()
    assert _keys(bucket) == []  # neither under the final name nor under a temporary one
    assert not Path(staged.path).exists()

    with storage.Staged(url, folder=True, marker="config.json") as path:
        for name in ("a.h5", "config.json"):
            (Path(path) / name).write_bytes(name.encode())
    assert _keys(bucket) == ["folders/checkpoint/a.h5", "folders/checkpoint/config.json"]
    assert storage.read_bytes(f"{url}/config.json") == b"config.json"


def test_a_folder_goes_up_under_a_temporary_prefix_and_is_copied_marker_last(bucket, aws):
    url = f"s3://{BUCKET}/folders/step"
    staged = storage.Staged(url, folder=True, marker="config.json")
    for name in ("config.json", "model.weights.h5", "optimizer.h5", "sub/extra.bin"):
        (Path(staged.path) / name).parent.mkdir(exist_ok=True)
        (Path(staged.path) / name).write_bytes(name.encode())
    writes = [(r["method"], r["url"].split(BUCKET + "/", 1)[-1].split("?")[0],
               r["headers"].get("x-amz-copy-source", r["headers"].get("X-Amz-Copy-Source")))
              for r in moto_requests(aws, staged.commit) if r["method"] in ("PUT", "POST")]
    temporary = {key for method, key, source in writes if method == "PUT" and not source}
    assert temporary and all(key.startswith(f"folders/.step{storage.TEMP_MARKER}")
                             for key in temporary)  # uploads go to the temporary prefix only
    copies = [key for method, key, source in writes if source]
    assert sorted(copies) == ["folders/step/config.json", "folders/step/model.weights.h5",
                              "folders/step/optimizer.h5", "folders/step/sub/extra.bin"]
    assert copies[-1] == "folders/step/config.json"  # the marker comes last
    assert writes[-1][0] == "POST"  # then the temporary prefix is deleted (DeleteObjects)
    assert _keys(bucket) == sorted(copies)
    assert storage.read_bytes(f"{url}/sub/extra.bin") == b"sub/extra.bin"


@pytest.mark.distributed
def test_two_gloo_ranks_train_and_resume_from_s3(periodic_dataset, bucket):
    """Rank 0 alone writes to S3; on resume every rank reads the checkpoint back from it."""
    import os
    import sys

    bin_dir = os.path.dirname(sys.executable)
    environment = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    run = f"s3://{BUCKET}/two"

    def train(*extra):
        result = subprocess.run(
            [os.path.join(bin_dir, "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
             sys.executable, "-m", "rainforest.cli", "train", str(periodic_dataset), "--run",
             run, *TINY_TRAINING, "--val-every", "0", "--checkpoint-every", "3", *extra],
            capture_output=True, text=True, env=environment, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    train("--steps", "6")
    resumed = train("--steps", "10", "--resume")
    assert resumed.count("done: step 10 on 2 rank(s)") == 1
    assert f"resuming {run}/checkpoints/step-000000006 at step 6" in resumed
    config = checkpoint.read_config(checkpoint.latest(run))
    assert config["step"] == 10 and config["data"]["ranks"] == 2
    rows = runlog.read_metrics(run)
    assert [row["step"] for row in rows] == list(range(1, 11))  # one writer, no repeats
    assert not [key for key in _keys(bucket) if storage.TEMP_MARKER in key]
