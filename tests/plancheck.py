"""`rainforest plan` against whole commands measured on this machine (its honesty check).

Used by tests/test_plan_accuracy.py (small inputs) and benchmarks/plan.py (larger ones): one
plan is calibrated on this machine, then real ``rainforest preprocess`` commands on local
clusters and a real 2-rank ``horovodrun`` training are timed whole (Python start-up and the
cluster's start-up included) and set beside what the plan predicted for them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import audiogen

RAINFOREST = [sys.executable, "-m", "rainforest.cli"]
TRAINING = ["--config", "tiny", "--batch-size", "2", "--target-length", "1024"]


def write_songs(folder: Path, *, count: int, seconds: float) -> Path:
    """Stereo 44.1 kHz FLAC songs of a few tones each, ``seconds`` long."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        audiogen.write_song(folder / f"song{index:03d}.flac", seconds=seconds, rate=44100,
                            channels=2, freq=180.0 + 25 * index, seed=index)
    return folder


def _timed(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed


def _plan(sources: Path, *, workers: tuple[int, ...], ranks: tuple[int, ...], steps: int,
          earlier: Path | None, extra: list[str]) -> dict:
    command = [*RAINFOREST, "plan", str(sources), "--json", "--steps", str(steps), *TRAINING,
               *extra]
    command += [f for w in workers for f in ("--workers", str(w))]
    command += [f for r in ranks for f in ("--ranks", str(r))]
    if earlier is not None:
        command += ["--from", str(earlier)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"plan failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


#: Every (input, workers) pair that can be measured.
ALL_RUNS = (("small", 1), ("small", 2), ("large", 1), ("large", 2))


def compare(small: Path, large: Path, work: Path, *, steps: int, calibration: list[str],
            env: dict, runs=ALL_RUNS) -> list[dict]:
    """Predicted against measured seconds for each whole command; one dict per command.

    The plan is calibrated on ``large``; ``runs`` are the preprocess commands measured, as
    (input, workers), and must include ("large", 2), whose dataset the 2-rank training reads.
    ``calibration`` are extra ``plan`` options (e.g. fewer calibration steps); ``env`` is the
    environment of the 2-rank training (horovodrun on PATH).
    """
    work.mkdir(parents=True, exist_ok=True)
    calibrated = _plan(large, workers=(1, 2), ranks=(1, 2), steps=steps, earlier=None,
                       extra=calibration)
    figures = work / "calibrated.json"
    figures.write_text(json.dumps(calibrated))
    small_plan = _plan(small, workers=(1, 2), ranks=(1, 2), steps=steps, earlier=figures,
                       extra=[])
    checks = []
    for name, document, source in (("small", small_plan, small), ("large", calibrated, large)):
        for row in document["rows"]:
            if (name, row["workers"]) not in runs:
                continue
            out = work / f"dataset-{name}-{row['workers']}"
            measured = _timed([*RAINFOREST, "preprocess", str(source), "--out", str(out),
                               "--cluster", f"local:{row['workers']}", "--no-progress",
                               "--json"])
            checks.append({"command": f"preprocess, {name} input "
                                      f"({document['sources']['hours'] * 3600:.0f} s of audio), "
                                      f"{row['workers']} worker(s)",
                           "predicted": row["preprocess_seconds"], "measured": measured})
            if name == "large" and row["workers"] == 2:
                dataset = out
            else:
                shutil.rmtree(out)
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    run = work / "run-2-ranks"
    measured = _timed([horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", *RAINFOREST,
                       "train", str(dataset), "--run", str(run), "--steps", str(steps),
                       *TRAINING, "--val-windows", "0", "--checkpoint-every", str(steps),
                       "--no-progress"], env=env)
    two_ranks = next(r for r in calibrated["rows"] if r["ranks"] == 2)
    checks.append({"command": f"train {steps} steps, 2 ranks (horovodrun --gloo)",
                   "predicted": two_ranks["train_seconds"], "measured": measured})
    for check in checks:
        check["error"] = check["predicted"] / check["measured"] - 1.0
    return checks


def table(checks: list[dict]) -> str:
    lines = [f"{'command':<58} {'predicted':>10} {'measured':>10} {'error':>7}"]
    lines += [f"{c['command']:<58} {c['predicted']:>9.1f}s {c['measured']:>9.1f}s "
              f"{c['error']:>+7.0%}" for c in checks]
    return "\n".join(lines)
