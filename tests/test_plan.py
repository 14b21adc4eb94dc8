"""`rainforest plan`: headers without decoding, unreadable sources, price, JSON, --from.

These take their figures from a plan document (``--from``), so no calibration runs; the
calibration itself, and the model's error against measured commands, are checked in
tests/test_plan_accuracy.py.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

import audiogen
from conftest import TINY_TRAINING, rank_env, run_cli

#: Figures of an earlier plan, given to --from so that no calibration runs here.
FIGURES = {"seconds_per_audio_second": 0.002, "task_overhead_seconds": 0.05,
           "preprocess_fixed_seconds": 4.0, "step_seconds": 0.25, "train_fixed_seconds": 9.0,
           "batch_size": 2, "target_length": 1024, "model": "tiny", "source": "a test"}


def earlier_plan(tmp_path: Path) -> Path:
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"format": "rainforest-plan", "version": 1,
                                "calibration": FIGURES}))
    return path


def songs(folder: Path, seconds=(3.0, 4.0, 5.0)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, length in enumerate(seconds):
        audiogen.write_song(folder / f"song{index}.flac", seconds=length, rate=22050,
                            channels=2, seed=index)
    return folder


def plan_json(*args) -> dict:
    result = run_cli("plan", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_durations_come_from_headers_even_when_the_audio_is_corrupt(tmp_path):
    folder = songs(tmp_path / "songs")
    corrupt = audiogen.write_song(folder / "corrupt.flac", seconds=6.0, rate=44100, channels=2)
    data = bytearray(corrupt.read_bytes())
    data[4096:] = np.random.default_rng(0).bytes(len(data) - 4096)  # frames, not STREAMINFO
    corrupt.write_bytes(bytes(data))
    from rainforest.audio import encode_song
    from rainforest.config import AudioConfig
    from rainforest.errors import AudioDecodeError

    with pytest.raises(AudioDecodeError):  # decoding it fails...
        encode_song(str(corrupt), AudioConfig(), [])
    document = plan_json(folder, "--from", earlier_plan(tmp_path), "--workers", "1")
    # ...yet it is counted, from its header: 3 + 4 + 5 + 6 s.
    assert document["sources"]["readable"] == 4
    assert document["sources"]["hours"] * 3600 == pytest.approx(18.0, abs=1e-3)
    assert document["sources"]["bytes"] == sum(p.stat().st_size for p in folder.iterdir())


def test_unreadable_sources_are_counted_and_listed_not_fatal(tmp_path):
    folder = songs(tmp_path / "songs", seconds=(2.0,))
    audiogen.write_html(folder / "error-page.mp3")
    audiogen.write_random_bytes(folder / "noise.wav")
    document = plan_json(folder, "--from", earlier_plan(tmp_path), "--workers", "1")
    assert document["sources"]["count"] == 3 and document["sources"]["readable"] == 1
    listed = {Path(u["source"]).name: u["reason"] for u in document["sources"]["unreadable"]}
    assert set(listed) == {"error-page.mp3", "noise.wav"}
    assert all("header unreadable" in reason for reason in listed.values())
    text = run_cli("plan", folder, "--from", earlier_plan(tmp_path)).stdout
    assert "1 of 3 source(s) readable" in text
    assert text.count("UNREADABLE") == 2


def model_seconds(work: list[float], workers: int, *, bytes_: int, per_shard: int,
                  storage_bps: float) -> float:
    """The preprocessing model written out plainly for equal-or-not songs, waves of shards."""
    shards = [sum(work[i:i + per_shard]) for i in range(0, len(work), per_shard)]
    finish = [0.0] * workers
    for shard in shards:
        finish[finish.index(min(finish))] += shard
    return (max(finish) + 2 * len(shards) * FIGURES["task_overhead_seconds"]
            + bytes_ / storage_bps + FIGURES["preprocess_fixed_seconds"])


def test_json_rows_follow_the_stated_model(tmp_path):
    lengths = (3.0, 4.0, 5.0, 3.5, 2.5)
    folder = songs(tmp_path / "songs", seconds=lengths)
    png = tmp_path / "plan.png"
    document = plan_json(folder, "--from", earlier_plan(tmp_path), "--workers", "1",
                         "--workers", "2", "--workers", "512", "--ranks", "1", "--ranks", "2",
                         "--ranks", "64", "--steps", "300", "--songs-per-shard", "2",
                         "--storage-gbps", "0.001", "--png", png)
    rows = document["rows"]
    assert [(r["workers"], r["ranks"]) for r in rows] == [(1, 1), (2, 2), (512, 64)]
    for row in rows:
        assert {"workers", "preprocess_seconds", "ranks", "train_seconds",
                "core_hours"} <= set(row)
    bytes_ = document["sources"]["bytes"]
    work = [FIGURES["seconds_per_audio_second"] * s for s in lengths]  # URL order = song0..4
    for row in rows:
        expected = model_seconds(work, row["workers"], bytes_=bytes_, per_shard=2,
                                 storage_bps=0.001e9)
        assert row["preprocess_seconds"] == pytest.approx(expected, rel=1e-9)
        efficiency = 1.0 if row["ranks"] == 1 else 0.95
        assert row["train_seconds"] == pytest.approx(
            FIGURES["train_fixed_seconds"] + 300 * FIGURES["step_seconds"] / efficiency)
        assert row["core_hours"] == pytest.approx(
            (row["workers"] * row["preprocess_seconds"] + row["ranks"] * row["train_seconds"])
            / 3600)
    assert [r["extrapolated"] for r in rows] == [False, False, True]
    assert rows[2]["preprocess_efficiency"] < rows[1]["preprocess_efficiency"] < 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run_cli("plan", folder, "--from", earlier_plan(tmp_path), "--workers", "512").stdout
    assert "(extrapolated)" in text
    assert "GB/s in all" in text and "tasks/s" in text  # the assumptions, printed


def test_money_only_with_a_price(tmp_path):
    folder = songs(tmp_path / "songs")
    unpriced = plan_json(folder, "--from", earlier_plan(tmp_path))
    assert unpriced["price_per_hour"] is None
    assert all("money" not in row for row in unpriced["rows"])
    assert "time only" in run_cli("plan", folder, "--from", earlier_plan(tmp_path)).stdout
    priced = plan_json(folder, "--from", earlier_plan(tmp_path), "--price-per-hour", "3.5")
    for row in priced["rows"]:
        assert row["money"] == pytest.approx(3.5 * row["core_hours"])
        assert row["money"] > 0


def test_bad_plan_options_are_refused_clearly(tmp_path):
    folder = songs(tmp_path / "songs", seconds=(2.0,))
    result = run_cli("plan", folder, "--from", earlier_plan(tmp_path), "--workers", "1",
                     "--workers", "2", "--ranks", "1", check=False)
    assert result.returncode == 1 and "pairs with --workers" in result.stderr
    dataset = tmp_path / "dataset"
    run_cli("preprocess", folder, "--out", dataset, "--cluster", "sync", "--no-progress")
    result = run_cli("plan", folder, "--from", dataset, check=False)
    assert result.returncode == 1 and "records no timings" in result.stderr


@pytest.mark.slow
def test_from_an_earlier_run_takes_its_step_time(tmp_path, periodic_dataset):
    run = tmp_path / "run"
    result = run_cli("train", periodic_dataset, "--run", run, *TINY_TRAINING, "--steps", "8",
                     "--log-every", "1", "--val-windows", "0", env=rank_env())
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_second_per_rank"] for r in rows if r["step"] > 2]
    batch, target = 4, 256  # TINY_TRAINING's
    document = plan_json(songs(tmp_path / "songs"), "--from", earlier_plan(tmp_path),
                         "--from", run, "--steps", "1000", "--workers", "1")
    calibration = document["calibration"]
    assert calibration["step_seconds"] == pytest.approx(batch * target / statistics.median(rates))
    assert (calibration["batch_size"], calibration["target_length"]) == (batch, target)
    assert str(run) in calibration["source"]
    # The preprocessing figures still come from the earlier plan.
    assert calibration["task_overhead_seconds"] == FIGURES["task_overhead_seconds"]
    assert document["rows"][0]["train_seconds"] == pytest.approx(
        calibration["train_fixed_seconds"] + 1000 * calibration["step_seconds"])
    assert math.isfinite(document["rows"][0]["core_hours"])


@pytest.mark.s3
@pytest.mark.slow
def test_s3_sources_are_read_from_their_headers(tmp_path, aws):
    import boto3

    folder = songs(tmp_path / "songs")
    audiogen.write_random_bytes(folder / "broken.ogg")
    client = boto3.client("s3")
    client.create_bucket(Bucket="plan-songs")
    for path in folder.iterdir():
        client.upload_file(str(path), "plan-songs", f"music/{path.name}")
    remote = plan_json("s3://plan-songs/music", "--from", earlier_plan(tmp_path))
    local = plan_json(folder, "--from", earlier_plan(tmp_path))
    assert remote["sources"]["readable"] == 3 and remote["sources"]["count"] == 4
    assert remote["sources"]["hours"] == pytest.approx(local["sources"]["hours"], rel=1e-9)
    assert remote["sources"]["bytes"] == local["sources"]["bytes"]
    assert [u["source"] for u in remote["sources"]["unreadable"]] == [
        "s3://plan-songs/music/broken.ogg"]
    assert remote["rows"] == local["rows"]


def _corrupt_song(folder: Path) -> Path:
    """A FLAC whose header reads (so a plan counts it) but whose frames do not decode."""
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = audiogen.write_song(folder / "corrupt.flac", seconds=6.0, rate=44100, channels=2)
    data = bytearray(corrupt.read_bytes())
    data[4096:] = np.random.default_rng(0).bytes(len(data) - 4096)
    corrupt.write_bytes(bytes(data))
    return corrupt


def test_a_calibration_song_that_cannot_be_preprocessed_is_refused_not_priced(tmp_path):
    _corrupt_song(tmp_path / "songs")
    result = run_cli("plan", tmp_path / "songs", "--workers", "1", "--json", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "calibration song corrupt.flac cannot be preprocessed" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_calibration_command_that_failed_songs_is_refused_not_priced(tmp_path):
    """Exit status 3 (songs failed, the rest kept) is a failed calibration: its time is that
    of less work than the songs need."""
    from rainforest.errors import RainforestError
    from rainforest.plan import _timed_command

    folder = songs(tmp_path / "songs", seconds=(2.0,))
    _corrupt_song(folder)
    with pytest.raises(RainforestError, match=r"failed song\(s\), so its time cannot be priced"):
        _timed_command(["preprocess", str(folder), "--out", str(tmp_path / "data"),
                        "--cluster", "sync", "--no-progress"])
    assert (tmp_path / "data" / "manifest.json").exists()  # it ran, and exited 3
