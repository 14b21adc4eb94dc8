"""bfloat16 products for the training kernels' bfloat16 variant (:mod:`.train_stack`).

The same products as :mod:`._tiles`, with bfloat16 operands (uint16, the upper half of a
float32, rounded to nearest even by :func:`to_bfloat16`) and float32 sums: on AVX512_BF16 each
VDPBF16PS adds two products per lane, twice what an FMA does (:func:`._lanes.pair_multiply_add`).
The pairs run along the sum, so the second operand of a product is packed in pairs of rows
(:func:`pack_pairs`: ``packed[p, 2c + e] = w[2p + e, c]``), and both operands of a weight
gradient, whose sum runs over positions, in pairs of positions (:func:`interleave_rows`).
Each output gets its terms in a fixed order (pair by pair, the second of a pair first), so the
result does not depend on tiles or threads.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from rainforest.kernels._lanes import load_pairs, load_vector, pair_multiply_add, store_vector
from rainforest.kernels._tiles import TILE_ROWS
from rainforest.kernels.fused_loop import _GENERATE_OPTIONS

_OPTIONS = _GENERATE_OPTIONS
_QUIET_NAN = np.uint16(0x7FC0)


@intrinsic
def _bits_of(typingctx, value):
    """The uint32 bit pattern of a float32 (a register move)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@njit(inline="always", **_OPTIONS)
def _bfloat16(value):
    """``value`` rounded to the nearest bfloat16 (ties to even), as its uint16 bits."""
    if value != value:
        return _QUIET_NAN
    bits = _bits_of(value)
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
                     >> np.uint32(16))


@njit(**_OPTIONS)
def to_bfloat16(source, row, rows, target, target_row):
    """target[target_row + i] = bfloat16(source[row + i]) for i < rows (float32 -> uint16)."""
    for i in range(rows):
        for c in range(source.shape[1]):
            target[target_row + i, c] = _bfloat16(source[row + i, c])


def bfloat16_bits(array) -> np.ndarray:
    """A float32 array rounded to bfloat16, as uint16 bits (the kernels' rounding)."""
    flat = np.ascontiguousarray(array, np.float32).reshape(1, -1)
    out = np.empty(flat.shape, np.uint16)
    to_bfloat16(flat, 0, 1, out, 0)
    return out.reshape(np.shape(array))


def pack_pairs(matrix) -> np.ndarray:
    """A (K, N) float32 matrix, K even, as (K / 2, 2N) bfloat16 pairs of rows."""
    bits = bfloat16_bits(matrix)
    k, n = bits.shape
    return np.ascontiguousarray(bits.reshape(k // 2, 2, n).transpose(0, 2, 1)).reshape(k // 2,
                                                                                       2 * n)


@njit(**_OPTIONS)
def interleave_rows(source, row, rows, target):
    """target[p, 2c + e] = source[row + 2p + e, c] for the ``rows`` rows (uint16), a last odd
    row paired with zeros."""
    channels = source.shape[1]
    for p in range((rows + 1) // 2):
        for e in range(2):
            if 2 * p + e < rows:
                for c in range(channels):
                    target[p, 2 * c + e] = source[row + 2 * p + e, c]
            else:
                for c in range(channels):
                    target[p, 2 * c + e] = 0


@njit(inline="always", **_OPTIONS)
def _pair_tile6(out, o, j, a, ra, ca, kpa, wa, b, rb, cb, kpb, wb, width):
    """out[o:o+6, j:j+width] += bf16 rows a[ra:ra+6, ca:ca+2 kpa] @ (wa, packed) + the same
    for b; ``ca``, ``cb`` count uint16 columns."""
    c0, c1 = load_vector(out, o, j, width), load_vector(out, o + 1, j, width)
    c2, c3 = load_vector(out, o + 2, j, width), load_vector(out, o + 3, j, width)
    c4, c5 = load_vector(out, o + 4, j, width), load_vector(out, o + 5, j, width)
    for p in range(kpa):
        w = load_pairs(wa, p, 2 * j, width)
        c0 = pair_multiply_add(c0, w, a, ra, ca + 2 * p)
        c1 = pair_multiply_add(c1, w, a, ra + 1, ca + 2 * p)
        c2 = pair_multiply_add(c2, w, a, ra + 2, ca + 2 * p)
        c3 = pair_multiply_add(c3, w, a, ra + 3, ca + 2 * p)
        c4 = pair_multiply_add(c4, w, a, ra + 4, ca + 2 * p)
        c5 = pair_multiply_add(c5, w, a, ra + 5, ca + 2 * p)
    for p in range(kpb):
        w = load_pairs(wb, p, 2 * j, width)
        c0 = pair_multiply_add(c0, w, b, rb, cb + 2 * p)
        c1 = pair_multiply_add(c1, w, b, rb + 1, cb + 2 * p)
        c2 = pair_multiply_add(c2, w, b, rb + 2, cb + 2 * p)
        c3 = pair_multiply_add(c3, w, b, rb + 3, cb + 2 * p)
        c4 = pair_multiply_add(c4, w, b, rb + 4, cb + 2 * p)
        c5 = pair_multiply_add(c5, w, b, rb + 5, cb + 2 * p)
    store_vector(out, o, j, c0)
    store_vector(out, o + 1, j, c1)
    store_vector(out, o + 2, j, c2)
    store_vector(out, o + 3, j, c3)
    store_vector(out, o + 4, j, c4)
    store_vector(out, o + 5, j, c5)


@njit(inline="always", **_OPTIONS)
def _pair_tile1(out, o, j, a, ra, ca, kpa, wa, b, rb, cb, kpb, wb, width):
    """:func:`_pair_tile6` for one row."""
    c0 = load_vector(out, o, j, width)
    for p in range(kpa):
        c0 = pair_multiply_add(c0, load_pairs(wa, p, 2 * j, width), a, ra, ca + 2 * p)
    for p in range(kpb):
        c0 = pair_multiply_add(c0, load_pairs(wb, p, 2 * j, width), b, rb, cb + 2 * p)
    store_vector(out, o, j, c0)


@njit(inline="always", **_OPTIONS)
def _pair_panel(out, o, rows, a, ra, ca, ka, wa, b, rb, cb, kb, wb, j, width):
    """Columns j..j+width of every row: tiles of 6 rows, then single rows."""
    full = rows - rows % TILE_ROWS
    for i in range(0, full, TILE_ROWS):
        if width == 64:
            _pair_tile6(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 64)
        elif width == 32:
            _pair_tile6(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 32)
        else:
            _pair_tile6(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 16)
    for i in range(full, rows):
        if width == 64:
            _pair_tile1(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 64)
        elif width == 32:
            _pair_tile1(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 32)
        else:
            _pair_tile1(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 16)


@njit(**_OPTIONS)
def pair_product(out, o, rows, a, ra, ca, ka, wa, b, rb, cb, kb, wb):
    """:func:`._tiles.product` with bfloat16 rows ``a``, ``b`` and packed weights ``wa``,
    ``wb`` (``kpa``, ``kpb`` pairs of rows).

    The loops run operand by operand (``a``, then ``b``), then column block by column block,
    then tile by tile, so one panel of weights (K x 64 columns) stays in the L1 cache for all
    the rows; each output still gets the ``a`` terms, then the ``b`` terms, in k order."""
    n = out.shape[1]
    for source in range(2):
        j = 0
        while j < n:
            width = 64 if j + 64 <= n else (32 if j + 32 <= n else 16)
            if source == 0 and ka > 0:
                _pair_panel(out, o, rows, a, ra, ca, ka, wa, b, rb, cb, 0, wb, j, width)
            elif source == 1 and kb > 0:
                _pair_panel(out, o, rows, a, ra, ca, 0, wa, b, rb, cb, kb, wb, j, width)
            j += width


@njit(inline="always", **_OPTIONS)
def _pair_gradient_tile6(dw, o, j, a, ca, pairs, g, width):
    """dw[o:o+6, j:j+width] += the products over ``pairs`` pairs of positions of the
    interleaved rows ``a`` (columns ca..ca+5) and ``g``."""
    c0, c1 = load_vector(dw, o, j, width), load_vector(dw, o + 1, j, width)
    c2, c3 = load_vector(dw, o + 2, j, width), load_vector(dw, o + 3, j, width)
    c4, c5 = load_vector(dw, o + 4, j, width), load_vector(dw, o + 5, j, width)
    for p in range(pairs):
        v = load_pairs(g, p, 2 * j, width)
        c0 = pair_multiply_add(c0, v, a, p, 2 * ca)
        c1 = pair_multiply_add(c1, v, a, p, 2 * ca + 2)
        c2 = pair_multiply_add(c2, v, a, p, 2 * ca + 4)
        c3 = pair_multiply_add(c3, v, a, p, 2 * ca + 6)
        c4 = pair_multiply_add(c4, v, a, p, 2 * ca + 8)
        c5 = pair_multiply_add(c5, v, a, p, 2 * ca + 10)
    store_vector(dw, o, j, c0)
    store_vector(dw, o + 1, j, c1)
    store_vector(dw, o + 2, j, c2)
    store_vector(dw, o + 3, j, c3)
    store_vector(dw, o + 4, j, c4)
    store_vector(dw, o + 5, j, c5)


@njit(inline="always", **_OPTIONS)
def _pair_gradient_tile4(dw, o, j, a, ca, pairs, g, width):
    """:func:`_pair_gradient_tile6` for 4 weight rows."""
    c0, c1 = load_vector(dw, o, j, width), load_vector(dw, o + 1, j, width)
    c2, c3 = load_vector(dw, o + 2, j, width), load_vector(dw, o + 3, j, width)
    for p in range(pairs):
        v = load_pairs(g, p, 2 * j, width)
        c0 = pair_multiply_add(c0, v, a, p, 2 * ca)
        c1 = pair_multiply_add(c1, v, a, p, 2 * ca + 2)
        c2 = pair_multiply_add(c2, v, a, p, 2 * ca + 4)
        c3 = pair_multiply_add(c3, v, a, p, 2 * ca + 6)
    store_vector(dw, o, j, c0)
    store_vector(dw, o + 1, j, c1)
    store_vector(dw, o + 2, j, c2)
    store_vector(dw, o + 3, j, c3)


@njit(inline="always", **_OPTIONS)
def _pair_gradient_tile2(dw, o, j, a, ca, pairs, g, width):
    """:func:`_pair_gradient_tile6` for 2 weight rows."""
    c0, c1 = load_vector(dw, o, j, width), load_vector(dw, o + 1, j, width)
    for p in range(pairs):
        v = load_pairs(g, p, 2 * j, width)
        c0 = pair_multiply_add(c0, v, a, p, 2 * ca)
        c1 = pair_multiply_add(c1, v, a, p, 2 * ca + 2)
    store_vector(dw, o, j, c0)
    store_vector(dw, o + 1, j, c1)


@njit(inline="always", **_OPTIONS)
def _pair_gradient_tile1(dw, o, j, a, ca, pairs, g, width):
    """:func:`_pair_gradient_tile6` for one weight row."""
    c0 = load_vector(dw, o, j, width)
    for p in range(pairs):
        c0 = pair_multiply_add(c0, load_pairs(g, p, 2 * j, width), a, p, 2 * ca)
    store_vector(dw, o, j, c0)


@njit(inline="always", **_OPTIONS)
def _pair_gradient_columns(dw, o, height, a, ca, pairs, g):
    """dw[o:o+height] (height 6, 4, 2 or 1) += over every column in blocks of 64, 32, 16."""
    n = dw.shape[1]
    j = 0
    while j < n:
        width = 64 if j + 64 <= n else (32 if j + 32 <= n else 16)
        if height == 6:
            if width == 64:
                _pair_gradient_tile6(dw, o, j, a, ca, pairs, g, 64)
            elif width == 32:
                _pair_gradient_tile6(dw, o, j, a, ca, pairs, g, 32)
            else:
                _pair_gradient_tile6(dw, o, j, a, ca, pairs, g, 16)
        elif height == 4:
            if width == 64:
                _pair_gradient_tile4(dw, o, j, a, ca, pairs, g, 64)
            elif width == 32:
                _pair_gradient_tile4(dw, o, j, a, ca, pairs, g, 32)
            else:
                _pair_gradient_tile4(dw, o, j, a, ca, pairs, g, 16)
        elif height == 2:
            if width == 64:
                _pair_gradient_tile2(dw, o, j, a, ca, pairs, g, 64)
            elif width == 32:
                _pair_gradient_tile2(dw, o, j, a, ca, pairs, g, 32)
            else:
                _pair_gradient_tile2(dw, o, j, a, ca, pairs, g, 16)
        elif width == 64:
            _pair_gradient_tile1(dw, o, j, a, ca, pairs, g, 64)
        elif width == 32:
            _pair_gradient_tile1(dw, o, j, a, ca, pairs, g, 32)
        else:
            _pair_gradient_tile1(dw, o, j, a, ca, pairs, g, 16)
        j += width


@njit(**_OPTIONS)
def pair_gradient(dw, o, k_rows, a, pairs, g):
    """dw[o:o+k_rows] += a.T @ g over ``pairs`` pairs of positions, ``a`` and ``g`` interleaved
    by :func:`interleave_rows` (``a`` has ``k_rows`` channels), in tiles of 6 weight rows (the
    rest in 4, 2 and 1)."""
    i = 0
    for height in (6, 4, 2, 1):
        while k_rows - i >= height:
            _pair_gradient_columns(dw, o + i, height, a, i, pairs, g)
            i += height
