"""Shared fixtures: small song folders, the reference pipeline, and process helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

import audiogen
import reference

sys.path.insert(0, os.path.dirname(__file__))

RAINFOREST = [sys.executable, "-m", "rainforest.cli"]


@pytest.fixture
def song_dir(tmp_path: Path) -> Path:
    """Six good songs of mixed formats, rates and channel counts, with silence to trim."""
    folder = tmp_path / "songs"
    layouts = [
        ("a.wav", 44100, 2), ("b.flac", 22050, 1), ("c.ogg", 48000, 2),
        ("d.mp3", 44100, 2), ("sub/e.wav", 16000, 6), ("sub/f.flac", 96000, 1),
    ]
    (folder / "sub").mkdir(parents=True)
    for index, (name, rate, channels) in enumerate(layouts):
        audiogen.write_song(folder / name, seconds=1.5 + 0.25 * index, rate=rate,
                            channels=channels, leading_silence=0.3, trailing_silence=0.5,
                            freq=220.0 + 60 * index, seed=index)
    return folder


def reference_codes(path, *, sample_rate=16000, trim_db=40.0, quality="MQ") -> np.ndarray:
    """The slow, obviously-correct pipeline: whole-file decode, mean mix, soxr, encode, trim."""
    frames, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = reference.downmix(frames)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality=quality)
    codes = reference.mulaw_encode(mono)
    threshold = reference.peak_amplitude(codes) * 10 ** (-trim_db / 20)
    start, stop = reference.trim_bounds(codes, threshold)
    return codes[start:stop]


def run_cli(*args, check=True, env=None, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([*RAINFOREST, *map(str, args)], capture_output=True, text=True,
                            env=env, **kwargs)
    if check and result.returncode not in (0, 3):
        raise AssertionError(f"rainforest {args} failed ({result.returncode}):\n{result.stderr}")
    return result


def tree_entries(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ``.tmp-`` leftovers included), relative, as
    ``"file"`` or ``"folder"``: the whole tree, not just its top level."""
    return {p.relative_to(root).as_posix(): "folder" if p.is_dir() else "file"
            for p in root.rglob("*")}


def assert_same_tree(left: Path, right: Path) -> None:
    """Byte-identical folders at every depth: the same relative paths (files and folders) on
    both sides, and the same bytes in every file."""
    left_entries, right_entries = tree_entries(Path(left)), tree_entries(Path(right))
    assert left_entries == right_entries, (
        sorted(left_entries.keys() - right_entries.keys()),
        sorted(right_entries.keys() - left_entries.keys()),
        sorted(k for k in left_entries.keys() & right_entries.keys()
               if left_entries[k] != right_entries[k]))
    files = [name for name, kind in left_entries.items() if kind == "file"]
    assert files, "empty dataset"
    for name in files:
        assert (Path(left) / name).read_bytes() == (Path(right) / name).read_bytes(), name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def periodic_dataset(tmp_path_factory) -> Path:
    """A labelled dataset of six periodic songs (two waveforms), preprocessed for real."""
    from rainforest.preprocess import preprocess

    root = tmp_path_factory.mktemp("periodic")
    audiogen.write_periodic_songs(root / "songs")
    preprocess([str(root / "songs")], str(root / "dataset"), cluster="sync", labels="parent",
               progress=False, log=lambda line: None)
    return root / "dataset"


TINY_TRAINING = ["--config", "tiny", "--batch-size", "4", "--target-length", "256",
                 "--val-fraction", "0.34", "--warmup-steps", "5", "--lr", "3e-3",
                 "--no-progress"]


def checkpoint_weights(folder) -> dict[str, np.ndarray]:
    """Every array in a checkpoint's HDF5 files, by file and path (read with h5py)."""
    import h5py

    arrays = {}
    for name in ("model.weights.h5", "optimizer.h5"):
        with h5py.File(Path(folder) / name, "r") as handle:
            def visit(path, item, name=name):
                if isinstance(item, h5py.Dataset):
                    arrays[f"{name}:{path}"] = item[()]
            handle.visititems(visit)
    return arrays
