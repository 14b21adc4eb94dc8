"""End-to-end preprocessing speed on real mp3 songs, on one core, against two alternatives.

Measured side by side in one run, rounds interleaved so machine noise hits all three alike:

- ``rainforest``: ``preprocess(..., cluster="sync")`` over the songs into a fresh dataset:
  hashing, decoding, mixing, soxr resampling, mu-law, trimming, shard and manifest writing.
- ``decode only``: soundfile decoding the same files in blocks, nothing else: the floor a
  user would write, and the one the target is stated against.
- ``libsndfile``: the same decoding with libsndfile's ``sf_readf_float`` called directly, as
  rainforest does, without soundfile's position check and seek around every block: the true
  floor, reported beside it so the ratio cannot improve by decoding faster than the floor.
- ``numpy/scipy``: the straightforward pipeline: whole-file decode, ``mean`` mix,
  ``scipy.signal.resample_poly``, float64 mu-law with ``np.digitize``, trimming with
  ``np.flatnonzero``, ``np.save``.

The songs are the Ogg tracks of Debian's ``wesnoth-1.16-music`` (GPL-2+), turned into mp3s by
soundfile and cached; nothing is committed. Reported: real-time factor (seconds of audio per
second of wall time), median and min..max over the rounds, and the ratios of the medians.

Usage: python benchmarks/preprocess.py [--songs 12] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import soundfile

from rainforest.audio import encode_song, read_frames
from rainforest.config import AudioConfig
from rainforest.kernels import mulaw_decode
from rainforest.preprocess import preprocess
from rainforest.samples import cache_root, debian_music, mp3_copies


def decode_only(paths):
    for path in paths:
        with soundfile.SoundFile(str(path)) as song:
            for _ in song.blocks(blocksize=1 << 16, dtype="float32", always_2d=True):
                pass


def libsndfile_direct(paths):
    for path in paths:
        with soundfile.SoundFile(str(path)) as song:
            buffer = np.empty((1 << 16, song.channels), dtype=np.float32)
            while read_frames(song, buffer, buffer.shape[0]) == buffer.shape[0]:
                pass


def numpy_scipy(paths, out_dir, rate=16000, mu=255):
    from math import gcd

    from scipy.signal import resample_poly

    edges = np.linspace(-1, 1, mu + 1)[1:-1]  # 255 inner edges of 256 equal bins in y
    for index, path in enumerate(paths):
        frames, source_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        mono = frames.mean(axis=1)
        common = gcd(rate, source_rate)
        resampled = resample_poly(mono, rate // common, source_rate // common)
        x = np.clip(resampled.astype(np.float64), -1, 1)
        y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
        codes = np.digitize(y, edges).astype(np.uint8)
        loud = np.flatnonzero(np.abs(x) >= np.abs(x).max() * 0.01)
        np.save(os.path.join(out_dir, f"{index}.npy"), codes[loud[0] : loud[-1] + 1])


def rainforest_run(paths, out_dir):
    preprocess([str(p) for p in paths], out_dir, cluster="sync", progress=False,
               log=lambda line: None)


def codes_against_hq(paths, quality):
    """How far ``quality``'s codes lie from HQ's: the share of codes that differ, and the
    signal-to-noise ratio of the decoded mu-law audio (dB), over every song."""
    differ = total = 0
    signal = noise = 0.0
    for path in paths:
        songs = {}
        for name in (quality, "HQ"):
            chunks = []
            encode_song(str(path), AudioConfig(resample_quality=name), chunks)
            songs[name] = np.concatenate(chunks)
        n = min(len(songs[quality]), len(songs["HQ"]))  # trimming may differ by a sample
        ours, reference = songs[quality][:n], songs["HQ"][:n]
        differ += int(np.count_nonzero(ours != reference))
        total += n
        clean = mulaw_decode(reference).astype(np.float64)
        signal += float(np.sum(clean ** 2))
        noise += float(np.sum((mulaw_decode(ours).astype(np.float64) - clean) ** 2))
    return differ / total, 10 * np.log10(signal / max(noise, 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--songs", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    oggs = debian_music("wesnoth-1.16-music")[: args.songs]
    paths = mp3_copies(oggs, out_dir=cache_root() / "mp3" / "wesnoth-1.16-music")
    audio_seconds = sum(soundfile.info(str(p)).duration for p in paths)
    print(f"{len(paths)} real mp3 songs, {audio_seconds / 60:.1f} min of audio, "
          f"{sum(p.stat().st_size for p in paths) / 1e6:.1f} MB; {os.cpu_count()} cores here, "
          "one used")

    scratch = tempfile.mkdtemp(prefix="rainforest-bench-")
    methods = {
        "rainforest": lambda out: rainforest_run(paths, out),
        "decode only": lambda out: decode_only(paths),
        "libsndfile": lambda out: libsndfile_direct(paths),
        "numpy/scipy": lambda out: numpy_scipy(paths, out),
    }
    rainforest_run(paths[:1], os.path.join(scratch, "warm-up"))  # JIT compile, not timed
    timings = {name: [] for name in methods}
    for round_index in range(args.rounds):
        for name, method in methods.items():
            out = os.path.join(scratch, f"{name.replace(' ', '-').replace('/', '-')}-{round_index}")
            os.makedirs(out, exist_ok=True)
            start = time.perf_counter()
            method(out)
            timings[name].append(time.perf_counter() - start)
            shutil.rmtree(out)
    shutil.rmtree(scratch)

    factors = {name: [audio_seconds / t for t in ts] for name, ts in timings.items()}
    median = {name: statistics.median(f) for name, f in factors.items()}
    print(f"\n{'method':<14}{'x real time (median)':>22}{'min..max':>18}")
    for name, values in factors.items():
        print(f"{name:<14}{median[name]:>22.0f}{min(values):>10.0f}..{max(values):<7.0f}")
    floor = median["decode only"]
    share = median["rainforest"] / floor
    print(f"\nrainforest / decode only : {share:.2f}  (target >= 0.80: "
          f"{'met' if share >= 0.8 else 'MISSED'})")
    print(f"rainforest / libsndfile  : {median['rainforest'] / median['libsndfile']:.2f}  "
          f"(decode only / libsndfile: {floor / median['libsndfile']:.2f})")
    differ, snr = codes_against_hq(paths, "MQ")
    print(f"MQ (the default) against HQ: {100 * differ:.2f}% of codes differ, decoded SNR "
          f"{snr:.1f} dB")
    print(f"rainforest / numpy-scipy : {median['rainforest'] / median['numpy/scipy']:.1f}x")
    print(f"rainforest end to end    : {median['rainforest']:.0f}x real time on one core"
          "  (target >= 500)")


if __name__ == "__main__":
    main()
