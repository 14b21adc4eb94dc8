"""Register-tiled float32 products for the training kernels (:mod:`.train_stack`).

A product adds ``a[rows, :K] @ w`` (optionally plus a second ``b @ wb``) into the rows of
``out``; a gradient adds ``a[rows].T @ g`` into a weight matrix, summed over the rows. Both run
in register tiles of 6 rows x 64, 32 or 16 columns (widths are multiples of 16, the channels
being padded to them): the tile's outputs stay in registers for the whole sum, each vector of
the second operand, loaded once, serves 6 rows, and each output is loaded and stored once. A
tile of 6 rows x 64 columns holds 24 of AVX-512's 32 vector registers. Every output gets its
terms one at a time, in order (k, or the row for a gradient), as fused multiply-adds: the
result does not depend on how rows are split among tiles or threads.
"""

from numba import njit

from rainforest.kernels._lanes import load_vector, store_vector, vector_multiply_add
from rainforest.kernels.fused_loop import _GENERATE_OPTIONS

_OPTIONS = _GENERATE_OPTIONS
#: Rows of a register tile.
TILE_ROWS = 6


@njit(inline="always", **_OPTIONS)
def _tile6(out, o, j, a, ra, ca, ka, wa, b, rb, cb, kb, wb, width):
    """out[o:o+6, j:j+width] += a[ra:ra+6, ca:ca+ka] @ wa[:ka] + b[rb:rb+6, cb:cb+kb] @ wb[:kb]
    (``wa``, ``wb`` row-offset by the caller's slicing of the weight rows: here ``wa`` rows
    start at 0). Each output gets its terms in k order, a then b."""
    c0, c1 = load_vector(out, o, j, width), load_vector(out, o + 1, j, width)
    c2, c3 = load_vector(out, o + 2, j, width), load_vector(out, o + 3, j, width)
    c4, c5 = load_vector(out, o + 4, j, width), load_vector(out, o + 5, j, width)
    for k in range(ka):
        w = load_vector(wa, k, j, width)
        c0 = vector_multiply_add(c0, a[ra, ca + k], w)
        c1 = vector_multiply_add(c1, a[ra + 1, ca + k], w)
        c2 = vector_multiply_add(c2, a[ra + 2, ca + k], w)
        c3 = vector_multiply_add(c3, a[ra + 3, ca + k], w)
        c4 = vector_multiply_add(c4, a[ra + 4, ca + k], w)
        c5 = vector_multiply_add(c5, a[ra + 5, ca + k], w)
    for k in range(kb):
        w = load_vector(wb, k, j, width)
        c0 = vector_multiply_add(c0, b[rb, cb + k], w)
        c1 = vector_multiply_add(c1, b[rb + 1, cb + k], w)
        c2 = vector_multiply_add(c2, b[rb + 2, cb + k], w)
        c3 = vector_multiply_add(c3, b[rb + 3, cb + k], w)
        c4 = vector_multiply_add(c4, b[rb + 4, cb + k], w)
        c5 = vector_multiply_add(c5, b[rb + 5, cb + k], w)
    store_vector(out, o, j, c0)
    store_vector(out, o + 1, j, c1)
    store_vector(out, o + 2, j, c2)
    store_vector(out, o + 3, j, c3)
    store_vector(out, o + 4, j, c4)
    store_vector(out, o + 5, j, c5)


@njit(inline="always", **_OPTIONS)
def _tile1(out, o, j, a, ra, ca, ka, wa, b, rb, cb, kb, wb, width):
    """:func:`_tile6` for one row."""
    c0 = load_vector(out, o, j, width)
    for k in range(ka):
        c0 = vector_multiply_add(c0, a[ra, ca + k], load_vector(wa, k, j, width))
    for k in range(kb):
        c0 = vector_multiply_add(c0, b[rb, cb + k], load_vector(wb, k, j, width))
    store_vector(out, o, j, c0)


@njit(inline="always", **_OPTIONS)
def _panel(out, o, rows, a, ra, ca, ka, wa, b, rb, cb, kb, wb, j, width):
    """Columns j..j+width of every row: tiles of 6 rows, then single rows."""
    full = rows - rows % TILE_ROWS
    for i in range(0, full, TILE_ROWS):
        if width == 64:
            _tile6(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 64)
        elif width == 32:
            _tile6(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 32)
        else:
            _tile6(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 16)
    for i in range(full, rows):
        if width == 64:
            _tile1(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 64)
        elif width == 32:
            _tile1(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 32)
        else:
            _tile1(out, o + i, j, a, ra + i, ca, ka, wa, b, rb + i, cb, kb, wb, 16)


@njit(**_OPTIONS)
def product(out, o, rows, a, ra, ca, ka, wa, b, rb, cb, kb, wb):
    """out[o:o+rows] += a[ra:ra+rows, ca:ca+ka] @ wa + b[rb:rb+rows, cb:cb+kb] @ wb, in tiles
    of 6 rows (then single rows) and 64, 32 or 16 columns (widths are multiples of 16).

    The loops run operand by operand (``a``, then ``b``), then column block by column block,
    then tile by tile, so one panel of weights (K x 64 columns) stays in the L1 cache for all
    the rows; each output still gets the ``a`` terms, then the ``b`` terms, in k order."""
    n = out.shape[1]
    for source in range(2):
        j = 0
        while j < n:
            width = 64 if j + 64 <= n else (32 if j + 32 <= n else 16)
            if source == 0 and ka > 0:
                _panel(out, o, rows, a, ra, ca, ka, wa, b, rb, cb, 0, wb, j, width)
            elif source == 1 and kb > 0:
                _panel(out, o, rows, a, ra, ca, 0, wa, b, rb, cb, kb, wb, j, width)
            j += width


@njit(inline="always", **_OPTIONS)
def _gradient_tile6(dw, o, j, a, ra, ca, rows, g, rg, width):
    """dw[o:o+6, j:j+width] += a[ra:ra+rows, ca:ca+6].T @ g[rg:rg+rows, j:j+width], summed
    over the rows in order."""
    c0, c1 = load_vector(dw, o, j, width), load_vector(dw, o + 1, j, width)
    c2, c3 = load_vector(dw, o + 2, j, width), load_vector(dw, o + 3, j, width)
    c4, c5 = load_vector(dw, o + 4, j, width), load_vector(dw, o + 5, j, width)
    for t in range(rows):
        v = load_vector(g, rg + t, j, width)
        c0 = vector_multiply_add(c0, a[ra + t, ca], v)
        c1 = vector_multiply_add(c1, a[ra + t, ca + 1], v)
        c2 = vector_multiply_add(c2, a[ra + t, ca + 2], v)
        c3 = vector_multiply_add(c3, a[ra + t, ca + 3], v)
        c4 = vector_multiply_add(c4, a[ra + t, ca + 4], v)
        c5 = vector_multiply_add(c5, a[ra + t, ca + 5], v)
    store_vector(dw, o, j, c0)
    store_vector(dw, o + 1, j, c1)
    store_vector(dw, o + 2, j, c2)
    store_vector(dw, o + 3, j, c3)
    store_vector(dw, o + 4, j, c4)
    store_vector(dw, o + 5, j, c5)


@njit(inline="always", **_OPTIONS)
def _gradient_tile4(dw, o, j, a, ra, ca, rows, g, rg, width):
    """:func:`_gradient_tile6` for 4 weight rows."""
    c0, c1 = load_vector(dw, o, j, width), load_vector(dw, o + 1, j, width)
    c2, c3 = load_vector(dw, o + 2, j, width), load_vector(dw, o + 3, j, width)
    for t in range(rows):
        v = load_vector(g, rg + t, j, width)
        c0 = vector_multiply_add(c0, a[ra + t, ca], v)
        c1 = vector_multiply_add(c1, a[ra + t, ca + 1], v)
        c2 = vector_multiply_add(c2, a[ra + t, ca + 2], v)
        c3 = vector_multiply_add(c3, a[ra + t, ca + 3], v)
    store_vector(dw, o, j, c0)
    store_vector(dw, o + 1, j, c1)
    store_vector(dw, o + 2, j, c2)
    store_vector(dw, o + 3, j, c3)


@njit(inline="always", **_OPTIONS)
def _gradient_tile2(dw, o, j, a, ra, ca, rows, g, rg, width):
    """:func:`_gradient_tile6` for 2 weight rows."""
    c0, c1 = load_vector(dw, o, j, width), load_vector(dw, o + 1, j, width)
    for t in range(rows):
        v = load_vector(g, rg + t, j, width)
        c0 = vector_multiply_add(c0, a[ra + t, ca], v)
        c1 = vector_multiply_add(c1, a[ra + t, ca + 1], v)
    store_vector(dw, o, j, c0)
    store_vector(dw, o + 1, j, c1)


@njit(inline="always", **_OPTIONS)
def _gradient_tile1(dw, o, j, a, ra, ca, rows, g, rg, width):
    """:func:`_gradient_tile6` for one weight row."""
    c0 = load_vector(dw, o, j, width)
    for t in range(rows):
        c0 = vector_multiply_add(c0, a[ra + t, ca], load_vector(g, rg + t, j, width))
    store_vector(dw, o, j, c0)


@njit(inline="always", **_OPTIONS)
def _gradient_columns(dw, o, height, a, ra, ca, rows, g, rg):
    """dw[o:o+height] (height 6, 4, 2 or 1 weight rows) += a[.., ca:ca+height].T @ g, across
    every column in blocks of 64, 32 and 16."""
    n = dw.shape[1]
    j = 0
    while j < n:
        width = 64 if j + 64 <= n else (32 if j + 32 <= n else 16)
        if height == 6:
            if width == 64:
                _gradient_tile6(dw, o, j, a, ra, ca, rows, g, rg, 64)
            elif width == 32:
                _gradient_tile6(dw, o, j, a, ra, ca, rows, g, rg, 32)
            else:
                _gradient_tile6(dw, o, j, a, ra, ca, rows, g, rg, 16)
        elif height == 4:
            if width == 64:
                _gradient_tile4(dw, o, j, a, ra, ca, rows, g, rg, 64)
            elif width == 32:
                _gradient_tile4(dw, o, j, a, ra, ca, rows, g, rg, 32)
            else:
                _gradient_tile4(dw, o, j, a, ra, ca, rows, g, rg, 16)
        elif height == 2:
            if width == 64:
                _gradient_tile2(dw, o, j, a, ra, ca, rows, g, rg, 64)
            elif width == 32:
                _gradient_tile2(dw, o, j, a, ra, ca, rows, g, rg, 32)
            else:
                _gradient_tile2(dw, o, j, a, ra, ca, rows, g, rg, 16)
        elif width == 64:
            _gradient_tile1(dw, o, j, a, ra, ca, rows, g, rg, 64)
        elif width == 32:
            _gradient_tile1(dw, o, j, a, ra, ca, rows, g, rg, 32)
        else:
            _gradient_tile1(dw, o, j, a, ra, ca, rows, g, rg, 16)
        j += width


@njit(**_OPTIONS)
def gradient(dw, o, k_rows, a, ra, ca, rows, g, rg):
    """dw[o:o+k_rows] += a[ra:ra+rows, ca:ca+k_rows].T @ g[rg:rg+rows]: a weight gradient's
    part from ``rows`` positions, in tiles of 6 weight rows (the rest in 4, 2 and 1) x 64, 32
    or 16 columns."""
    i = 0
    for height in (6, 4, 2, 1):
        while k_rows - i >= height:
            _gradient_columns(dw, o + i, height, a, ra, ca + i, rows, g, rg)
            i += height
