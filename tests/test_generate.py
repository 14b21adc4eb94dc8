"""Generation: weight export, the fused loop against the full forward pass, priming, the CLI."""

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audiogen import write_periodic_songs, write_random_bytes
from conftest import RAINFOREST, TINY_TRAINING, run_cli
from interrupt import signal_when
from rainforest import checkpoint
from rainforest.checkpoint import read_weights
from rainforest.config import AudioConfig
from rainforest.errors import CheckpointError, ParameterError
from rainforest.generate import is_stream_file, load_network, spectrogram_file, stream_file
from rainforest.kernels.fused_loop import _exp32, _sigmoid32, _tanh32, generate_codes
from rainforest.kernels.priming import (
    forward_logits,
    prime_state,
    silence_code,
    stream_gate_bias,
    stream_seeds,
)
from rainforest.model_config import PRESETS, ModelConfig, weight_layout
from rainforest.network import build_model
from reference import queue_wavenet_logits

CONFIGS = {
    "tiny": PRESETS["tiny"],
    "odd-dilations-conditioned": ModelConfig(
        dilations=(1, 3, 2, 5, 1), residual_channels=8, gate_channels=12, skip_channels=24,
        classes=64, labels=("rock", "folk", "jazz"), condition_channels=4),
    "dilation-1-only": ModelConfig(dilations=(1, 1, 1), residual_channels=8, gate_channels=8,
                                   skip_channels=16, classes=32),
    # The ring of the 64 wraps round more than once in the tests' RF + 10 steps.
    "one-wide-dilation-conditioned": ModelConfig(
        dilations=(1, 64, 2), residual_channels=8, gate_channels=8, skip_channels=16,
        classes=32, labels=("a", "b")),
}


def keras_checkpoint(run: Path, config: ModelConfig, *, seed: int = 0):
    """A real checkpoint of a Keras model with random weights, biases included (Keras starts
    biases at zero, which would hide a misplaced bias)."""
    model = build_model(config, seed=seed)
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.normal(0.0, 0.3, variable.shape).astype("float32"))
    document = {"model": config.to_dict(), "audio": AudioConfig().to_dict()}
    checkpoint.write(str(run), 7, document,
                     lambda folder: model.save_weights(os.path.join(folder,
                                                                    checkpoint.WEIGHTS_NAME)),
                     keep=1)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    config = CONFIGS[request.param]
    run = tmp_path_factory.mktemp(request.param)
    model = keras_checkpoint(run, config, seed=len(request.param))
    return config, model, load_network(str(run)), run


def label_ids(config, streams):
    return [b % len(config.labels) for b in range(streams)] if config.conditioned else [0] * streams


def keras_logits(model, config, codes, ids):
    if config.conditioned:
        return np.asarray(model(codes, np.asarray(ids)))
    return np.asarray(model(codes))


def assert_logits_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-4,
                               atol=2e-4 * float(np.abs(expected).max()))


def test_weight_layout_is_the_keras_models():
    for config in CONFIGS.values():
        model = build_model(config)
        expected = [(f"{owner}/{name}" if owner else name, shape)
                    for owner, entries in weight_layout(config).items()
                    for name, shape in entries]
        actual = [(v.path.removeprefix(model.name + "/"), tuple(v.shape)) for v in model.weights]
        assert sorted(actual) == sorted(expected)
        assert len(actual) == len(expected)


def test_export_reads_every_weight_of_the_checkpoint(exported):
    config, model, source, run = exported
    weights = read_weights(os.path.join(source.folder, checkpoint.WEIGHTS_NAME), config)
    by_path = {v.path.removeprefix(model.name + "/"): np.asarray(v.numpy())
               for v in model.weights}
    assert weights.keys() == by_path.keys()
    for name, array in weights.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, by_path[name], err_msg=name)
    assert source.step == 7 and source.model == config
    assert source.network.receptive_field == 2 + sum(config.dilations)


@pytest.mark.parametrize("streams", [1, 3])
def test_fused_loop_equals_the_full_forward_pass(exported, streams):
    """Teacher-forced: the loop's logits at every step against Keras on the whole sequence,
    for the first RF + 10 steps after priming (every ring wraps at least once)."""
    config, model, source, _ = exported
    network = source.network
    rf = network.receptive_field
    steps = rf + 10
    rng = np.random.default_rng(streams)
    sequence = rng.integers(0, config.classes, size=(streams, rf - 1 + steps))
    ids = label_ids(config, streams)
    gate_bias = stream_gate_bias(network, ids)
    state = prime_state(network, sequence[:, :rf], gate_bias=gate_bias,
                        seeds=stream_seeds(0, streams))
    codes, logits = generate_codes(network, state, steps, forced=sequence[:, rf:],
                                   record_logits=True)
    logits = logits.transpose(1, 0, 2)
    expected = keras_logits(model, config, sequence, ids)
    assert expected.shape == logits.shape == (streams, steps, config.classes)
    assert_logits_close(logits, expected)
    assert_logits_close(forward_logits(network, sequence, gate_bias), expected)
    np.testing.assert_array_equal(codes[:, :-1], sequence[:, rf:])
    # The slow queue-based reference (float64), stream 0.
    weights = read_weights(os.path.join(source.folder, checkpoint.WEIGHTS_NAME), config)
    reference = queue_wavenet_logits(weights, config.dilations, sequence[0],
                                     label_id=ids[0] if config.conditioned else None)
    assert_logits_close(logits[0], reference)


def test_generated_sequence_matches_the_forward_pass(exported):
    """Free-running generation: Keras, fed the codes the loop sampled, gives its logits."""
    config, model, source, _ = exported
    network = source.network
    rf, streams, steps = network.receptive_field, 2, 40
    prime = np.random.default_rng(5).integers(0, config.classes, size=(streams, rf))
    ids = label_ids(config, streams)
    state = prime_state(network, prime, gate_bias=stream_gate_bias(network, ids),
                        seeds=stream_seeds(11, streams))
    codes, logits = generate_codes(network, state, steps, temperature=1.0, record_logits=True)
    sequence = np.concatenate([prime, codes[:, :-1]], axis=1)
    assert_logits_close(logits.transpose(1, 0, 2), keras_logits(model, config, sequence, ids))


def test_priming_equals_feeding_the_prime_sample_by_sample(exported):
    config, _, source, _ = exported
    network = source.network
    streams, steps = 2, 64
    prime = np.random.default_rng(9).integers(0, config.classes,
                                              size=(streams, network.receptive_field + 7))
    gate_bias = stream_gate_bias(network, label_ids(config, streams))
    seeds = stream_seeds(3, streams)
    batched = prime_state(network, prime, gate_bias=gate_bias, seeds=seeds)
    one_by_one = prime_state(network, np.empty((streams, 0)), gate_bias=gate_bias, seeds=seeds)
    fed = generate_codes(network, one_by_one, prime.shape[1], forced=prime)
    np.testing.assert_array_equal(fed, prime)
    np.testing.assert_array_equal(batched.last_codes, one_by_one.last_codes)
    codes_a, logits_a = generate_codes(network, batched, steps, record_logits=True)
    codes_b, logits_b = generate_codes(network, one_by_one, steps, record_logits=True)
    assert_logits_close(logits_a, logits_b)
    np.testing.assert_array_equal(codes_a, codes_b)


def test_a_short_prime_is_padded_with_silence(exported):
    config, _, source, _ = exported
    network = source.network
    gate_bias = stream_gate_bias(network, label_ids(config, 1))
    short = np.array([[3, 1, 4]])
    silence = np.full((1, network.receptive_field), silence_code(config.classes))
    padded = np.concatenate([silence, short], axis=1)
    a = prime_state(network, short % config.classes, gate_bias=gate_bias, seeds=[0])
    b = prime_state(network, padded % config.classes, gate_bias=gate_bias, seeds=[0])
    np.testing.assert_array_equal(generate_codes(network, a, 50), generate_codes(network, b, 50))


@pytest.fixture(scope="module")
def tiny_network(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny-run")
    keras_checkpoint(run, PRESETS["tiny"], seed=1)
    return load_network(str(run)).network


def fresh_state(network, streams, seed):
    return prime_state(network, np.empty((streams, 0)),
                       gate_bias=stream_gate_bias(network, [0] * streams),
                       seeds=stream_seeds(seed, streams))


def test_seeded_runs_repeat_and_streams_differ(tiny_network):
    first = generate_codes(tiny_network, fresh_state(tiny_network, 4, seed=7), 400)
    again = generate_codes(tiny_network, fresh_state(tiny_network, 4, seed=7), 400)
    other = generate_codes(tiny_network, fresh_state(tiny_network, 4, seed=8), 400)
    np.testing.assert_array_equal(first, again)
    assert len({row.tobytes() for row in first}) == 4
    assert (first != other).mean() > 0.5


def test_chained_calls_equal_one_call(tiny_network):
    whole = generate_codes(tiny_network, fresh_state(tiny_network, 2, seed=1), 300)
    state = fresh_state(tiny_network, 2, seed=1)
    parts = [generate_codes(tiny_network, state, n) for n in (1, 99, 200)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


def test_temperature_zero_is_the_argmax_path(tiny_network):
    codes, logits = generate_codes(tiny_network, fresh_state(tiny_network, 3, seed=0), 300,
                                   temperature=0.0, record_logits=True)
    np.testing.assert_array_equal(codes, logits.argmax(axis=2).T)
    cold = generate_codes(tiny_network, fresh_state(tiny_network, 3, seed=99), 300,
                          temperature=1e-3)
    np.testing.assert_array_equal(cold, codes)


def test_sampling_follows_the_softmax(tiny_network):
    """One step of 20,000 streams from one state: the histogram of the drawn codes against
    softmax(logits / T), for two temperatures."""
    streams = 20000
    for temperature in (1.0, 0.5):
        state = fresh_state(tiny_network, streams, seed=4)
        codes, logits = generate_codes(tiny_network, state, 1, temperature=temperature,
                                       record_logits=True)
        scaled = logits[0, 0].astype(np.float64) / temperature
        expected = np.exp(scaled - scaled.max())
        expected /= expected.sum()
        observed = np.bincount(codes[:, 0], minlength=expected.size) / streams
        assert 0.5 * np.abs(observed - expected).sum() < 0.03


def test_fast_activations_are_accurate():
    x = np.linspace(-80, 80, 200001).astype(np.float32)
    exp = np.array([_exp32(v) for v in x[::50]])
    np.testing.assert_allclose(exp, np.exp(x[::50].astype(np.float64)), rtol=5e-7)
    small = np.linspace(-12, 12, 4001).astype(np.float32)
    tanh = np.array([_tanh32(v) for v in small])
    sigmoid = np.array([_sigmoid32(v) for v in small])
    assert np.abs(tanh - np.tanh(small.astype(np.float64))).max() < 3e-7
    assert np.abs(sigmoid - 1 / (1 + np.exp(-small.astype(np.float64)))).max() < 2e-7
    assert _exp32(np.float32(-200.0)) < 1e-37 and np.isfinite(_exp32(np.float32(200.0)))


def test_generate_codes_checks_its_input(tiny_network):
    state = fresh_state(tiny_network, 2, seed=0)
    with pytest.raises(ParameterError, match="temperature"):
        generate_codes(tiny_network, state, 5, temperature=-1)
    with pytest.raises(ParameterError, match="forced"):
        generate_codes(tiny_network, state, 5, forced=np.zeros((3, 2)))
    with pytest.raises(ParameterError, match="forced codes"):
        generate_codes(tiny_network, state, 5, forced=np.full((2, 2), 999))
    with pytest.raises(ParameterError, match="FusedNetwork"):
        generate_codes(None, state, 5)


def test_export_refuses_a_mismatched_or_config_less_checkpoint(tmp_path):
    keras_checkpoint(tmp_path / "run", PRESETS["tiny"])
    folder = Path(checkpoint.latest(str(tmp_path / "run")))
    document = json.loads((folder / "config.json").read_text())
    document["model"]["residual_channels"] = 24
    (folder / "config.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="implies"):
        load_network(str(tmp_path / "run"))
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_network(str(tmp_path / "run"))


# --- the command line, on a run trained for real by `rainforest train` -----------------------


def test_stream_file_names_are_recognised_and_nothing_else():
    names = [stream_file(stream) for stream in (0, 7, 999, 1000)]
    assert names[:2] == ["stream-000.wav", "stream-007.wav"] and names[3] == "stream-1000.wav"
    assert all(map(is_stream_file, names))
    assert not any(map(is_stream_file, [
        "stream-00.wav", ".stream-000.wav", "stream-000.wav.tmp", "stream-000.png",
        "../stream-000.wav", "x/stream-000.wav", "stream-000.wav\n", "song.wav"]))
    assert spectrogram_file("stream-000.wav") == "stream-000.png"
    assert spectrogram_file("/out/stream-001.wav") == "/out/stream-001.png"


@pytest.fixture(scope="module")
def trained_conditioned_run(periodic_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("generate") / "run"
    run_cli("train", periodic_dataset, "--run", run, *TINY_TRAINING, "--steps", "6",
            "--val-every", "0", "--condition")
    return run


def labels_of(run):
    return checkpoint.read_config(checkpoint.latest(str(run)))["model"]["labels"]


@pytest.mark.slow
def test_cli_writes_wavs_of_the_right_length_and_rate(trained_conditioned_run, tmp_path):
    label = labels_of(trained_conditioned_run)[1]
    out = tmp_path / "out"
    result = run_cli("generate", trained_conditioned_run, "--seconds", "0.3", "--streams", "3",
                     "--threads", "2", "--label", label, "--seed", "5", "--out", out,
                     "--no-progress")
    assert "3 x 0.30 s" in result.stdout
    rate = checkpoint.read_config(checkpoint.latest(str(trained_conditioned_run)))["audio"][
        "sample_rate"]
    wavs = sorted(out.glob("*.wav"))
    assert [w.name for w in wavs] == ["stream-000.wav", "stream-001.wav", "stream-002.wav"]
    for wav in wavs:
        info = soundfile.info(wav)
        assert (info.samplerate, info.frames, info.channels, info.subtype) == (
            rate, round(0.3 * rate), 1, "PCM_16")
        assert wav.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    audio = [soundfile.read(w)[0] for w in wavs]
    assert not np.array_equal(audio[0], audio[1])
    summary = json.loads((out / "generation.json").read_text())
    assert summary["settings"]["label"] == label and not summary["interrupted"]
    # The same seed and threads give the same songs.
    again = tmp_path / "again"
    run_cli("generate", trained_conditioned_run, "--seconds", "0.3", "--streams", "3",
            "--threads", "2", "--label", label, "--seed", "5", "--out", again, "--no-progress")
    for wav in wavs:
        np.testing.assert_array_equal(soundfile.read(again / wav.name)[0],
                                      soundfile.read(wav)[0])


@pytest.mark.slow
def test_cli_continues_a_prime_song(trained_conditioned_run, tmp_path):
    song = write_periodic_songs(tmp_path / "prime", songs=1, seconds=1.0)[0]
    out = tmp_path / "out"
    label = labels_of(trained_conditioned_run)[0]
    run_cli("generate", trained_conditioned_run, "--seconds", "0.2", "--prime", song,
            "--label", label, "--out", out, "--no-progress")
    assert soundfile.info(out / "stream-000.wav").frames == 3200
    assert json.loads((out / "generation.json").read_text())["settings"]["prime"] == str(song)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown label", "missing label", "bad prime",
                                  "no config", "no checkpoint"])
def test_cli_bad_input_is_a_clear_error(case, trained_conditioned_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_conditioned_run, run)
    label = labels_of(run)[0]
    args = ["--label", label]
    expected = {"unknown label": "unknown --label 'polka'", "missing label": "pass --label",
                "bad prime": "cannot be decoded", "no config": "no config.json",
                "no checkpoint": "has no checkpoint yet"}[case]
    if case == "unknown label":
        args = ["--label", "polka"]
    elif case == "missing label":
        args = []
    elif case == "bad prime":
        args += ["--prime", write_random_bytes(tmp_path / "broken.mp3")]
    elif case == "no config":
        (Path(checkpoint.latest(str(run))) / "config.json").unlink()
    else:
        shutil.rmtree(run / "checkpoints")
    out = tmp_path / "out"
    result = run_cli("generate", run, "--seconds", "0.1", "--out", out, "--no-progress",
                     *args, check=False)
    assert result.returncode == 1
    assert expected in result.stderr
    assert not out.exists() or not list(out.glob("*.wav"))


def _seconds_shown(stderr: bytes) -> float:
    """The audio the progress bar last showed as written (its renders end in ``\\r``)."""
    shown = re.findall(rb"([0-9.]+)/[0-9.]+ s of audio", stderr)
    return float(shown[-1]) if shown else 0.0


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_keeps_what_was_generated(stop, trained_conditioned_run, tmp_path):
    out = tmp_path / "out"
    label = labels_of(trained_conditioned_run)[0]
    process = subprocess.Popen(
        [*RAINFOREST, "generate", str(trained_conditioned_run), "--seconds", "600", "--label",
         label, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The bar's first render (0.0 s) comes before the loop has compiled: wait for audio.
    stdout, stderr = signal_when(process, lambda seen: _seconds_shown(seen) > 0, stop)
    shown = _seconds_shown(stderr)
    assert process.returncode == 0, stderr.decode(errors="replace")
    assert b"interrupted: kept" in stdout
    frames = soundfile.info(out / "stream-000.wav").frames
    assert round(shown * 16000) <= frames < 600 * 16000, (shown, frames)
    summary = json.loads((out / "generation.json").read_text())
    assert summary["interrupted"] and summary["samples"] == frames


def test_generate_help_explains_itself():
    result = subprocess.run([*RAINFOREST, "generate", "--help"], capture_output=True,
                            text=True, check=True)
    for option in ("--seconds", "--streams", "--temperature", "--seed", "--label", "--prime",
                   "--out", "Ctrl-C"):
        assert option in result.stdout
