"""Stage 4: generate audio from a checkpoint with the fused loop of ``rainforest.kernels``.

The steps:

1. :func:`load_network` reads a checkpoint's ``config.json`` and ``model.weights.h5`` with
   h5py alone (no TensorFlow: generation machines may not have it) and lays the weights out
   as the float32 arrays of :class:`~rainforest.kernels.fused_loop.FusedNetwork`. Shapes come
   from the checkpoint's own model config (:func:`rainforest.model_config.weight_layout`).
2. :func:`~rainforest.kernels.priming.prime_state` fills every layer's ring buffer from one
   batched numpy forward pass over the last receptive field of the prime (silence when there
   is none).
3. :func:`generate` runs the loop in chunks of about a tenth of a second of audio, so a
   progress bar can move and Ctrl-C keeps every finished chunk, then writes one 16-bit wav
   and one spectrogram PNG per stream, and ``generation.json`` with the settings.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from rainforest import checkpoint, storage
from rainforest.audio import encode_song
from rainforest.config import AudioConfig, Config, documented, setting
from rainforest.errors import AudioDecodeError, ParameterError
from rainforest.kernels import mulaw_decode
from rainforest.kernels.fused_loop import (
    WEIGHT_PRECISIONS,
    FusedNetwork,
    StreamState,
    generate_codes,
)
from rainforest.kernels.priming import (
    fuse,
    prime_state,
    stream_gate_bias,
    stream_seeds,
)
from rainforest.model_config import ModelConfig
from rainforest.plots import spectrogram_png

#: Audio generated per kernel call: short enough for a live progress bar and a prompt Ctrl-C.
CHUNK_SECONDS = 0.1
GENERATION_NAME = "generation.json"
_STREAM_FILE = re.compile(r"stream-[0-9]{3,}\.wav")
#: Shorter streams get no spectrogram PNG (too few samples for its 512-point windows).
SPECTROGRAM_MIN_SAMPLES = 256


@documented
@dataclass(frozen=True)
class GenerationConfig(Config):
    """The settings of one ``rainforest generate`` call, saved in ``generation.json``."""

    seconds: float = setting(4.0, "seconds of audio per stream")
    streams: int = setting(1, "independent songs generated at once (batched: far more "
                           "samples/s)")
    temperature: float = setting(1.0, "softmax temperature: <1 safer, >1 wilder, 0 always "
                                 "the likeliest code")
    seed: int = setting(0, "random seed; each stream draws from its own generator")
    label: str | None = setting(None, "for a model trained with --condition: which label "
                                "(e.g. genre or artist) to generate")
    prime: str | None = setting(None, "a song to continue: decoded and encoded like the "
                                "training data, its last receptive field primes every stream")
    threads: int = setting(1, "CPU threads; streams are shared among them")
    precision: str = setting("float32", "how the loop stores the weights it multiplies by: "
                             "float32 (exact), bfloat16 (half the bytes, about 2x faster for "
                             "one stream) or int8 (a scale per weight row; the output stack "
                             "stays bfloat16; about a quarter of the bytes); products are "
                             "float32 in all three",
                             choices=WEIGHT_PRECISIONS)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ParameterError(f"--seconds must be a positive number, got {self.seconds}")
        if self.streams < 1:
            raise ParameterError(f"--streams must be >= 1, got {self.streams}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ParameterError(
                f"--temperature must be >= 0 (0 = always the most likely code), "
                f"got {self.temperature}")
        if self.threads < 1:
            raise ParameterError(f"--threads must be >= 1, got {self.threads}")


@dataclass
class TrainedNetwork:
    """A checkpoint's network, laid out for the fused loop, with the configs it was saved with."""

    folder: str
    step: int
    model: ModelConfig
    audio: AudioConfig
    network: FusedNetwork


def load_network(run: str) -> TrainedNetwork:
    """The newest checkpoint of ``run`` (or the checkpoint folder ``run``), fused for the loop.

    Raises
    ------
    CheckpointError
        If there is no checkpoint, its config is missing or damaged, a file fails its sha256,
        or the weights do not match the config.
    """
    folder = checkpoint.latest(run)
    with checkpoint.local_copy(folder) as local:  # an s3:// checkpoint is downloaded
        document = checkpoint.read_config(local)
        checkpoint.verify(local, document)
        model, audio = checkpoint.saved_shape(folder, document)
        weights = checkpoint.read_weights(os.path.join(local, checkpoint.WEIGHTS_NAME), model)
    return TrainedNetwork(folder, int(document["step"]), model, audio, fuse(weights, model))


def prime_codes(path: str, audio: AudioConfig, receptive: int) -> np.ndarray:
    """The last receptive field of a prime song's codes, made by the training data's chain."""
    if not os.path.exists(path):
        raise ParameterError(f"--prime {path} does not exist")
    chunks: list[np.ndarray] = []
    try:  # any length will do for a prime, so no minimum
        encode_song(path, dataclasses.replace(audio, min_seconds=0.0), chunks)
    except AudioDecodeError as error:
        raise ParameterError(f"--prime {path} cannot be decoded: {error}") from None
    codes = np.concatenate(chunks) if chunks else np.empty(0, np.uint8)
    if codes.shape[0] < 2:
        raise ParameterError(f"--prime {path} holds no audible audio to continue from")
    return codes[-receptive:]


def generate_threaded(network: FusedNetwork, states: list[StreamState], steps: int,
                      temperature: float) -> list[np.ndarray]:
    """Advance each state by ``steps`` on a thread of its own (the kernel drops the GIL), so
    the streams of the states run on as many cores; the codes of each state, in order."""
    codes: list[np.ndarray | None] = [None] * len(states)

    def work(index):
        codes[index] = generate_codes(network, states[index], steps, temperature=temperature)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, len(states))]
    for thread in threads:
        thread.start()
    try:
        work(0)
    finally:  # also on Ctrl-C: no thread may still write a state when the caller reads it
        for thread in threads:
            thread.join()
    return codes


def stream_file(stream: int) -> str:
    """The wav name of stream ``stream`` (0-based), in ``--out`` and in a training sample."""
    return f"stream-{stream:03d}.wav"


def is_stream_file(name: str) -> bool:
    """Whether ``name`` is a name :func:`stream_file` gives (never a path, never hidden)."""
    return _STREAM_FILE.fullmatch(name) is not None


def spectrogram_file(wav: str) -> str:
    """The name of the spectrogram PNG written beside the stream wav ``wav``."""
    return os.path.splitext(wav)[0] + ".png"


def write_outputs(codes: np.ndarray, audio: AudioConfig, out: str, *, plot: bool = True
                  ) -> list[str]:
    """One 16-bit wav (and spectrogram PNG) per stream, each committed whole."""
    import soundfile

    os.makedirs(out, exist_ok=True)
    paths = []
    for stream, stream_codes in enumerate(codes):
        path = os.path.join(out, stream_file(stream))
        samples = mulaw_decode(stream_codes)
        with storage.Staged(path) as staging:
            soundfile.write(staging, samples, audio.sample_rate, subtype="PCM_16",
                            format="WAV")
        paths.append(path)
        if plot and samples.shape[0] >= SPECTROGRAM_MIN_SAMPLES:
            spectrogram_png(samples, audio.sample_rate, spectrogram_file(path))
    return paths


def stream_label_ids(model: ModelConfig, label: str | None, streams: int) -> list[int]:
    """Each stream's label id for ``--label``, with an error that lists the model's labels."""
    if not model.conditioned:
        if label is not None:
            raise ParameterError(
                f"--label {label!r} given, but this model was trained without labels")
        return [0] * streams
    if label is None:
        raise ParameterError(
            f"this model is conditioned on labels; pass --label with one of: "
            f"{', '.join(model.labels)}")
    if label not in model.labels:
        raise ParameterError(
            f"unknown --label {label!r}; this model knows: {', '.join(model.labels)}")
    return [model.labels.index(label)] * streams


def _generate_chunks(network: FusedNetwork, states: list[StreamState], total: int, *,
                     chunk: int, temperature: float, bar) -> tuple[np.ndarray, bool]:
    """Run the loop ``chunk`` samples at a time up to ``total``; Ctrl-C keeps finished chunks.

    Returns the codes (streams, samples generated) and whether it was interrupted.
    """
    chunks: list[np.ndarray] = []
    done, interrupted = 0, False
    try:
        while done < total:
            steps = min(chunk, total - done)
            chunks.append(np.concatenate(
                generate_threaded(network, states, steps, temperature)))
            done += steps
            bar.update(steps)
    except KeyboardInterrupt:  # the chunk under way is dropped; finished ones are kept
        interrupted = True
    streams = sum(state.streams for state in states)
    codes = np.concatenate(chunks, axis=1) if chunks else np.empty((streams, 0), np.uint8)
    return codes, interrupted


class _NoBar:
    def update(self, steps: int) -> None:
        pass


def start_states(network: FusedNetwork, source: TrainedNetwork, config: GenerationConfig
                 ) -> list[StreamState]:
    """The primed states of ``config.streams`` streams, one per ``config.threads`` share."""
    streams = config.streams
    label_ids = stream_label_ids(source.model, config.label, streams)
    rf = network.receptive_field
    prime = np.empty((streams, 0), np.int64)
    if config.prime:
        prime = np.broadcast_to(prime_codes(config.prime, source.audio, rf), (streams, rf))
    state = prime_state(network, prime, gate_bias=stream_gate_bias(network, label_ids),
                        seeds=stream_seeds(config.seed, streams))
    shares = np.array_split(np.arange(streams), min(config.threads, streams))
    return [state.take(share) for share in shares]


def run_states(network: FusedNetwork, states: list[StreamState], audio: AudioConfig,
               config: GenerationConfig, *, bar=None) -> tuple[np.ndarray, bool]:
    """Run primed states for ``config.seconds``; the codes and whether Ctrl-C cut them short."""
    total = int(round(config.seconds * audio.sample_rate))
    return _generate_chunks(
        network, states, total, chunk=max(1, int(CHUNK_SECONDS * audio.sample_rate)),
        temperature=config.temperature, bar=bar or _NoBar())


def stream_codes(network: FusedNetwork, source: TrainedNetwork, config: GenerationConfig
                 ) -> np.ndarray:
    """The codes (streams, samples) of ``config.streams`` streams from ``network``
    (``source``'s network at ``config.precision``): what :func:`generate` writes, and what
    training samples are."""
    states = start_states(network, source, config)
    return run_states(network, states, source.audio, config)[0]


def generate(run: str, out: str, config: GenerationConfig, *, progress: bool = True,
             log=print) -> dict[str, Any]:
    """Generate ``config.streams`` songs of ``config.seconds`` from the newest checkpoint.

    Ctrl-C stops after the current chunk (a tenth of a second of audio) and still writes
    what was generated. Returns a summary (paths, samples, samples per second, interrupted).
    """
    from tqdm import tqdm

    source = load_network(run)
    audio, streams = source.audio, config.streams
    network = source.network.at_precision(config.precision)
    states = start_states(network, source, config)
    total = int(round(config.seconds * audio.sample_rate))
    log(f"generating {streams} x {config.seconds:g} s at {audio.sample_rate} Hz from "
        f"{source.folder} (step {source.step}, receptive field {network.receptive_field} "
        f"codes, {config.precision} weights: {network.nbytes / 1e6:.2f} MB read per sample)")
    started = time.perf_counter()
    # Counted in samples, shown in seconds of audio (unit_scale multiplies for display).
    with tqdm(total=total, unit_scale=1.0 / audio.sample_rate, disable=not progress,
              dynamic_ncols=True, desc="generating",
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s of audio "
                         "[{elapsed}<{remaining}]") as bar:
        codes, interrupted = run_states(network, states, audio, config, bar=bar)
    elapsed = time.perf_counter() - started
    done = codes.shape[1]
    if interrupted:
        log(f"interrupted: keeping the {done / audio.sample_rate:.2f} s generated so far")
    paths = write_outputs(codes, audio, out) if done else []
    summary = {
        "checkpoint": source.folder, "step": source.step, "settings": config.to_dict(),
        "sample_rate": audio.sample_rate, "samples": int(done), "streams": streams,
        "seconds_generated": done / audio.sample_rate, "interrupted": interrupted,
        "wall_seconds": round(elapsed, 3),
        "samples_per_second": round(done * streams / elapsed, 1) if elapsed > 0 else None,
        "files": [os.path.basename(p) for p in paths],
    }
    if paths:
        storage.write_json_atomic(os.path.join(out, GENERATION_NAME), summary)
    return summary


if __name__ == "__main__":  # python -m rainforest.generate ARGS is rainforest generate ARGS
    from rainforest.cli import run_stage

    run_stage("generate")
