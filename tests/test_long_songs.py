"""Songs longer than one spool chunk: the chunked trim and copy against the reference.

``preprocess`` spools a song's codes (in memory up to ``SPOOL_IN_MEMORY`` bytes, then in a
file) and finds the loud range by scanning the spool in chunks of ``_SPOOL_CHUNK`` codes from
each end, then copies the range chunk by chunk.
A 16 kHz chunk is about 4.4 minutes, so most real songs fit in one and never take the
multi-chunk path. Here 10-minute songs take it with the real chunk size, and short songs
take it with chunk sizes made tiny (the chunk size is a parameter, not the thing tested).
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

import audiogen
from conftest import reference_codes
from rainforest import audio as chain_module  # the song-to-codes chain and its spool
from rainforest.dataset import Dataset
from rainforest.preprocess import preprocess

RATE = 16000


def _song(path, parts, *, rate, seed=0):
    """Write a mono song of ``(seconds, loud)`` parts: a tone when loud, digital silence not."""
    pieces = []
    for index, (seconds, loud) in enumerate(parts):
        if loud:
            pieces.append(audiogen.tone(seconds, rate, 1, freq=180.0 + 40 * index,
                                        seed=seed + index))
        else:
            pieces.append(np.zeros((int(round(seconds * rate)), 1), dtype=np.float32))
    return audiogen.write_samples(path, np.concatenate(pieces), rate)


def _preprocess(folder, out):
    preprocess([str(folder)], str(out), cluster="sync", progress=False, log=lambda line: None)
    return Dataset(str(out))


def _assert_matches_reference(data, count):
    assert len(data.songs) == count and not data.failed, data.failed
    for song in data.songs:
        expected = reference_codes(song.source)
        np.testing.assert_array_equal(data.song_codes(song), expected, err_msg=song.source)


@pytest.fixture(scope="module")
def ten_minute_dataset(tmp_path_factory):
    """Two 10-minute songs (8 kHz wav, cheap to write and decode) preprocessed for real."""
    root = tmp_path_factory.mktemp("long")
    songs = root / "songs"
    songs.mkdir()
    # Loud from 300 s to 570 s: the loud range starts in chunk 1 and ends in chunk 2.
    _song(songs / "late.wav", [(300, False), (270, True), (30, False)], rate=8000)
    # Loud from 5 s to 25 s: the backward scan passes two wholly silent chunks first.
    _song(songs / "early.wav", [(5, False), (20, True), (575, False)], rate=8000, seed=7)
    return _preprocess(songs, root / "dataset")


@pytest.mark.slow
def test_ten_minute_songs_match_the_reference(ten_minute_dataset):
    _assert_matches_reference(ten_minute_dataset, 2)


@pytest.mark.slow
def test_ten_minute_songs_take_the_multi_chunk_path(ten_minute_dataset):
    chunk = chain_module._SPOOL_CHUNK
    entries = {e["source"].rsplit("/", 1)[-1]: e for e in ten_minute_dataset.manifest["songs"]}
    for entry in entries.values():
        total = entry["trimmed_start"] + entry["length"] + entry["trimmed_end"]
        assert total / RATE == pytest.approx(600.0, abs=0.01)
        assert total > 2 * chunk  # three chunks of spooled codes
    late, early = entries["late.wav"], entries["early.wav"]
    # The trim lands where the silence ends and starts (give or take the resampler's ringing).
    assert late["trimmed_start"] / RATE == pytest.approx(300.0, abs=0.01)
    assert late["trimmed_end"] / RATE == pytest.approx(30.0, abs=0.01)
    assert early["trimmed_start"] / RATE == pytest.approx(5.0, abs=0.01)
    assert early["trimmed_end"] / RATE == pytest.approx(575.0, abs=0.01)
    # The premises: the late song's loud range starts and ends in different chunks, and the
    # early song's loud range lies in chunk 0 with two silent chunks after it.
    late_stop = late["trimmed_start"] + late["length"]
    assert (late["trimmed_start"] // chunk, (late_stop - 1) // chunk) == (1, 2)
    assert (early["trimmed_start"] + early["length"] - 1) // chunk == 0


@pytest.fixture(scope="module")
def short_songs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("short") / "songs"
    folder.mkdir()
    # Internal silence longer than the small chunks must stay; only the ends are trimmed.
    _song(folder / "gap.flac", [(0.3, False), (0.6, True), (0.4, False), (0.6, True),
                                (0.5, False)], rate=RATE)
    # Loud at the first and the last sample: nothing to trim at either end.
    _song(folder / "full.wav", [(1.3, True)], rate=RATE, seed=3)
    # Resampled from 44.1 kHz, with silences of odd lengths.
    _song(folder / "resampled.wav", [(0.137, False), (1.2, True), (0.071, False)],
          rate=44100, seed=5)
    return folder


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_tiny_chunks_give_the_reference_codes(chunk, short_songs, tmp_path, monkeypatch):
    monkeypatch.setattr(chain_module, "_SPOOL_CHUNK", chunk)
    data = _preprocess(short_songs, tmp_path / "dataset")
    _assert_matches_reference(data, 3)
    gap = next(s for s in data.songs if s.source.endswith("gap.flac"))
    # The premise: the song spans many chunks and its silent middle is wider than a chunk.
    assert gap.length > 4 * chunk and 0.4 * RATE > chunk


@pytest.mark.parametrize("limit", [1, 5000])
def test_songs_past_the_in_memory_limit_spool_to_a_file_with_the_same_codes(
        limit, short_songs, tmp_path, monkeypatch):
    sizes_at_rollover = []

    class RecordingSpool(tempfile.SpooledTemporaryFile):
        def rollover(self):
            if not self._rolled:
                sizes_at_rollover.append(self.tell())
            super().rollover()

    monkeypatch.setattr(chain_module, "SPOOL_IN_MEMORY", limit)
    monkeypatch.setattr(chain_module.tempfile, "SpooledTemporaryFile", RecordingSpool)
    monkeypatch.setattr(chain_module, "_SPOOL_CHUNK", 4096)
    data = _preprocess(short_songs, tmp_path / "dataset")
    _assert_matches_reference(data, 3)
    # Every song (over 1 s at 16 kHz) outgrew the limit and moved to a file at its first block
    # past it.
    assert len(sizes_at_rollover) == 3 and all(size > limit for size in sizes_at_rollover)
