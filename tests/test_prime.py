"""--prime: the codes of a prime file, the state they leave, and what follows from them."""

import os

import numpy as np
import pytest

import audiogen
from rainforest.config import AudioConfig
from rainforest.dataset import Dataset
from rainforest.generate import GenerationConfig, generate, load_network, prime_codes
from rainforest.kernels.fused_loop import generate_codes
from rainforest.kernels.priming import prime_state, silence_code, stream_gate_bias, stream_seeds
from rainforest.model_config import PRESETS, ModelConfig
from rainforest.preprocess import preprocess
from test_generate import assert_logits_close, keras_checkpoint

CONFIGS = {
    "tiny": PRESETS["tiny"],
    "odd-dilations-conditioned": ModelConfig(
        dilations=(1, 3, 2, 5, 1), residual_channels=8, gate_channels=12, skip_channels=24,
        labels=("rock", "folk")),
}


def prime_song(path, *, freq=330.0, seed=0):
    """A stereo 44.1 kHz song with silence around it: resampled, mixed and trimmed."""
    return audiogen.write_song(path, seconds=1.2, rate=44100, channels=2, freq=freq,
                               leading_silence=0.2, trailing_silence=0.4, seed=seed)


def test_prime_codes_are_the_tail_of_the_preprocessed_song(tmp_path):
    (tmp_path / "songs").mkdir()
    song = prime_song(tmp_path / "songs" / "prime.flac")
    preprocess([str(song)], str(tmp_path / "data"), cluster="sync", progress=False,
               log=lambda line: None)
    dataset = Dataset(str(tmp_path / "data"))
    (entry,) = dataset.songs
    codes = np.asarray(dataset.song_codes(entry))
    assert entry.length > 2048 and dataset.manifest["songs"][0]["trimmed_end"] > 0
    for receptive in (32, 2048):
        np.testing.assert_array_equal(prime_codes(str(song), dataset.audio, receptive),
                                      codes[-receptive:])
    # A receptive field longer than the song takes the whole (trimmed) song.
    np.testing.assert_array_equal(prime_codes(str(song), dataset.audio, 10**6), codes)


def _rings_by_age(network, state):
    """Each layer's ring rows ordered from its oldest input to its newest, whatever the
    position (row ``offset + tau % d`` holds time ``tau``)."""
    layers = []
    for layer, d in enumerate(network.dilations):
        times = np.arange(state.position - d, state.position)
        layers.append(state.rings[:, network.ring_offsets[layer] + times % d])
    return np.concatenate(layers, axis=1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_primed_state_equals_the_prime_fed_sample_by_sample(tmp_path, name):
    """prime_state's one batched pass over a prime file's codes leaves the rings, last codes
    and following logits that the loop itself reaches when fed the prime one sample at a
    time (teacher-forced) from a receptive field of silence."""
    config = CONFIGS[name]
    keras_checkpoint(tmp_path / "run", config, seed=2)
    network = load_network(str(tmp_path / "run")).network
    rf = network.receptive_field
    codes = prime_codes(str(prime_song(tmp_path / "prime.wav")), AudioConfig(), rf)
    assert codes.shape == (rf,) and len(np.unique(codes)) > 10
    streams = 2
    prime = np.broadcast_to(codes, (streams, rf))
    gate_bias = stream_gate_bias(network, [b % max(1, len(config.labels)) for b in
                                           range(streams)])
    seeds = stream_seeds(5, streams)
    batched = prime_state(network, prime, gate_bias=gate_bias, seeds=seeds)
    fed = prime_state(network, np.empty((streams, 0)), gate_bias=gate_bias, seeds=seeds)
    assert (fed.last_codes == silence_code(config.classes)).all()
    np.testing.assert_array_equal(generate_codes(network, fed, rf, forced=prime), prime)
    np.testing.assert_array_equal(batched.last_codes, fed.last_codes)
    np.testing.assert_array_equal(batched.rng_states, fed.rng_states)
    expected = _rings_by_age(network, fed)
    np.testing.assert_allclose(_rings_by_age(network, batched), expected, rtol=1e-5,
                               atol=1e-5 * float(np.abs(expected).max()))
    after_batched = generate_codes(network, batched, 1, forced=[[0], [0]], record_logits=True)
    after_fed = generate_codes(network, fed, 1, forced=[[0], [0]], record_logits=True)
    assert_logits_close(after_batched[1], after_fed[1])


def test_the_continuation_depends_on_the_prime(tmp_path):
    """Same seed and settings, different prime songs: different songs; the same prime twice:
    the same song (so the difference comes from the prime, not from chance)."""
    keras_checkpoint(tmp_path / "run", PRESETS["tiny"], seed=4)
    primes = [prime_song(tmp_path / "low.wav", freq=220.0, seed=1),
              prime_song(tmp_path / "high.wav", freq=660.0, seed=2)]

    def continuation(prime, out):
        config = GenerationConfig(seconds=0.05, streams=1, seed=8,
                                  prime=None if prime is None else str(prime))
        summary = generate(str(tmp_path / "run"), str(tmp_path / out), config,
                           progress=False, log=lambda line: None)
        with open(os.path.join(tmp_path / out, summary["files"][0]), "rb") as handle:
            return handle.read()

    low, high, unprimed = (continuation(p, out) for p, out in
                           [(primes[0], "low"), (primes[1], "high"), (None, "none")])
    assert low != high and low != unprimed and high != unprimed
    assert continuation(primes[0], "low-again") == low
