"""Shared fixtures: small song folders, the reference pipeline, and process helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

import audiogen
import reference

sys.path.insert(0, os.path.dirname(__file__))

RAINFOREST = [sys.executable, "-m", "rainforest.cli"]

# A shell without job control starts a background command (`pytest &`, `nohup`, some CI
# runners) with SIGINT ignored, and every command a test starts would inherit that and
# ignore the Ctrl-C the signal tests send. Python's own handler is reset to the default on
# exec, so the commands get Ctrl-C as a terminal delivers it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


def run_cli(*args, check=True, expect_failed_songs=False, env=None,
            **kwargs) -> subprocess.CompletedProcess:
    """``rainforest ARGS`` in a subprocess. With ``check`` it must exit 0, or 3 (some songs
    failed, the rest kept) exactly when the test says it ``expect_failed_songs``."""
    result = subprocess.run([*RAINFOREST, *map(str, args)], capture_output=True, text=True,
                            env=env, **kwargs)
    expected = 3 if expect_failed_songs else 0
    if check and result.returncode != expected:
        raise AssertionError(f"rainforest {args} exited {result.returncode}, not {expected}:\n"
                             f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def tree_entries(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ``.tmp-`` leftovers included), relative, as
    ``"file"`` or ``"folder"``: the whole tree, not just its top level."""
    return {p.relative_to(root).as_posix(): "folder" if p.is_dir() else "file"
            for p in root.rglob("*")}


def rank_env() -> dict[str, str]:
    """The environment for Horovod ranks started by a test: this venv's launchers first on
    PATH, OpenMPI allowed to run as root (containers and CI often do), quiet TensorFlow, and
    unbuffered output so a killed rank's last lines are not lost."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


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
#: For runs of 300 steps or more that test something other than the step choice: the step
#: --compile auto's rule takes on a CPU, without the timed trial of every candidate, which
#: costs such a run 20-40 s (tests/test_horovod.py tests the trial).
NO_TRIAL = ["--compile", "fused"]


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


def checkpoint_digest(folder) -> str:
    """Load a checkpoint's weights into a fresh model (every file's sha256 checked); the
    sha256 of what was loaded, as elastic ranks log theirs."""
    from rainforest import checkpoint
    from rainforest.elastic import weights_digest
    from rainforest.network import build_model
    from rainforest.train import TrainingState

    state = TrainingState.from_checkpoint(str(folder))
    model = build_model(state.model, seed=12345)
    model.load_weights(os.path.join(folder, checkpoint.WEIGHTS_NAME))
    return weights_digest(model.weights)


def write_hosts(path: Path, *hosts: str) -> None:
    """A hosts file for launch/discover-hosts.sh: one slot on each host, replaced whole."""
    staging = path.with_suffix(".new")
    staging.write_text("".join(f"{host}:1\n" for host in hosts))
    staging.replace(path)  # the discovery script never reads half a file


# moto's request recorder (tests that check the order of S3 requests) writes here, not into
# the working directory; it is read when moto is first imported.
os.environ.setdefault("MOTO_RECORDER_FILEPATH", os.path.join(
    tempfile.gettempdir(), f"rainforest-moto-recording-{os.getpid()}.jsonl"))

MOTO_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto_endpoint():
    """A real AWS protocol server (moto: S3, EC2) on 127.0.0.1 for a module's tests.

    The environment points boto3, aiobotocore and s3fs, in this process and in the processes
    it starts, at it through ``AWS_ENDPOINT_URL``.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in [*MOTO_ENVIRONMENT, "AWS_ENDPOINT_URL"]}
    os.environ.update(MOTO_ENVIRONMENT, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def aws(moto_endpoint):
    """moto with fresh state: its state is process-wide and outlives a stopped server."""
    import urllib.request

    import s3fs

    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset",
                                                  method="POST"), timeout=30).close()
    s3fs.S3FileSystem.clear_instance_cache()
    return moto_endpoint


def moto_requests(endpoint: str, action) -> list[dict]:
    """The requests moto's server received while ``action()`` ran, in order (its recorder)."""
    import json
    import urllib.request

    def call(name: str, method: str = "POST") -> bytes:
        request = urllib.request.Request(f"{endpoint}/moto-api/recorder/{name}", method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    call("reset-recording")
    call("start-recording")
    try:
        action()
    finally:
        call("stop-recording")
    return [json.loads(line) for line in call("download-recording", "GET").splitlines()]


# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE. The default ("rainforest", what CI runs)
# keeps every property test quick and the same on every run (derandomised, no example
# database); "long" gives each test 100,000 examples, random ones, remembering failures in
# .hypothesis/ (run it with --timeout=0: a test then takes longer than pytest-timeout's 900 s).
# A test that sets its own max_examples or deadline (tests/test_kernels.py: 60 examples, no
# deadline) keeps them under either profile; the default derandomises it too.
from hypothesis import settings as hypothesis_settings  # noqa: E402

hypothesis_settings.register_profile("rainforest", max_examples=500, deadline=None,
                                     derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("long", max_examples=100_000, deadline=None,
                                     print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "rainforest"))
