"""Real songs, fetched by Debian package name into the cache, through the whole preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

import audiogen
from conftest import reference_codes
from rainforest.dataset import Dataset
from rainforest.preprocess import preprocess
from rainforest.samples import debian_music, mp3_copies

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
