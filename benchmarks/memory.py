"""Peak resident memory while preprocessing one very long song, for growing lengths.

Each song is a 44.1 kHz stereo 16-bit wav generated here (block by block, so the generator
itself stays small) and preprocessed by a fresh process with ``cluster="sync"``; its peak RSS
is read from ``getrusage``. The longest default song is 6.5 hours, a 4.1 GB file.

Usage: python benchmarks/memory.py [--hours 0.5 2 6.5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from test_memory import MEASURE  # noqa: E402

import audiogen  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, nargs="+", default=[0.5, 2.0, 6.5])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    print(f"{'hours':>6}{'wav size':>12}{'peak RSS':>12}{'wall':>9}{'x real time':>13}")
    for hours in args.hours:
        scratch = tempfile.mkdtemp(prefix="rainforest-memory-", dir=args.dir)
        try:
            song = audiogen.write_long_wav(os.path.join(scratch, "long.wav"),
                                           seconds=hours * 3600)
            start = time.perf_counter()
            result = subprocess.run(
                [sys.executable, "-c", MEASURE, str(song), os.path.join(scratch, "data")],
                capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            peak = int(result.stdout.strip().splitlines()[-1])
            print(f"{hours:>6.2f}{song.stat().st_size / 1e9:>10.2f}GB{peak:>10d}MB"
                  f"{wall:>8.1f}s{hours * 3600 / wall:>12.0f}x")
        finally:
            shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
