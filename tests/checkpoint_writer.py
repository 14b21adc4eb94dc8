"""Run by tests/test_checkpoint_atomic.py, to be killed: write checkpoints in a loop.

    python tests/checkpoint_writer.py RUN SMALL_FILES

Each checkpoint ``step`` holds ``model.weights.h5`` and ``optimizer.h5`` (large arrays filled
with values derived from the step, so a reader can tell a whole file from a torn one) and
``SMALL_FILES`` small files besides (so that deleting an old checkpoint takes a while too).
It continues from the run's ``latest`` checkpoint, as a resumed training run would.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from rainforest import checkpoint
from rainforest.errors import CheckpointError

ARRAY_SIZE = 1 << 21  # 8 MB of float32 per array
KEEP = 2


def arrays_of(step: int) -> list[tuple[str, np.ndarray]]:
    return [(f"array{i}", np.full(ARRAY_SIZE, step + i / 4, np.float32)) for i in range(2)]


def small_name(index: int) -> str:
    return f"small-{index:05d}.bin"


def small_bytes(step: int, index: int) -> bytes:
    return f"{step}:{index}".encode() * 8


def save_files(folder: str, step: int, small_files: int) -> None:
    checkpoint.save_arrays(os.path.join(folder, checkpoint.WEIGHTS_NAME), arrays_of(step))
    checkpoint.save_arrays(os.path.join(folder, checkpoint.OPTIMIZER_NAME), arrays_of(-step))
    for index in range(small_files):
        with open(os.path.join(folder, small_name(index)), "wb") as handle:
            handle.write(small_bytes(step, index))


def next_step(run: str) -> int:
    try:
        return checkpoint.read_config(checkpoint.latest(run))["step"] + 1
    except CheckpointError:
        return 1


def main(run: str, small_files: int) -> None:
    step = next_step(run)
    while True:
        checkpoint.write(run, step, {"small_files": small_files},
                         lambda folder, step=step: save_files(folder, step, small_files),
                         keep=KEEP)
        print(step, flush=True)
        step += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
