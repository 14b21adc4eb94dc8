"""Training as one process: data order, learning, checkpoints, resume, SIGTERM, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import NO_TRIAL, RAINFOREST, TINY_TRAINING, checkpoint_weights, run_cli
from rainforest import checkpoint, storage
from rainforest.config import AudioConfig
from rainforest.dataset import Dataset, Song
from rainforest.errors import CheckpointError, ParameterError
from rainforest.kernels import random_window_starts
from rainforest.model_config import PRESETS
from rainforest.sampling import (
    WindowSampler,
    _derive_seed,
    rank_share,
    split_songs,
    validation_windows,
)
from rainforest.train import TrainingState

# --- the input pipeline --------------------------------------------------------------------


def _songs(lengths):
    return [Song(f"id{i:03d}", f"s{i}", "part-00000", 0, n, None) for i, n in enumerate(lengths)]


def test_split_is_stable_and_by_song():
    songs = _songs(range(100, 140))
    train, held = split_songs(songs, validation_fraction=0.1)
    assert len(held) == 4 and len(train) == 36
    again = split_songs(list(reversed(songs)), validation_fraction=0.1)
    assert {s.id for s in again[1]} == {s.id for s in held}
    assert not {s.id for s in train} & {s.id for s in held}
    with pytest.raises(ParameterError, match="at least 2"):
        split_songs(songs[:1], validation_fraction=0.1)
    assert split_songs(songs[:1], validation_fraction=0.0) == (songs[:1], [])


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_rank_shares_are_disjoint_complete_and_balanced(size):
    songs = _songs(np.random.default_rng(size).integers(100, 10_000, 23))
    shares = [rank_share(songs, rank=r, size=size) for r in range(size)]
    ids = [s.id for share in shares for s in share]
    assert sorted(ids) == sorted(s.id for s in songs)
    totals = [sum(s.length for s in share) for share in shares]
    assert max(totals) - min(totals) <= max(s.length for s in songs)
    with pytest.raises(ParameterError, match="ranks"):
        rank_share(songs[:2], rank=0, size=3)


def test_window_sampler_is_a_function_of_the_step(periodic_dataset):
    dataset = Dataset(str(periodic_dataset))
    window, batch = 300, 4
    sampler = WindowSampler(dataset, dataset.songs, window=window, target_length=100,
                            batch_size=batch, seed=7, rank=0)
    first, labels = sampler.batch(0)
    assert first.shape == (batch, window) and first.dtype == np.uint8
    np.testing.assert_array_equal(sampler.batch(0)[0], first)
    assert not np.array_equal(sampler.batch(1)[0], first)
    # Steps 0 and 1 are the first 2 * batch draws of one stream: the data position is the step.
    starts = random_window_starts(sampler.virtual_offsets, sampler.lengths, window=window,
                                  count=2 * batch, seed=_derive_seed(7, 0, 0))
    which = np.searchsorted(sampler.virtual_offsets, starts, side="right") - 1
    expected = np.stack([
        dataset.song_codes(sampler.songs[w])[s - sampler.virtual_offsets[w]:][:window]
        for w, s in zip(which, starts, strict=True)])
    np.testing.assert_array_equal(np.concatenate([first, sampler.batch(1)[0]]), expected)
    # Another rank (or seed) gets another stream.
    other = WindowSampler(dataset, dataset.songs, window=window, target_length=100,
                          batch_size=batch, seed=7, rank=1)
    assert not np.array_equal(other.batch(0)[0], first)
    # tf.data yields the same batches, from any first step.
    from_tf = [w.numpy() for w, _ in sampler.tf_dataset(1, 3)]
    np.testing.assert_array_equal(from_tf[0], sampler.batch(1)[0])
    np.testing.assert_array_equal(from_tf[1], sampler.batch(2)[0])


def test_windows_never_cross_a_song_boundary(periodic_dataset):
    dataset = Dataset(str(periodic_dataset))
    sampler = WindowSampler(dataset, dataset.songs, window=5000, target_length=100,
                            batch_size=64, seed=3, rank=0)
    songs = [bytes(dataset.song_codes(s)) for s in dataset.songs]
    for row in sampler.batch(0)[0]:
        assert any(bytes(row) in song for song in songs)


def test_validation_windows_are_dealt_to_ranks(periodic_dataset):
    dataset = Dataset(str(periodic_dataset))
    whole, _ = validation_windows(dataset, dataset.songs, window=512, count=20, rank=0, size=1)
    parts = [validation_windows(dataset, dataset.songs, window=512, count=20, rank=r,
                                size=3)[0] for r in range(3)]
    assert whole.shape == (20, 512)
    assert sum(p.shape[0] for p in parts) == 20
    together = sorted(bytes(r) for p in parts for r in p)
    assert together == sorted(bytes(r) for r in whole)
    with pytest.raises(ParameterError, match="longer than every held-out song"):
        validation_windows(dataset, dataset.songs, window=10**7, count=4, rank=0, size=1)


def test_sampler_refuses_a_window_longer_than_every_song(periodic_dataset):
    dataset = Dataset(str(periodic_dataset))
    with pytest.raises(ParameterError, match="longer than every song"):
        WindowSampler(dataset, dataset.songs, window=10**7, target_length=10,
                      batch_size=1, seed=0, rank=0)


# --- the training command ------------------------------------------------------------------


def _train(dataset, run, *extra, check=True):
    return run_cli("train", dataset, "--run", run, *TINY_TRAINING, *extra, check=check)


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_learns_periodic_songs_far_below_unigram(periodic_dataset, tmp_path):
    run = tmp_path / "run"
    started = time.time()
    result = _train(periodic_dataset, run, "--steps", "200", "--val-every", "50",
                    "--checkpoint-every", "100")
    ended = time.time()
    held = [m for m in _metrics(run) if "validation_bits" in m]
    assert [m["step"] for m in held] == [50, 100, 150, 200]
    final = held[-1]
    assert final["unigram_bits"] > 4.0
    assert final["validation_bits"] < final["unigram_bits"] - 3.0, final
    assert held[-1]["validation_bits"] < held[0]["validation_bits"]
    assert "held-out" in result.stdout and "done: step 200" in result.stdout
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    names = {k for m in _metrics(run) for k in m}
    assert {"loss_bits", "learning_rate", "samples_per_second",
            "samples_per_second_per_rank", "grad_norm"} <= names
    # Each line's wall-clock time: within the command's, in step order.
    times = [m["time"] for m in _metrics(run)]
    assert started < times[0] and times[-1] < ended and times == sorted(times)


@pytest.mark.slow
def test_checkpoints_are_atomic_plain_arrays_and_pruned(periodic_dataset, tmp_path):
    run = tmp_path / "run"
    _train(periodic_dataset, run, "--steps", "12", "--checkpoint-every", "3", "--keep", "2",
           "--val-every", "6", "--condition")
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [
        "latest", "step-000000009", "step-000000012"]
    assert (root / "latest").read_text().strip() == "step-000000012"
    folder = checkpoint.latest(str(run))
    config = checkpoint.read_config(folder)
    checkpoint.verify(folder, config)
    assert config["step"] == 12 and config["data"]["next_step"] == 12
    assert config["model"] == PRESETS["tiny"].to_dict() | {"labels": ["high", "low"]}
    assert config["audio"]["sample_rate"] == 16000 and config["train"]["steps"] == 12
    # No pickle anywhere: HDF5 holding numbers only, and JSON.
    for path in Path(folder).iterdir():
        if path.suffix == ".h5":
            with h5py.File(path, "r") as handle:
                kinds: list[str] = []

                def collect(_, item, kinds=kinds):
                    if isinstance(item, h5py.Dataset):
                        kinds.append(item.dtype.kind)

                handle.visititems(collect)
                assert kinds and set(kinds) <= set("biuf")
        assert b"\x80\x04\x95" not in path.read_bytes()  # the pickle protocol 4 opcode
    # The weights load into a fresh Keras model of the saved config, and are then exactly the
    # checkpoint's arrays (read with h5py alone), which 12 steps moved from the initial ones.
    from rainforest.checkpoint import read_weights
    from rainforest.model_config import ModelConfig
    from rainforest.network import build_model

    model_config = ModelConfig.from_dict(config["model"])
    model = build_model(model_config)

    def by_name():
        return {v.path.removeprefix(model.name + "/"): np.array(v.numpy())
                for v in model.weights}

    initial = by_name()
    model.load_weights(str(Path(folder) / checkpoint.WEIGHTS_NAME))
    loaded = by_name()
    saved = read_weights(str(Path(folder) / checkpoint.WEIGHTS_NAME), model_config)
    assert loaded.keys() == saved.keys() and len(saved) > 20
    for name, array in saved.items():
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)
    assert sum(not np.array_equal(initial[n], loaded[n]) for n in saved) > len(saved) // 2


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(periodic_dataset, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ("--val-every", "8", "--checkpoint-every", "8")
    _train(periodic_dataset, whole, "--steps", "16", *common)
    _train(periodic_dataset, split, "--steps", "8", *common)
    resumed = _train(periodic_dataset, split, "--steps", "16", "--resume", *common)
    assert "resuming" in resumed.stdout
    # The resume keeps the training step the run was started with (chosen for 8 steps).
    choices = [checkpoint.read_config(checkpoint.latest(str(run)))["data"]["step_choice"]
               for run in (whole, split)]
    assert [c["reason"].split(" are too few")[0] for c in choices] == ["16 step(s)", "8 step(s)"]
    assert [(c["compile"], c["precision"]) for c in choices] == [("fused", "float32")] * 2
    assert "training step:" not in resumed.stdout
    a = checkpoint_weights(checkpoint.latest(str(whole)))
    b = checkpoint_weights(checkpoint.latest(str(split)))
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-7, err_msg=name)
    losses = {m["step"]: m["loss_bits"] for m in _metrics(whole)}
    for row in _metrics(split):
        assert row["loss_bits"] == pytest.approx(losses[row["step"]], rel=1e-5)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(periodic_dataset, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [*RAINFOREST, "train", str(periodic_dataset), "--run", str(run), *TINY_TRAINING,
         *NO_TRIAL, "--steps", "100000", "--checkpoint-every", "100000", "--val-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "stopped by SIGTERM" in out
    folder = checkpoint.latest(str(run))
    config = checkpoint.read_config(folder)
    checkpoint.verify(folder, config)
    assert 5 <= config["step"] < 100000
    assert config["step"] == config["data"]["next_step"]
    assert not [p for p in (run / "checkpoints").iterdir() if storage.TEMP_MARKER in p.name]
    resumed = _train(periodic_dataset, run, "--resume", "--steps", str(config["step"] + 2),
                     "--val-every", "0")
    assert f"done: step {config['step'] + 2}" in resumed.stdout


@pytest.fixture(scope="module")
def trained_run(periodic_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    _train(periodic_dataset, run, "--steps", "4", "--val-every", "0")
    return run


def _copy(run, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def test_training_state_is_what_the_checkpoint_records(trained_run):
    folder = checkpoint.latest(str(trained_run))
    saved = checkpoint.read_config(folder)
    state = TrainingState.from_checkpoint(folder)
    assert state.step == saved["step"] == saved["data"]["next_step"] == 4
    assert state.model.to_dict() == saved["model"] and state.train.to_dict() == saved["train"]
    assert state.resumed_from == folder
    document = state.to_document(audio=AudioConfig.from_dict(saved["audio"]),
                                 metrics=saved["metrics"], size=saved["data"]["ranks"])
    assert document == {k: v for k, v in saved.items()
                        if k not in ("format", "version", "step", "files")}


@pytest.mark.slow
def test_resume_warns_about_settings_it_does_not_take(periodic_dataset, trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    changed = _train(periodic_dataset, run, "--resume", "--steps", "6", "--val-every", "0",
                     "--lr", "0.05", "--config", "default")
    assert "warning: --resume keeps the settings" in changed.stdout
    assert "learning_rate=0.05 (the run has 0.003)" in changed.stdout
    assert "residual_channels=32 (the run has 16)" in changed.stdout
    saved = checkpoint.read_config(checkpoint.latest(str(run)))
    assert saved["step"] == 6 and saved["train"]["learning_rate"] == 3e-3
    assert saved["model"] == PRESETS["tiny"].to_dict()
    same = _train(periodic_dataset, run, "--resume", "--steps", "7", "--val-every", "0")
    assert "warning" not in same.stdout and "done: step 7" in same.stdout


def test_a_checkpoint_published_before_its_pointer_is_found_and_resumed(periodic_dataset,
                                                                        trained_run, tmp_path):
    """A writer stopped between renaming its first checkpoint into place and writing the
    `latest` pointer leaves a whole checkpoint: resume takes it."""
    run = _copy(trained_run, tmp_path)
    (run / "checkpoints" / checkpoint.LATEST).unlink()
    assert checkpoint.latest(str(run)) == str(run / "checkpoints" / checkpoint.step_name(4))
    resumed = _train(periodic_dataset, run, "--resume", "--steps", "5", "--val-every", "0")
    assert "resuming" in resumed.stdout and "done: step 5" in resumed.stdout


def test_damaged_checkpoint_is_a_clear_error(periodic_dataset, trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    weights = Path(checkpoint.latest(str(run))) / checkpoint.WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = _train(periodic_dataset, run, "--resume", "--steps", "8", check=False)
    assert result.returncode == 1
    assert "damaged" in result.stderr and "sha256" in result.stderr


def test_foreign_or_unknown_checkpoints_are_refused(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    folder = Path(checkpoint.latest(str(run)))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        checkpoint.read_config(str(folder))
    (folder / "config.json").write_text(json.dumps({"format": "keras", "version": 1}))
    with pytest.raises(CheckpointError, match="not a rainforest file"):
        checkpoint.read_config(str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="not a rainforest checkpoint"):
        checkpoint.read_config(str(folder))
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        checkpoint.latest(str(tmp_path))
    (folder / checkpoint.OPTIMIZER_NAME).write_bytes(b"\x80\x04\x95 not hdf5")
    with pytest.raises(CheckpointError, match="not a readable HDF5"):
        checkpoint.load_arrays(str(folder / checkpoint.OPTIMIZER_NAME))


def test_a_checkpoint_of_another_shape_is_refused(periodic_dataset, trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    folder = Path(checkpoint.latest(str(run)))
    config = json.loads((folder / "config.json").read_text())
    config["model"]["skip_channels"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    result = _train(periodic_dataset, run, "--resume", "--steps", "8", check=False)
    assert result.returncode == 1
    assert "sha256" in result.stderr or "cannot load the weights" in result.stderr


def _bad_version(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 42}))
    return copy, "format version 42"


def _foreign(dataset, tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"format": "something-else"}')
    return tmp_path / "foreign", "not a rainforest file"


def _missing(dataset, tmp_path):
    return tmp_path / "nowhere", "not a rainforest dataset"


@pytest.mark.parametrize("make", [_missing, _foreign, _bad_version])
def test_bad_datasets_stop_before_any_work(make, periodic_dataset, tmp_path):
    dataset, message = make(periodic_dataset, tmp_path)
    result = _train(dataset, tmp_path / "run", "--steps", "2", check=False)
    assert result.returncode == 1 and message in result.stderr
    assert not (tmp_path / "run").exists()


def _classes_config(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(PRESETS["tiny"].to_dict() | {"classes": 128}))
    return ["--config", str(path)], '"classes": 256'


@pytest.mark.parametrize("extra, message", [
    (["--target-length", "100000000"], "longer than every song"),
    (["--val-fraction", "1.5"], "validation_fraction must be in [0, 1)"),
    (["--config", "huge"], "neither a preset"),
    (["--steps", "0"], "steps must be >= 1"),
    (_classes_config, '"classes": 256'),
])
def test_bad_options_stop_before_any_work(extra, message, periodic_dataset, tmp_path):
    if callable(extra):
        extra, message = extra(tmp_path)
    result = _train(periodic_dataset, tmp_path / "run", *extra, check=False)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_condition_needs_labels_and_runs_need_resume(tmp_path, trained_run, periodic_dataset):
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(periodic_dataset, unlabelled)
    manifest = json.loads((unlabelled / "manifest.json").read_text())
    for song in manifest["songs"]:
        song["label"] = None
    (unlabelled / "manifest.json").write_text(json.dumps(manifest))
    result = _train(unlabelled, tmp_path / "run", "--condition", check=False)
    assert result.returncode == 1 and "--labels parent" in result.stderr
    again = _train(periodic_dataset, _copy(trained_run, tmp_path), "--steps", "8",
                   check=False)
    assert again.returncode == 1 and "pass --resume" in again.stderr
    done = _train(periodic_dataset, _copy(trained_run, tmp_path / "x"), "--resume",
                  "--steps", "4", check=False)
    assert done.returncode == 1 and "already at step 4" in done.stderr


def test_a_killed_writers_staging_folder_is_removed_and_damage_is_kept(periodic_dataset,
                                                                     trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    root = run / "checkpoints"
    staging = root / f".step-000000005{storage.TEMP_MARKER}0123456789ab"
    staging.mkdir()
    (staging / checkpoint.WEIGHTS_NAME).write_bytes(b"half")
    damaged = root / "step-000000099"  # no config.json: not ours to delete, not a checkpoint
    damaged.mkdir()
    (damaged / checkpoint.WEIGHTS_NAME).write_bytes(b"someone's")
    assert [Path(f).name for f in checkpoint.list_checkpoints(str(run))] == ["step-000000004"]
    resumed = _train(periodic_dataset, run, "--resume", "--steps", "5", "--val-every", "0")
    assert "done: step 5" in resumed.stdout
    assert not staging.exists()
    assert (damaged / checkpoint.WEIGHTS_NAME).read_bytes() == b"someone's"
