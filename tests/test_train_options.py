"""Training options that had never been run: --compile, --precision, --clip-norm, --val-windows,
--lr-schedule.

Every run trains the same tiny model from the same seed on the same data for 3 steps, and
differs from the reference run in one option only. The runs share one Python process
(``cli_sequence_worker.py``), so TensorFlow is imported once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_TRAINING, checkpoint_weights
from rainforest import checkpoint
from reference import queue_wavenet_logits

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("cli_sequence_worker.py"))
STEPS = 3
VAL_WINDOWS = 3
TINY_CLIP = 1e-6

#: name -> the one option that differs from the reference run
RUNS = {
    "reference": [],
    "graph": ["--compile", "graph"],
    "float32": ["--precision", "float32"],
    "bfloat16": ["--precision", "mixed_bfloat16"],
    "eager": ["--compile", "eager"],
    "clip": ["--clip-norm", str(TINY_CLIP)],
    "cosine": ["--lr-schedule", "cosine", "--warmup-steps", "0"],
    "xla": ["--compile", "xla"],  # last: TensorFlow logs its XLA line once per process
}


@pytest.fixture(scope="module")
def runs(periodic_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    commands = [["train", str(periodic_dataset), "--run", str(root / name), *TINY_TRAINING,
                 "--steps", str(STEPS), "--log-every", "1", "--checkpoint-every", "1",
                 "--keep", str(STEPS), "--val-every", str(STEPS), "--val-windows",
                 str(VAL_WINDOWS), *extra] for name, extra in RUNS.items()]
    (root / "commands.json").write_text(json.dumps(commands))
    # TensorFlow's C++ info lines on, to see XLA compile (cmd_train keeps a level it is given).
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}
    result = subprocess.run([sys.executable, WORKER, str(root), str(root / "commands.json")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((root / "status.json").read_text()) == [0] * len(RUNS)
    stderr_by_run = result.stderr.split("=== run ")[1:]
    out = {}
    for index, name in enumerate(RUNS):
        run = root / name
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), name
        folder = checkpoint.latest(str(run))
        config = checkpoint.read_config(folder)
        checkpoint.verify(folder, config)
        assert config["step"] == STEPS
        out[name] = {"rows": rows, "losses": [r["loss_bits"] for r in rows], "run": run,
                     "train": config["train"], "stderr": stderr_by_run[index],
                     "choice": config["data"]["step_choice"],
                     "stdout": (root / f"run-{index}.stdout").read_text()}
    return out


def test_every_option_is_recorded_in_the_checkpoint(runs):
    assert runs["reference"]["train"]["compile"] == "fused"
    assert runs["graph"]["train"]["compile"] == "graph"
    assert runs["eager"]["train"]["compile"] == "eager"
    assert runs["xla"]["train"]["compile"] == "xla"
    assert runs["float32"]["train"]["precision"] == "float32"
    assert runs["bfloat16"]["train"]["precision"] == "mixed_bfloat16"
    assert runs["clip"]["train"]["clip_norm"] == TINY_CLIP
    assert runs["reference"]["train"]["validation_windows"] == VAL_WINDOWS
    assert "; eager, float32; new run" in runs["eager"]["stdout"]


def test_auto_compile_and_precision_of_a_short_run_take_the_rule_and_say_why(runs):
    # 3 steps are too few to time candidates: the fused kernels, float32 on a CPU, with the
    # reason in the checkpoint and the log.
    choice = runs["reference"]["choice"]
    assert (choice["compile"], choice["precision"]) == ("fused", "float32")
    assert choice["reason"].startswith(f"{STEPS} step(s) are too few to repay timing")
    assert choice["seconds"] == {}
    assert f"training step: fused, float32: {choice['reason']}" in runs["reference"]["stdout"]
    assert runs["xla"]["choice"]["precision"] == "float32"


def test_compile_eager_graph_and_xla_train_like_the_fused_kernels(runs):
    reference = runs["reference"]["losses"]
    assert runs["eager"]["losses"] == pytest.approx(reference, rel=1e-5)
    assert runs["graph"]["losses"] == pytest.approx(reference, rel=1e-5)
    assert runs["xla"]["losses"] == pytest.approx(reference, rel=1e-4)
    held = runs["reference"]["rows"][-1]["validation_bits"]
    assert runs["eager"]["rows"][-1]["validation_bits"] == pytest.approx(held, rel=1e-5)
    assert runs["graph"]["rows"][-1]["validation_bits"] == pytest.approx(held, rel=1e-5)
    assert runs["xla"]["rows"][-1]["validation_bits"] == pytest.approx(held, rel=1e-4)


def test_compile_xla_really_compiles_with_xla(runs):
    assert "Compiled cluster using XLA" in runs["xla"]["stderr"]
    assert not any("Compiled cluster using XLA" in runs[name]["stderr"]
                   for name in RUNS if name != "xla")


def _float64_loss_bits(run, step, dataset) -> float:
    """Step ``step + 1``'s training loss recomputed in float64 by the queue-based reference:
    checkpoint ``step``'s weights on the batch of that step, drawn again by the sampler."""
    from rainforest.checkpoint import read_weights
    from rainforest.dataset import Dataset
    from rainforest.model_config import PRESETS, receptive_field
    from rainforest.sampling import WindowSampler, rank_share, split_songs

    config = PRESETS["tiny"]
    folder = checkpoint.list_checkpoints(str(run))[step - 1]
    weights = read_weights(os.path.join(folder, checkpoint.WEIGHTS_NAME), config)
    data = Dataset(str(dataset))
    songs, _ = split_songs(data.songs, validation_fraction=0.34)  # as TINY_TRAINING says
    receptive = receptive_field(config)
    sampler = WindowSampler(data, rank_share(songs, rank=0, size=1), window=receptive + 256,
                            target_length=256, batch_size=4, seed=0, rank=0)
    windows, _ = sampler.batch(step)
    nats = []
    for window in windows:
        logits = queue_wavenet_logits(weights, config.dilations, window[:-1])
        log_p = logits - logits.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        nats.append(-log_p[np.arange(256), window[receptive:]])
    return float(np.mean(nats) / np.log(2.0))


@pytest.mark.parametrize("step", [1, 2])
def test_compile_eager_graph_and_xla_compute_the_float64_loss(runs, step, periodic_dataset):
    for name in ("eager", "graph", "xla"):
        exact = _float64_loss_bits(runs[name]["run"], step, periodic_dataset)
        assert runs[name]["losses"][step] == pytest.approx(exact, rel=1e-6), name


@pytest.mark.parametrize("step", [1, 2])
def test_precision_float32_computes_in_float32_as_auto_does_on_a_cpu(runs, step,
                                                                     periodic_dataset):
    for name in ("float32", "reference"):
        exact = _float64_loss_bits(runs[name]["run"], step, periodic_dataset)
        assert runs[name]["losses"][step] == pytest.approx(exact, rel=1e-6), name
    assert runs["float32"]["losses"] == runs["reference"]["losses"]  # the very same numbers


@pytest.mark.parametrize("step", [1, 2])
def test_precision_mixed_bfloat16_computes_in_bfloat16(runs, step, periodic_dataset):
    # bfloat16 keeps 8 bits of mantissa: near the float64 loss, but not as near as float32
    # (about 6e-6 against 1e-7 here).
    exact = _float64_loss_bits(runs["bfloat16"]["run"], step, periodic_dataset)
    error = abs(runs["bfloat16"]["losses"][step] / exact - 1)
    assert 1e-6 < error < 1e-2
    assert runs["bfloat16"]["losses"][step] != runs["reference"]["losses"][step]
    weights = checkpoint_weights(checkpoint.latest(str(runs["bfloat16"]["run"])))
    assert {a.dtype for a in weights.values() if a.ndim} == {np.dtype("float32")}


def _dense_update(run, step) -> float:
    """The largest change of a residual block's weight from checkpoint ``step`` to ``step + 1``.

    Only the blocks' (dense) weights: the input lookup tables get sparse gradients, for which
    Keras's Adam can move a row by more than the learning rate.
    """
    folders = checkpoint.list_checkpoints(str(run))
    before, after = (checkpoint_weights(folders[step - 1]), checkpoint_weights(folders[step]))
    return max(float(np.max(np.abs(after[k] - before[k]))) for k in before
               if k.startswith("model.weights.h5:blocks/"))


def test_clip_norm_clips_the_update_and_logs_the_norm_before_clipping(runs):
    reference, clipped = runs["reference"]["rows"], runs["clip"]["rows"]
    # Step 1 starts from the same weights: same loss and the same (unclipped) gradient norm,
    # far above the clip.
    assert clipped[0]["loss_bits"] == reference[0]["loss_bits"]
    assert clipped[0]["grad_norm"] == pytest.approx(reference[0]["grad_norm"], rel=1e-6)
    assert clipped[0]["grad_norm"] > 1000 * TINY_CLIP
    # A gradient clipped to 1e-6 is far below Adam's epsilon, so the weights hardly move.
    moved = _dense_update(runs["reference"]["run"], 1)
    assert moved > 1e-4
    assert _dense_update(runs["clip"]["run"], 1) < moved / 10


def test_lr_schedule_cosine_decays_from_the_rate_to_a_tenth_at_the_last_step(runs):
    rate = float(TINY_TRAINING[TINY_TRAINING.index("--lr") + 1])
    # metrics.jsonl logs, for step s, the rate of update s - 1 (counted from 0).
    expected = [rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / (STEPS - 1))))
                for s in range(STEPS)]
    assert [r["learning_rate"] for r in runs["cosine"]["rows"]] == pytest.approx(expected)
    assert expected[-1] == pytest.approx(rate / 10)
    assert runs["cosine"]["train"]["lr_schedule"] == "cosine"
    assert runs["reference"]["train"]["lr_schedule"] == "constant"
    assert [r["learning_rate"] for r in runs["reference"]["rows"]] == pytest.approx([rate] * STEPS)


def test_val_windows_sets_the_number_of_held_out_windows(runs, periodic_dataset):
    from rainforest.dataset import Dataset
    from rainforest.model_config import PRESETS, receptive_field
    from rainforest.sampling import split_songs, validation_windows

    data = Dataset(str(periodic_dataset))
    _, held_out = split_songs(data.songs, validation_fraction=0.34)
    receptive = receptive_field(PRESETS["tiny"])

    def unigram_bits(count):
        windows, _ = validation_windows(data, held_out, window=receptive + 256, count=count,
                                        rank=0, size=1)
        assert windows.shape[0] == count
        counts = np.bincount(windows[:, receptive:].ravel(), minlength=256)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())

    logged = runs["reference"]["rows"][-1]["unigram_bits"]
    assert logged == pytest.approx(unigram_bits(VAL_WINDOWS), rel=1e-9)
    assert abs(unigram_bits(VAL_WINDOWS) - unigram_bits(64)) > 1e-3  # the default differs
