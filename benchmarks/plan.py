"""`rainforest plan`'s predictions against whole commands measured here, on generated songs.

One plan is calibrated on the larger input (a whole ``rainforest preprocess`` on one local
worker, a few training steps of the ``tiny`` config under ``horovodrun`` on one core); then
``rainforest preprocess`` of a small and a larger input on 1 and 2 local workers and a 2-rank
``horovodrun --gloo`` training are timed whole, Python and cluster start-up included, and
printed beside the predictions with the error of each.

Run: ``python benchmarks/plan.py [--small 4x10] [--large 24x60] [--steps 200]`` (COUNTxSECONDS
of stereo 44.1 kHz FLAC songs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import plancheck  # noqa: E402
from machine import cpu_model  # noqa: E402

from conftest import rank_env  # noqa: E402


def songs(text: str) -> tuple[int, float]:
    count, seconds = text.lower().split("x")
    return int(count), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=songs, default=(4, 10.0), help="COUNTxSECONDS")
    parser.add_argument("--large", type=songs, default=(24, 60.0), help="COUNTxSECONDS")
    parser.add_argument("--steps", type=int, default=200, help="steps of the 2-rank training")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory(prefix="rainforest-plan-bench-") as scratch:
        root = Path(scratch)
        small = plancheck.write_songs(root / "small", count=args.small[0], seconds=args.small[1])
        large = plancheck.write_songs(root / "large", count=args.large[0], seconds=args.large[1])
        checks = plancheck.compare(small, large, root / "work", steps=args.steps,
                                   calibration=[], env=rank_env())
    print(plancheck.table(checks))
    errors = [abs(c["error"]) for c in checks]
    print(f"mean absolute error {sum(errors) / len(errors):.0%}, largest {max(errors):.0%}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
