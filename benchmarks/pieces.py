"""Where a step of the fused loop goes: its pieces timed one by one, at the loop's shapes.

The loop is one compiled function, so it cannot be timed from inside; instead each piece runs
on its own, ``steps`` times over, with the arrays and kernels the loop uses:

* products: each layer's gate and residual products and the skip product of all layers;
* gates: ``tanh(filter) * sigmoid(gate)`` of every layer;
* output stack: relu, the two 1x1 products (skip -> skip -> classes) and their biases;
* sampling: softmax at temperature 1 and the inverse-CDF draw, per stream;

and the whole step (``generate_codes``) beside them; what the pieces do not cover (ring
buffers, input lookup, biases) is the rest. Used by ``generate.py --pieces``.
"""

import time

import numpy as np
from numba import njit

from rainforest.kernels.fused_loop import (
    FusedNetwork,
    _output_stack,
    _product,
    _sample,
    _sigmoid32,
    _tanh32,
    generate_codes,
)

_OPTIONS = dict(nogil=True, fastmath={"contract"}, error_model="numpy")


@njit(**_OPTIONS)
def _layer_products(steps, taps, gate_kernel, gate_scale, residual_kernel, residual_scale,
                    skip_kernel, skip_scale, scaled):
    streams, layers = taps.shape[0], gate_kernel.shape[0]
    gated = np.full((streams, residual_kernel.shape[1]), np.float32(0.1))
    z = np.zeros((streams, gate_kernel.shape[2]), np.float32)
    delta = np.zeros((streams, residual_kernel.shape[2]), np.float32)
    gated_all = np.full((streams, skip_kernel.shape[0]), np.float32(0.1))
    skip_sum = np.zeros((streams, skip_kernel.shape[1]), np.float32)
    for _ in range(steps):
        for layer in range(layers):
            _product(taps, gate_kernel[layer], gate_scale[layer], z, scaled)
            if layer + 1 < layers:
                _product(gated, residual_kernel[layer], residual_scale[layer], delta, scaled)
        _product(gated_all, skip_kernel, skip_scale, skip_sum, scaled)
    return z[0, 0] + delta[0, 0] + skip_sum[0, 0]


@njit(**_OPTIONS)
def _gates(steps, z, layers):
    streams, gate = z.shape[0], z.shape[1] // 2
    gated_all = np.empty((streams, layers * gate), np.float32)
    for _ in range(steps):
        for layer in range(layers):
            for b in range(streams):
                for k in range(gate):
                    gated_all[b, layer * gate + k] = _tanh32(z[b, k]) * _sigmoid32(z[b, gate + k])
    return gated_all[0, 0]


@njit(**_OPTIONS)
def _output_stack_steps(steps, skip_sum, output1_kernel, output1_scale, output1_bias,
                        output2_kernel, output2_scale, output2_bias, scaled):
    head = np.empty_like(skip_sum)
    logits = np.empty((skip_sum.shape[0], output2_bias.shape[0]), np.float32)
    for _ in range(steps):
        _output_stack(skip_sum, head, logits, output1_kernel, output1_scale, output1_bias,
                      output2_kernel, output2_scale, output2_bias, scaled)
    return logits[0, 0]


@njit(**_OPTIONS)
def _sampling(steps, logits, states):
    weights = np.empty(logits.shape[1], np.float32)
    total = 0
    for _ in range(steps):
        for b in range(logits.shape[0]):
            total += _sample(logits[b], 1.0, states, b, weights)
    return total


def _timed(repeats, function, *args):
    """The shortest of ``repeats`` runs: the one least disturbed by whatever else runs."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - started)
    return min(times)


def profile(network, state, steps, repeats=10):
    """Seconds per step of each piece and of the whole step, for ``state``'s streams (each
    the best of ``repeats`` runs of ``steps`` steps)."""
    rng = np.random.default_rng(0)
    streams, layers = state.streams, network.layers
    kernels = network.stored_kernels()
    (gate, gate_scale), (residual, residual_scale), (skip, skip_scale), (out1, out1_scale), \
        (out2, out2_scale) = (kernels[name] for name in FusedNetwork.KERNELS)
    taps = rng.standard_normal((streams, gate.shape[1])).astype(np.float32) * 0.1
    scaled = np.empty((streams, max(gate.shape[1], skip.shape[0], out1.shape[0])), np.float32)
    z = rng.standard_normal((streams, gate.shape[2])).astype(np.float32)
    skip_sum = rng.standard_normal((streams, skip.shape[1])).astype(np.float32)
    logits = rng.standard_normal((streams, network.classes)).astype(np.float32) * 3
    states = np.arange(streams, dtype=np.uint64)
    pieces = {
        "products": (_layer_products, taps, gate, gate_scale, residual, residual_scale, skip,
                     skip_scale, scaled),
        "gates": (_gates, z, layers),
        "output stack": (_output_stack_steps, skip_sum, out1, out1_scale,
                         network.output1_bias, out2, out2_scale, network.output2_bias, scaled),
        "sampling": (_sampling, logits, states),
    }
    seconds = {}
    for name, (function, *args) in pieces.items():
        function(1, *args)  # compile outside the timing
        seconds[name] = _timed(repeats, function, steps, *args) / steps
    generate_codes(network, state, 2)
    seconds["whole step"] = _timed(repeats, generate_codes, network, state, steps) / steps
    return seconds
