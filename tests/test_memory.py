"""Peak memory of preprocessing does not grow with the song's length."""

from __future__ import annotations

import pytest

import audiogen
from peak_memory import run_child

pytestmark = pytest.mark.slow

# The child's own peak (VmHWM; see peak_memory), not ru_maxrss inherited from pytest.
MEASURE = """
import sys
from peak_memory import own_peak_kb
from rainforest.preprocess import preprocess
preprocess([sys.argv[1]], sys.argv[2], cluster="sync", progress=False, log=lambda line: None)
print(own_peak_kb() // 1024)
"""


def peak_rss_mb(song, out) -> int:
    """Peak resident memory, in MB, of a fresh process that preprocesses one song."""
    return int(run_child(MEASURE, song, out).strip().splitlines()[-1])


def test_peak_memory_is_flat_in_song_length(tmp_path):
    short = audiogen.write_long_wav(tmp_path / "short.wav", seconds=60)
    long = audiogen.write_long_wav(tmp_path / "long.wav", seconds=30 * 60)  # 318 MB of wav
    short_peak = peak_rss_mb(short, tmp_path / "short-data")
    long_peak = peak_rss_mb(long, tmp_path / "long-data")
    # Holding the long song would cost 318 MB as int16, 635 MB as float32; streaming costs
    # a few block buffers whatever the length.
    assert long_peak - short_peak < 48, (short_peak, long_peak)
    assert long_peak < 1024
