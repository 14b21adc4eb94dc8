"""The residual stack of a WaveNet training step, forward and backward, in fused kernels.

The stack is every gated, dilated block of ``rainforest.network`` between the input lookup
and the output head: for block ``k`` with dilation ``d`` and input ``x`` (``n`` positions),

    z[t]     = gate_bias + x[t] @ Wg[:R] + x[t + d] @ Wg[R:]        t < m = n - d
    gated[t] = tanh(z[t, :G]) * sigmoid(z[t, G:])
    next[t]  = residual_bias + x[t + d] + gated[t] @ Wr             (all but the last block)
    skip    += gated[t] @ Ws  over the last T positions

and the stack returns ``skip`` (without the skip biases, which the head adds). Each block of
:data:`BLOCK_ROWS` positions of a layer goes through the gate product, the activation and the
residual product while its activations are in the L2 cache; the skip sum then runs through
every layer for a block of targets at a time, so it never goes to memory and back per layer.
Every product runs in register tiles of 6 rows x 64 (or 32, or 16) columns, as the generation
loop's do (:mod:`rainforest.kernels.fused_loop`; here :mod:`._tiles`, and :mod:`._pairs` for
bfloat16). The backward pass runs the same tiles on the transposed weights, and the weight
gradients as register tiles of 6 weight rows x 64 columns summed over the positions.

Layout (float32, C-contiguous, channels padded to multiples of 16: see
:meth:`StackShape.pad_weights`): every array is 2-D, one row per position. Layer ``k``'s input
of batch item ``b`` at position ``t`` is row ``x_offsets[k] + b * n_k + t`` of ``xs``; its
gate values ``[tanh, sigmoid]`` and gated output at position ``t < m_k`` are rows
``act_offsets[k] + b * m_k + t`` of ``acts`` and ``gated``; weights are stacked by layer
(``Wg`` rows ``k * 2R ..``).

Determinism: positions are cut into fixed chunks (:data:`CHUNK_ROWS`, never across a batch
item or the skip boundary), every chunk sums its own part of each weight gradient in position
order, and the parts are added in chunk order. Which thread ran which chunk never changes a
bit, so 1 or 2 threads (or cores) give the same gradients.
"""

import time

import numba
import numpy as np
from numba import njit, prange

from rainforest.errors import ParameterError
from rainforest.kernels._pairs import (
    interleave_rows,
    pack_pairs,
    pair_gradient,
    pair_product,
    to_bfloat16,
)
from rainforest.kernels._tiles import gradient, product
from rainforest.kernels._validate import positive_int
from rainforest.kernels.fused_loop import _GENERATE_OPTIONS, _sigmoid32, _tanh32

_OPTIONS = _GENERATE_OPTIONS
_PARALLEL = dict(_GENERATE_OPTIONS, parallel=True)

#: Positions a block of work goes through every step of a pass with (a gate product, the
#: activation, the residual product): a multiple of the register tiles' 6 rows, whose
#: activations stay in the L2 cache while each panel of weights is in L1 for all its rows.
BLOCK_ROWS = 48
#: Positions per task; a multiple of BLOCK_ROWS. Gradient parts are summed per chunk.
CHUNK_ROWS = 384
#: Channel counts are padded to a multiple of this (one AVX-512 vector of float32).
ALIGN = 16
_ONE = np.float32(1.0)


# --- the passes --------------------------------------------------------------------------------


@njit(**_OPTIONS)
def _input_chunks(batch, n, d, m):
    """:func:`_chunks` for a block's input positions, cut where its taps start or stop
    reading: at ``d`` and ``m`` (``n = m + d``)."""
    low, high = min(d, m), max(d, m)
    per_item = 3 + n // CHUNK_ROWS + 1
    found = np.empty((batch * per_item, 3), np.int64)
    count = 0
    for b in range(batch):
        for first, end in ((0, low), (low, high), (high, n)):
            for t in range(first, end, CHUNK_ROWS):
                found[count, 0] = b
                found[count, 1] = t
                found[count, 2] = min(t + CHUNK_ROWS, end)
                count += 1
    return found[:count]


@njit(**_OPTIONS)
def _chunks(batch, positions, tail):
    """(count, 3) rows of (batch item, first position, end): each item's ``positions`` cut at
    ``positions - tail`` (where the skip sum starts), then into CHUNK_ROWS pieces."""
    cut = positions - tail
    per_item = (cut + CHUNK_ROWS - 1) // CHUNK_ROWS + (tail + CHUNK_ROWS - 1) // CHUNK_ROWS
    found = np.empty((batch * per_item, 3), np.int64)
    count = 0
    for b in range(batch):
        for first, end in ((0, cut), (cut, positions)):
            for t in range(first, end, CHUNK_ROWS):
                found[count, 0] = b
                found[count, 1] = t
                found[count, 2] = min(t + CHUNK_ROWS, end)
                count += 1
    return found[:count]


@njit(inline="always", **_OPTIONS)
def _gate(acts, gated, row, rows, channels):
    """acts rows [f | g] -> [tanh f | sigmoid g], gated = tanh f * sigmoid g, in place."""
    for i in range(row, row + rows):
        for c in range(channels):
            a = _tanh32(acts[i, c])
            s = _sigmoid32(acts[i, channels + c])
            acts[i, c] = a
            acts[i, channels + c] = s
            gated[i, c] = a * s


@njit(**_PARALLEL)
def _layers_forward(xs, acts, gated, gate_bias, wg, wr, br, dilations, lengths, x_offsets,
                    act_offsets, tail, batch, pairs, x16, gated16, wg_pairs, wr_pairs):
    """Fill ``xs`` (past layer 0), ``acts`` and ``gated`` from layer 0's input, block by block.

    With ``pairs`` the products take bfloat16 operands: ``x16`` and ``gated16`` (layer 0's
    rows of ``x16`` given) and the pair-packed weights."""
    layers = dilations.shape[0]
    r, g = xs.shape[1], gated.shape[1]
    for k in range(layers):
        d, n = dilations[k], lengths[k]
        m = n - d
        last = k == layers - 1
        past, current = wg[k * 2 * r:k * 2 * r + r], wg[k * 2 * r + r:(k + 1) * 2 * r]
        residual = wr[k * g:(k + 1) * g]
        past_p = wg_pairs[k * r:k * r + r // 2]
        current_p = wg_pairs[k * r + r // 2:(k + 1) * r]
        residual_p = wr_pairs[k * (g // 2):(k + 1) * (g // 2)]
        chunks = _chunks(batch, m, tail)
        for q in prange(chunks.shape[0]):
            b, first, end = chunks[q, 0], chunks[q, 1], chunks[q, 2]
            for t in range(first, end, BLOCK_ROWS):
                rows = min(BLOCK_ROWS, end - t)
                x_row = x_offsets[k] + b * n + t
                a_row = act_offsets[k] + b * m + t
                _copy_rows(acts, a_row, gate_bias, b * layers + k, 0, rows)
                if pairs:
                    pair_product(acts, a_row, rows, x16, x_row, 0, r // 2, past_p, x16,
                                 x_row + d, 0, r // 2, current_p)
                else:
                    product(acts, a_row, rows, xs, x_row, 0, r, past, xs, x_row + d, 0, r,
                            current)
                _gate(acts, gated, a_row, rows, g)
                if pairs:
                    to_bfloat16(gated, a_row, rows, gated16, a_row)
                if not last:
                    n_row = x_offsets[k + 1] + b * m + t
                    for i in range(rows):
                        for c in range(r):
                            xs[n_row + i, c] = br[k, c] + xs[x_row + d + i, c]
                    if pairs:
                        pair_product(xs, n_row, rows, gated16, a_row, 0, g // 2, residual_p,
                                     gated16, a_row, 0, 0, residual_p)
                        to_bfloat16(xs, n_row, rows, x16, n_row)
                    else:
                        product(xs, n_row, rows, gated, a_row, 0, g, residual, gated, a_row,
                                0, 0, residual)


@njit(**_PARALLEL)
def _skip_sum(skip, gated, ws, dilations, lengths, act_offsets, tail, pairs, gated16,
              ws_pairs):
    """skip = sum over the blocks of their last ``tail`` gated outputs @ their skip kernel,
    a block of targets at a time through every block: the sum stays in the cache instead of
    going to memory and back once per block."""
    layers, g = dilations.shape[0], gated.shape[1]
    batch = skip.shape[0] // tail
    chunks = _chunks(batch, tail, tail)
    for q in prange(chunks.shape[0]):
        b, first, end = chunks[q, 0], chunks[q, 1], chunks[q, 2]
        for t in range(first, end, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, end - t)
            s_row = b * tail + t
            _zero_rows(skip, s_row, rows)
            for k in range(layers):
                m = lengths[k] - dilations[k]
                a_row = act_offsets[k] + b * m + m - tail + t
                if pairs:
                    kernel = ws_pairs[k * (g // 2):(k + 1) * (g // 2)]
                    pair_product(skip, s_row, rows, gated16, a_row, 0, g // 2, kernel, gated16,
                                 a_row, 0, 0, kernel)
                else:
                    kernel = ws[k * g:(k + 1) * g]
                    product(skip, s_row, rows, gated, a_row, 0, g, kernel, gated, a_row, 0, 0,
                            kernel)


@njit(inline="always", **_OPTIONS)
def _gate_gradient(d_gated, acts, dz, a_row, z_row, rows, channels):
    """dz = d gated through tanh x sigmoid: [dg s (1 - a^2), dg a s (1 - s)]."""
    for i in range(rows):
        for c in range(channels):
            a = acts[a_row + i, c]
            s = acts[a_row + i, channels + c]
            dg = d_gated[i, c]
            dz[z_row + i, c] = dg * s * (_ONE - a * a)
            dz[z_row + i, channels + c] = dg * a * s * (_ONE - s)


@njit(inline="always", **_OPTIONS)
def _sum_rows(out, o, source, row, rows):
    """out[o] = sum of source[row:row+rows], in row order."""
    for c in range(out.shape[1]):
        out[o, c] = 0.0
    for t in range(row, row + rows):
        for c in range(out.shape[1]):
            out[o, c] += source[t, c]


@njit(inline="always", **_OPTIONS)
def _copy_rows(out, o, source, row, step, rows):
    """out[o + i] = source[row + step * i] for i < rows (``step`` 0 repeats one row)."""
    for i in range(rows):
        for c in range(out.shape[1]):
            out[o + i, c] = source[row + step * i, c]


@njit(inline="always", **_OPTIONS)
def _zero_rows(out, o, rows):
    for i in range(o, o + rows):
        for c in range(out.shape[1]):
            out[i, c] = 0.0


@njit(**_PARALLEL)
def _add_parts(total, t_row, parts, size, count):
    """total[t_row:t_row+size] = the sum of ``count`` parts of ``size`` rows, in part order."""
    for i in prange(size):
        total[t_row + i] = 0.0
        for q in range(count):
            total[t_row + i] += parts[q * size + i]


@njit(inline="always", **_OPTIONS)
def _interleaved(source, row, rows):
    """:func:`._pairs.interleave_rows` into a new array."""
    out = np.empty(((rows + 1) // 2, 2 * source.shape[1]), np.uint16)
    interleave_rows(source, row, rows, out)
    return out


@njit(**_PARALLEL)
def _layer_gradients(k, d, n, m, tail, has_next, saved, dskip, d_next, dz, transposed,
                     x_offsets, act_offsets, chunks, parts, pairs, saved16, dskip16, d_next16,
                     dz16, transposed_pairs, dx, dx_current):
    """Block ``k``'s dz (into ``dz``, and ``dz16`` with ``pairs``), each chunk's part of its
    weight and bias gradients, and the two taps' parts of d x while dz is in the cache: the
    earlier tap's (with the residual path) into ``dx`` at the same positions, the later tap's
    into ``dx_current`` at ``d`` positions on (:func:`_input_gradient` adds them)."""
    xs, acts, gated = saved
    x16, gated16 = saved16
    wgt, wrt, wst = transposed
    wgt_p, wrt_p, wst_p = transposed_pairs
    part_wg, part_wr, part_ws, part_gb, part_br = parts
    r, g, s = xs.shape[1], gated.shape[1], dskip.shape[1]
    g2 = 2 * g
    residual_t, skip_t = wrt[k * r:(k + 1) * r], wst[k * s:(k + 1) * s]
    residual_tp = wrt_p[k * (r // 2):(k + 1) * (r // 2)]
    skip_tp = wst_p[k * (s // 2):(k + 1) * (s // 2)]
    past_t, current_t = wgt[k * 2 * g2:k * 2 * g2 + g2], wgt[k * 2 * g2 + g2:(k + 1) * 2 * g2]
    past_tp, current_tp = wgt_p[k * g2:k * g2 + g], wgt_p[k * g2 + g:(k + 1) * g2]
    for q in prange(chunks.shape[0]):
        b, first, end = chunks[q, 0], chunks[q, 1], chunks[q, 2]
        in_skip = first >= m - tail
        s_first = b * tail + first - (m - tail)
        d_gated = np.empty((BLOCK_ROWS, g), np.float32)
        for t in range(first, end, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, end - t)
            _zero_rows(d_gated, 0, rows)
            if pairs:
                pair_product(d_gated, 0, rows, d_next16, b * m + t, 0,
                             r // 2 if has_next else 0, residual_tp, dskip16,
                             s_first + t - first, 0, s // 2 if in_skip else 0, skip_tp)
            else:
                product(d_gated, 0, rows, d_next, b * m + t, 0, r if has_next else 0,
                        residual_t, dskip, s_first + t - first, 0, s if in_skip else 0, skip_t)
            _gate_gradient(d_gated, acts, dz, act_offsets[k] + b * m + t, b * m + t, rows, g)
            for i in range(rows):  # the residual path: x[t + d] went into next[t]
                if has_next and t + i >= d:
                    _copy_rows(dx, b * n + t + i, d_next, b * m + t + i - d, 1, 1)
                else:
                    _zero_rows(dx, b * n + t + i, 1)
            _zero_rows(dx_current, b * n + t + d, rows)
            if pairs:
                to_bfloat16(dz, b * m + t, rows, dz16, b * m + t)
                pair_product(dx, b * n + t, rows, dz16, b * m + t, 0, g, past_tp, dz16, 0, 0, 0,
                             past_tp)
                pair_product(dx_current, b * n + t + d, rows, dz16, b * m + t, 0, g, current_tp,
                             dz16, 0, 0, 0, current_tp)
            else:
                product(dx, b * n + t, rows, dz, b * m + t, 0, g2, past_t, dz, 0, 0, 0, past_t)
                product(dx_current, b * n + t + d, rows, dz, b * m + t, 0, g2, current_t, dz, 0,
                        0, 0, current_t)
        count = end - first
        x_row, a_row, z_row = x_offsets[k] + b * n + first, act_offsets[k] + b * m + first, \
            b * m + first
        part_wg[q * 2 * r:(q + 1) * 2 * r] = 0.0
        part_wr[q * g:(q + 1) * g] = 0.0
        part_ws[q * g:(q + 1) * g] = 0.0
        _sum_rows(part_gb, q, dz, z_row, count)
        part_br[q] = 0.0
        if has_next:
            _sum_rows(part_br, q, d_next, b * m + first, count)
        if pairs:
            half = (count + 1) // 2
            dz_i = _interleaved(dz16, z_row, count)
            pair_gradient(part_wg, q * 2 * r, r, _interleaved(x16, x_row, count), half, dz_i)
            pair_gradient(part_wg, q * 2 * r + r, r, _interleaved(x16, x_row + d, count), half,
                          dz_i)
            gated_i = _interleaved(gated16, a_row, count)
            if has_next:
                pair_gradient(part_wr, q * g, g, gated_i, half,
                              _interleaved(d_next16, b * m + first, count))
            if in_skip:
                pair_gradient(part_ws, q * g, g, gated_i, half,
                              _interleaved(dskip16, s_first, count))
        else:
            gradient(part_wg, q * 2 * r, r, xs, x_row, 0, count, dz, z_row)
            gradient(part_wg, q * 2 * r + r, r, xs, x_row + d, 0, count, dz, z_row)
            if has_next:
                gradient(part_wr, q * g, g, gated, a_row, 0, count, d_next, b * m + first)
            if in_skip:
                gradient(part_ws, q * g, g, gated, a_row, 0, count, dskip, s_first)


@njit(**_PARALLEL)
def _input_gradient(d, n, m, has_next, d_next, dx, dx_current, chunks, pairs, dx16):
    """d x of a block: ``dx`` (its earlier tap's part and the residual path, positions < m)
    plus ``dx_current`` (its later tap's, positions >= d), and the residual path where only the
    later tap reads; with ``pairs``, its bfloat16 copy ``dx16``."""
    r = dx.shape[1]
    for q in prange(chunks.shape[0]):
        b, first, end = chunks[q, 0], chunks[q, 1], chunks[q, 2]
        for p in range(b * n + first, b * n + end):
            t = p - b * n
            if t >= m and t < d:  # past the earlier tap, before the later one: unread
                for c in range(r):
                    dx[p, c] = 0.0
            elif t >= m:  # no earlier-tap part here: only the residual path, if any
                for c in range(r):
                    dx[p, c] = (d_next[b * m + t - d, c] if has_next else 0.0) + \
                        dx_current[p, c]
            elif t >= d:
                for c in range(r):
                    dx[p, c] += dx_current[p, c]
        if pairs:
            to_bfloat16(dx, b * n + first, end - first, dx16, b * n + first)


@njit(**_OPTIONS)
def _sum_parts(k, chunks, parts, d_wg, d_wr, d_ws, d_br, d_gate_bias, batch):
    """Block ``k``'s gradients: the chunks' parts added in chunk order."""
    part_wg, part_wr, part_ws, part_gb, part_br = parts
    r, g = part_br.shape[1], d_wr.shape[0] // d_br.shape[0]
    layers, count = d_br.shape[0], chunks.shape[0]
    _add_parts(d_wg, k * 2 * r, part_wg, 2 * r, count)
    _add_parts(d_wr, k * g, part_wr, g, count)
    _add_parts(d_ws, k * g, part_ws, g, count)
    _add_parts(d_br, k, part_br, 1, count)
    for b in range(batch):  # each item's chunks, in order
        d_gate_bias[b * layers + k] = 0.0
        for q in range(count):
            if chunks[q, 0] == b:
                d_gate_bias[b * layers + k] += part_gb[q]


# --- the public wrappers -----------------------------------------------------------------------


def _padded(size):
    return -(-size // ALIGN) * ALIGN


class StackShape:
    """The sizes and offsets of one stack call, channels padded to multiples of :data:`ALIGN`.

    ``positions`` is the length of layer 0's input, ``targets`` the positions whose skip
    outputs are summed (the last ones of every block).
    """

    def __init__(self, dilations, batch, positions, targets, residual, gate, skip):
        for name, value in (("batch", batch), ("positions", positions), ("targets", targets),
                            ("residual channels", residual), ("gate channels", gate),
                            ("skip channels", skip)):
            positive_int(name, value)
        self.dilations = np.asarray(dilations, np.int64)
        if self.dilations.ndim != 1 or not self.dilations.size or self.dilations.min() < 1:
            raise ParameterError(f"dilations must be positive integers, got {dilations!r}")
        self.batch, self.positions, self.targets = int(batch), int(positions), int(targets)
        self.channels = (int(residual), int(gate), int(skip))
        self.r, self.g, self.s = (_padded(c) for c in self.channels)
        self.lengths = positions - np.concatenate([[0], np.cumsum(self.dilations)[:-1]])
        self.outputs = self.lengths - self.dilations
        if self.outputs[-1] != targets:
            raise ParameterError(
                f"{positions} positions through dilations summing to "
                f"{int(self.dilations.sum())} leave {int(self.outputs[-1])} targets, not "
                f"{targets}: give receptive field - 2 + targets positions")
        self.x_offsets = batch * np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.act_offsets = batch * np.concatenate([[0], np.cumsum(self.outputs)[:-1]])
        self.x_rows = int(batch * self.lengths.sum())
        self.act_rows = int(batch * self.outputs.sum())
        per_item = -(-int(self.outputs[0] - targets) // CHUNK_ROWS) + -(-targets // CHUNK_ROWS)
        self.max_chunks = batch * per_item
        #: what tells two shapes apart (their buffers differ)
        self.key = (tuple(self.dilations.tolist()), self.batch, self.positions, self.targets,
                    self.channels)

    @property
    def layers(self) -> int:
        return self.dilations.shape[0]

    def pad_weights(self, gate_bias, gate_kernel, residual_kernel, residual_bias, skip_kernel):
        """The weights in the kernels' layout: 2-D, stacked by layer, channels padded, the
        last block given an all-zero residual (it has none)."""
        (r, g, s), (rp, gp, sp), layers = self.channels, (self.r, self.g, self.s), self.layers
        expected = {"gate_bias": (gate_bias, (self.batch, layers, 2 * g)),
                    "gate_kernel": (gate_kernel, (layers, 2 * r, 2 * g)),
                    "residual_kernel": (residual_kernel, (layers - 1, g, r)),
                    "residual_bias": (residual_bias, (layers - 1, r)),
                    "skip_kernel": (skip_kernel, (layers, g, s))}
        for name, (array, wanted) in expected.items():
            if np.shape(array) != wanted:
                raise ParameterError(f"{name} must have shape {wanted}, got {np.shape(array)}")
        wg = np.zeros((layers, 2 * rp, 2 * gp), np.float32)
        for tap in range(2):
            for half in range(2):
                wg[:, tap * rp:tap * rp + r, half * gp:half * gp + g] = \
                    gate_kernel[:, tap * r:(tap + 1) * r, half * g:(half + 1) * g]
        bias = np.zeros((self.batch, layers, 2 * gp), np.float32)
        bias[..., :g], bias[..., gp:gp + g] = gate_bias[..., :g], gate_bias[..., g:]
        wr = np.zeros((layers, gp, rp), np.float32)
        wr[:layers - 1, :g, :r] = residual_kernel
        br = np.zeros((layers, rp), np.float32)
        br[:layers - 1, :r] = residual_bias
        ws = np.zeros((layers, gp, sp), np.float32)
        ws[:, :g, :s] = skip_kernel
        return (bias.reshape(-1, 2 * gp), wg.reshape(-1, 2 * gp), wr.reshape(-1, rp), br,
                ws.reshape(-1, sp))

    def unpad_gradients(self, d_bias, d_wg, d_wr, d_br, d_ws):
        """The gradients of :meth:`pad_weights`'s inputs, in their own shapes."""
        (r, g, s), (rp, gp), layers = self.channels, (self.r, self.g), self.layers
        d_wg = d_wg.reshape(layers, 2 * rp, 2 * gp)
        gate = np.empty((layers, 2 * r, 2 * g), np.float32)
        for tap in range(2):
            for half in range(2):
                gate[:, tap * r:(tap + 1) * r, half * g:(half + 1) * g] = \
                    d_wg[:, tap * rp:tap * rp + r, half * gp:half * gp + g]
        d_bias = d_bias.reshape(self.batch, layers, 2 * gp)
        bias = np.concatenate([d_bias[..., :g], d_bias[..., gp:gp + g]], axis=-1)
        return (bias, gate, d_wr.reshape(layers, gp, rp)[:layers - 1, :g, :r],
                d_br[:layers - 1, :r], d_ws.reshape(layers, self.g, self.s)[:, :g, :s])


def _pad_channels(array, width):
    """``array`` (rows, c) with zero columns up to ``width``; the array itself if c == width."""
    array = np.ascontiguousarray(array, np.float32)
    if array.shape[-1] == width:
        return array
    out = np.zeros((*array.shape[:-1], width), np.float32)
    out[..., :array.shape[-1]] = array
    return out


#: The products' precisions: float32, or bfloat16 operands summed in float32.
PRECISIONS = ("float32", "bfloat16")
_NONE16 = np.empty((0, 0), np.uint16)


class StackBuffers:
    """Everything one shape of stack call writes, allocated once and reused call after call:
    fresh memory costs a page fault per 4 KiB, hundreds of megabytes a step.

    ``xs``, ``acts`` and ``gated`` (with ``bfloat16``, also their operand copies ``x16`` and
    ``gated16``) are what the forward keeps for the backward; the rest is the backward's
    scratch.
    """

    def __init__(self, shape: StackShape, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ParameterError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        b, r, g, s, chunks = shape.batch, shape.r, shape.g, shape.s, shape.max_chunks
        first = b * int(shape.outputs[0])
        self.xs = np.empty((shape.x_rows, r), np.float32)
        self.acts = np.empty((shape.act_rows, 2 * g), np.float32)
        self.gated = np.empty((shape.act_rows, g), np.float32)
        self.skip = np.empty((b * shape.targets, s), np.float32)
        self.dz = np.empty((first, 2 * g), np.float32)
        self.dx = (np.empty((b * shape.positions, r), np.float32),
                   np.empty((b * shape.positions, r), np.float32))
        self.dx_current = np.empty((b * shape.positions, r), np.float32)
        self.parts = (np.empty((chunks * 2 * r, 2 * g), np.float32),
                      np.empty((chunks * g, r), np.float32), np.empty((chunks * g, s), np.float32),
                      np.empty((chunks, 2 * g), np.float32), np.empty((chunks, r), np.float32))
        pairs = precision == "bfloat16"

        def uint16(rows, columns):
            return np.empty((rows, columns), np.uint16) if pairs else _NONE16

        self.x16, self.gated16 = uint16(shape.x_rows, r), uint16(shape.act_rows, g)
        self.dz16 = uint16(first, 2 * g)
        self.dx16 = (uint16(b * shape.positions, r), uint16(b * shape.positions, r))


def _pairs_of(matrices, layers):
    """Each layer's (K, N) matrix of a stack (layers * K, N) as (K / 2, 2N) bfloat16 pairs."""
    k = matrices.shape[0] // layers
    return np.concatenate([pack_pairs(matrices[i * k:(i + 1) * k]) for i in range(layers)])


def stack_forward(shape, hidden, padded_weights, buffers, *, threads=1):
    """Run the stack: ``hidden`` (batch, positions, residual) is layer 0's input,
    ``padded_weights`` what :meth:`StackShape.pad_weights` gave, ``buffers`` a
    :class:`StackBuffers` of ``shape`` that keeps what :func:`stack_backward` needs (and says
    the precision).

    Returns the skip sum (batch, targets, skip) without its biases, a view into ``buffers``.
    """
    bias, wg, wr, br, ws = padded_weights
    wanted = (shape.batch, shape.positions, shape.channels[0])
    if np.shape(hidden) != wanted:
        raise ParameterError(f"hidden must have shape {wanted}, got {np.shape(hidden)}")
    rows, layers = shape.batch * shape.positions, shape.layers
    buffers.xs[:rows] = _pad_channels(hidden.reshape(rows, -1), shape.r)
    pairs = buffers.precision == "bfloat16"
    packed = (_NONE16, _NONE16, _NONE16)
    if pairs:
        to_bfloat16(buffers.xs, 0, rows, buffers.x16, 0)
        # the gate kernel's two taps are packed apart: a pair never spans them
        packed = (_pairs_of(wg, 2 * layers), _pairs_of(wr, layers), _pairs_of(ws, layers))
    numba.set_num_threads(threads)
    _layers_forward(buffers.xs, buffers.acts, buffers.gated, bias, wg, wr, br, shape.dilations,
                    shape.lengths, shape.x_offsets, shape.act_offsets, shape.targets,
                    shape.batch, pairs, buffers.x16, buffers.gated16, packed[0], packed[1])
    _skip_sum(buffers.skip, buffers.gated, ws, shape.dilations, shape.lengths,
              shape.act_offsets, shape.targets, pairs, buffers.gated16, packed[2])
    return buffers.skip[:, :shape.channels[2]].reshape(shape.batch, shape.targets, -1)


def stack_backward(shape, d_skip, padded_weights, buffers, *, threads=1):
    """The gradients of :func:`stack_forward`'s inputs, given the skip sum's ``d_skip`` and
    the ``buffers`` of that forward: ``(d_hidden, d_gate_bias, d_gate_kernel,
    d_residual_kernel, d_residual_bias, d_skip_kernel)`` in the shapes
    :meth:`StackShape.pad_weights` was given."""
    return _backward(shape, d_skip, padded_weights, buffers, threads, {})


def timed_backward(shape, d_skip, padded_weights, buffers, *, threads=1) -> dict[str, float]:
    """:func:`stack_backward`'s seconds in each of its passes (for benchmarks/train_stack.py)."""
    seconds: dict[str, float] = {"gradients": 0.0, "part sums": 0.0, "input": 0.0}
    _backward(shape, d_skip, padded_weights, buffers, threads, seconds)
    return seconds


def _backward(shape, d_skip, padded_weights, buffers, threads, seconds):
    """Every gradient of the stack, last block first; with ``seconds`` as given, each pass's
    time added to its entry."""
    _, wg, wr, br, ws = padded_weights
    wanted = (shape.batch, shape.targets, shape.channels[2])
    if np.shape(d_skip) != wanted:
        raise ParameterError(f"d_skip must have shape {wanted}, got {np.shape(d_skip)}")
    layers, r, g, s = shape.layers, shape.r, shape.g, shape.s
    wg3 = wg.reshape(layers, 2, r, 2 * g)
    transposed = (np.ascontiguousarray(wg3.transpose(0, 1, 3, 2)).reshape(-1, r),  # taps.T
                  np.ascontiguousarray(wr.reshape(layers, g, r).transpose(0, 2, 1)).reshape(-1, g),
                  np.ascontiguousarray(ws.reshape(layers, g, s).transpose(0, 2, 1)).reshape(-1, g))
    dskip = _pad_channels(d_skip.reshape(shape.batch * shape.targets, -1), s)
    pairs = buffers.precision == "bfloat16"
    dskip16, transposed_pairs = _NONE16, (_NONE16, _NONE16, _NONE16)
    if pairs:
        dskip16 = np.empty(dskip.shape, np.uint16)
        to_bfloat16(dskip, 0, dskip.shape[0], dskip16, 0)
        transposed_pairs = (_pairs_of(transposed[0], 2 * layers),
                            _pairs_of(transposed[1], layers), _pairs_of(transposed[2], layers))
    d_gate_bias = np.empty((shape.batch * layers, 2 * g), np.float32)
    d_wg = np.empty((layers * 2 * r, 2 * g), np.float32)
    d_wr = np.empty((layers * g, r), np.float32)
    d_br = np.empty((layers, r), np.float32)
    d_ws = np.empty((layers * g, s), np.float32)
    saved = (buffers.xs, buffers.acts, buffers.gated)
    saved16 = (buffers.x16, buffers.gated16)
    numba.set_num_threads(threads)
    clock = time.perf_counter
    for k in range(layers - 1, -1, -1):
        d, n = int(shape.dilations[k]), int(shape.lengths[k])
        m = n - d
        has_next = k < layers - 1
        d_next, d_next16 = buffers.dx[(k + 1) % 2], buffers.dx16[(k + 1) % 2]  # block k + 1's
        chunks = _chunks(shape.batch, m, shape.targets)
        started = clock()
        _layer_gradients(k, d, n, m, shape.targets, has_next, saved, dskip, d_next, buffers.dz,
                         transposed, shape.x_offsets, shape.act_offsets, chunks, buffers.parts,
                         pairs, saved16, dskip16, d_next16, buffers.dz16, transposed_pairs,
                         buffers.dx[k % 2], buffers.dx_current)
        summed = clock()
        _sum_parts(k, chunks, buffers.parts, d_wg, d_wr, d_ws, d_br, d_gate_bias, shape.batch)
        inputs = clock()
        _input_gradient(d, n, m, has_next, d_next, buffers.dx[k % 2], buffers.dx_current,
                        _input_chunks(shape.batch, n, d, m), pairs, buffers.dx16[k % 2])
        if seconds:
            seconds["gradients"] += summed - started
            seconds["part sums"] += inputs - summed
            seconds["input"] += clock() - inputs
    d_hidden = buffers.dx[0][:shape.batch * shape.positions]
    hidden = d_hidden[:, :shape.channels[0]].reshape(shape.batch, shape.positions, -1).copy()
    return (hidden, *shape.unpad_gradients(d_gate_bias, d_wg, d_wr, d_br, d_ws))
