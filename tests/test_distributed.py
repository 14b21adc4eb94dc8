"""Preprocessing on real Dask clusters: worker-count independence, a killed run, a scheduler."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

import audiogen
from conftest import RAINFOREST, assert_same_tree, run_cli
from daskprocs import DaskProcesses
from rainforest import storage
from rainforest.preprocess import preprocess

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_one_worker_and_two_workers_give_identical_datasets(song_dir, tmp_path):
    for workers in (1, 2):
        preprocess([str(song_dir)], str(tmp_path / f"w{workers}"), cluster=f"local:{workers}",
                   songs_per_shard=2, progress=False, log=lambda line: None)
    assert_same_tree(tmp_path / "w1", tmp_path / "w2")


def test_one_worker_builds_the_largest_shards_first(tmp_path):
    # Largest first keeps the last tasks small; Dask alone starts a bag's partitions in an
    # order of its own, so this also checks the order reaches the workers.
    songs = tmp_path / "songs"
    songs.mkdir()
    for index, seconds in enumerate([1.5, 4.0, 2.0, 5.0, 3.0, 2.5]):
        audiogen.write_song(songs / f"{index}.wav", seconds=seconds, rate=16000, seed=index)
    out = tmp_path / "data"
    preprocess([str(songs)], str(out), cluster="local:1", songs_per_shard=1, progress=False,
               log=lambda line: None)
    records = [json.loads(path.read_text()) for path in (out / "shards").glob("*.json")]
    assert len(records) == 6
    built = sorted(records, key=lambda record: os.stat(
        out / "shards" / f"{record['name']}.json").st_mtime_ns)
    assert [r["songs"][0]["source_size"] for r in built] == sorted(
        (r["songs"][0]["source_size"] for r in records), reverse=True)


def test_killed_run_leaves_no_half_shard_and_resume_matches_clean(tmp_path):
    songs = tmp_path / "songs"
    songs.mkdir()
    for index in range(24):
        audiogen.write_song(songs / f"{index:02d}.wav", seconds=4.0, rate=44100, channels=2,
                            freq=150.0 + 20 * index, seed=index)
    out = tmp_path / "killed"
    command = [*RAINFOREST, "preprocess", str(songs), "--out", str(out), "--cluster", "local:1",
               "--songs-per-shard", "1", "--no-progress"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    shard_dir = out / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(shard_dir.glob("part-*.json")):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the client and its worker processes, mid-run
    process.wait()
    done = sorted(shard_dir.glob("part-*.json"))
    assert 1 <= len(done) < 24, f"{len(done)} shards finished before the kill"
    assert not (out / "manifest.json").exists()
    for record_path in done:  # every shard with a record is complete and matches it
        record = json.loads(record_path.read_text())
        codes = np.load(out / record["path"], allow_pickle=False)
        assert codes.shape == (record["samples"],)
    for shard in shard_dir.glob("part-*.npy"):  # every visible .npy parses completely
        np.load(shard, allow_pickle=False)
    done_songs = sum(len(json.loads(p.read_text())["songs"]) for p in done)

    resumed = json.loads(run_cli("preprocess", songs, "--out", out, "--cluster", "local:1",
                                 "--songs-per-shard", "1", "--no-progress", "--json").stdout)
    assert resumed["skipped_songs"] == done_songs
    assert resumed["processed_songs"] == 24 - done_songs  # nothing done twice
    assert not [p for p in shard_dir.iterdir() if ".tmp-" in p.name]
    run_cli("preprocess", songs, "--out", tmp_path / "clean", "--cluster", "sync",
            "--songs-per-shard", "1", "--no-progress")
    assert_same_tree(tmp_path / "clean", out)


def test_cli_against_a_dask_scheduler_and_two_dask_workers(song_dir, tmp_path):
    with DaskProcesses(tmp_path) as dask:
        for name in ("worker-a", "worker-b"):
            dask.add_worker(name)
        dask.wait_for_workers(2)
        address = dask.address
        result = run_cli("preprocess", song_dir, "--out", tmp_path / "remote", "--cluster",
                         address, "--songs-per-shard", "1", "--no-progress")
        assert result.returncode == 0, result.stderr
        assert "Dask dashboard" in result.stdout
        from distributed import Client

        with Client(address, timeout="30s") as client:
            # both workers ran tasks: each executed some of the identify and shard tasks
            executed = client.run(lambda dask_worker: dask_worker.state.executed_count,
                                  nanny=False)
            assert len(executed) == 2 and min(executed.values()) >= 1, executed
            assert sum(executed.values()) >= 6 + 6  # six songs identified, six shards made
    run_cli("preprocess", song_dir, "--out", tmp_path / "local", "--cluster", "sync",
            "--songs-per-shard", "1", "--no-progress")
    assert_same_tree(tmp_path / "local", tmp_path / "remote")


def _many_songs(folder, count: int, seconds: float = 3.0):
    folder.mkdir()
    for index in range(count):
        audiogen.write_song(folder / f"{index:02d}.wav", seconds=seconds, rate=44100, channels=2,
                            freq=150.0 + 20 * index, seed=index)
    return folder


def test_a_worker_killed_mid_run_costs_nothing(tmp_path):
    songs = _many_songs(tmp_path / "songs", 16)
    out = tmp_path / "survived"
    with DaskProcesses(tmp_path) as dask:
        for name in ("worker-a", "worker-b"):
            dask.add_worker(name)
        dask.wait_for_workers(2)
        command = [*RAINFOREST, "preprocess", str(songs), "--out", str(out), "--cluster",
                   dask.address, "--songs-per-shard", "1", "--no-progress"]
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((out / "shards").glob("part-*.json")):
            time.sleep(0.01)
        assert run.poll() is None, "the run ended before the kill"
        dask.kill("worker-b")
        stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    done = sorted((out / "shards").glob("part-*.json"))
    assert len(done) == 16, "the surviving worker finished every shard"
    assert not [p for p in (out / "shards").iterdir() if storage.TEMP_MARKER in p.name]
    run_cli("preprocess", songs, "--out", tmp_path / "clean", "--cluster", "sync",
            "--songs-per-shard", "1", "--no-progress")
    assert_same_tree(tmp_path / "clean", out)
