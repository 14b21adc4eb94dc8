"""Small synthetic songs and broken files for tests, written with soundfile.

Everything here is deterministic (seeded) and quick: a one-second song takes milliseconds.

Good audio::

    tone(seconds, rate, channels=1, freq=440.0, amplitude=0.5, seed=0) -> float32 (frames, channels)
    write_song(path, seconds=1.0, rate=44100, channels=1, ...) -> Path
    write_samples(path, samples, rate, subtype=None) -> Path

The container and codec follow the extension: ``.wav`` and ``.flac`` (PCM_16 unless a
``subtype`` such as ``"PCM_U8"``, ``"PCM_S8"``, ``"PCM_24"`` or ``"FLOAT"`` is given), ``.mp3``
(MPEG layer III; MPEG rates up to 48 kHz only, see :data:`MP3_RATES`), ``.ogg`` (Vorbis) and
``.opus`` (Ogg Opus; libsndfile takes only :data:`OPUS_RATES`).

Bad input, each returning the path::

    write_random_bytes(path, size=4096, seed=0)
    write_empty(path)
    write_html(path)                      # an error page saved under an audio name
    write_one_sample_wav(path)
    write_silent_wav(path, seconds=1.0, rate=16000)
    write_truncated_mp3(path, fraction=0.4, seconds=2.0, rate=44100)

Examples
--------
>>> import tempfile, soundfile
>>> path = write_song(tempfile.mkdtemp() + "/a.flac", seconds=0.5, rate=22050, channels=2)
>>> soundfile.info(str(path)).frames
11025
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile

#: (soundfile format, default subtype) for each extension write_song understands.
FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
    ".ogg": ("OGG", "VORBIS"),
    ".opus": ("OGG", "OPUS"),
}

#: Sample rates the MPEG-1/2/2.5 layer III encoder accepts.
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

#: Sample rates libsndfile's Opus encoder accepts.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def tone(seconds: float, rate: int, channels: int = 1, *, freq: float = 440.0,
         amplitude: float = 0.5, seed: int = 0) -> np.ndarray:
    """A harmonic tone with a little noise, as float32 of shape (frames, channels).

    Every channel has its fundamental at ``freq`` (so it dominates the spectrum), but the
    harmonic weights, phases and noise differ per channel. The peak is at most ``amplitude``.
    """
    frames = int(round(seconds * rate))
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / rate
    out = np.empty((frames, channels), dtype=np.float32)
    for c in range(channels):
        weights = np.array([1.0, 0.3 / (c + 1), 0.15 * ((c % 3) + 1) / 3])
        signal = np.zeros(frames)
        for k, weight in enumerate(weights, start=1):
            if k * freq < rate / 2:  # keep harmonics below the source Nyquist
                signal += weight * np.sin(2 * np.pi * k * freq * t + 0.7 * c * k)
        signal += 0.01 * rng.standard_normal(frames)
        peak = np.max(np.abs(signal)) if frames else 1.0
        out[:, c] = amplitude * signal / peak
    return out


def _format_for(path: Path, subtype: str | None) -> tuple[str, str]:
    try:
        fmt, default = FORMATS[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"unknown extension {path.suffix!r}; use one of {sorted(FORMATS)}"
        ) from None
    return fmt, subtype or default


def write_samples(path, samples: np.ndarray, rate: int, *, subtype: str | None = None) -> Path:
    """Write float samples of shape (frames,) or (frames, channels); format from the extension."""
    path = Path(path)
    fmt, subtype = _format_for(path, subtype)
    soundfile.write(str(path), np.asarray(samples, dtype=np.float32), rate,
                    format=fmt, subtype=subtype)
    return path


def write_song(path, *, seconds: float = 1.0, rate: int = 44100, channels: int = 1,
               subtype: str | None = None, leading_silence: float = 0.0,
               trailing_silence: float = 0.0, amplitude: float = 0.5, freq: float = 440.0,
               seed: int = 0) -> Path:
    """Write a :func:`tone` of ``seconds`` between optional stretches of digital silence.

    The file lasts ``leading_silence + seconds + trailing_silence`` (before any codec padding).
    """
    song = tone(seconds, rate, channels, freq=freq, amplitude=amplitude, seed=seed)
    lead = np.zeros((int(round(leading_silence * rate)), channels), dtype=np.float32)
    trail = np.zeros((int(round(trailing_silence * rate)), channels), dtype=np.float32)
    return write_samples(path, np.concatenate([lead, song, trail]), rate, subtype=subtype)


def write_random_bytes(path, size: int = 4096, *, seed: int = 0) -> Path:
    """Noise bytes under whatever name is given (no audio format recognises them)."""
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def write_empty(path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_html(path) -> Path:
    """An HTTP error page, as a failed download saves it under the song's name."""
    path = Path(path)
    path.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
                    "<body><h1>Not Found</h1></body></html>\n")
    return path


def write_one_sample_wav(path, *, rate: int = 16000) -> Path:
    return write_samples(path, np.array([[0.25]], dtype=np.float32), rate)


def write_silent_wav(path, *, seconds: float = 1.0, rate: int = 16000, channels: int = 1) -> Path:
    frames = int(round(seconds * rate))
    return write_samples(path, np.zeros((frames, channels), dtype=np.float32), rate)


def write_truncated_mp3(path, *, fraction: float = 0.4, seconds: float = 2.0,
                        rate: int = 44100, channels: int = 1) -> Path:
    """A valid mp3 song cut to ``fraction`` of its bytes, like an interrupted download."""
    path = Path(path)
    whole = path.with_name(path.name + ".whole.mp3")
    write_song(whole, seconds=seconds, rate=rate, channels=channels)
    data = whole.read_bytes()
    os.remove(whole)
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def write_long_wav(path, *, seconds: float, rate: int = 44100, channels: int = 2,
                   block_seconds: float = 10.0) -> Path:
    """A long 16-bit wav (RF64 beyond 4 GiB), written block by block in bounded memory.

    Each block is a :func:`tone` at its own pitch, so the song is not one repeated block.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames_left = int(round(seconds * rate))
    bytes_needed = frames_left * channels * 2
    file_format = "RF64" if bytes_needed > 4_000_000_000 else "WAV"
    with soundfile.SoundFile(str(path), "w", samplerate=rate, channels=channels,
                             format=file_format, subtype="PCM_16") as song:
        block = 0
        while frames_left > 0:
            frames = min(frames_left, int(block_seconds * rate))
            song.write(tone(frames / rate, rate, channels, freq=110.0 + 7 * (block % 50),
                            seed=block)[:frames])
            frames_left -= frames
            block += 1
    return path


def write_periodic_songs(folder, *, songs: int = 6, seconds: float = 2.0, rate: int = 16000,
                         labels: tuple[str, ...] = ("low", "high")) -> list[Path]:
    """Songs repeating one random waveform period per label, in one sub-folder per label.

    Every song of label ``k`` repeats the same cycle of ``24 + 12 k`` samples from its own
    random phase, plus faint noise. A model whose receptive field spans a period can predict
    held-out songs almost exactly, so their bits per sample must fall far below the unigram
    entropy.
    """
    folder = Path(folder)
    cycles = [np.random.default_rng(k).uniform(-0.6, 0.6, size=24 + 12 * k)
              for k in range(len(labels))]
    paths = []
    frames = int(round(seconds * rate))
    for index in range(songs):
        k = index % len(labels)
        rng = np.random.default_rng(1000 + index)
        cycle = np.roll(cycles[k], int(rng.integers(0, cycles[k].size)))
        samples = np.tile(cycle, frames // cycle.size + 1)[:frames]
        samples = samples + 0.002 * rng.standard_normal(frames)
        (folder / labels[k]).mkdir(parents=True, exist_ok=True)
        paths.append(write_samples(folder / labels[k] / f"song{index}.wav", samples, rate))
    return paths
