"""Non-default audio options on the command line, and quiet songs near the silence floor."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import soundfile
import soxr

import audiogen
import reference
from conftest import reference_codes, run_cli
from rainforest.dataset import Dataset
from rainforest.preprocess import preprocess

OPTIONS = {"sample_rate": 8000, "trim_db": 20.0, "quality": "HQ", "min_seconds": 0.5}


def _write(path, parts, rate, seed=0):
    """A mono song of ``(seconds, amplitude)`` parts; amplitude 0 is digital silence."""
    pieces = [audiogen.tone(seconds, rate, 1, amplitude=amplitude, freq=300.0 + 50 * k,
                            seed=seed + k) if amplitude else
              np.zeros((int(round(seconds * rate)), 1), np.float32)
              for k, (seconds, amplitude) in enumerate(parts)]
    return audiogen.write_samples(path, np.concatenate(pieces), rate, subtype="FLOAT")


@pytest.fixture(scope="module")
def option_songs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("options") / "songs"
    folder.mkdir()
    # A lead-in 30 dB below the peak: trimmed at --trim-db 20, kept at the default 40.
    _write(folder / "fade.wav", [(0.2, 0), (0.5, 0.5 * 10 ** (-30 / 20)), (1.0, 0.5),
                                 (0.3, 0)], 44100)
    _write(folder / "plain.wav", [(0.1, 0), (1.4, 0.6), (0.2, 0)], 22050, seed=4)
    # 0.7 s of audio: kept at --min-seconds 0.5 (the default 1.0 would reject it) ...
    _write(folder / "short.wav", [(0.2, 0), (0.7, 0.5), (0.2, 0)], 48000, seed=8)
    # ... and 0.3 s: too short even then.
    _write(folder / "tiny.wav", [(0.2, 0), (0.3, 0.5), (0.2, 0)], 48000, seed=9)
    return folder


@pytest.fixture(scope="module")
def option_dataset(option_songs, tmp_path_factory):
    out = tmp_path_factory.mktemp("options-data") / "dataset"
    result = run_cli("preprocess", option_songs, "--out", out, "--cluster", "sync",
                     "--no-progress", "--sample-rate", OPTIONS["sample_rate"], "--trim-db",
                     OPTIONS["trim_db"], "--quality", OPTIONS["quality"], "--min-seconds",
                     OPTIONS["min_seconds"], expect_failed_songs=True)
    assert result.returncode == 3, result.stderr  # tiny.wav fails, the rest is kept
    return Dataset(str(out))


def _name(url):
    return os.path.basename(url)


def test_options_are_recorded_in_the_manifest(option_dataset):
    audio = option_dataset.manifest["audio"]
    assert audio["sample_rate"] == 8000 and audio["trim_db"] == 20.0
    assert audio["resample_quality"] == "HQ" and audio["min_seconds"] == 0.5


def test_codes_match_the_reference_at_the_chosen_options(option_dataset):
    kept = {_name(s.source): s for s in option_dataset.songs}
    assert set(kept) == {"fade.wav", "plain.wav", "short.wav"}
    for name, song in kept.items():
        expected = reference_codes(song.source, sample_rate=8000, trim_db=20.0, quality="HQ")
        np.testing.assert_array_equal(option_dataset.song_codes(song), expected, err_msg=name)
    # The premises, so that the options are shown to matter: each differs from its default.
    fade = kept["fade.wav"].source
    assert len(reference_codes(fade, sample_rate=8000, trim_db=40.0, quality="HQ")) > \
        len(reference_codes(fade, sample_rate=8000, trim_db=20.0, quality="HQ")) + 0.4 * 8000
    plain = kept["plain.wav"].source
    assert not np.array_equal(reference_codes(plain, sample_rate=8000, trim_db=20.0,
                                              quality="MQ"),
                              reference_codes(plain, sample_rate=8000, trim_db=20.0,
                                              quality="HQ"))
    assert kept["short.wav"].length / 8000 == pytest.approx(0.7, abs=0.02)


def test_min_seconds_rejects_with_the_chosen_value(option_dataset):
    reasons = {_name(f["source"]): f["reason"] for f in option_dataset.failed}
    assert list(reasons) == ["tiny.wav"]
    assert "too short" in reasons["tiny.wav"] and "at least 0.5 s needed" in reasons["tiny.wav"]


# --- songs near the -80 dBFS silence floor -------------------------------------------------


def _peak_dbfs_of_codes(path, sample_rate=16000):
    """The level the silence check sees: the peak of the song's untrimmed mu-law codes."""
    frames, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = soxr.resample(reference.downmix(frames), rate, sample_rate, quality="MQ")
    return 20 * math.log10(reference.peak_amplitude(reference.mulaw_encode(mono)))


def test_a_quiet_song_is_kept_and_a_quieter_one_rejected_as_silent(tmp_path):
    songs = tmp_path / "songs"
    songs.mkdir()
    quiet = _write(songs / "quiet.wav", [(0.3, 0), (1.5, 10 ** (-70 / 20)), (0.3, 0)], 44100)
    hush = _write(songs / "hush.wav", [(0.3, 0), (1.5, 10 ** (-85 / 20)), (0.3, 0)], 44100)
    # The premises: one lies above the -80 dBFS floor, the other below it, both near it.
    assert -80 < _peak_dbfs_of_codes(quiet) < -65
    hush_level = _peak_dbfs_of_codes(hush)
    assert -85 < hush_level < -80
    preprocess([str(songs)], str(tmp_path / "dataset"), cluster="sync", progress=False,
               log=lambda line: None)
    data = Dataset(str(tmp_path / "dataset"))
    assert [_name(s.source) for s in data.songs] == ["quiet.wav"]
    np.testing.assert_array_equal(data.song_codes(data.songs[0]), reference_codes(quiet))
    [failure] = data.failed
    assert _name(failure["source"]) == "hush.wav"
    assert failure["reason"] == (f"silent: the loudest sample is {hush_level:.1f} dBFS, below "
                                 "the -80 dBFS floor")
