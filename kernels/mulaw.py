"""mu-law companding between float audio in [-1, 1] and unsigned 8-bit codes.

Convention (ARCHITECTURE.md, pinned by ``tests/reference.py``), with mu = 255::

    encode(x) = floor((sign(x) * ln(1 + mu|x|) / ln(1 + mu) + 1) / 2 * mu + 0.5)
    decode(c) = sign(y) * ((1 + mu)**|y| - 1) / mu,  y = 2c/mu - 1   (the bin centre)

Inputs outside [-1, 1] are clipped. Encoding needs no logarithm per sample: the formula is
monotonic, so each code k has a smallest float32 input ``t_k`` that reaches it. Those 255
thresholds are found once, by bisection over the float32 values with the formula itself, and
encoding becomes a table look-up plus one comparison, exact for every float32 input.
"""

import numpy as np

from rainforest.errors import ParameterError
from rainforest.kernels._flags import jit
from rainforest.kernels._validate import as_1d

MU = 255
_LOG1P_MU = np.log1p(MU)


def _formula_codes(x):
    """The convention's encode, evaluated in float64 (used only to build the tables)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(MU * np.abs(x)) / _LOG1P_MU
    return np.floor((y + 1.0) / 2.0 * MU + 0.5).astype(np.int64)


def _ordered_keys(x):
    """Map float32 values to int32 keys whose integer order is the float order."""
    bits = np.asarray(x, dtype=np.float32).view(np.int32)
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


def _key_to_float(keys):
    keys = np.asarray(keys, dtype=np.int32)
    return (keys ^ ((keys >> 31) & np.int32(0x7FFFFFFF))).view(np.float32)


def _build_encode_tables():
    # Smallest key reaching code k, for k = 1..255, by bisection over every float32 key in
    # [-1, 1] (the range outside clips to codes 0 and 255).
    lo = np.full(MU, _ordered_keys(np.float32(-1.0)), dtype=np.int64)
    hi = np.full(MU, _ordered_keys(np.float32(1.0)), dtype=np.int64)
    target = np.arange(1, MU + 1)
    while np.any(hi - lo > 0):
        mid = (lo + hi) // 2
        reached = _formula_codes(_key_to_float(mid.astype(np.int32))) >= target
        hi = np.where(reached, mid, hi)
        lo = np.where(reached, lo, mid + 1)
    threshold_keys = np.empty(MU + 2, dtype=np.int32)
    threshold_keys[0] = np.iinfo(np.int32).min
    threshold_keys[1 : MU + 1] = hi
    threshold_keys[MU + 1] = np.iinfo(np.int32).max  # sentinel: code 255 never increments
    # The top 16 bits of a key name a bucket of floats within 0.8% of each other; mu-law bins
    # are at least 4% wide, so a bucket holds at most one threshold (checked below).
    bucket_first_keys = (np.arange(65536, dtype=np.int64) - 32768) << 16
    base = np.searchsorted(threshold_keys[1 : MU + 1], bucket_first_keys, side="right")
    bucket_last_keys = bucket_first_keys + 0xFFFF
    top = np.searchsorted(threshold_keys[1 : MU + 1], bucket_last_keys, side="right")
    assert np.all(top - base <= 1), "a bucket holds two mu-law thresholds"
    return base.astype(np.uint8), threshold_keys


def _build_decode_table():
    y = 2.0 * np.arange(MU + 1, dtype=np.float64) / MU - 1.0
    return (np.sign(y) * ((1.0 + MU) ** np.abs(y) - 1.0) / MU).astype(np.float32)


_BUCKET_BASE, _THRESHOLD_KEYS = _build_encode_tables()
DECODE_TABLE = _build_decode_table()
DECODE_TABLE.setflags(write=False)


@jit
def _mulaw_encode(x, out, bucket_base, threshold_keys):
    """Encode float32 ``x`` into ``out``; returns the number of NaNs seen."""
    keys = x.view(np.int32)
    nans = 0
    for i in range(x.shape[0]):
        bits = keys[i]
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        code = bucket_base[(key >> 16) + 32768]
        out[i] = code + (key >= threshold_keys[code + 1])
        nans += x[i] != x[i]
    return nans


@jit
def _mulaw_decode(codes, out, table):
    for i in range(codes.shape[0]):
        out[i] = table[codes[i]]


def mulaw_encode(x, *, out=None):
    """Encode audio samples into 8-bit mu-law codes.

    Parameters
    ----------
    x : array_like, 1-D
        Samples, nominally in [-1, 1]; values outside are clipped. Converted to float32.
    out : np.ndarray of uint8, optional
        Where to write the codes; must have the same length as ``x``.

    Returns
    -------
    np.ndarray of uint8
        Codes in 0..255.

    Raises
    ------
    ParameterError
        If ``x`` is not 1-D, not numeric, holds NaN, or ``out`` does not fit.

    Examples
    --------
    >>> mulaw_encode([-1.0, 0.0, 1.0]).tolist()
    [0, 128, 255]
    """
    x = as_1d("x", x, np.float32)
    out = _output("out", out, x.shape[0], np.uint8)
    nans = _mulaw_encode(x, out, _BUCKET_BASE, _THRESHOLD_KEYS)
    if nans:
        first = int(np.flatnonzero(np.isnan(x))[0])
        raise ParameterError(f"x holds {nans} NaN sample(s), the first at index {first}")
    return out


def mulaw_decode(codes, *, out=None):
    """Decode 8-bit mu-law codes into float32 samples at the bin centres.

    Examples
    --------
    >>> mulaw_decode(mulaw_encode([0.5])).round(2).tolist()
    [0.5]
    """
    codes = as_1d("codes", codes, np.uint8)
    out = _output("out", out, codes.shape[0], np.float32)
    _mulaw_decode(codes, out, DECODE_TABLE)
    return out


def _output(name, out, length, dtype):
    if out is None:
        return np.empty(length, dtype=dtype)
    if not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != (length,):
        raise ParameterError(f"{name} must be a {np.dtype(dtype)} array of shape ({length},)")
    if not out.flags.c_contiguous:
        raise ParameterError(f"{name} must be C-contiguous")
    return out
