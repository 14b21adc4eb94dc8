"""mu-law companding between float audio in [-1, 1] and unsigned 8-bit codes.

Convention (the README's dataset format; pinned by ``tests/reference.py``), with mu = 255::

    encode(x) = floor((sign(x) * ln(1 + mu|x|) / ln(1 + mu) + 1) / 2 * mu + 0.5)
    decode(c) = sign(y) * ((1 + mu)**|y| - 1) / mu,  y = 2c/mu - 1   (the bin centre)

Inputs outside [-1, 1] are clipped. Encoding needs no logarithm per sample: the formula is
monotonic, so each code k has a smallest float32 input ``t_k`` that reaches it. Those 255
thresholds are found once, by bisection over the float32 values with the formula itself, and
encoding becomes a table look-up plus one comparison, exact for every float32 input.

The per-sample integer work is emitted as 32-bit LLVM IR (:func:`_bucket_index`,
:func:`_finish_code`) because Numba widens int32 arithmetic to int64, which halves the SIMD
width; the look-up itself is a short scalar loop between two vectorised ones.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

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


_KEY_MINUS_ONE = int(_ordered_keys(np.float32(-1.0)))
_KEY_ONE = int(_ordered_keys(np.float32(1.0)))
# A bucket is 2**18 consecutive float32 keys: at most 3.1% of its values' magnitude, narrower
# than any mu-law bin (at least 4%), so it holds at most one threshold (checked at build).
_BUCKET_SHIFT = 18
_LOW_MASK = (1 << _BUCKET_SHIFT) - 1
_FIRST_BUCKET = _KEY_MINUS_ONE >> _BUCKET_SHIFT
#: Samples per chunk: the index and entry buffers of a chunk stay in L1.
_CHUNK = 512


def _threshold_keys():
    """Key of the smallest float32 reaching code k, for k = 1..255, by bisection over every
    float32 key in [-1, 1] (the range outside clips to codes 0 and 255)."""
    lo = np.full(MU, _KEY_MINUS_ONE, dtype=np.int64)
    hi = np.full(MU, _KEY_ONE, dtype=np.int64)
    target = np.arange(1, MU + 1)
    while np.any(hi - lo > 0):
        mid = (lo + hi) // 2
        reached = _formula_codes(_key_to_float(mid.astype(np.int32))) >= target
        hi = np.where(reached, mid, hi)
        lo = np.where(reached, lo, mid + 1)
    return hi


def _build_encode_table():
    """One int32 per bucket of clipped keys: ``code | rise << 8``.

    ``code`` is the code of the bucket's first key and ``rise`` the offset within the bucket of
    the threshold to code + 1, or 2**18 (never reached) when the bucket holds none.
    """
    thresholds = _threshold_keys()
    buckets = np.arange(_FIRST_BUCKET, (_KEY_ONE >> _BUCKET_SHIFT) + 1, dtype=np.int64)
    first_keys = buckets << _BUCKET_SHIFT
    code = np.searchsorted(thresholds, first_keys, side="right")
    next_code = np.searchsorted(thresholds, first_keys + _LOW_MASK, side="right")
    assert np.all(next_code - code <= 1), "a bucket holds two mu-law thresholds"
    next_threshold = thresholds[np.minimum(code, MU - 1)]
    rise = np.where(next_code > code, next_threshold - first_keys, _LOW_MASK + 1)
    return (code | (rise << 8)).astype(np.int32)


def _build_decode_table():
    y = 2.0 * np.arange(MU + 1, dtype=np.float64) / MU - 1.0
    return (np.sign(y) * ((1.0 + MU) ** np.abs(y) - 1.0) / MU).astype(np.float32)


_ENCODE_TABLE = _build_encode_table()
DECODE_TABLE = _build_decode_table()
DECODE_TABLE.setflags(write=False)

_I32 = ir.IntType(32)


def _clipped_key(builder, bits):
    """IR: the ordered key of float32 ``bits``, clamped to the keys of [-1, 1]."""
    sign_fill = builder.and_(builder.ashr(bits, _I32(31)), _I32(0x7FFFFFFF))
    key = builder.xor(bits, sign_fill)
    key = builder.select(
        builder.icmp_signed("<", key, _I32(_KEY_MINUS_ONE)), _I32(_KEY_MINUS_ONE), key
    )
    return builder.select(builder.icmp_signed(">", key, _I32(_KEY_ONE)), _I32(_KEY_ONE), key)


@intrinsic
def _bucket_index(typingctx, bits):
    """Encode-table index of a float32 given as its int32 bit pattern."""

    def codegen(context, builder, signature, args):
        key = _clipped_key(builder, args[0])
        return builder.sub(builder.ashr(key, _I32(_BUCKET_SHIFT)), _I32(_FIRST_BUCKET))

    return types.uint32(types.int32), codegen


@intrinsic
def _finish_code(typingctx, bits, entry):
    """The code of ``bits`` from its encode-table entry: base code, plus one past the rise."""

    def codegen(context, builder, signature, args):
        bits, entry = args
        low = builder.and_(_clipped_key(builder, bits), _I32(_LOW_MASK))
        past_rise = builder.icmp_signed(">=", low, builder.ashr(entry, _I32(8)))
        code = builder.add(builder.and_(entry, _I32(0xFF)), builder.zext(past_rise, _I32))
        return builder.trunc(code, ir.IntType(8))

    return types.uint8(types.int32, types.int32), codegen


@intrinsic
def _add_if_nan(typingctx, count, bits):
    """``count + isnan(bits)`` in int32: a NaN has all exponent bits and some mantissa bit set."""

    def codegen(context, builder, signature, args):
        count, bits = args
        magnitude = builder.and_(bits, _I32(0x7FFFFFFF))
        nan = builder.icmp_signed(">", magnitude, _I32(0x7F800000))
        return builder.add(count, builder.zext(nan, _I32))

    return types.int32(types.int32, types.int32), codegen


@jit
def _mulaw_encode(x, out, table):
    """Encode float32 ``x`` into ``out``; returns the number of NaNs seen."""
    all_bits = x.view(np.int32)
    index = np.empty(_CHUNK, dtype=np.uint32)
    entry = np.empty(_CHUNK, dtype=np.int32)
    nans = 0
    for start in range(0, x.shape[0], _CHUNK):
        size = min(_CHUNK, x.shape[0] - start)
        # Slices, not start + i: Numba cannot prove start + i >= 0 and would add
        # negative-index wraparound, which stops LLVM vectorising.
        bits = all_bits[start : start + size]
        codes = out[start : start + size]
        chunk_nans = np.int32(0)
        for i in range(size):  # vectorised
            index[i] = _bucket_index(bits[i])
            chunk_nans = _add_if_nan(chunk_nans, bits[i])
        for i in range(size):  # the look-up stays scalar: LLVM emits no gather on AVX2 targets
            entry[i] = table[index[i]]
        for i in range(size):  # vectorised
            codes[i] = _finish_code(bits[i], entry[i])
        nans += chunk_nans
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
    nans = _mulaw_encode(x, out, _ENCODE_TABLE)
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
