"""Real music by Debian package name (marked ``music``: real apt, ~150 MB once), and the
cache and mp3 rules, which need no network."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile

import audiogen
from rainforest.audio import SongDecoder
from rainforest.errors import ParameterError, RainforestError
from rainforest.samples import cache_root, debian_music, mp3_copies

WESNOTH = "wesnoth-1.16-music"


@pytest.fixture
def no_tools(monkeypatch, tmp_path):
    """A PATH with no apt-get or dpkg: anything that tries to run them fails loudly."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.mark.music
def test_wesnoth_music_is_fetched_once_then_served_from_the_cache(monkeypatch, tmp_path):
    songs = debian_music(WESNOTH)  # into the real cache: later runs reuse it
    assert len(songs) >= 40 and all(p.suffix == ".ogg" for p in songs)
    assert songs == sorted(songs)
    assert all(cache_root() / "debian" / WESNOTH in p.parents for p in songs)
    infos = [soundfile.info(str(p)) for p in songs]
    assert all(i.format == "OGG" and i.subtype == "VORBIS" for i in infos)
    assert all(i.samplerate in (44100, 48000) and i.channels in (1, 2) for i in infos)
    # Jingles (victory.ogg, 5.5 s) to full themes (knalgan_theme.ogg, 9 min), ~2 h in all.
    assert all(3 < i.duration < 15 * 60 for i in infos)
    assert 1.5 * 3600 < sum(i.duration for i in infos) < 3 * 3600

    # Served from the cache: with apt-get and dpkg off the PATH, a fetch would fail.
    monkeypatch.setenv("PATH", str(tmp_path))
    assert debian_music(WESNOTH) == songs


@pytest.mark.music
def test_mp3_copy_of_a_real_song_lasts_as_long(tmp_path):
    songs = debian_music(WESNOTH)
    shortest = min(songs, key=lambda p: soundfile.info(str(p)).frames)
    (mp3,) = mp3_copies([shortest], out_dir=tmp_path)
    assert mp3 == tmp_path / f"{shortest.stem}.mp3"
    ogg_info, mp3_info = soundfile.info(str(shortest)), soundfile.info(str(mp3))
    assert (mp3_info.format, mp3_info.subtype) == ("MP3", "MPEG_LAYER_III")
    assert abs(mp3_info.duration - ogg_info.duration) < 0.1
    with SongDecoder(str(mp3), sample_rate=16000) as song:
        loudest = max(float(np.max(np.abs(block))) for block in song.blocks())
        assert song.truncation is None
    assert loudest > 0.05  # music, not an encoder's silence


@pytest.mark.music
def test_asc_music_gives_real_mp3_songs(tmp_path):
    songs = debian_music("asc-music", cache_dir=tmp_path)
    assert [p.name for p in songs] == ["frontiers.mp3", "machine_wars.mp3",
                                       "time_to_strike.mp3"]
    assert all(soundfile.info(str(p)).duration > 60 for p in songs)


@pytest.mark.music
def test_missing_package_lists_are_fetched_once_then_the_download_retried(monkeypatch,
                                                                         tmp_path):
    # apt reads APT_CONFIG, so point it at empty lists of its own (the system's stay as they
    # are): the first download cannot locate the package, apt-get update fills these lists.
    lists, cache = tmp_path / "apt" / "lists", tmp_path / "apt" / "cache"
    (lists / "partial").mkdir(parents=True)
    (cache / "archives" / "partial").mkdir(parents=True)
    config = tmp_path / "apt" / "apt.conf"
    config.write_text(f'Dir::State::Lists "{lists}";\nDir::Cache "{cache}";\n')
    monkeypatch.setenv("APT_CONFIG", str(config))
    songs = debian_music("asc-music", cache_dir=tmp_path / "music")
    assert len(songs) == 3
    assert any(name.endswith("_InRelease") for name in os.listdir(lists))


@pytest.mark.music
def test_unknown_package_says_how_to_check_the_name(tmp_path):
    # Runs apt-get update once (the lists might be stale), then gives up with advice.
    with pytest.raises(RainforestError, match=r"apt-cache policy no-such-rainforest-music"):
        debian_music("no-such-rainforest-music", cache_dir=tmp_path)
    assert not list((tmp_path / "debian").iterdir())  # no work folder left behind


# ---------------------------------------------------------------------------------------
# No network needed


@pytest.mark.parametrize("name", ["", "A-Music", "../etc", "-oDebug::pkgAcquire=1", "a b"])
def test_package_name_is_checked_before_running_anything(tmp_path, name):
    with pytest.raises(ParameterError, match="not a Debian package name"):
        debian_music(name, cache_dir=tmp_path)


def test_missing_apt_says_what_to_do(tmp_path, no_tools):
    with pytest.raises(RainforestError, match=r"apt-get not found: .* needs a Debian"):
        debian_music("asc-music", cache_dir=tmp_path)


def test_a_folder_without_the_completion_marker_is_fetched_again(tmp_path, no_tools):
    half = tmp_path / "debian" / "asc-music" / "usr"
    half.mkdir(parents=True)
    audiogen.write_song(half / "frontiers.mp3", seconds=0.1)
    # Not trusted, so it tries to download (and, with no apt-get here, says so).
    with pytest.raises(RainforestError, match="apt-get not found"):
        debian_music("asc-music", cache_dir=tmp_path)


def test_cache_root_prefers_argument_then_environment_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAINFOREST_CACHE", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "rainforest"
    monkeypatch.setenv("RAINFOREST_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_mp3_copies_streams_caches_and_honours_limit(tmp_path):
    songs = [audiogen.write_song(tmp_path / f"{name}.ogg", seconds=1.5, rate=44100,
                                 channels=2, seed=i)
             for i, name in enumerate(["a", "b", "c"])]
    out = tmp_path / "mp3"
    made = mp3_copies(songs, out_dir=out, limit=2)
    assert made == [out / "a.mp3", out / "b.mp3"]
    assert sorted(os.listdir(out)) == ["a.mp3", "b.mp3"]  # no staging files left
    for mp3 in made:
        info = soundfile.info(str(mp3))
        assert (info.format, info.samplerate, info.channels) == ("MP3", 44100, 2)
        assert info.frames == 1.5 * 44100

    # A finished mp3 is reused untouched; only the missing one is written.
    stamp = made[0].stat().st_mtime_ns
    again = mp3_copies(songs, out_dir=out)
    assert again == [out / "a.mp3", out / "b.mp3", out / "c.mp3"]
    assert made[0].stat().st_mtime_ns == stamp


def test_mp3_copies_refuses_what_mp3_cannot_hold(tmp_path):
    surround = audiogen.write_song(tmp_path / "surround.ogg", seconds=0.2, rate=44100,
                                   channels=6)
    hires = audiogen.write_song(tmp_path / "hires.flac", seconds=0.2, rate=96000)
    with pytest.raises(RainforestError, match="mp3 needs 1 or 2 channels .* not 6 channels"):
        mp3_copies([surround], out_dir=tmp_path / "out")
    with pytest.raises(RainforestError, match="not 1 channels at 96000 Hz"):
        mp3_copies([hires], out_dir=tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []

    same_name = [tmp_path / "x" / "song.ogg", tmp_path / "y" / "song.ogg"]
    with pytest.raises(ParameterError, match="share an mp3 name: song"):
        mp3_copies(same_name, out_dir=tmp_path / "out")
    with pytest.raises(ParameterError, match="limit must be a non-negative integer"):
        mp3_copies([], out_dir=tmp_path / "out", limit=-1)
