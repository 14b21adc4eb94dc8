"""Training windows cut from a shard's concatenated codes, never across a song boundary.

Random offsets come from splitmix64 (``rainforest.kernels._splitmix``), which a plain-Python
reference reproduces exactly.
"""

import numpy as np

from rainforest.errors import ParameterError
from rainforest.kernels._flags import jit
from rainforest.kernels._splitmix import GOLDEN, _mix
from rainforest.kernels._validate import as_1d, positive_int


@jit
def _valid_counts(lengths, window):
    counts = np.empty(lengths.shape[0], dtype=np.int64)
    for s in range(lengths.shape[0]):
        counts[s] = max(0, lengths[s] - window + 1)
    return counts


@jit
def _random_window_starts(offsets, lengths, window, count, seed, skip):
    valid = _valid_counts(lengths, window)
    cumulative = np.cumsum(valid)
    total = np.uint64(cumulative[-1])
    starts = np.empty(count, dtype=np.int64)
    state = seed + skip * GOLDEN  # skipping draws: one multiply
    for j in range(count):
        state = state + GOLDEN
        draw = np.int64(_mix(state) % total)
        song = np.searchsorted(cumulative, draw, side="right")
        before = cumulative[song - 1] if song > 0 else 0
        starts[j] = offsets[song] + (draw - before)
    return starts


@jit
def _strided_window_starts(offsets, lengths, window, stride):
    valid = _valid_counts(lengths, window)
    total = 0
    for s in range(valid.shape[0]):
        if valid[s] > 0:
            total += (valid[s] - 1) // stride + 1
    starts = np.empty(total, dtype=np.int64)
    j = 0
    for s in range(valid.shape[0]):
        for k in range(0, valid[s], stride):
            starts[j] = offsets[s] + k
            j += 1
    return starts


@jit
def _cut_windows(codes, starts, window, out):
    for j in range(starts.shape[0]):
        out[j, :] = codes[starts[j] : starts[j] + window]


def _songs(offsets, lengths):
    offsets = as_1d("offsets", offsets, np.int64)
    lengths = as_1d("lengths", lengths, np.int64)
    if offsets.shape != lengths.shape:
        raise ParameterError(
            f"offsets and lengths differ in length: {offsets.shape[0]} != {lengths.shape[0]}"
        )
    if offsets.size and (offsets.min() < 0 or lengths.min() < 0):
        raise ParameterError("offsets and lengths must be non-negative")
    return offsets, lengths


def random_window_starts(offsets, lengths, *, window, count, seed, skip=0):
    """Draw ``count`` window starts uniformly over every valid position of every song.

    A song of length ``n`` has ``n - window + 1`` valid starts; songs shorter than ``window``
    have none. Each valid position in the shard is equally likely, and the same ``seed`` gives
    the same starts. ``skip=k`` returns draws ``k .. k + count - 1`` of the same stream without
    making the first ``k``, so a stream can be read from any position.

    Parameters
    ----------
    offsets, lengths : array_like of int, 1-D
        Where each song starts in the shard and how many codes it has.
    window : int
        Window length (receptive field + target length).
    count : int
        How many starts to draw.
    seed : int
        Any integer in 0..2**64-1.
    skip : int
        Draws of the stream to pass over first (>= 0).

    Examples
    --------
    >>> starts = random_window_starts([0, 100], [100, 50], window=40, count=5, seed=1)
    >>> bool(((starts <= 60) | ((starts >= 100) & (starts <= 110))).all())
    True
    """
    offsets, lengths = _songs(offsets, lengths)
    window = positive_int("window", window)
    count = positive_int("count", count)
    if not 0 <= int(seed) < 2**64:
        raise ParameterError(f"seed must be in 0..2**64-1, got {seed}")
    if isinstance(skip, bool) or not isinstance(skip, int | np.integer) or skip < 0:
        raise ParameterError(f"skip must be a non-negative integer, got {skip!r}")
    if not np.any(lengths >= window):
        longest = int(lengths.max()) if lengths.size else 0
        raise ParameterError(
            f"window of {window} samples is longer than every song (longest: {longest}); "
            "use a shorter window or longer songs"
        )
    return _random_window_starts(offsets, lengths, window, count, np.uint64(int(seed)),
                                 np.uint64(int(skip) % 2**64))


def strided_window_starts(offsets, lengths, *, window, stride):
    """Window starts every ``stride`` samples through each song, in song order.

    Examples
    --------
    >>> strided_window_starts([0, 10], [10, 4], window=4, stride=3).tolist()
    [0, 3, 6, 10]
    """
    offsets, lengths = _songs(offsets, lengths)
    window = positive_int("window", window)
    stride = positive_int("stride", stride)
    return _strided_window_starts(offsets, lengths, window, stride)


def cut_windows(codes, starts, *, window):
    """Copy the windows ``codes[s : s + window]`` for each start into a (n, window) array.

    Examples
    --------
    >>> cut_windows(np.arange(10, dtype=np.uint8), [0, 5], window=3).tolist()
    [[0, 1, 2], [5, 6, 7]]
    """
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.dtype != np.uint8:
        raise ParameterError(f"codes must be a 1-D uint8 array, got {codes.dtype} {codes.shape}")
    starts = as_1d("starts", starts, np.int64)
    window = positive_int("window", window)
    if starts.size and (starts.min() < 0 or starts.max() + window > codes.shape[0]):
        raise ParameterError(
            f"a window runs outside the codes: starts span {starts.min()}..{starts.max()}, "
            f"window {window}, codes {codes.shape[0]}"
        )
    out = np.empty((starts.shape[0], window), dtype=np.uint8)
    _cut_windows(codes, starts, window, out)
    return out
