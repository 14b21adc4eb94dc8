"""The fused residual stack of a training step (``rainforest.kernels.train_stack``).

Its skip sum and every gradient are compared with the float64 chain rule of
``tests/reference.py`` over dilations, odd lengths, batch sizes and channel counts (padded to
16 inside, or not); its bits must not depend on the number of threads; and bad shapes are
refused by name. The network-level comparison with the Keras layouts is in tests/test_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference
from rainforest.errors import ParameterError
from rainforest.kernels.train_stack import (
    CHUNK_ROWS,
    StackBuffers,
    StackShape,
    stack_backward,
    stack_forward,
)

NAMES = ("d_hidden", "d_gate_bias", "d_gate_kernel", "d_residual_kernel", "d_residual_bias",
         "d_skip_kernel")


def _inputs(dilations, batch, targets, r, g, s, seed=0):
    rng = np.random.default_rng(seed)
    layers, positions = len(dilations), targets + sum(dilations)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return (StackShape(dilations, batch, positions, targets, r, g, s),
            normal(batch, positions, r), normal(batch, layers, 2 * g, scale=0.3),
            normal(layers, 2 * r, 2 * g, scale=(2 * r) ** -0.5),
            normal(layers - 1, g, r, scale=g ** -0.5), normal(layers - 1, r, scale=0.3),
            normal(layers, g, s, scale=g ** -0.5), normal(batch, targets, s))


def _poisoned(buffers):
    """Every float32 buffer filled with NaN, so a value the kernels read before writing shows
    (fresh memory is often zeros, which would hide it)."""
    for value in vars(buffers).values():
        for array in value if isinstance(value, tuple) else (value,):
            if isinstance(array, np.ndarray) and array.dtype == np.float32:
                array.fill(np.nan)
    return buffers


def _run(shape, hidden, weights, d_skip, threads=1):
    padded = shape.pad_weights(*weights)
    buffers = _poisoned(StackBuffers(shape))
    skip = stack_forward(shape, hidden, padded, buffers, threads=threads).copy()
    return skip, stack_backward(shape, d_skip, padded, buffers, threads=threads)


@pytest.mark.parametrize("dilations, batch, targets, channels", [
    ((1, 2, 4), 1, 5, (16, 16, 32)),
    ((1, 2, 4, 8, 1, 2), 2, 37, (32, 32, 64)),
    ((3, 1, 5), 3, 11, (12, 20, 24)),   # odd dilations, channels padded inside
    ((4,), 2, 7, (16, 16, 16)),         # one block: no residual
    ((1, 2, 1), 1, 2 * CHUNK_ROWS + 9, (16, 48, 16)),  # several chunks per item
    ((1, 200, 2), 2, 13, (16, 16, 16)),  # a dilation past the targets: positions no tap reads
], ids=["tiny", "two-stacks", "odd", "one-block", "chunks", "wide-dilation"])
def test_skip_sum_and_every_gradient_match_the_float64_chain_rule(dilations, batch, targets,
                                                                  channels):
    shape, hidden, *weights, d_skip = _inputs(dilations, batch, targets, *channels)
    skip, grads = _run(shape, hidden, weights, d_skip)
    expected_skip, expected = reference.residual_stack(hidden, *weights, dilations, targets,
                                                       d_skip)
    np.testing.assert_allclose(skip, expected_skip, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(NAMES, grads, expected, strict=True):
        assert got.shape == want.shape, name
        scale = np.abs(want).max() if want.size else 1.0
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale * np.sqrt(targets),
                                   err_msg=name)


def test_one_and_two_threads_give_the_same_bits():
    shape, hidden, *weights, d_skip = _inputs((1, 2, 4, 8), 3, 2 * CHUNK_ROWS + 5, 32, 32, 64)
    one = _run(shape, hidden, weights, d_skip, threads=1)
    two = _run(shape, hidden, weights, d_skip, threads=2)
    assert one[0].tobytes() == two[0].tobytes()
    for name, a, b in zip(NAMES, one[1], two[1], strict=True):
        assert a.tobytes() == b.tobytes(), name


def test_buffers_reused_by_a_second_call_give_the_same_result():
    shape, hidden, *weights, d_skip = _inputs((1, 2, 4), 2, 20, 16, 16, 32)
    padded, buffers = shape.pad_weights(*weights), StackBuffers(shape)
    first = stack_forward(shape, hidden, padded, buffers).copy()
    grads = stack_backward(shape, d_skip, padded, buffers)
    stack_forward(shape, hidden * 2, padded, buffers)  # dirty every buffer
    stack_backward(shape, d_skip * 3, padded, buffers)
    again = stack_forward(shape, hidden, padded, buffers).copy()
    assert again.tobytes() == first.tobytes()
    for a, b in zip(grads, stack_backward(shape, d_skip, padded, buffers), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "targets": 4}, "leave 5 targets, not 4"),
    (lambda a: {**a, "dilations": (1, 0, 4)}, "dilations must be positive"),
    (lambda a: {**a, "batch": 0}, "batch must be a positive integer"),
])
def test_a_shape_that_does_not_add_up_is_refused_by_name(change, message):
    arguments = {"dilations": (1, 2, 4), "batch": 1, "positions": 12, "targets": 5,
                 "residual": 16, "gate": 16, "skip": 16}
    with pytest.raises(ParameterError, match=message):
        StackShape(**change(arguments))


def test_arrays_of_the_wrong_shape_are_refused_by_name():
    shape, hidden, *weights, d_skip = _inputs((1, 2), 1, 4, 16, 16, 16)
    with pytest.raises(ParameterError, match=r"skip_kernel must have shape \(2, 16, 16\)"):
        shape.pad_weights(*weights[:-1], weights[-1][:, :8])
    padded, buffers = shape.pad_weights(*weights), StackBuffers(shape)
    with pytest.raises(ParameterError, match="hidden must have shape"):
        stack_forward(shape, hidden[:, 1:], padded, buffers)
    stack_forward(shape, hidden, padded, buffers)
    with pytest.raises(ParameterError, match="d_skip must have shape"):
        stack_backward(shape, d_skip[:, :2], padded, buffers)


# --- bfloat16 --------------------------------------------------------------------------------


def _run_bfloat16(shape, hidden, weights, d_skip, threads=1):
    padded = shape.pad_weights(*weights)
    buffers = _poisoned(StackBuffers(shape, "bfloat16"))
    skip = stack_forward(shape, hidden, padded, buffers, threads=threads).copy()
    return skip, stack_backward(shape, d_skip, padded, buffers, threads=threads)


@pytest.mark.parametrize("dilations, batch, targets, channels", [
    ((1, 2, 4), 2, 37, (16, 16, 32)),
    ((3, 1, 5), 3, 11, (12, 20, 24)),
    ((1, 2, 1), 1, 2 * CHUNK_ROWS + 9, (16, 48, 16)),
    ((1, 200, 2), 2, 13, (16, 16, 16)),
], ids=["tiny", "odd", "chunks", "wide-dilation"])
def test_bfloat16_products_are_within_bfloat16_rounding_of_the_chain_rule(dilations, batch,
                                                                          targets, channels):
    shape, hidden, *weights, d_skip = _inputs(dilations, batch, targets, *channels)
    skip, grads = _run_bfloat16(shape, hidden, weights, d_skip)
    expected_skip, expected = reference.residual_stack(hidden, *weights, dilations, targets,
                                                       d_skip)
    errors = [np.abs(skip - expected_skip).max() / np.abs(expected_skip).max()]
    errors += [np.abs(got - want).max() / np.abs(want).max()
               for got, want in zip(grads, expected, strict=True) if want.size]
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9); sums in float32.
    assert all(1e-4 < error < 2e-2 for error in errors), errors


def test_bfloat16_one_and_two_threads_give_the_same_bits():
    shape, hidden, *weights, d_skip = _inputs((1, 2, 4, 8), 2, 2 * CHUNK_ROWS + 5, 32, 32, 64)
    one = _run_bfloat16(shape, hidden, weights, d_skip, threads=1)
    two = _run_bfloat16(shape, hidden, weights, d_skip, threads=2)
    assert one[0].tobytes() == two[0].tobytes()
    for name, a, b in zip(NAMES, one[1], two[1], strict=True):
        assert a.tobytes() == b.tobytes(), name


def test_bfloat16_rounding_matches_the_reference_including_ties_and_nan():
    from rainforest.kernels._pairs import bfloat16_bits

    rng = np.random.default_rng(3)
    values = rng.standard_normal(2000).astype(np.float32) * np.float32(1e3)
    ties = (np.arange(64, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-40], np.float32)
    for sample in (values, ties, special):
        assert np.array_equal(bfloat16_bits(sample), reference.bfloat16_bits(sample))


def _pair_product_function():
    """A fresh compile of one row of pair products (it sees the CPU flag as it is now)."""
    import numba

    from rainforest.kernels._lanes import (
        load_pairs,
        load_vector,
        pair_multiply_add,
        store_vector,
    )

    @numba.njit(cache=False)
    def products(total, pairs, factors):
        acc = load_vector(total, 0, 0, 16)
        for p in range(pairs.shape[0]):
            acc = pair_multiply_add(acc, load_pairs(pairs, p, 0, 16), factors, 0, 2 * p)
        store_vector(total, 0, 0, acc)

    return products


def test_pair_products_equal_vdpbf16ps_semantics_natively_and_emulated(monkeypatch):
    from rainforest.kernels import _lanes
    from rainforest.kernels._pairs import bfloat16_bits

    rng = np.random.default_rng(5)
    pairs = bfloat16_bits(rng.standard_normal((12, 32)).astype(np.float32))
    factors = bfloat16_bits(rng.standard_normal((1, 24)).astype(np.float32) * 3)
    start = rng.standard_normal((1, 16)).astype(np.float32)
    expected = reference.pair_products(start[0], pairs, factors[0])
    results = {}
    for native in sorted({False, _lanes.bfloat16_dot_products()}):
        monkeypatch.setattr(_lanes, "bfloat16_dot_products", lambda native=native: native)
        total = start.copy()
        _pair_product_function()(total, pairs, factors)
        results[native] = total[0]
        assert total[0].tobytes() == expected.tobytes(), f"native={native}"
    assert len({r.tobytes() for r in results.values()}) == 1
