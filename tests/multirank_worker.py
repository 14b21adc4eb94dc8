"""Run by tests/test_multirank.py under ``horovodrun --gloo`` (or alone as one rank).

    python tests/multirank_worker.py dynamics OUT_DIR
    python tests/multirank_worker.py cli OUT_DIR train DATASET --run RUN ...

MODE ``dynamics``: one optimizer step of a ``Trainer`` with no warm-up on chosen batches:
batch A (random codes) on rank 0 and batch B (a slow repeating pattern) on rank 1. One
rank alone first measures the loss of A and of B separately, then steps on A. Each rank
writes ``rank-R.json`` with the loss the step returned and the largest change of any dense
weight (Adam's first update moves each weight by the learning rate, give or take its
epsilon).

MODE ``cli``: ``rainforest.cli.main`` with the remaining arguments, as ``rainforest`` would
run them. Each rank first writes its pid to ``pid-R`` (so a test can signal one rank) and at
the end ``result-R.json`` with what ``train`` returned on that rank (the CLI prints rank 0's
alone) and the exit status.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

BATCH = 3
TARGET = 64
LEARNING_RATE = 1e-3


def _batches(window: int) -> list[np.ndarray]:
    noise = np.random.default_rng(1).integers(0, 256, (BATCH, window)).astype(np.uint8)
    pattern = (128 + 60 * np.sin(np.arange(window) / 5.0)).astype(np.uint8)
    return [noise, np.tile(pattern, (BATCH, 1))]


def dynamics(out: str) -> None:
    from rainforest.model_config import PRESETS, receptive_field
    from rainforest.train import TrainConfig, Trainer, init_horovod

    hvd = init_horovod()
    rank, size = hvd.rank(), hvd.size()
    model_config = PRESETS["tiny"]
    config = TrainConfig(seed=0, batch_size=BATCH, target_length=TARGET,
                         learning_rate=LEARNING_RATE, warmup_steps=0)
    trainer = Trainer(model_config, config, hvd)
    batches = _batches(receptive_field(model_config) + TARGET)
    labels = np.zeros(BATCH, np.int32)
    report: dict = {"rank": rank, "size": size}
    if size == 1:
        # The same batches' losses measured on one rank: what the ranks' average must give.
        report["local_losses"] = [trainer.validation_bits(b, labels) * math.log(2.0)
                                  for b in batches]
    before = trainer.weights()
    loss, norm, _ = trainer.train_step(batches[rank], labels, 0)
    after = trainer.weights()
    report["loss"] = loss
    report["grad_norm"] = norm
    # The input lookup tables get sparse gradients, for which Keras's Adam sums the squares
    # of repeated rows separately, so a row can move by more than the rate; leave them out.
    dense = [not v.path.endswith(("input_previous", "input_current"))
             for v in trainer.model.weights]
    report["max_update"] = max(float(np.max(np.abs(a - b)))
                               for a, b, keep in zip(after, before, dense, strict=True) if keep)
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as handle:
        json.dump(report, handle)


def cli(out: str, argv: list[str]) -> int:
    from rainforest.cli import main
    from rainforest.train import train as real_train

    training = sys.modules["rainforest.train"]  # the module; rainforest.train is the function

    rank = os.environ.get("HOROVOD_RANK", "0")
    with open(os.path.join(out, f"pid-{rank}"), "w") as handle:
        handle.write(str(os.getpid()))
    results = {}

    def train(*args, **kwargs):  # the real train(); its per-rank result is kept
        results.update(real_train(*args, **kwargs))
        return results

    training.train = train
    status = main(argv)
    with open(os.path.join(out, f"result-{rank}.json"), "w") as handle:
        json.dump({**results, "exit_status": status}, handle, default=str)
    return status


if __name__ == "__main__":
    if sys.argv[1] == "dynamics":
        dynamics(sys.argv[2])
    elif sys.argv[1] == "cli":
        sys.exit(cli(sys.argv[2], sys.argv[3:]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]}")
