"""Silence trimming on mu-law codes, with a threshold relative to the song's own peak.

Working on codes keeps trimming exact and streamable: a song's codes can be scanned in blocks
from either end without holding the song in memory.
"""

import numpy as np

from rainforest.errors import ParameterError
from rainforest.kernels._flags import jit
from rainforest.kernels._validate import as_1d
from rainforest.kernels.mulaw import DECODE_TABLE

# |decode(c)| per code, in float64 so comparisons with a float64 threshold are exact.
_ABS_AMPLITUDE = np.abs(DECODE_TABLE.astype(np.float64))


@jit
def _peak_amplitude(codes, abs_amplitude):
    # |decode(c)| grows with |2c - 255|, so the loudest code is the smallest or the largest:
    # a min and max over bytes vectorise, a table look-up per code does not.
    if codes.shape[0] == 0:
        return 0.0
    low = np.uint8(255)
    high = np.uint8(0)
    for i in range(codes.shape[0]):
        low = min(low, codes[i])
        high = max(high, codes[i])
    return max(abs_amplitude[low], abs_amplitude[high])


@jit
def _trim_bounds(codes, threshold, abs_amplitude):
    n = codes.shape[0]
    start = 0
    while start < n and abs_amplitude[codes[start]] < threshold:
        start += 1
    if start == n:
        return 0, 0
    stop = n
    while abs_amplitude[codes[stop - 1]] < threshold:
        stop -= 1
    return start, stop


def peak_amplitude(codes):
    """Largest decoded absolute amplitude among ``codes`` (0.0 for an empty array).

    Examples
    --------
    >>> from rainforest.kernels import mulaw_encode
    >>> round(peak_amplitude(mulaw_encode([0.0, -0.5, 0.25])), 2)
    0.5
    """
    codes = as_1d("codes", codes, np.uint8)
    return float(_peak_amplitude(codes, _ABS_AMPLITUDE))


def trim_bounds(codes, *, threshold):
    """Half-open range ``(start, stop)`` from the first to the last loud sample.

    A sample is loud when its decoded absolute amplitude is at least ``threshold``.
    Returns ``(0, 0)`` when no sample is loud.

    Parameters
    ----------
    codes : array_like of uint8, 1-D
        mu-law codes.
    threshold : float
        Absolute amplitude in [0, 1], usually the song's peak times ``10 ** (-trim_db / 20)``.

    Examples
    --------
    >>> from rainforest.kernels import mulaw_encode
    >>> trim_bounds(mulaw_encode([0, 0, 0.5, 0, 0.3, 0]), threshold=0.1)
    (2, 5)
    """
    codes = as_1d("codes", codes, np.uint8)
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ParameterError(f"threshold must be an amplitude in [0, 1], got {threshold}")
    start, stop = _trim_bounds(codes, threshold, _ABS_AMPLITUDE)
    return int(start), int(stop)


def relative_threshold(peak, trim_db):
    """The trimming threshold ``trim_db`` decibels below ``peak``."""
    if trim_db <= 0:
        raise ParameterError(f"trim_db must be positive, got {trim_db}")
    return float(peak) * 10.0 ** (-float(trim_db) / 20.0)
