"""SongDecoder and decode_mono on every format and layout the toolkit promises, written here.

Measured with the libsndfile 1.2.2 in the soundfile wheel: mp3 (through the LAME tag), Vorbis
and Opus all decode to exactly the number of frames written, aligned to the sample (encoder
delay and padding are trimmed), so the lengths below are exact for lossy codecs too.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import soundfile
import soxr

import audiogen
import reference
from peak_memory import run_child
from rainforest.audio import BLOCK_FRAMES, SongDecoder, decode_mono
from rainforest.config import AudioConfig
from rainforest.errors import AudioDecodeError, ParameterError

TARGET = 16000
QUALITY = AudioConfig.resample_quality  # what SongDecoder resamples with by default
SECONDS = 0.5
FREQ = 440.0
RATES = (8000, 11025, 22050, 44100, 48000, 96000)
LAYOUTS = (1, 2, 6)

# Relative RMS error of the decoded mono against the exact mean of the written channels,
# resampled with the same soxr recipe: measured maxima over RATES x LAYOUTS, with headroom.
FIDELITY = {
    ("wav", "PCM_U8"): 0.05,    # measured 0.026: 8-bit quantisation
    ("wav", "PCM_16"): 1e-3,    # 1e-4
    ("wav", "PCM_24"): 1e-5,
    ("wav", "FLOAT"): 1e-5,
    ("flac", "PCM_S8"): 0.05,   # 0.007 (FLAC's 8-bit is signed; wav's is unsigned)
    ("flac", "PCM_16"): 1e-3,   # 3e-5
    ("flac", "PCM_24"): 1e-5,
    ("mp3", None): 0.05,        # 0.017
    ("ogg", None): 0.08,        # 0.033
    ("opus", None): 0.25,       # 0.13: Opus keeps the spectrum more than the waveform
}


def _cases():
    for subtype in ("PCM_U8", "PCM_16", "PCM_24", "FLOAT"):
        for rate in RATES:
            for channels in LAYOUTS:
                yield "wav", subtype, rate, channels
    for subtype in ("PCM_S8", "PCM_16", "PCM_24"):  # FLAC has no float
        for rate in RATES:
            for channels in LAYOUTS:
                yield "flac", subtype, rate, channels
    for rate in RATES:
        for channels in LAYOUTS:
            yield "ogg", None, rate, channels
    for rate in (r for r in RATES if r in audiogen.MP3_RATES):  # no 96 kHz in MPEG
        for channels in (1, 2):  # the mp3 encoder takes mono or stereo only
            yield "mp3", None, rate, channels
    for rate in audiogen.OPUS_RATES:
        for channels in LAYOUTS:
            yield "opus", None, rate, channels


CASES = [pytest.param(*case, id=f"{case[0]}-{case[1] or 'lossy'}-{case[2]}-{case[3]}ch")
         for case in _cases()]


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum)) * rate / len(samples)


def _rel_rms(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.sqrt(np.mean((actual - expected) ** 2) / np.mean(expected**2)))


@pytest.mark.parametrize("ext, subtype, rate, channels", CASES)
def test_every_format_decodes_to_mono_at_target(tmp_path, ext, subtype, rate, channels):
    written = audiogen.tone(SECONDS, rate, channels, freq=FREQ)
    path = audiogen.write_samples(tmp_path / f"song.{ext}", written, rate, subtype=subtype)

    with SongDecoder(str(path), sample_rate=TARGET) as song:
        mono = np.concatenate([block.copy() for block in song.blocks()])
        assert (song.source_rate, song.channels) == (rate, channels)
        assert song.format.split("/")[0] == ("OGG" if ext == "opus" else ext.upper())
        # decoded_frames counts what was read, which is all soundfile itself can read...
        assert song.decoded_frames == soundfile.read(str(path), dtype="float32")[0].shape[0]
        # ...and, with delay and padding trimmed, exactly what was written, as promised.
        assert song.decoded_frames == song.header_frames == written.shape[0]
        assert song.truncation is None

    assert mono.dtype == np.float32 and mono.ndim == 1
    assert abs(len(mono) - SECONDS * TARGET) <= 1
    assert abs(_dominant_hz(mono, TARGET) - FREQ) <= 1 / SECONDS  # one FFT bin

    expected = soxr.resample(written.mean(axis=1), rate, TARGET, quality=QUALITY)
    if ext in ("ogg", "opus") and channels == 6:
        # Vorbis and Opus code the 6th channel of 5.1 as LFE, low-passed far below 440 Hz
        # (measured: it loses ~97% of the tone), so compare with what the codec kept.
        decoded = soundfile.read(str(path), dtype="float32", always_2d=True)[0]
        expected = soxr.resample(decoded.mean(axis=1), rate, TARGET, quality=QUALITY)
    assert _rel_rms(mono, expected) < FIDELITY[ext, subtype]


@pytest.mark.parametrize("ext, subtype", [("wav", "PCM_16"), ("wav", "FLOAT"),
                                          ("flac", "PCM_24")])
@pytest.mark.parametrize("rate", [16000, 44100])  # 16 kHz skips the resampler
def test_mono_is_the_mean_of_the_channels(tmp_path, ext, subtype, rate):
    x = audiogen.tone(SECONDS, rate, 1, freq=FREQ)[:, 0]
    zero = np.zeros_like(x)
    exact = soxr.resample(x, rate, TARGET, quality=QUALITY) if rate != TARGET else x
    tolerance = 1e-4 if subtype == "PCM_16" else 1e-6  # quantisation step 3e-5

    opposite = audiogen.write_samples(tmp_path / f"opposite.{ext}", np.stack([x, -x], 1),
                                      rate, subtype=subtype)
    assert np.max(np.abs(decode_mono(str(opposite), sample_rate=TARGET))) < tolerance

    left_only = audiogen.write_samples(tmp_path / f"left.{ext}", np.stack([x, zero], 1),
                                       rate, subtype=subtype)
    np.testing.assert_allclose(decode_mono(str(left_only), sample_rate=TARGET), exact / 2,
                               atol=tolerance)

    # Six channels: a left-only mix would give x, the mean gives (x + 0 + ... + x/2) / 6.
    six = np.stack([x, zero, zero, zero, zero, x / 2], 1)
    surround = audiogen.write_samples(tmp_path / f"six.{ext}", six, rate, subtype=subtype)
    np.testing.assert_allclose(decode_mono(str(surround), sample_rate=TARGET), exact / 4,
                               atol=tolerance)


def test_lossy_stereo_in_opposite_phase_mixes_to_near_silence(tmp_path):
    # Joint stereo could leave a residue; measured: none for mp3, 4e-5 of the RMS for Opus.
    for ext in ("mp3", "ogg", "opus"):
        rate = 48000 if ext == "opus" else 44100
        x = audiogen.tone(SECONDS, rate, 1)[:, 0]
        path = audiogen.write_samples(tmp_path / f"opposite.{ext}", np.stack([x, -x], 1), rate)
        mono = decode_mono(str(path), sample_rate=TARGET)
        assert np.sqrt(np.mean(mono**2)) < 1e-3 * np.sqrt(np.mean(x**2)), ext


def test_block_size_does_not_change_the_result(tmp_path):
    path = audiogen.write_song(tmp_path / "song.flac", seconds=1.0, rate=44100, channels=2)
    whole = decode_mono(str(path), sample_rate=TARGET)
    with SongDecoder(str(path), sample_rate=TARGET, block_frames=1000) as song:
        pieces = np.concatenate([block.copy() for block in song.blocks()])
        assert song.decoded_frames == 44100
    assert pieces.shape == whole.shape
    np.testing.assert_allclose(pieces, whole, atol=1e-6)


@pytest.mark.parametrize("ext, rate, channels", [
    ("wav", 44100, 2), ("flac", 48000, 6), ("ogg", 22050, 1), ("mp3", 44100, 2),
    ("opus", 48000, 2),
])
def test_blocks_hold_exactly_the_frames_soundfile_reads(tmp_path, ext, rate, channels):
    # SongDecoder calls libsndfile directly instead of soundfile's read: same frames, as many.
    path = audiogen.write_song(tmp_path / f"song.{ext}", seconds=1.3, rate=rate,
                               channels=channels)
    frames = soundfile.read(str(path), dtype="float32", always_2d=True)[0]
    with SongDecoder(str(path), sample_rate=rate, block_frames=1000) as song:
        mono = np.concatenate([block.copy() for block in song.blocks()])
        assert song.decoded_frames == frames.shape[0] > 2 * 1000
    np.testing.assert_array_equal(mono, reference.downmix(frames))


def test_decode_mono_keeps_every_block_without_resampling(tmp_path):
    # 16 kHz in, 16 kHz out: blocks are views of one reused buffer, more than one of them.
    song = audiogen.tone(5.0, TARGET, 2)
    path = audiogen.write_samples(tmp_path / "song.wav", song, TARGET, subtype="FLOAT")
    mono = decode_mono(str(path), sample_rate=TARGET)
    assert len(mono) == 80000 > BLOCK_FRAMES
    np.testing.assert_allclose(mono, song.mean(axis=1), atol=1e-7)


def test_block_frames_must_be_positive(tmp_path):
    path = audiogen.write_song(tmp_path / "song.wav", seconds=0.1, rate=TARGET)
    with pytest.raises(ParameterError, match="block_frames must be positive, got 0"):
        SongDecoder(str(path), sample_rate=TARGET, block_frames=0)


# ---------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("ext", ["mp3", "wav", "ogg", "flac", "opus"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_not_audio(tmp_path, ext, seed):
    path = audiogen.write_random_bytes(tmp_path / f"noise.{ext}", seed=seed)
    with pytest.raises(AudioDecodeError) as caught:
        SongDecoder(str(path), sample_rate=TARGET)
    message = str(caught.value)
    assert message.startswith("cannot decode: not a recognised audio format, or a corrupt file")
    # libsndfile's mp3 probe says "File does not exist or is not a regular file" here.
    assert "does not exist" not in message


def test_empty_file_says_empty(tmp_path):
    path = audiogen.write_empty(tmp_path / "song.mp3")
    with pytest.raises(AudioDecodeError, match=r"^empty file \(0 bytes\)$"):
        SongDecoder(str(path), sample_rate=TARGET)


def test_html_page_says_text_not_audio(tmp_path):
    path = audiogen.write_html(tmp_path / "song.mp3")
    with pytest.raises(AudioDecodeError, match=r"^not audio: the file is text \('<!DOCTYPE"):
        decode_mono(str(path), sample_rate=TARGET)


@pytest.mark.parametrize("rate, expected_length", [(16000, 1), (44100, 0)])
def test_one_sample_wav_decodes_to_what_little_there_is(tmp_path, rate, expected_length):
    # Not an error at this layer: rejecting songs too short to train on is preprocess's job.
    path = audiogen.write_one_sample_wav(tmp_path / "one.wav", rate=rate)
    with SongDecoder(str(path), sample_rate=TARGET) as song:
        mono = np.concatenate([block.copy() for block in song.blocks()])
        assert song.decoded_frames == 1 and song.truncation is None
    assert len(mono) == expected_length
    if expected_length:
        assert mono[0] == pytest.approx(0.25, abs=1e-4)


def test_silent_wav_decodes_to_zeros(tmp_path):
    # Also not an error here: preprocess trims silence and drops what is left empty.
    path = audiogen.write_silent_wav(tmp_path / "silence.wav", seconds=1.0, rate=44100)
    mono = decode_mono(str(path), sample_rate=TARGET)
    assert len(mono) == TARGET and not mono.any()


@pytest.mark.parametrize("fraction", [0.4, 0.7])
def test_truncated_mp3_decodes_its_first_part_with_a_note(tmp_path, fraction):
    # libsndfile takes the length from the LAME/Xing header (88200 frames), then its reads
    # simply end where the bytes do: no error, so only the shortfall reveals the cut.
    path = audiogen.write_truncated_mp3(tmp_path / "cut.mp3", fraction=fraction,
                                        seconds=2.0, rate=44100)
    with SongDecoder(str(path), sample_rate=TARGET) as song:
        mono = np.concatenate([block.copy() for block in song.blocks()])
        decoded = song.decoded_frames
        assert song.header_frames == 88200
        assert song.stopped_by is None
        assert decoded == soundfile.read(str(path))[0].shape[0]
        # The LAME tag frame and the bit reservoir cost a few frames more than the bytes cut.
        assert fraction - 0.1 < decoded / 88200 < fraction
        assert song.truncation == (
            f"truncated: decoded {decoded} of the 88200 frames the header promised "
            f"({100 * decoded / 88200:.1f}%)"
        )
    assert abs(len(mono) - decoded * TARGET / 44100) <= 1


def _zero_the_middle(path, size=2000):
    """Damage a song in place: ``size`` zero bytes in the middle of the file."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = bytes(size)
    path.write_bytes(bytes(data))


def test_flac_damaged_in_the_middle_keeps_the_audio_before_with_the_decoders_reason(tmp_path):
    path = audiogen.write_song(tmp_path / "song.flac", seconds=3.0, rate=44100, channels=2)
    _zero_the_middle(path)
    with SongDecoder(str(path), sample_rate=TARGET, block_frames=4096) as song:
        kept = sum(len(block) for block in song.blocks())
        # Reading through soundfile lost the last good block and reported its own seek
        # ("Internal psf_fseek() failed.") instead of the decoder's error.
        assert song.stopped_by == "Error : flac decoder lost sync."
        assert 0.4 * 44100 * 3 < song.decoded_frames < 0.6 * 44100 * 3
        assert song.decoded_frames % 4096 == 0  # whole blocks, up to the damaged one
    assert abs(kept - song.decoded_frames * TARGET / 44100) <= 1


def test_vorbis_damaged_in_the_middle_decodes_as_one_whole_read_with_a_note(tmp_path):
    # libvorbis skips the damaged pages and resyncs, so the song comes out short. Reading in
    # blocks through soundfile seeked after each block, which resynced it differently (109,068
    # frames kept instead of the 105,676 that one whole read gives).
    path = audiogen.write_song(tmp_path / "song.ogg", seconds=3.0, rate=44100, channels=2)
    intact = soundfile.read(str(path), dtype="float32", always_2d=True)[0]
    _zero_the_middle(path)
    whole = soundfile.read(str(path), dtype="float32", always_2d=True)[0]
    with SongDecoder(str(path), sample_rate=44100, block_frames=4096) as song:
        mono = np.concatenate([block.copy() for block in song.blocks()])
        header_frames = song.header_frames
        decoded = song.decoded_frames
        assert song.stopped_by is None  # the decoder reports nothing: only the shortfall shows
        assert song.truncation == (
            f"truncated: decoded {decoded} of the {header_frames} frames the header promised "
            f"({100 * decoded / header_frames:.1f}%)"
        )
    assert header_frames == 44100 * 3 and decoded == whole.shape[0] < 0.9 * header_frames
    np.testing.assert_array_equal(mono, reference.downmix(whole))
    before_damage = int(0.3 * header_frames)
    np.testing.assert_array_equal(mono[:before_damage], reference.downmix(intact)[:before_damage])


def test_mp3_cut_inside_its_first_frames_cannot_be_opened(tmp_path):
    # 1% of a 2 s mono mp3 is 195 bytes: less than the LAME tag frame and one audio frame.
    path = audiogen.write_truncated_mp3(tmp_path / "cut.mp3", fraction=0.01)
    with pytest.raises(AudioDecodeError, match="no decoder recognised the data"):
        SongDecoder(str(path), sample_rate=TARGET)


def test_mp3_cut_by_under_one_percent_passes_as_whole(tmp_path):
    # The header may overstate an mp3's length slightly, so a 1% shortfall is tolerated.
    path = audiogen.write_truncated_mp3(tmp_path / "cut.mp3", fraction=0.995)
    with SongDecoder(str(path), sample_rate=TARGET) as song:
        for _ in song.blocks():
            pass
        assert 0.99 * 88200 < song.decoded_frames < 88200
        assert song.truncation is None


# ---------------------------------------------------------------------------------------
# Memory

# The child's own peak (VmHWM; see peak_memory): ru_maxrss would start at pytest's peak.
_MEASURE = textwrap.dedent("""
    import sys
    from peak_memory import own_peak_kb
    from rainforest.audio import SongDecoder

    def decode(path):
        frames = 0
        with SongDecoder(path, sample_rate=16000) as song:
            for block in song.blocks():
                frames += len(block)
        return frames

    decode(sys.argv[2])  # compile the downmix kernel and load the codecs first
    before = own_peak_kb()
    frames = decode(sys.argv[1])
    after = own_peak_kb()
    print(frames, (after - before) * 1024)
""")


@pytest.mark.slow
def test_long_song_decodes_in_bounded_memory(tmp_path):
    rate, channels, minutes = 48000, 2, 10
    path = tmp_path / "long.wav"
    # Written a second at a time: the test itself must not hold the song either.
    with soundfile.SoundFile(str(path), "w", samplerate=rate, channels=channels,
                             subtype="PCM_16") as out:
        second = audiogen.tone(1.0, rate, channels)
        for _ in range(minutes * 60):
            out.write(second)
    warm = audiogen.write_song(tmp_path / "warm.wav", seconds=0.1, rate=rate, channels=channels)
    as_float32 = minutes * 60 * rate * channels * 4  # 230 MB

    # A fresh process, so its peak RSS reflects this decode only (C allocations included).
    frames, grown = (int(v) for v in run_child(_MEASURE, path, warm).split())
    assert frames == minutes * 60 * TARGET
    assert grown < 64 << 20, f"peak RSS grew {grown >> 20} MiB for a {as_float32 >> 20} MiB song"
