"""Preprocessing on real Dask clusters: worker-count independence, a killed run, a scheduler."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import audiogen
from conftest import RAINFOREST, assert_same_tree, run_cli
from rainforest.preprocess import preprocess

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_one_worker_and_two_workers_give_identical_datasets(song_dir, tmp_path):
    for workers in (1, 2):
        preprocess([str(song_dir)], str(tmp_path / f"w{workers}"), cluster=f"local:{workers}",
                   songs_per_shard=2, progress=False, log=lambda line: None)
    assert_same_tree(tmp_path / "w1", tmp_path / "w2")


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


def _start(args, **kwargs):
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)


def test_cli_against_a_dask_scheduler_and_two_dask_workers(song_dir, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    processes = [_start([*dask, "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                         "--scheduler-file", str(scheduler_file)])]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for name in ("worker-a", "worker-b"):
            processes.append(_start([sys.executable, "-m", "distributed.cli.dask_worker",
                                     address, "--nthreads", "1", "--name", name,
                                     "--no-dashboard"]))
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            assert len(client.scheduler_info()["workers"]) == 2
        result = run_cli("preprocess", song_dir, "--out", tmp_path / "remote", "--cluster",
                         address, "--songs-per-shard", "1", "--no-progress")
        assert result.returncode == 0, result.stderr
        assert "Dask dashboard" in result.stdout
        with Client(address, timeout="30s") as client:
            # both workers ran tasks: each executed some of the identify and shard tasks
            executed = client.run(lambda dask_worker: dask_worker.state.executed_count,
                                  nanny=False)
            assert len(executed) == 2 and min(executed.values()) >= 1, executed
            assert sum(executed.values()) >= 6 + 6  # six songs identified, six shards made
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
    run_cli("preprocess", song_dir, "--out", tmp_path / "local", "--cluster", "sync",
            "--songs-per-shard", "1", "--no-progress")
    assert_same_tree(tmp_path / "local", tmp_path / "remote")
