"""Real songs, fetched by Debian package name into the cache, through the whole preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

import audiogen
import reference
from conftest import reference_codes
from rainforest.audio import BLOCK_FRAMES, SongDecoder, encode_song
from rainforest.config import AudioConfig
from rainforest.dataset import Dataset
from rainforest.preprocess import preprocess
from rainforest.samples import cache_root, debian_music, mp3_copies

pytestmark = [pytest.mark.music, pytest.mark.slow]


def test_real_songs_match_the_reference(tmp_path):
    oggs = debian_music("wesnoth-1.16-music")
    by_length = sorted(oggs, key=lambda p: soundfile.info(str(p)).duration)
    # The shortest real tracks (a few seconds each), one of them as a real mp3, plus tracks of
    # pure silence, which must be rejected rather than kept: the package's own, if it has one,
    # and always one made here (a Vorbis track, like the package's).
    chosen = [p for p in by_length if p.stem != "silence"][:3]
    silence = [p for p in oggs if p.stem == "silence"]
    (tmp_path / "silence").mkdir()
    silence.append(audiogen.write_silent_wav(tmp_path / "silence" / "made-here.ogg",
                                             seconds=3.0, rate=44100, channels=2))
    mp3 = mp3_copies(chosen[:1], out_dir=tmp_path / "mp3")
    sources = [str(p) for p in [*chosen, *mp3, *silence]]
    summary = preprocess(sources, str(tmp_path / "data"), cluster="local:2", progress=False,
                         log=lambda line: None)
    data = Dataset(str(tmp_path / "data"))
    assert summary["songs"] == 4
    for song in data.songs:
        entry = next(s for s in data.manifest["songs"] if s["source"] == song.source)
        info = soundfile.info(song.source)
        assert entry["source_seconds"] == pytest.approx(info.duration, abs=0.05)
        kept = song.length / 16000
        assert 0.5 * info.duration < kept <= info.duration + 0.01
        np.testing.assert_array_equal(data.song_codes(song), reference_codes(song.source))
        # real music uses the code range, not a sliver of it
        assert np.ptp(data.song_codes(song)) > 100
    assert sorted(f["source"] for f in data.failed) == sorted(str(p) for p in silence)
    assert [f["reason"][:7] for f in data.failed] == ["silent:"] * len(silence)


def test_a_long_real_mp3_decodes_in_blocks_exactly_as_in_one_read():
    # soundfile's read seeks after every block, and libsndfile's mp3 decoder resumes from a
    # seek with slightly different samples (in this song: 6,302 frames from the 8th block on,
    # up to 2.2e-3). SongDecoder reads straight through, so its blocks are one whole read.
    ogg = next(p for p in debian_music("wesnoth-1.16-music") if p.stem == "into_the_shadows")
    mp3 = str(mp3_copies([ogg], out_dir=cache_root() / "mp3" / "wesnoth-1.16-music")[0])
    whole = soundfile.read(mp3, dtype="float32", always_2d=True)[0]
    with SongDecoder(mp3, sample_rate=44100) as song:
        mono = np.concatenate([block.copy() for block in song.blocks()])
    np.testing.assert_array_equal(mono, reference.downmix(whole))
    codes = []
    encode_song(mp3, AudioConfig(), codes)
    np.testing.assert_array_equal(np.concatenate(codes), reference_codes(mp3))
    # The premise: soundfile's own block reads of this song differ from one whole read.
    with soundfile.SoundFile(mp3) as handle:
        blocks = list(handle.blocks(BLOCK_FRAMES, dtype="float32", always_2d=True))
    assert len(blocks) > 8 and not np.array_equal(np.concatenate(blocks), whole)
