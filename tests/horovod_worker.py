"""Run by the Horovod tests under horovodrun/mpirun (or alone as one rank).

    python tests/horovod_worker.py MODE OUT_DIR

MODE ``consistency``: each rank starts from different weights (seed = rank) and trains 3
steps on its own random windows; the broadcast after step 1 and the allreduce must leave
every rank with the same weights. MODE ``equivalence``: one step on a fixed global batch
of 2B windows, each rank taking its B (one rank takes all 2B); besides the weights it saves
the step's loss and gradient norm, both taken after the allreduce, so the test checks the
averaged gradient and metric themselves, not only their effect on the weights through Adam.
MODE ``choice``: `--compile auto --precision auto` timed on every rank (a run long enough to
time the candidates); it saves the choice (JSON) and the weights of the Trainer built after it,
before any step. MODE ``cores``: one rank, 3 float32 graph steps on fixed random windows with
however many cores the process may use.
Each rank saves to ``OUT_DIR/rank-R.npz``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from rainforest.model_config import PRESETS, receptive_field
from rainforest.train import TrainConfig, Trainer, init_horovod

BATCH_PER_RANK_AT_TWO = 3
TARGET = 64


def main(mode: str, out: str) -> None:
    hvd = init_horovod()
    rank, size = hvd.rank(), hvd.size()
    model_config = PRESETS["tiny"]
    window = receptive_field(model_config) + TARGET
    extra = {}
    if mode == "consistency":
        config = TrainConfig(seed=rank, batch_size=2, target_length=TARGET, warmup_steps=0)
        trainer = Trainer(model_config, config, hvd)
        rng = np.random.default_rng(100 + rank)
        for step in range(3):
            windows = rng.integers(0, 256, (2, window)).astype(np.uint8)
            trainer.train_step(windows, np.zeros(2, np.int32), step)
    elif mode == "equivalence":
        global_batch = 2 * BATCH_PER_RANK_AT_TWO
        config = TrainConfig(seed=0, batch_size=global_batch // size, target_length=TARGET,
                             learning_rate=1e-2, warmup_steps=10)
        trainer = Trainer(model_config, config, hvd)
        windows = np.random.default_rng(5).integers(0, 256, (global_batch, window))
        mine = np.array_split(windows.astype(np.uint8), size)[rank]
        loss, norm, _ = trainer.train_step(mine, np.zeros(mine.shape[0], np.int32), 0)
        extra = {"loss": loss, "grad_norm": norm}
    elif mode.startswith("cores-"):  # cores-graph, cores-fused
        config = TrainConfig(seed=0, batch_size=2, target_length=TARGET, warmup_steps=0,
                             compile=mode.split("-")[1], precision="float32")
        trainer = Trainer(model_config, config, hvd)
        rng = np.random.default_rng(7)
        for step in range(3):
            windows = rng.integers(0, 256, (2, window)).astype(np.uint8)
            trainer.train_step(windows, np.zeros(2, np.int32), step)
    elif mode == "choice":
        from rainforest.step_choice import MEASURE_FROM_STEPS, choose

        config = TrainConfig(seed=0, batch_size=2, target_length=TARGET, warmup_steps=0)
        choice = choose(model_config, config, hvd, gpu=False, steps_left=MEASURE_FROM_STEPS,
                        elastic=False, log=print,
                        build_trainer=lambda candidate: Trainer(model_config, candidate, hvd))
        config = dataclasses.replace(config, compile=choice.compile, precision=choice.precision)
        trainer = Trainer(model_config, config, hvd)
        extra = {"choice": json.dumps(choice.to_dict())}
    else:
        raise SystemExit(f"unknown mode {mode}")
    weights = {f"w{i:03d}": w for i, w in enumerate(trainer.weights())}
    np.savez(os.path.join(out, f"rank-{rank}.npz"), size=size, **extra, **weights)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
