"""Checkpoints survive SIGKILL at any moment: a real writer process is killed mid-write and
mid-pruning, again and again, and every checkpoint the run lists still loads and verifies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import checkpoint_writer
from rainforest import checkpoint, storage

pytestmark = pytest.mark.slow

WRITER = str(Path(checkpoint_writer.__file__))
SMALL_FILES = 300


def _start(run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WRITER, str(run), str(SMALL_FILES)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_a_checkpoint(process: subprocess.Popen) -> None:
    """Until the writer has finished one checkpoint in this life (it prints each step)."""
    line = process.stdout.readline()
    assert line.strip().isdigit(), process.stderr.read() if process.poll() is not None else line


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stdout.close()
    process.stderr.close()


def _kill_at_a_random_moment(run: Path, rng) -> None:
    process = _start(run)
    _wait_for_a_checkpoint(process)
    time.sleep(rng.uniform(0.0, 0.4))  # most of the writer's time is spent writing
    _kill(process)


def _kill_as_pruning_starts(run: Path) -> None:
    """Kill just after ``latest`` moves on: that is when the oldest checkpoint is deleted."""
    pointer = Path(checkpoint.checkpoint_root(str(run))) / checkpoint.LATEST
    process = _start(run)
    _wait_for_a_checkpoint(process)
    seen = pointer.read_text()
    deadline = time.monotonic() + 120
    while pointer.read_text() == seen and time.monotonic() < deadline:
        time.sleep(0.0005)
    _kill(process)


def _leftovers(run: Path) -> set[str]:
    root = Path(checkpoint.checkpoint_root(str(run)))
    return {p.name for p in root.iterdir() if storage.TEMP_MARKER in p.name}


def assert_every_checkpoint_loads(run: Path) -> None:
    folders = checkpoint.list_checkpoints(str(run))
    assert folders, "no checkpoint left"
    assert checkpoint.latest(str(run)) in folders
    for folder in folders:
        config = checkpoint.read_config(folder)
        checkpoint.verify(folder, config)
        step = config["step"]
        assert os.path.basename(folder) == checkpoint.step_name(step)
        assert len(config["files"]) == 2 + SMALL_FILES
        for name, expected in [(checkpoint.WEIGHTS_NAME, checkpoint_writer.arrays_of(step)),
                               (checkpoint.OPTIMIZER_NAME, checkpoint_writer.arrays_of(-step))]:
            loaded = checkpoint.load_arrays(os.path.join(folder, name))
            assert [n for n, _ in loaded] == [n for n, _ in expected]
            for (_, array), (_, wanted) in zip(loaded, expected, strict=True):
                np.testing.assert_array_equal(array, wanted)


def test_sigkill_mid_write_or_mid_pruning_leaves_every_checkpoint_loadable(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    interrupted_writes = 0
    for attempt in range(40):
        if interrupted_writes >= 4 and attempt >= 8:
            break
        before = _leftovers(run) if run.exists() else set()
        if attempt % 2:
            _kill_as_pruning_starts(run)
        else:
            _kill_at_a_random_moment(run, rng)
        interrupted_writes += bool(_leftovers(run) - before)
        assert_every_checkpoint_loads(run)
    # The kills did land inside writes: each such kill left its staging folder behind.
    assert interrupted_writes >= 4
    # And the run goes on from its latest checkpoint.
    step = checkpoint.read_config(checkpoint.latest(str(run)))["step"]
    process = _start(run)
    _wait_for_a_checkpoint(process)
    _kill(process)
    assert checkpoint.read_config(checkpoint.latest(str(run)))["step"] >= step + 1
    assert_every_checkpoint_loads(run)
