"""The fused WaveNet generation loop: T samples for B streams in one compiled call.

"Fast WaveNet" (Paine et al., 2016, arXiv:1611.09482): a dilated layer only ever needs its own
input from ``dilation`` steps ago, so each layer keeps its past inputs in a ring buffer of
length ``dilation`` and one new sample costs O(layers), not O(receptive field). Here the whole
recurrence (input lookup, every layer, output stack, softmax, sampling) runs in one ``@njit``
function with no Python and no framework call per sample.

Layout (float32, C-contiguous, the matrices in the network's precision; :mod:`rainforest.generate`
exports it from a checkpoint):

============================  ====================  ======================================
array                         shape                 role
============================  ====================  ======================================
``input_previous/current``    (classes, R)          the kernel-2 input conv as two tables
``input_bias``                (R,)
``gate_kernel``               (L, 2R, 2G)           rows 0..R-1 read x[t-d], R..2R-1 x[t]
``gate_bias``                 (B, L, 2G)            per stream: bias + label conditioning
``residual_kernel``           (L, G, R)             row L-1 unused (the last block has none)
``residual_bias``             (L, R)
``skip_kernel``               (L, G, S)
``skip_bias``                 (S,)                  the sum of every block's skip bias
``output1_kernel, _bias``     (S, S), (S,)
``output2_kernel, _bias``     (S, classes), (classes,)
============================  ====================  ======================================

The state a call advances in place: ``rings`` (B, sum(dilations), R) holding layer ``l``'s
input at time ``tau`` in row ``ring_offsets[l] + tau % dilations[l]``; ``last_codes`` (B, 2),
the codes at times t-1 and t; ``rng_states`` (B,) one splitmix64 state per stream. Step ``t``
reads those, computes the logits of the code at ``t + 1`` and samples it.

Matrix products (:func:`_product`) run in register tiles of 4 streams x 64 output columns
(4 AVX-512 registers a stream; with AVX2, 16 columns in 2; see :mod:`rainforest.kernels._lanes`):
the tile's outputs stay in registers for the whole sum over the weight rows, each vector of
weights, loaded once, serves 4 streams, and each output is loaded and stored once per
product. Columns left over go a row at a time; a stream left over, or alone, goes through the
matrix-vector form in blocks of 8 weight rows, which runs at the speed weights arrive. Every
output is summed in the same order whatever the number of streams (its start value, then one
fused multiply-add per weight row, in row order), so the codes of a stream do not depend on
how many streams share its call. ``tanh`` and ``sigmoid`` use :func:`_exp32`, a polynomial
exponential the compiler can vectorise (libm's ``expf`` is a scalar call).

Precisions (:data:`WEIGHT_PRECISIONS`): the five matrices may be stored as ``bfloat16`` (the upper
16 bits of each float32, rounded to nearest even) or ``int8`` (one scale per weight row,
``max |row| / 127``; the two output matrices stay bfloat16), so the single stream reads about
a half or a quarter of the bytes and the medium config's weights fit a core's L2. Products
still multiply and add in float32: a stored weight is widened in a register (a shift, or an
int-to-float convert), and an int8 row's scale is folded into the activation it multiplies,
once per row, not per weight. ``float32`` keeps scales of exactly 1, so its results are bit
for bit what they were before precisions existed.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from rainforest.errors import ParameterError
from rainforest.kernels._flags import JIT_OPTIONS
from rainforest.kernels._lanes import LANES, load_lanes, multiply_add, store_lanes
from rainforest.kernels._splitmix import GOLDEN, _mix
from rainforest.model_config import receptive_field

# FMA contraction only; no reassociation, which would break _exp32's rounding trick and make
# results depend on vector width.
# error_model="numpy": a float division returns inf instead of checking for zero and raising,
# a branch that stops the activation loops from vectorising.
_GENERATE_OPTIONS = dict(JIT_OPTIONS, fastmath={"contract"}, error_model="numpy")

#: ``x + 1.5 * 2**23 - 1.5 * 2**23`` rounds a float32 |x| < 2**22 to the nearest integer.
_ROUNDER = np.float32(12582912.0)
_LOG2E = np.float32(1.4426950408889634)
# ln 2 split so that k * _LN2_HIGH is exact for |k| < 2**9 (Cody and Waite, 1980).
_LN2_HIGH = np.float32(0.693359375)
_LN2_LOW = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.0)
_EXP_MAX = np.float32(88.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_TWO = np.float32(2.0)
# Taylor coefficients 1/n!: on |r| <= ln(2)/2 the degree-7 remainder is below 6e-9.
_C2, _C3, _C4 = np.float32(1 / 2), np.float32(1 / 6), np.float32(1 / 24)
_C5, _C6, _C7 = np.float32(1 / 120), np.float32(1 / 720), np.float32(1 / 5040)


@intrinsic
def _power_of_two(typingctx, k):
    """2**k for a float32 ``k`` holding an integer in [-126, 127], built from its bits."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        exponent = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(exponent, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(types.float32), codegen


#: `generate --precision`: how the loop stores its matrices (see :func:`storage_format`).
WEIGHT_PRECISIONS = ("float32", "bfloat16", "int8")
_INT8_LIMIT = 127
#: The output stack (5% of the medium config's weights) decides the logits most directly:
#: in int8 alone it flipped 7% of the argmax codes, in bfloat16 1.3%; so int8 keeps it bfloat16.
_INT8_KEEPS_BFLOAT16 = ("output1_kernel", "output2_kernel")


def storage_format(kernel, precision):
    """How ``precision`` stores the matrix named ``kernel``: float32, bfloat16 or int8."""
    if precision == "int8" and kernel in _INT8_KEEPS_BFLOAT16:
        return "bfloat16"
    return precision


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the uint32 ``bits`` (a register move, no memory)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def _widen(weight):
    """A stored weight as float32 (see the module docstring); compiled only."""


@overload(_widen, inline="always")
def _widen_overload(weight):
    if weight == types.float32:
        return lambda weight: weight
    if weight == types.uint16:  # bfloat16: the high half of a float32
        return lambda weight: _float32_from_bits(np.uint32(weight) << np.uint32(16))
    if weight == types.int8:
        return lambda weight: np.float32(weight)
    return None


@njit(inline="always", **_GENERATE_OPTIONS)
def _exp32(x):
    """exp(x) in float32 to about 2 ulp, vectorisable; x is clamped to [-87, 88]."""
    # Conditional expressions, not min/max: Numba's min/max do not vectorise.
    x = _EXP_MIN if x < _EXP_MIN else x
    x = _EXP_MAX if x > _EXP_MAX else x
    k = (x * _LOG2E + _ROUNDER) - _ROUNDER
    r = (x - k * _LN2_HIGH) - k * _LN2_LOW
    p = _C6 + r * _C7
    p = _C5 + r * p
    p = _C4 + r * p
    p = _C3 + r * p
    p = _C2 + r * p
    p = _ONE + r * p
    p = _ONE + r * p
    return p * _power_of_two(k)


@njit(inline="always", **_GENERATE_OPTIONS)
def _sigmoid32(x):
    return _ONE / (_ONE + _exp32(-x))


@njit(inline="always", **_GENERATE_OPTIONS)
def _tanh32(x):
    # 2 sigmoid(2x) - 1: absolute error ~1e-7, which is what the next matmul sees.
    return _TWO * _sigmoid32(_TWO * x) - _ONE


@njit(inline="always", **_GENERATE_OPTIONS)
def _splitmix_uniform(states, stream):
    """The next uniform float64 in [0, 1) of a stream's splitmix64 generator: its top 53 bits."""
    state = states[stream] + GOLDEN
    states[stream] = state
    return np.float64(_mix(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(**_GENERATE_OPTIONS)
def _sample(logits, temperature, states, stream, weights):
    """Inverse-CDF sample of softmax(logits / temperature); argmax when temperature is 0."""
    classes = logits.shape[0]
    best = 0
    top = logits[0]
    for k in range(1, classes):
        if logits[k] > top:
            top = logits[k]
            best = k
    if temperature == 0.0:
        return best
    scale = np.float32(1.0 / temperature)
    for k in range(classes):
        weights[k] = _exp32((logits[k] - top) * scale)
    total = 0.0
    for k in range(classes):
        total += weights[k]
    target = _splitmix_uniform(states, stream) * total
    running = 0.0
    for k in range(classes):
        running += weights[k]
        if running > target and weights[k] > 0.0:
            return k
    return best  # only reached through rounding at the very top of the CDF


# Every product below adds to each output in one fixed order: its start value (the bias), then
# x[0] * w[0], x[1] * w[1], ... each as one fused multiply-add, whatever the number of streams
# and whichever block a stream falls in. So a stream's codes do not depend on how many
# streams share its call (``--threads``), and there is no reassociation to make results
# depend on vector width. The speed comes from the blocking, not from reordering the sums.


@njit(inline="always", **_GENERATE_OPTIONS)
def _four_stream_tile(scaled, w, out, b, j):
    """out[b:b+4, j:j+LANES] += scaled[b:b+4, :K] @ w[:, j:j+LANES].

    The register tile: its 4 vectors of outputs stay in registers for the whole sum over k,
    so each output is loaded and stored once per product, and each vector of weights, loaded
    once, serves 4 streams. Each output still gets its terms one at a time in k order."""
    first, second = load_lanes(out, b, j), load_lanes(out, b + 1, j)
    third, fourth = load_lanes(out, b + 2, j), load_lanes(out, b + 3, j)
    for k in range(w.shape[0]):
        weights = load_lanes(w, k, j)
        first = multiply_add(first, scaled[b, k], weights)
        second = multiply_add(second, scaled[b + 1, k], weights)
        third = multiply_add(third, scaled[b + 2, k], weights)
        fourth = multiply_add(fourth, scaled[b + 3, k], weights)
    store_lanes(out, b, j, first)
    store_lanes(out, b + 1, j, second)
    store_lanes(out, b + 2, j, third)
    store_lanes(out, b + 3, j, fourth)


@njit(inline="always", **_GENERATE_OPTIONS)
def _eight_rows_one_stream(x, w, scale, out, b, i):
    """out[b] += (x[b, i:i+8] * scale[i:i+8]) @ w[i:i+8]: the matrix-vector form, each
    output loaded and stored once per 8 weight rows, so the loop runs at the speed weights
    arrive. The sum runs row by row, as in the register tiles: the same result."""
    w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
    w4, w5, w6, w7 = w[i + 4], w[i + 5], w[i + 6], w[i + 7]
    o = out[b]
    a0, a1 = x[b, i] * scale[i], x[b, i + 1] * scale[i + 1]
    a2, a3 = x[b, i + 2] * scale[i + 2], x[b, i + 3] * scale[i + 3]
    a4, a5 = x[b, i + 4] * scale[i + 4], x[b, i + 5] * scale[i + 5]
    a6, a7 = x[b, i + 6] * scale[i + 6], x[b, i + 7] * scale[i + 7]
    for j in range(w.shape[1]):
        first = (((o[j] + a0 * _widen(w0[j])) + a1 * _widen(w1[j])) + a2 * _widen(w2[j])
                 + a3 * _widen(w3[j]))
        o[j] = ((((first + a4 * _widen(w4[j])) + a5 * _widen(w5[j])) + a6 * _widen(w6[j]))
                + a7 * _widen(w7[j]))


@njit(inline="always", **_GENERATE_OPTIONS)
def _rows_one_at_a_time(x, w, scale, out, streams, first_row, first_column):
    """out[streams, first_column:] += (x * scale)[streams, first_row:] @ w[first_row:,
    first_column:], a row at a time."""
    for i in range(first_row, x.shape[1]):
        row = w[i]
        for b in streams:
            value = x[b, i] * scale[i]
            o = out[b]
            for j in range(first_column, w.shape[1]):
                o[j] += value * _widen(row[j])


@njit(**_GENERATE_OPTIONS)
def _product(x, w, scale, out, scaled):
    """out (B, N) += (x (B, K) * scale (K,)) @ w (K, N); ``scaled`` (at least B x K) is scratch.

    Streams in fours go through register tiles of 4 x LANES outputs, and the columns left over
    row by row; each stream left over alone, in blocks of 8 weight rows."""
    streams, inner = x.shape
    tiled_streams = streams - streams % 4
    tiled_columns = w.shape[1] - w.shape[1] % LANES
    for b in range(tiled_streams):  # the tiles' broadcast factors, rounded as x * scale
        for k in range(inner):
            scaled[b, k] = x[b, k] * scale[k]
    for b in range(0, tiled_streams, 4):
        for j in range(0, tiled_columns, LANES):
            _four_stream_tile(scaled, w, out, b, j)
    _rows_one_at_a_time(x, w, scale, out, range(tiled_streams), 0, tiled_columns)
    octets = inner - inner % 8
    for b in range(tiled_streams, streams):
        for i in range(0, octets, 8):
            _eight_rows_one_stream(x, w, scale, out, b, i)
    _rows_one_at_a_time(x, w, scale, out, range(tiled_streams, streams), octets, 0)


@njit(inline="always", **_GENERATE_OPTIONS)
def _output_stack(skip_sum, head, logits, output1_kernel, output1_scale, output1_bias,
                  output2_kernel, output2_scale, output2_bias, scaled):
    """logits = relu(relu(skip_sum) @ output1 + bias) @ output2 + bias, for every stream;
    ``skip_sum`` is rectified in place, ``head`` is the scratch for the middle layer."""
    streams, skip = skip_sum.shape
    for b in range(streams):
        for j in range(skip):
            skip_sum[b, j] = skip_sum[b, j] if skip_sum[b, j] > 0 else np.float32(0.0)
            head[b, j] = output1_bias[j]
    _product(skip_sum, output1_kernel, output1_scale, head, scaled)
    for b in range(streams):
        for j in range(skip):
            head[b, j] = head[b, j] if head[b, j] > 0 else np.float32(0.0)
        for j in range(logits.shape[1]):
            logits[b, j] = output2_bias[j]
    _product(head, output2_kernel, output2_scale, logits, scaled)


@njit(**_GENERATE_OPTIONS)
def _generate(input_previous, input_current, input_bias, gate_kernel, gate_bias,
              residual_kernel, residual_bias, skip_kernel, skip_bias, output1_kernel,
              output1_bias, output2_kernel, output2_bias, scales, dilations, ring_offsets,
              rings, last_codes, rng_states, position, temperature, forced, codes_out,
              logits_out):
    """The loop. Every kernel comes as (K, N) for :func:`_product` (``skip_kernel`` as
    (L*G, S)); ``gate_kernel`` and ``residual_kernel`` carry a leading layer axis.
    ``scales`` holds each kernel's row scales, in that order."""
    gate_scale, residual_scale, skip_scale, output1_scale, output2_scale = scales
    streams, steps = codes_out.shape
    layers = dilations.shape[0]
    residual = rings.shape[2]
    double_residual, gate = 2 * residual, residual_kernel.shape[1]
    double_gate = 2 * gate
    skip = skip_bias.shape[0]
    classes = output2_bias.shape[0]
    record_logits = logits_out.shape[0] > 0
    taps = np.empty((streams, double_residual), np.float32)  # [x(t - d), x(t)] per stream
    z = np.empty((streams, double_gate), np.float32)
    gated = np.empty((streams, gate), np.float32)
    gated_all = np.empty((streams, layers * gate), np.float32)  # for one skip product
    delta = np.empty((streams, residual), np.float32)
    skip_sum = np.empty((streams, skip), np.float32)
    head = np.empty((streams, skip), np.float32)
    logits = np.empty((streams, classes), np.float32)
    weights = np.empty(classes, np.float32)
    scaled = np.empty((streams, max(double_residual, layers * gate, skip)), np.float32)

    for step in range(steps):
        t = position + step
        for b in range(streams):
            previous, current = last_codes[b, 0], last_codes[b, 1]
            for i in range(residual):
                taps[b, residual + i] = (input_previous[previous, i]
                                         + input_current[current, i] + input_bias[i])

        for layer in range(layers):
            slot = ring_offsets[layer] + t % dilations[layer]
            for b in range(streams):
                for i in range(residual):
                    taps[b, i] = rings[b, slot, i]
                    rings[b, slot, i] = taps[b, residual + i]
                for j in range(double_gate):
                    z[b, j] = gate_bias[b, layer, j]
            _product(taps, gate_kernel[layer], gate_scale[layer], z, scaled)
            first = layer * gate
            for b in range(streams):
                for k in range(gate):
                    gated[b, k] = _tanh32(z[b, k]) * _sigmoid32(z[b, gate + k])
                    gated_all[b, first + k] = gated[b, k]
            if layer + 1 < layers:
                # The next layer's x(t) = x(t) + residual; it goes where this one's was.
                for b in range(streams):
                    for i in range(residual):
                        delta[b, i] = residual_bias[layer, i]
                _product(gated, residual_kernel[layer], residual_scale[layer], delta, scaled)
                for b in range(streams):
                    for i in range(residual):
                        taps[b, residual + i] += delta[b, i]

        # Skips of all layers in one product, then relu -> 1x1 -> relu -> 1x1.
        for b in range(streams):
            for j in range(skip):
                skip_sum[b, j] = skip_bias[j]
        _product(gated_all, skip_kernel, skip_scale, skip_sum, scaled)
        _output_stack(skip_sum, head, logits, output1_kernel, output1_scale, output1_bias,
                      output2_kernel, output2_scale, output2_bias, scaled)

        for b in range(streams):
            if record_logits:
                for j in range(classes):
                    logits_out[step, b, j] = logits[b, j]
            code = forced[b, step] if step < forced.shape[1] else -1
            if code < 0:
                code = _sample(logits[b], temperature, rng_states, b, weights)
            codes_out[b, step] = code
            last_codes[b, 0] = last_codes[b, 1]
            last_codes[b, 1] = code


#: Every array of a :class:`FusedNetwork` besides the gate bias, conditioning and dilations.
NETWORK_ARRAYS = ("input_previous", "input_current", "input_bias", "gate_kernel",
                  "residual_kernel", "residual_bias", "skip_kernel", "skip_bias",
                  "output1_kernel", "output1_bias", "output2_kernel", "output2_bias")


class FusedNetwork:
    """A WaveNet's weights as the contiguous float32 arrays the fused loop reads.

    Built by :func:`rainforest.generate.load_network` from a checkpoint; see the module
    docstring for the shapes. ``gate_bias`` (L, 2G) is the unconditioned gate bias and
    ``condition`` (labels, L, 2G) the gate bias each label adds (empty without labels).
    """

    def __init__(self, *, dilations, gate_bias, condition, precision="float32", **arrays):
        if precision not in WEIGHT_PRECISIONS:
            raise ParameterError(f"precision must be one of {WEIGHT_PRECISIONS}, got {precision!r}")
        self.precision = precision
        missing = set(NETWORK_ARRAYS) - set(arrays)
        if missing or set(arrays) - set(NETWORK_ARRAYS):
            raise ParameterError(f"FusedNetwork needs exactly {NETWORK_ARRAYS}; "
                                 f"missing {sorted(missing)}")
        for name, array in arrays.items():
            setattr(self, name, np.ascontiguousarray(array, dtype=np.float32))
        self.gate_bias = np.ascontiguousarray(gate_bias, dtype=np.float32)
        self.condition = np.ascontiguousarray(condition, dtype=np.float32)
        self.dilations = np.ascontiguousarray(dilations, dtype=np.int64)
        self.ring_offsets = np.concatenate([[0], np.cumsum(self.dilations)[:-1]]).astype(np.int64)
        self._check_shapes()
        self._stored = None

    def at_precision(self, precision):
        """This network with its matrices stored as ``precision`` (:data:`WEIGHT_PRECISIONS`).

        Its float32 arrays hold the values the stored weights stand for, so the numpy code
        that primes a state reads the same network as the loop that continues from it.
        """
        if precision not in WEIGHT_PRECISIONS:
            raise ParameterError(f"precision must be one of {WEIGHT_PRECISIONS}, got {precision!r}")
        if precision == self.precision:
            return self
        stored = {name: _store(kernel, storage_format(name, precision))
                  for name, kernel in self.row_kernels().items()}
        arrays = {name: getattr(self, name) for name in NETWORK_ARRAYS}
        for name, (weights, scale) in stored.items():
            meant = widened(weights) * scale[..., None]
            arrays[name] = meant.reshape(arrays[name].shape)
        network = FusedNetwork(dilations=self.dilations, gate_bias=self.gate_bias,
                               condition=self.condition, precision=precision, **arrays)
        network._stored = stored
        return network

    @property
    def layers(self):
        return self.gate_kernel.shape[0]

    @property
    def residual_channels(self):
        return self.gate_kernel.shape[1] // 2

    @property
    def classes(self):
        return self.output2_bias.shape[0]

    @property
    def receptive_field(self):
        return receptive_field(self)

    def _check_shapes(self):
        layers, double_residual, double_gate = self.gate_kernel.shape
        residual = double_residual // 2
        gate, skip, classes = double_gate // 2, self.skip_bias.shape[0], self.output2_bias.shape[0]
        expected = {
            "input_previous": (classes, residual), "input_current": (classes, residual),
            "input_bias": (residual,), "gate_kernel": (layers, 2 * residual, 2 * gate),
            "gate_bias": (layers, 2 * gate),
            "residual_kernel": (layers, gate, residual), "residual_bias": (layers, residual),
            "skip_kernel": (layers, gate, skip), "skip_bias": (skip,),
            "output1_kernel": (skip, skip), "output1_bias": (skip,),
            "output2_kernel": (skip, classes), "output2_bias": (classes,),
            "dilations": (layers,),
        }
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ParameterError(
                    f"{name} has shape {getattr(self, name).shape}, expected {shape}")
        if double_gate % 2 or double_residual % 2 or layers < 1:
            raise ParameterError(f"gate_kernel has shape {self.gate_kernel.shape}")
        if self.condition.ndim != 3 or self.condition.shape[1:] != (layers, 2 * gate):
            raise ParameterError(f"condition has shape {self.condition.shape}, "
                                 f"expected (labels, {layers}, {2 * gate})")
        if (self.dilations < 1).any():
            raise ParameterError(f"dilations must be positive, got {self.dilations}")

    #: The matrix arrays the loop multiplies by, as opposed to the biases and lookup tables.
    KERNELS = ("gate_kernel", "residual_kernel", "skip_kernel", "output1_kernel",
               "output2_kernel")

    def row_kernels(self):
        """Kernels as (K, N), the skip kernels of all layers stacked to (L*G, S)."""
        kernels = {name: getattr(self, name) for name in self.KERNELS}
        kernels["skip_kernel"] = self.skip_kernel.reshape(-1, self.skip_kernel.shape[2])
        return kernels

    def stored_kernels(self):
        """``(weights, row scales)`` of each kernel of :meth:`row_kernels`, in this network's
        precision: what the loop reads. Computed once."""
        if self._stored is None:
            self._stored = {name: _store(kernel, storage_format(name, self.precision))
                            for name, kernel in self.row_kernels().items()}
        return self._stored

    @property
    def nbytes(self):
        """Bytes of weights one generated sample reads (the input tables: two rows only)."""
        total = 0
        for weights, scale in self.stored_kernels().values():
            total += weights.nbytes + (scale.nbytes if weights.dtype == np.int8 else 0)
        residual, residual_scale = self.stored_kernels()["residual_kernel"]
        total -= residual[-1].nbytes  # the last block has no residual
        total -= residual_scale[-1].nbytes if residual.dtype == np.int8 else 0
        biases = sum(getattr(self, name).nbytes for name in NETWORK_ARRAYS
                     if name.endswith("_bias") and not name.startswith("input_"))
        return total + biases - self.residual_bias[-1].nbytes


def _store(kernel, form):
    """A float32 (..., K, N) kernel stored as ``form`` (float32, bfloat16 or int8), and its
    (..., K) row scales."""
    ones = np.ones(kernel.shape[:-1], np.float32)
    if form == "float32":
        return kernel, ones
    if form == "bfloat16":  # round to nearest even on the 16 bits that are dropped
        bits = kernel.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return np.ascontiguousarray(rounded.astype(np.uint16)), ones
    largest = np.abs(kernel).max(axis=-1)
    scale = np.where(largest > 0, largest / _INT8_LIMIT, 1.0).astype(np.float32)
    quantised = np.clip(np.rint(kernel / scale[..., None]), -_INT8_LIMIT, _INT8_LIMIT)
    return np.ascontiguousarray(quantised.astype(np.int8)), scale


def widened(stored):
    """The float32 values of stored weights (float32, bfloat16 as uint16, or int8) before their
    row scales: what :func:`_widen` computes in the loop."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


class StreamState:
    """Where B streams stand: the per-layer rings, the last two codes, the generators.

    ``position`` is the time index of the next step; ring row ``ring_offsets[l] + tau % d``
    holds layer ``l``'s input at time ``tau``, for the ``d`` times before ``position``.
    ``gate_bias`` (B, L, 2G) is each stream's gate bias, label conditioning included.
    """

    def __init__(self, rings, last_codes, rng_states, gate_bias, position):
        # Own copies: the loop writes the state, and a caller's prime must stay untouched.
        self.rings = np.array(rings, dtype=np.float32, order="C")
        self.last_codes = np.array(last_codes, dtype=np.int64, order="C")
        self.rng_states = np.array(rng_states, dtype=np.uint64, order="C")
        self.gate_bias = np.array(gate_bias, dtype=np.float32, order="C")
        self.position = int(position)

    @property
    def streams(self):
        return self.rings.shape[0]

    def take(self, streams):
        """A state of its own for some of the streams (indices), e.g. one thread's share."""
        return StreamState(self.rings[streams], self.last_codes[streams],
                           self.rng_states[streams], self.gate_bias[streams], self.position)


def generate_codes(network, state, steps, *, temperature=1.0, forced=None,
                   record_logits=False):
    """Advance ``state`` by ``steps`` samples per stream with the fused loop.

    Parameters
    ----------
    network : FusedNetwork
    state : StreamState
        Updated in place, so calls can be chained (and interrupted between calls).
    steps : int
    temperature : float
        Softmax temperature; 0 picks the most likely code (the argmax path).
    forced : int array (B, n), optional
        Teacher forcing: where ``forced[b, i] >= 0`` step ``i`` of stream ``b`` takes that code
        instead of sampling (the generator does not advance). Used to check the loop against
        the full forward pass and to prime one sample at a time.
    record_logits : bool
        Also return the (steps, B, classes) logits that each code was drawn from.

    Returns
    -------
    codes : uint8 array (B, steps), and ``logits`` when ``record_logits``.

    Examples
    --------
    >>> codes = generate_codes(network, state, 16000, temperature=0.9)  # doctest: +SKIP
    """
    if not isinstance(network, FusedNetwork) or not isinstance(state, StreamState):
        raise ParameterError("generate_codes needs a FusedNetwork and a StreamState")
    steps = int(steps)
    if steps < 0:
        raise ParameterError(f"steps must be >= 0, got {steps}")
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature < 0:
        raise ParameterError(f"temperature must be a finite number >= 0, got {temperature}")
    streams = state.streams
    expected_rings = (streams, int(network.dilations.sum()), network.residual_channels)
    if state.rings.shape != expected_rings:
        raise ParameterError(f"state rings have shape {state.rings.shape}, this network "
                             f"needs {expected_rings}")
    if state.last_codes.shape != (streams, 2) or state.rng_states.shape != (streams,):
        raise ParameterError("state last_codes must be (B, 2) and rng_states (B,)")
    if state.gate_bias.shape != (streams,) + network.gate_bias.shape:
        raise ParameterError(f"state gate_bias has shape {state.gate_bias.shape}, expected "
                             f"{(streams,) + network.gate_bias.shape}")
    if state.last_codes.min() < 0 or state.last_codes.max() >= network.classes:
        raise ParameterError(f"state codes must lie in 0..{network.classes - 1}")
    if forced is None:
        forced = np.empty((streams, 0), np.int64)
    forced = np.ascontiguousarray(forced, dtype=np.int64)
    if forced.ndim != 2 or forced.shape[0] != streams or forced.shape[1] > steps:
        raise ParameterError(f"forced must be (B={streams}, n <= steps={steps}), "
                             f"got {forced.shape}")
    if forced.size and forced.max() >= network.classes:
        raise ParameterError(f"forced codes must be < {network.classes}")
    codes = np.empty((streams, steps), np.uint8)
    logits = np.empty((steps if record_logits else 0, streams, network.classes), np.float32)
    if steps:
        kernels = network.stored_kernels()
        matrices = {name: stored for name, (stored, _) in kernels.items()}
        scales = tuple(kernels[name][1] for name in FusedNetwork.KERNELS)
        _generate(network.input_previous, network.input_current, network.input_bias,
                  matrices["gate_kernel"], state.gate_bias, matrices["residual_kernel"],
                  network.residual_bias, matrices["skip_kernel"], network.skip_bias,
                  matrices["output1_kernel"], network.output1_bias, matrices["output2_kernel"],
                  network.output2_bias, scales, network.dilations, network.ring_offsets,
                  state.rings, state.last_codes, state.rng_states, state.position,
                  temperature, forced, codes, logits)
    state.position += steps
    return (codes, logits) if record_logits else codes

