"""`rainforest generate` options on a run trained for real: --temperature, --threads, and
generation on a machine without TensorFlow."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from conftest import TINY_TRAINING, run_cli
from rainforest import checkpoint
from rainforest.generate import load_network, write_outputs
from rainforest.kernels.fused_loop import generate_codes
from rainforest.kernels.priming import prime_state, stream_gate_bias, stream_seeds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(periodic_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("generate-cli") / "run"
    run_cli("train", periodic_dataset, "--run", run, *TINY_TRAINING, "--steps", "6",
            "--val-every", "0")
    return run


def _generate(run, out, *options):
    run_cli("generate", run, "--out", out, "--no-progress", *options)
    return {path.name: path.read_bytes() for path in sorted(out.glob("stream-*.wav"))}


def test_temperature_zero_is_the_argmax_path_whatever_the_seed(trained_run, tmp_path):
    seconds, rate = 0.25, 16000
    one = _generate(trained_run, tmp_path / "t0-seed1", "--seconds", seconds,
                    "--temperature", "0", "--seed", "1")
    two = _generate(trained_run, tmp_path / "t0-seed2", "--seconds", seconds,
                    "--temperature", "0", "--seed", "2")
    assert list(one) == ["stream-000.wav"] and one == two
    settings = json.loads((tmp_path / "t0-seed1" / "generation.json").read_text())["settings"]
    assert settings["temperature"] == 0.0
    # The argmax path itself: the code of every step is the largest logit of that step.
    source = load_network(str(trained_run))
    network = source.network
    state = prime_state(network, np.empty((1, 0)), gate_bias=stream_gate_bias(network, [0]),
                        seeds=stream_seeds(1, 1))
    codes, logits = generate_codes(network, state, int(seconds * rate), temperature=0.0,
                                   record_logits=True)
    np.testing.assert_array_equal(codes, logits.argmax(axis=2).T)
    expected = write_outputs(codes, source.audio, str(tmp_path / "expected"), plot=False)
    with open(expected[0], "rb") as handle:
        assert handle.read() == one["stream-000.wav"]
    # At temperature 1 the seed does matter, so the equality above is not a given.
    warm = [_generate(trained_run, tmp_path / f"t1-seed{seed}", "--seconds", seconds,
                      "--temperature", "1", "--seed", seed) for seed in (1, 2)]
    assert warm[0] != warm[1] and warm[0] != one


def test_threads_change_nothing_but_the_speed(trained_run, tmp_path):
    """5 streams on 1, 2 and 5 threads (shares of 5; 3 + 2; 1 each): the same files."""
    files = {threads: _generate(trained_run, tmp_path / f"threads-{threads}", "--seconds",
                                "0.2", "--streams", "5", "--seed", "3", "--threads", threads)
             for threads in (1, 2, 5)}
    assert len(files[1]) == 5 and len(set(files[1].values())) == 5
    assert files[2] == files[1]
    assert files[5] == files[1]


# Any import of tensorflow, keras or horovod fails, as on a machine without them; then the
# command line runs as `rainforest ...` would.
WITHOUT_TENSORFLOW = """
import importlib.abc
import sys

BLOCKED = ("tensorflow", "keras", "horovod", "tf_keras")


class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, NoTensorFlow())
from rainforest.cli import main

code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "imported anyway"
sys.exit(code)
"""


def test_generation_works_without_tensorflow(trained_run, tmp_path):
    blocked = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW.replace(
        "from rainforest.cli import main", "import tensorflow")], capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked by the test" in blocked.stderr
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, "generate", str(trained_run), "--seconds",
         "0.2", "--streams", "2", "--seed", "4", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rate = checkpoint.read_config(checkpoint.latest(str(trained_run)))["audio"]["sample_rate"]
    for name in ("stream-000.wav", "stream-001.wav"):
        info = soundfile.info(out / name)
        assert (info.samplerate, info.frames, info.channels) == (rate, round(0.2 * rate), 1)
    # The same files as generation with TensorFlow installed.
    with_tensorflow = _generate(trained_run, tmp_path / "with", "--seconds", "0.2",
                                "--streams", "2", "--seed", "4")
    assert with_tensorflow == {p.name: p.read_bytes() for p in sorted(out.glob("*.wav"))}


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_precision_option_generates_with_those_weights(trained_run, tmp_path, precision):
    # Sampled at temperature 1: over 4000 draws some code lies near a boundary of the
    # inverse CDF, so float32 weights would give other bytes (checked: the test fails then).
    seconds, rate = 0.25, 16000
    made = _generate(trained_run, tmp_path / precision, "--seconds", seconds,
                     "--precision", precision)
    settings = json.loads((tmp_path / precision / "generation.json").read_text())["settings"]
    assert settings["precision"] == precision
    source = load_network(str(trained_run))
    network = source.network.at_precision(precision)
    state = prime_state(network, np.empty((1, 0)), gate_bias=stream_gate_bias(network, [0]),
                        seeds=stream_seeds(0, 1))
    codes = generate_codes(network, state, int(seconds * rate))
    expected = write_outputs(codes, source.audio, str(tmp_path / "expected"), plot=False)
    with open(expected[0], "rb") as handle:
        assert handle.read() == made["stream-000.wav"]
