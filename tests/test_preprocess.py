"""Preprocessing into a dataset: contents against the reference, bad input, resume, format."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import soundfile

import audiogen
from conftest import assert_same_tree, reference_codes, run_cli
from rainforest.config import AudioConfig
from rainforest.dataset import Dataset, read_manifest
from rainforest.errors import DatasetFormatError, ParameterError
from rainforest.preprocess import preprocess


def _run(sources, out, **options):
    options.setdefault("cluster", "sync")
    options.setdefault("progress", False)
    return preprocess([str(s) for s in sources], str(out), log=lambda line: None, **options)


def test_codes_match_the_reference_pipeline(song_dir, tmp_path):
    summary = _run([song_dir], tmp_path / "data", songs_per_shard=4)
    data = Dataset(str(tmp_path / "data"))
    assert summary["songs"] == 6 and summary["failed"] == 0 and len(data.shards) == 2
    for song in data.songs:
        expected = reference_codes(song.source)
        np.testing.assert_array_equal(data.song_codes(song), expected, err_msg=song.source)
        info = soundfile.info(song.source)
        entry = next(s for s in data.manifest["songs"] if s["source"] == song.source)
        assert entry["source_rate"] == info.samplerate and entry["channels"] == info.channels
        # 0.3 s of leading and 0.5 s of trailing digital silence are trimmed, give or take
        # the resampler's ringing and a lossy codec's padding.
        assert entry["trimmed_start"] / 16000 == pytest.approx(0.3, abs=0.06)
        assert entry["trimmed_end"] / 16000 == pytest.approx(0.5, abs=0.08)
        assert entry["source_sha256"].startswith(song.id)
    offsets = [(s.shard, s.offset, s.length) for s in data.songs]
    for shard in data.shards:
        spans = sorted((o, n) for name, o, n in offsets if name == shard)
        assert spans[0][0] == 0 and data.shard_codes(shard).shape[0] == sum(n for _, n in spans)
        assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))


def test_bad_inputs_are_recorded_and_good_songs_still_processed(song_dir, tmp_path):
    bad = song_dir / "bad"
    bad.mkdir()
    audiogen.write_random_bytes(bad / "noise.mp3")
    audiogen.write_empty(bad / "empty.wav")
    audiogen.write_html(bad / "page.mp3")
    audiogen.write_one_sample_wav(bad / "one.wav")
    audiogen.write_silent_wav(bad / "silent.wav")
    audiogen.write_truncated_mp3(bad / "cut.mp3", fraction=0.4, seconds=3.0)
    result = run_cli("preprocess", song_dir, "--out", tmp_path / "data", "--cluster", "sync",
                     "--no-progress", expect_failed_songs=True)
    assert result.returncode == 3, result.stderr
    manifest = read_manifest(str(tmp_path / "data"))
    reasons = {os.path.basename(f["source"]): f["reason"] for f in manifest["failed"]}
    assert "empty file" in reasons["empty.wav"]
    assert "not audio" in reasons["page.mp3"] and "text" in reasons["page.mp3"]
    assert "cannot decode" in reasons["noise.mp3"]
    assert "too short" in reasons["one.wav"]
    assert "silent" in reasons["silent.wav"]
    kept = {os.path.basename(s["source"]): s for s in manifest["songs"]}
    assert set(kept) >= {"a.wav", "b.flac", "c.ogg", "d.mp3", "e.wav", "f.flac"}
    # A truncated mp3 keeps what decodes, with a note (docs/preprocess.md's promise): 40% of 3 s.
    assert "cut.mp3" in kept and "cut.mp3" not in reasons
    note = kept["cut.mp3"]["note"]
    assert re.fullmatch(r"truncated: decoded (\d+) of the (\d+) frames the header promised "
                        r"\((\d+\.\d)%\)", note), note
    decoded, promised = (int(n) for n in re.findall(r"\d+", note)[:2])
    assert 0.3 < decoded / promised < 0.4
    assert kept["cut.mp3"]["source_seconds"] == pytest.approx(decoded / 44100, abs=1e-3)
    assert 0.3 * 3.0 < kept["cut.mp3"]["seconds"] < 0.4 * 3.0
    assert all(song.get("note") is None for name, song in kept.items() if name != "cut.mp3")
    assert f"{len(manifest['failed'])} song(s) FAILED" in result.stdout
    assert len(manifest["failed"]) == len(reasons) >= 5


def test_rerun_resumes_and_adding_songs_appends_shards(song_dir, tmp_path):
    out = tmp_path / "data"
    first = _run([song_dir], out, songs_per_shard=2)
    assert first["processed_songs"] == 6
    again = _run([song_dir], out, songs_per_shard=2)
    assert again["processed_songs"] == 0 and again["skipped_songs"] == 6
    # A renamed copy is the same song (same size and sha256): not processed again.
    shutil.copy(song_dir / "a.wav", song_dir / "renamed.wav")
    audiogen.write_song(song_dir / "new.flac", seconds=2.0, rate=32000, channels=2, seed=42)
    third = _run([song_dir], out, songs_per_shard=2)
    assert third["processed_songs"] == 1 and third["duplicates"] == 1
    manifest = read_manifest(str(out))
    assert [s["name"] for s in manifest["shards"]] == [f"part-0000{i}" for i in range(4)]
    assert manifest["shards"][-1]["songs"] == 1
    assert manifest["songs"][-1]["source"].endswith("new.flac")


def test_same_inputs_give_identical_bytes_and_resume_equals_clean(song_dir, tmp_path):
    _run([song_dir], tmp_path / "one", songs_per_shard=2)
    _run([song_dir], tmp_path / "two", songs_per_shard=2)
    assert_same_tree(tmp_path / "one", tmp_path / "two")
    # Simulate a run that died after its first shard: drop the rest and the manifest.
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "one", partial)
    for name in ["part-00001", "part-00002"]:
        (partial / "shards" / f"{name}.json").unlink()
    (partial / "shards" / "part-00002.npy").unlink()
    (partial / "manifest.json").unlink()
    (partial / "shards" / ".part-00001.npy.tmp-deadbeef").write_bytes(b"half a shard")
    resumed = _run([song_dir], partial, songs_per_shard=2)
    assert resumed["processed_songs"] == 4 and resumed["skipped_songs"] == 2
    assert_same_tree(tmp_path / "one", partial)


def test_labels_from_parent_folder(tmp_path):
    for genre in ["jazz", "metal"]:
        (tmp_path / "songs" / genre).mkdir(parents=True)
        for index in range(2):
            audiogen.write_song(tmp_path / "songs" / genre / f"{index}.flac", seconds=1.2,
                                rate=16000, seed=index + (genre == "metal") * 10)
    _run([tmp_path / "songs"], tmp_path / "data", labels="parent")
    manifest = read_manifest(str(tmp_path / "data"))
    assert manifest["labels"] == ["jazz", "metal"]
    assert sorted(s["label"] for s in manifest["songs"]) == ["jazz", "jazz", "metal", "metal"]


def test_resume_with_other_settings_is_refused(song_dir, tmp_path):
    _run([song_dir], tmp_path / "data")
    with pytest.raises(ParameterError, match="other audio settings"):
        _run([song_dir], tmp_path / "data", config=AudioConfig(sample_rate=8000))


def test_reader_refuses_unknown_version_and_foreign_folders(song_dir, tmp_path):
    _run([song_dir], tmp_path / "data")
    manifest_path = tmp_path / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetFormatError, match="version 99"):
        Dataset(str(tmp_path / "data"))
    result = run_cli("inspect", tmp_path / "data", check=False)
    assert result.returncode == 1 and "version 99" in result.stderr
    with pytest.raises(DatasetFormatError, match="not a rainforest dataset"):
        Dataset(str(song_dir))
    manifest_path.write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(DatasetFormatError, match="something-else"):
        read_manifest(str(tmp_path / "data"))


def test_shards_load_without_pickle_and_match_their_records(song_dir, tmp_path):
    _run([song_dir], tmp_path / "data", songs_per_shard=3)
    manifest = read_manifest(str(tmp_path / "data"))
    for shard in manifest["shards"]:
        codes = np.load(tmp_path / "data" / shard["path"], allow_pickle=False)
        assert codes.dtype == np.uint8 and codes.shape == (shard["samples"],)
        assert (tmp_path / "data" / shard["path"]).stat().st_size == shard["bytes"]


def test_inspect_summarises(song_dir, tmp_path):
    audiogen.write_empty(song_dir / "empty.wav")
    _run([song_dir], tmp_path / "data")
    text = run_cli("inspect", tmp_path / "data").stdout
    assert "songs        6" in text and "empty.wav: empty file" in text
    info = json.loads(run_cli("inspect", tmp_path / "data", "--json").stdout)
    assert info["songs"] == 6 and info["sample_rate"] == 16000
    assert len(info["failed"]) == 1 and info["hours"] > 0


def test_cli_errors_are_clear(tmp_path):
    result = run_cli("preprocess", tmp_path / "missing", "--out", tmp_path / "d", check=False)
    assert result.returncode == 1 and "no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_cli("preprocess", tmp_path / "empty", "--out", tmp_path / "d", check=False)
    assert result.returncode == 1 and "no audio files found" in result.stderr
    helptext = run_cli("preprocess", "--help").stdout
    assert "--cluster" in helptext and "resumes" in helptext
