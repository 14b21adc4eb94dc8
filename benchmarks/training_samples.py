"""What ``train --sample-every`` costs the training ranks, per sampled step.

Run with ``python benchmarks/training_samples.py [--config default] [--steps 40] [--every 10]
[--seconds 2] [--rounds 2]``. Each round trains the same run twice in fresh processes, side by
side so that machine noise hits both alike: without samples, and with a sample every
``--every`` steps. Each step's time comes from ``metrics.jsonl`` (``--log-every 1``); the
first steps, which trace the graph, are left out. It prints:

* handoff:  what rank 0 itself spends per sampled step (writing the weights snapshot and
  handing it to the sampler process), as the run prints it;
* slowdown: (training time with samples - without) / sampled steps, i.e. the handoff plus
  whatever the niced sampler process takes from the training cores while it generates;
* the sampler's own wall time per sampled step (it runs beside training).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
from machine import describe

WARMUP_STEPS = 3


def make_dataset(folder: str) -> str:
    """Four 20 s songs of drifting tones with noise, preprocessed for real."""
    import soundfile

    from rainforest.preprocess import preprocess

    rng = np.random.default_rng(0)
    songs = os.path.join(folder, "songs")
    os.makedirs(songs)
    for index in range(4):
        t = np.arange(20 * 16000) / 16000
        tone = np.sin(2 * np.pi * (220 + 40 * index) * t * (1 + 0.01 * np.sin(t)))
        soundfile.write(os.path.join(songs, f"song{index}.wav"),
                        0.5 * tone + 0.05 * rng.standard_normal(t.shape), 16000)
    dataset = os.path.join(folder, "dataset")
    preprocess([songs], dataset, cluster="sync", progress=False, log=lambda line: None)
    return dataset


def train_once(dataset: str, run: str, args, every: int) -> dict:
    command = [sys.executable, "-m", "rainforest.cli", "train", dataset, "--run", run,
               "--config", args.config, "--steps", str(args.steps), "--batch-size", "2",
               "--target-length", "2048", "--log-every", "1", "--val-every", "0",
               "--checkpoint-every", str(10 * args.steps), "--no-progress",
               "--sample-every", str(every), "--sample-seconds", str(args.seconds)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    per_step = 2 * 2048
    step_seconds = [per_step / row["samples_per_second_per_rank"] for row in rows
                    if row["step"] > WARMUP_STEPS]
    found = re.search(r"rank 0 spent ([0-9.]+) ms per sampled step .* the sampler process "
                      r"([0-9.]+) s", result.stdout)
    return {"train_seconds": sum(step_seconds),
            "handoff_ms": float(found.group(1)) if found else None,
            "sampler_seconds": float(found.group(2)) if found else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(describe())
    sampled = len([s for s in range(WARMUP_STEPS + 1, args.steps + 1) if s % args.every == 0])
    with tempfile.TemporaryDirectory(prefix="rainforest-bench-samples-") as folder:
        dataset = make_dataset(folder)
        rounds = []
        for index in range(args.rounds):
            plain = train_once(dataset, os.path.join(folder, f"plain{index}"), args, 0)
            with_samples = train_once(dataset, os.path.join(folder, f"sampled{index}"), args,
                                      args.every)
            slowdown = (with_samples["train_seconds"] - plain["train_seconds"]) / sampled
            rounds.append({**with_samples, "plain_seconds": plain["train_seconds"],
                           "slowdown_per_sampled_step_s": slowdown})
            print(f"round {index}: {args.steps - WARMUP_STEPS} steps {plain['train_seconds']:.2f}"
                  f" s without samples, {with_samples['train_seconds']:.2f} s with {sampled} "
                  f"sampled steps of {args.seconds:g} s: slowdown {slowdown:.3f} s per sampled "
                  f"step; rank 0 handoff {with_samples['handoff_ms']} ms; sampler "
                  f"{with_samples['sampler_seconds']} s each", flush=True)
    slow = [r["slowdown_per_sampled_step_s"] for r in rounds]
    hand = [r["handoff_ms"] for r in rounds]
    print(f"median over {args.rounds} round(s): handoff {np.median(hand):.1f} ms "
          f"(min {min(hand):.1f}, max {max(hand):.1f}); slowdown per sampled step "
          f"{np.median(slow):.3f} s (min {min(slow):.3f}, max {max(slow):.3f}); plain step "
          f"{np.median([r['plain_seconds'] for r in rounds]) / (args.steps - WARMUP_STEPS):.3f}"
          f" s; config {args.config}, batch 2 x 2048, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
