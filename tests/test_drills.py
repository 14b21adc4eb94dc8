"""Fault drills for preprocessing: hostile files, links, a full disk, an object store that goes
away. Each ends in a manifest that says what happened, or a clear error and a clean resume."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

import numpy as np
import pytest
import soundfile

import audiogen
from conftest import RAINFOREST, assert_same_tree, reference_codes, run_cli
from rainforest import storage
from rainforest.dataset import Dataset, read_manifest

pytestmark = pytest.mark.slow


def _preprocess(sources, out, *extra, check=True):
    result = run_cli("preprocess", *sources, "--out", out, "--cluster", "sync", "--no-progress",
                     *extra, check=check)
    return result


def _by_name(entries):
    return {os.path.basename(e["source"]): e for e in entries}


def test_non_finite_samples_are_repaired_with_a_note(tmp_path):
    songs = tmp_path / "songs"
    songs.mkdir()
    tone = audiogen.tone(2.0, 16000, 1, freq=330.0)[:, 0].copy()
    tone[[100, 5000, 9000]] = np.nan
    tone[12000], tone[12001] = np.inf, -np.inf
    soundfile.write(songs / "damaged.wav", tone, 16000, subtype="FLOAT")
    soundfile.write(songs / "all-nan.wav", np.full(16000, np.nan, np.float32), 16000,
                    subtype="FLOAT")
    result = _preprocess([songs], tmp_path / "data", check=False)
    assert result.returncode == 3, result.stderr
    manifest = read_manifest(str(tmp_path / "data"))
    kept, failed = _by_name(manifest["songs"]), _by_name(manifest["failed"])
    assert "repaired 5 non-finite sample(s)" in kept["damaged.wav"]["note"]
    assert "all 16000 samples are NaN or infinite" in failed["all-nan.wav"]["reason"]
    assert "internal error" not in json.dumps(manifest)
    repaired = np.nan_to_num(tone, nan=0.0, posinf=1.0, neginf=-1.0)
    soundfile.write(tmp_path / "repaired.wav", repaired, 16000, subtype="FLOAT")
    dataset = Dataset(str(tmp_path / "data"))
    song = next(s for s in dataset.songs if s.source.endswith("damaged.wav"))
    np.testing.assert_array_equal(dataset.song_codes(song),
                                  reference_codes(tmp_path / "repaired.wav"))


@pytest.mark.parametrize("frames, rate", [(3, 44100), (1, 8000), (8000, 16000)],
                         ids=["3-frames-44k", "1-frame-8k", "half-second"])
def test_files_too_short_fail_as_too_short(tmp_path, frames, rate):
    songs = tmp_path / "songs"
    songs.mkdir()
    audiogen.write_samples(songs / "short.wav", np.full((frames, 1), 0.5, np.float32), rate)
    result = _preprocess([songs], tmp_path / "data", check=False)
    assert result.returncode == 3, result.stdout + result.stderr  # songs failed, none lost
    reason = read_manifest(str(tmp_path / "data"))["failed"][0]["reason"]
    assert reason.startswith("too short:"), reason
    assert f"{frames} frame(s) at {rate} Hz" in reason


def test_a_shard_whose_songs_all_failed_writes_no_empty_shard(song_dir, tmp_path):
    audiogen.write_random_bytes(song_dir / "zz-noise.mp3")  # sorts last: a shard of its own
    out = tmp_path / "data"
    _preprocess([song_dir], out, "--songs-per-shard", "1", check=False)
    records = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.json"))]
    empty = [r for r in records if not r["songs"]]
    assert len(empty) == 1 and empty[0]["failed"][0]["source"].endswith("zz-noise.mp3")
    assert empty[0]["path"] is None
    assert not (out / "shards" / f"{empty[0]['name']}.npy").exists()
    manifest = read_manifest(str(out))
    assert empty[0]["name"] not in {s["name"] for s in manifest["shards"]}
    assert all(s["songs"] > 0 for s in manifest["shards"])
    assert len(Dataset(str(out)).songs) == 6
    again = json.loads(_preprocess([song_dir], out, "--songs-per-shard", "1", "--json",
                                   check=False).stdout)
    assert again["processed_songs"] == 0 and again["skipped_songs"] == 7


def test_symbolic_links_are_followed_and_loops_and_dead_links_reported(song_dir, tmp_path):
    library = tmp_path / "library"
    (library / "rock").mkdir(parents=True)
    (library / "rock" / "a.wav").symlink_to(song_dir / "a.wav")  # a linked file
    (library / "jazz").symlink_to(song_dir / "sub")  # a linked folder
    (library / "rock" / "again").symlink_to(library)  # a loop back to the top
    (library / "rock" / "gone.mp3").symlink_to(tmp_path / "deleted.mp3")  # a dead link
    out = tmp_path / "data"
    result = _preprocess([library], out, "--labels", "parent", check=False)
    assert result.returncode == 3, result.stderr
    manifest = read_manifest(str(out))
    kept = {os.path.relpath(s["source"], library): s["label"] for s in manifest["songs"]}
    assert kept == {"rock/a.wav": "rock", "jazz/e.wav": "jazz", "jazz/f.flac": "jazz"}
    reasons = {os.path.relpath(f["source"], library): f["reason"] for f in manifest["failed"]}
    assert reasons["rock/again"].startswith("symbolic link loop")
    assert reasons["rock/gone.mp3"].startswith("broken symbolic link to")
    assert len(reasons) == 2


def _check_visible_files_are_whole(folder) -> None:
    """Every shard under a final name parses to the length its header says; no staging."""
    shards = folder / "shards"
    for path in shards.glob("part-*.npy"):
        codes = np.load(path, allow_pickle=False)
        record = path.with_suffix(".json")
        if record.exists():
            assert codes.shape == (json.loads(record.read_text())["samples"],)
    assert not [p for p in shards.iterdir() if storage.TEMP_MARKER in p.name]


def test_a_full_disk_stops_cleanly_and_the_same_command_then_finishes(song_dir, tmp_path):
    # A small tmpfs in a private mount namespace, held open by a sleeping process, so that it
    # can be made bigger ("space freed") between the two runs.
    mount = tmp_path / "small"
    mount.mkdir()
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size=96k none {mount} && echo ready && exec sleep 900"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        inside = ["nsenter", "-t", str(holder.pid), "-m"]
        command = [*inside, *RAINFOREST, "preprocess", str(song_dir), "--out",
                   str(mount / "data"), "--cluster", "sync", "--songs-per-shard", "1",
                   "--no-progress"]
        full = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert full.returncode == 1, full.stdout + full.stderr
        assert "no space left on the device" in full.stderr, full.stderr
        assert "re-run the same command" in full.stderr and "Traceback" not in full.stderr
        subprocess.run([*inside, "cp", "-a", str(mount / "data"), str(tmp_path / "at-full")],
                       check=True)
        _check_visible_files_are_whole(tmp_path / "at-full")
        assert not (tmp_path / "at-full" / "manifest.json").exists()
        assert 1 <= len(list((tmp_path / "at-full" / "shards").glob("part-*.json"))) < 6

        subprocess.run([*inside, "mount", "-o", "remount,size=16m", str(mount)], check=True)
        finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr
        subprocess.run([*inside, "cp", "-a", str(mount / "data"), str(tmp_path / "finished")],
                       check=True)
    finally:
        holder.kill()
        holder.wait()
    _preprocess([song_dir], tmp_path / "clean", "--songs-per-shard", "1")
    assert_same_tree(tmp_path / "clean", tmp_path / "finished")


@pytest.mark.s3
def test_an_object_store_that_goes_away_stops_the_run_and_a_rerun_matches(song_dir, tmp_path,
                                                                         monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    from conftest import free_port

    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3")
    client.create_bucket(Bucket="drill")
    for path in sorted(song_dir.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), "drill", f"songs/{path.relative_to(song_dir)}")
    command = [*RAINFOREST, "preprocess", "s3://drill/songs", "--out", "s3://drill/data",
               "--cluster", "sync", "--songs-per-shard", "1", "--no-progress"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        listed = client.list_objects_v2(Bucket="drill", Prefix="data/shards/")
        if any(o["Key"].endswith(".json") for o in listed.get("Contents", [])):
            break
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before the outage"
    server.stop()
    outage_started = time.monotonic()
    _, stderr = run.communicate(timeout=600)
    outage_seconds = time.monotonic() - outage_started
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()  # moto keeps its buckets across a restart in one process
    try:
        assert run.returncode == 1, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "re-run the same command" in last, stderr
        # s3fs's event loop may log its own unretrieved task errors; none may be ours.
        assert "rainforest/" not in stderr, stderr
        print(f"the run stopped {outage_seconds:.1f} s after the object store went away")
        rerun = run_cli("preprocess", "s3://drill/songs", "--out", "s3://drill/data",
                        "--cluster", "sync", "--songs-per-shard", "1", "--no-progress")
        assert rerun.returncode == 0
        run_cli("preprocess", "s3://drill/songs", "--out", "s3://drill/clean", "--cluster",
                "sync", "--songs-per-shard", "1", "--no-progress")
        for prefix, folder in (("data/", tmp_path / "data"), ("clean/", tmp_path / "clean")):
            for item in client.list_objects_v2(Bucket="drill", Prefix=prefix)["Contents"]:
                local = folder / item["Key"][len(prefix):]
                local.parent.mkdir(parents=True, exist_ok=True)
                client.download_file("drill", item["Key"], str(local))
        assert_same_tree(tmp_path / "clean", tmp_path / "data")
    finally:
        server.stop()


def test_training_refuses_a_shard_changed_after_preprocessing(periodic_dataset, tmp_path,
                                                              monkeypatch):
    import shutil

    from conftest import TINY_TRAINING

    monkeypatch.setenv("RAINFOREST_CACHE", str(tmp_path / "cache"))
    dataset = tmp_path / "dataset"
    shutil.copytree(periodic_dataset, dataset)
    shard = sorted((dataset / "shards").glob("part-*.npy"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01  # one bit of one code
    shard.write_bytes(bytes(data))
    result = run_cli("train", dataset, "--run", tmp_path / "run", *TINY_TRAINING, "--steps", "2",
                     check=False)
    assert result.returncode == 1
    assert f"{shard} does not match the sha256 in manifest.json" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def _counting_hashes(monkeypatch) -> list[str]:
    """Every file storage.sha256_of hashes from now on (it still hashes them)."""
    hashed: list[str] = []
    real = storage.sha256_of

    def counted(url):
        hashed.append(url)
        return real(url)

    monkeypatch.setattr(storage, "sha256_of", counted)
    return hashed


def test_shard_hashes_are_cached_until_the_file_or_its_inode_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("RAINFOREST_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "shard.npy"
    path.write_bytes(b"a" * 1000)
    first = storage.verified_sha256(str(path))
    assert (tmp_path / "cache" / "verified-sha256.json").exists()
    hashed = _counting_hashes(monkeypatch)
    assert storage.verified_sha256(str(path)) == first and hashed == []  # unchanged: cached
    stamp = os.stat(path)
    # Rewritten in place, same size, old mtime put back: the ctime tells.
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = storage.verified_sha256(str(path))
    assert second == hashlib.sha256(b"b" * 1000).hexdigest() and len(hashed) == 1
    # A copy renamed over it with the same size and times (rsync -a): another inode.
    copy = tmp_path / "copy.npy"
    copy.write_bytes(b"c" * 1000)
    os.utime(copy, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    copy.replace(path)
    assert storage.verified_sha256(str(path)) == hashlib.sha256(b"c" * 1000).hexdigest()
    assert storage.verified_sha256(str(path), trust_cache=False) and len(hashed) == 3


def _flip_a_bit_keeping_the_mtime(path) -> None:
    stamp = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of one code
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert os.stat(path).st_size == stamp.st_size


def test_a_bit_flipped_after_a_warm_cache_is_refused(periodic_dataset, tmp_path, monkeypatch):
    import shutil

    from rainforest.errors import DatasetFormatError

    monkeypatch.setenv("RAINFOREST_CACHE", str(tmp_path / "cache"))
    shutil.copytree(periodic_dataset, tmp_path / "dataset")
    dataset = Dataset(str(tmp_path / "dataset"))
    dataset.verify_shards(dataset.shards)  # every shard hashed once: the cache is warm
    shard = sorted((tmp_path / "dataset" / "shards").glob("part-*.npy"))[0]
    _flip_a_bit_keeping_the_mtime(shard)
    with pytest.raises(DatasetFormatError, match=f"{shard} does not match the sha256"):
        Dataset(str(tmp_path / "dataset")).verify_shards(dataset.shards)


def test_train_verify_shards_hashes_what_the_cache_says_is_unchanged(periodic_dataset,
                                                                     tmp_path, monkeypatch):
    """Bit rot below the file system changes no stat field. Stood in for here by a cache
    entry that vouches for a shard's current stat with the manifest's sha256: only
    --verify-shards still finds the damage."""
    import shutil

    from conftest import TINY_TRAINING

    monkeypatch.setenv("RAINFOREST_CACHE", str(tmp_path / "cache"))
    shutil.copytree(periodic_dataset, tmp_path / "dataset")
    shard = sorted((tmp_path / "dataset" / "shards").glob("part-*.npy"))[0]
    good = storage.verified_sha256(str(shard))
    _flip_a_bit_keeping_the_mtime(shard)
    info, cache = os.stat(shard), tmp_path / "cache" / "verified-sha256.json"
    known = json.loads(cache.read_text())
    known[os.path.realpath(shard)] = [info.st_size, info.st_mtime_ns, info.st_ino,
                                      info.st_ctime_ns, good]
    cache.write_text(json.dumps(known))
    common = [tmp_path / "dataset", *TINY_TRAINING, "--steps", "1", "--val-fraction", "0"]
    trusted = run_cli("train", *common, "--run", tmp_path / "trusted", check=False)
    assert trusted.returncode == 0, trusted.stderr  # the cache was believed
    full = run_cli("train", *common, "--run", tmp_path / "full", "--verify-shards",
                   check=False)
    assert full.returncode == 1, full.stdout + full.stderr
    assert f"{shard} does not match the sha256 in manifest.json" in full.stderr
    assert "Traceback" not in full.stderr and not (tmp_path / "full").exists()
