"""Peak memory of preprocessing does not grow with the song's length."""

from __future__ import annotations

import subprocess
import sys

import pytest

import audiogen

pytestmark = pytest.mark.slow

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent, so
# a child of a pytest process that has loaded TensorFlow would report that process's size.
MEASURE = """
import sys
from rainforest.preprocess import preprocess
preprocess([sys.argv[1]], sys.argv[2], cluster="sync", progress=False, log=lambda line: None)
with open("/proc/self/status") as status:
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(peak_kb // 1024)
"""


def peak_rss_mb(song, out) -> int:
    """Peak resident memory, in MB, of a fresh process that preprocesses one song."""
    result = subprocess.run([sys.executable, "-c", MEASURE, str(song), str(out)],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_in_song_length(tmp_path):
    short = audiogen.write_long_wav(tmp_path / "short.wav", seconds=60)
    long = audiogen.write_long_wav(tmp_path / "long.wav", seconds=30 * 60)  # 318 MB of wav
    short_peak = peak_rss_mb(short, tmp_path / "short-data")
    long_peak = peak_rss_mb(long, tmp_path / "long-data")
    # Holding the long song would cost 318 MB as int16, 635 MB as float32; streaming costs
    # a few block buffers whatever the length.
    assert long_peak - short_peak < 48, (short_peak, long_peak)
    assert long_peak < 1024
