"""The plan's honesty: its predictions against whole commands measured on this machine.

One plan is calibrated here (a whole ``rainforest preprocess`` on one local worker and a few
training steps under ``horovodrun`` on one core), then real commands are timed whole, Python
and cluster start-up included: ``preprocess`` of a small input on 1 local worker and of a
larger one on 2, and a 2-rank ``horovodrun --gloo`` training. Each must come within the
stated tolerance of its prediction. ``benchmarks/plan.py`` measures every combination on
larger inputs; docs/performance.md gives the errors found.
"""

from __future__ import annotations

import plancheck
import pytest

from conftest import rank_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

#: Every whole command within this factor of its prediction (error within -67%..+200%): the
#: start-up of Python, Dask and TensorFlow dominates commands this small, and it varies with
#: whatever else shares the machine's cores (errors of up to -60% were measured on 2 cores
#: shared with three other test sessions; see docs/performance.md).
TOLERANCE = 3.0


def test_predictions_come_within_the_tolerance_of_measured_commands(tmp_path):
    small = plancheck.write_songs(tmp_path / "small", count=3, seconds=8.0)
    large = plancheck.write_songs(tmp_path / "large", count=12, seconds=30.0)
    checks = plancheck.compare(small, large, tmp_path / "work", steps=40,
                               calibration=["--calibration-songs", "1",
                                            "--calibration-steps", "4"],
                               env=rank_env(), runs=(("small", 1), ("large", 2)))
    print("\n" + plancheck.table(checks))
    assert len(checks) == 3
    for check in checks:
        assert 1 / TOLERANCE <= check["predicted"] / check["measured"] <= TOLERANCE, check
