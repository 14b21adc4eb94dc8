"""Songs to codes: decoding, mixing, resampling, mu-law encoding and trimming, in bounded memory.

soundfile (libsndfile 1.2.2 in its wheel) decodes mp3, ogg/vorbis, opus, flac and wav at any
channel count, bit depth and rate. Blocks are mixed to mono by a Numba kernel and streamed
through soxr, so peak memory depends on the block size, never on the song's length.
:func:`encode_song` is the one chain from a song to its trimmed mu-law codes; preprocessing
and generation's ``--prime`` both use it.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator

import numpy as np
import soundfile
import soxr
from soundfile import _ffi as _cffi
from soundfile import _snd as _libsndfile

from rainforest.config import AudioConfig
from rainforest.errors import AudioDecodeError, ParameterError
from rainforest.kernels import (
    count_non_finite,
    downmix,
    mulaw_encode,
    peak_amplitude,
    relative_threshold,
    trim_bounds,
)

#: Frames read per block: large enough to amortise per-call costs, small enough for L2.
BLOCK_FRAMES = 1 << 16

# mp3 headers can overstate the length by an encoder delay or a frame or two; a shortfall
# beyond this fraction means the file was cut short.
_TRUNCATION_TOLERANCE = 0.01

#: Codes read back from the spool file at a time while trimming and copying.
_SPOOL_CHUNK = 1 << 22

#: A song's spooled codes stay in memory up to this size (17 minutes at 16 kHz), then move to
#: a file; a temporary file for every song cost 2.5% of preprocessing (docs/performance.md).
SPOOL_IN_MEMORY = 1 << 24


def sniff_reason(path: str) -> str | None:
    """A plain-words reason for files that are obviously not audio, or None."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return "empty file (0 bytes)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"{", b"[")):
        return (
            f"not audio: the file is text ({head[:40].decode('utf-8', 'replace')!r}...), "
            "perhaps an error page saved under an audio name"
        )
    return None


class SongDecoder:
    """Stream one song as mono float32 blocks at ``sample_rate``.

    Parameters
    ----------
    path : str
        A local file.
    sample_rate : int
        Target rate in Hz.
    quality : str
        soxr recipe, e.g. ``"HQ"``; the default is ``AudioConfig``'s.
    block_frames : int
        Source frames read per block.

    Examples
    --------
    >>> with SongDecoder("song.mp3", sample_rate=16000) as song:   # doctest: +SKIP
    ...     samples = np.concatenate(list(song.blocks()))
    """

    def __init__(self, path: str, *, sample_rate: int,
                 quality: str = AudioConfig.resample_quality,
                 block_frames: int = BLOCK_FRAMES) -> None:
        if block_frames <= 0:
            raise ParameterError(f"block_frames must be positive, got {block_frames}")
        reason = sniff_reason(path)
        if reason:
            raise AudioDecodeError(reason)
        try:
            self._file = soundfile.SoundFile(path)
        except (soundfile.LibsndfileError, RuntimeError) as error:
            message = _libsndfile_message(error)
            if "does not exist or is not a regular file" in message:
                # libsndfile's mp3 probe reports unreadable data this way (random bytes, an
                # mp3 cut inside its first frames), yet the file was just read above.
                message = "no decoder recognised the data"
            raise AudioDecodeError(
                "cannot decode: not a recognised audio format, or a corrupt file "
                f"(libsndfile: {message})"
            ) from None
        self.sample_rate = int(sample_rate)
        self.source_rate = int(self._file.samplerate)
        self.channels = int(self._file.channels)
        self.format = f"{self._file.format}/{self._file.subtype}"
        self.header_frames = int(self._file.frames)
        self._seekable = bool(self._file.seekable())
        self.decoded_frames = 0
        self.non_finite = 0  # NaN or infinite mono samples, replaced before resampling
        self.stopped_by: str | None = None
        self._quality = quality
        self._block_frames = block_frames
        if self.channels < 1 or self.source_rate < 1:
            self.close()
            raise AudioDecodeError(
                f"header claims {self.channels} channels at {self.source_rate} Hz"
            )

    def __enter__(self) -> SongDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def blocks(self) -> Iterator[np.ndarray]:
        """Yield mono float32 blocks at the target rate until the song ends.

        A decoding error after some audio ends the stream early and sets ``stopped_by``; an
        error before any audio raises :class:`AudioDecodeError`.

        Without resampling, each block is a view of one reused buffer, valid only until the
        next block is requested: copy blocks you keep (as :func:`decode_mono` does).
        """
        resampler = None
        if self.source_rate != self.sample_rate:
            resampler = soxr.ResampleStream(
                self.source_rate, self.sample_rate, 1, dtype="float32", quality=self._quality
            )
        buffer = np.empty((self._block_frames, self.channels), dtype=np.float32)
        mono = np.empty(self._block_frames, dtype=np.float32)
        while True:
            try:
                frames = self._read(buffer)
            except (soundfile.LibsndfileError, RuntimeError) as error:
                if self.decoded_frames == 0:
                    raise AudioDecodeError(
                        f"cannot decode: {_libsndfile_message(error)}"
                    ) from None
                self.stopped_by = _libsndfile_message(error)
                break
            n = frames.shape[0]
            if n == 0:
                break
            self.decoded_frames += n
            block = mono[:n]
            if self.channels == 1:
                block[:] = frames[:, 0]
            else:
                downmix(frames, out=block)
            self._repair(block)
            yield resampler.resample_chunk(block) if resampler else block
            if n < self._block_frames:
                break
        if resampler is not None:
            tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            if tail.size:
                yield tail

    def _read(self, buffer: np.ndarray) -> np.ndarray:
        """Decode the next frames into ``buffer`` (at most its length) and return them.

        Calls libsndfile directly: soundfile's ``read`` asks for the position before every
        block and seeks to it after, which cost 6-7% of an mp3's decoding time
        (docs/performance.md). Like ``read``, it stops at the header's frame count in a seekable
        file, so the same frames decode either way (``tests/test_audio.py`` compares them).
        """
        wanted = buffer.shape[0]
        if self._seekable:
            wanted = max(0, min(wanted, self.header_frames - self.decoded_frames))
        return buffer[: read_frames(self._file, buffer, wanted)]

    def _repair(self, block: np.ndarray) -> None:
        """NaN becomes silence and +-Inf full scale, so one bad sample cannot smear (soxr
        would spread a NaN over its whole filter) or stop the song; they are counted."""
        bad = count_non_finite(block)
        if bad:
            self.non_finite += bad
            np.nan_to_num(block, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)

    @property
    def notes(self) -> list[str]:
        """What a reader of the manifest should know about how this song decoded."""
        notes = [self.truncation] if self.truncation else []
        if self.non_finite:
            notes.append(f"repaired {self.non_finite} non-finite sample(s) (NaN as silence, "
                         "infinities as full scale)")
        return notes

    @property
    def truncation(self) -> str | None:
        """A note when less audio decoded than the header promised, else None."""
        if self.stopped_by:
            return (f"decoding stopped after {self.decoded_frames} of {self.header_frames} "
                    f"frames: {self.stopped_by}")
        if self.header_frames > 0 and self.decoded_frames < self.header_frames * (
            1 - _TRUNCATION_TOLERANCE
        ):
            share = 100.0 * self.decoded_frames / self.header_frames
            return (f"truncated: decoded {self.decoded_frames} of the {self.header_frames} "
                    f"frames the header promised ({share:.1f}%)")
        return None


def read_frames(sound_file: soundfile.SoundFile, buffer: np.ndarray, frames: int) -> int:
    """Decode up to ``frames`` float32 frames into C-contiguous ``buffer`` with libsndfile's
    ``sf_readf_float``, without soundfile's position check and seek; returns how many came.

    Raises
    ------
    soundfile.LibsndfileError
        If libsndfile reports an error.
    """
    handle = sound_file._file
    count = _libsndfile.sf_readf_float(handle, _cffi.from_buffer("float[]", buffer), frames)
    error = _libsndfile.sf_error(handle)
    if error:
        raise soundfile.LibsndfileError(error)
    return count


def decode_mono(path: str, *, sample_rate: int,
                quality: str = AudioConfig.resample_quality) -> np.ndarray:
    """Decode a whole song to one mono float32 array at ``sample_rate`` (for short files).

    Examples
    --------
    >>> decode_mono("song.flac", sample_rate=16000).dtype   # doctest: +SKIP
    dtype('float32')
    """
    with SongDecoder(path, sample_rate=sample_rate, quality=quality) as song:
        parts = [block.copy() for block in song.blocks()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _read_codes(spool, start: int, stop: int) -> np.ndarray:
    spool.seek(start)
    return np.frombuffer(spool.read(stop - start), dtype=np.uint8)


def _loud_range(spool, length: int, threshold: float) -> tuple[int, int]:
    """First and last loud sample of the spooled codes, scanning in chunks from each end."""
    start = None
    for chunk_start in range(0, length, _SPOOL_CHUNK):
        chunk_stop = min(length, chunk_start + _SPOOL_CHUNK)
        first, last = trim_bounds(_read_codes(spool, chunk_start, chunk_stop), threshold=threshold)
        if last > 0:
            start = chunk_start + first
            break
    if start is None:
        return 0, 0
    chunk_stop = length
    while True:
        chunk_start = max(start, chunk_stop - _SPOOL_CHUNK)
        first, last = trim_bounds(_read_codes(spool, chunk_start, chunk_stop), threshold=threshold)
        if last > 0:
            return start, chunk_start + last
        chunk_stop = chunk_start


def encode_song(path: str, config: AudioConfig, sink, *, spool_dir: str | None = None) -> dict:
    """The one song-to-codes chain: decode, mix to mono, resample, mu-law encode, and trim.

    The kept codes go to ``sink.append(codes)`` in order, a chunk at a time (a shard writer,
    or a plain list). Blocks are spooled while the song's peak is found: in memory up to
    ``SPOOL_IN_MEMORY`` bytes, then to a temporary file in ``spool_dir``, so memory stays
    bounded for songs of any length. Returns the song's manifest fields (without its place
    in a shard).

    Raises
    ------
    AudioDecodeError
        If the song cannot be used; the message is the reason recorded in the manifest.
    """
    with SongDecoder(path, sample_rate=config.sample_rate,
                     quality=config.resample_quality) as song, \
            tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, dir=spool_dir) as spool:
        peak, length = 0.0, 0
        codes = np.empty(0, dtype=np.uint8)
        for block in song.blocks():
            if codes.shape[0] < block.shape[0]:
                codes = np.empty(block.shape[0], dtype=np.uint8)
            encoded = mulaw_encode(block, out=codes[: block.shape[0]])
            peak = max(peak, peak_amplitude(encoded))
            spool.write(encoded)
            length += encoded.shape[0]
        _check_usable(song, length, config)
        floor = 10.0 ** (config.silence_floor_db / 20.0)
        if peak < floor:
            level = 20 * math.log10(peak) if peak > 0 else -math.inf
            raise AudioDecodeError(
                f"silent: the loudest sample is {level:.1f} dBFS, below the "
                f"{config.silence_floor_db:.0f} dBFS floor"
            )
        start, stop = _loud_range(spool, length, relative_threshold(peak, config.trim_db))
        kept = stop - start
        if kept < config.min_seconds * config.sample_rate:
            raise AudioDecodeError(
                f"too short: {kept / config.sample_rate:.3f} s of audio after trimming silence "
                f"(at least {config.min_seconds:g} s needed)"
            )
        for chunk_start in range(start, stop, _SPOOL_CHUNK):
            sink.append(_read_codes(spool, chunk_start, min(stop, chunk_start + _SPOOL_CHUNK)))
        fields = {
            "source_rate": song.source_rate,
            "channels": song.channels,
            "source_format": song.format,
            "source_seconds": round(song.decoded_frames / song.source_rate, 6),
            "trimmed_start": start,
            "trimmed_end": length - stop,
            "length": kept,
            "seconds": round(kept / config.sample_rate, 6),
        }
        if song.notes:
            fields["note"] = "; ".join(song.notes)
        return fields


def _check_usable(song: SongDecoder, length: int, config: AudioConfig) -> None:
    """Refuse a song with no usable samples, or too few even before trimming."""
    if song.decoded_frames == 0:
        raise AudioDecodeError("no audio: the file decodes to 0 samples")
    if song.non_finite >= song.decoded_frames:
        raise AudioDecodeError(
            f"no usable audio: all {song.decoded_frames} samples are NaN or infinite")
    if length < config.min_seconds * config.sample_rate or length == 0:
        raise AudioDecodeError(
            f"too short: {song.decoded_frames} frame(s) at {song.source_rate} Hz give "
            f"{length / config.sample_rate:.3f} s at {config.sample_rate} Hz (at least "
            f"{config.min_seconds:g} s needed)")


def _libsndfile_message(error: Exception) -> str:
    message = str(error)
    # soundfile prefixes the path; the manifest already names the song.
    if "Error opening" in message and ": " in message:
        message = message.rsplit(": ", 1)[-1]
    return message.strip() or type(error).__name__
