"""The fused loop's matrix product: one summation order for any number of streams, bit for bit
the ordered sum of the reference, and exact against Keras for widths that leave remainders
in every block (streams, rows and columns)."""

import numpy as np
import pytest

from rainforest.generate import load_network
from rainforest.kernels._lanes import LANES
from rainforest.kernels.fused_loop import (
    WEIGHT_PRECISIONS,
    _product,
    _store,
    generate_codes,
    widened,
)
from rainforest.kernels.priming import prime_state, stream_gate_bias, stream_seeds
from rainforest.model_config import PRESETS, ModelConfig
from reference import fused_multiply_add32, ordered_product
from test_generate import assert_logits_close, keras_checkpoint, keras_logits, label_ids

# Widths of 5, 7, 11 and 37: every block of the product has a remainder (channels % 4 != 0).
ODD_WIDTHS = ModelConfig(dilations=(1, 2, 3, 1), residual_channels=7, gate_channels=5,
                         skip_channels=11, classes=37, labels=("x", "y", "z"),
                         condition_channels=3)


def _multiplied(x, w, scale, start):
    """``start + (x * scale) @ w`` by the loop's product, with a scratch bigger than it needs
    and full of NaN, so that reading a factor it did not write would show in the result."""
    out = start.copy()
    scratch = np.full((x.shape[0] + 3, x.shape[1] + 5), np.nan, np.float32)
    _product(np.ascontiguousarray(x), w, scale, out, scratch)
    return out


def _one_at_a_time(x, w, scale, start):
    """The product for each stream in a call of its own (one row of x at a time)."""
    return np.concatenate([_multiplied(x[b:b + 1], w, scale, start[b:b + 1])
                           for b in range(x.shape[0])])


def test_the_reference_fused_multiply_add_rounds_once():
    """The case where rounding to float64 and then to float32 goes wrong: a * b + c lies just
    below the midpoint between c and the next float32, its float64 rounding on the midpoint."""
    a, b = np.float32(8 * (1 - 2**-15)), np.float32(8 * (1 + 2**-15))  # a * b = 64 - 2**-24
    c = np.float32(2**30 + 2**7)  # float32 neighbours 2**7 = 128 apart
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) == c + np.float32(128)
    assert fused_multiply_add32(a, b, c) == c


# K that is no multiple of 4 or 8; N (LANES columns per tile) below, at and past a whole
# tile, and with more than half a tile left over after two.
TILE_SHAPES = [(13, LANES + 5), (7, LANES), (130, 2 * LANES + LANES // 2 + 3), (1, LANES - 1),
               (9, 3), (24, 2 * LANES)]


@pytest.mark.parametrize("form", WEIGHT_PRECISIONS)
@pytest.mark.parametrize("inner, outputs", TILE_SHAPES)
def test_product_is_the_ordered_sum_for_every_remainder(inner, outputs, form):
    """Bit for bit the reference's ordered sum (start, then one fused multiply-add per row in
    row order) for 1..9 streams: no register tile, no stream, row or column left over changes
    the summation order or is dropped."""
    rng = np.random.default_rng(inner * 1000 + outputs)
    streams = 9  # two tiles of 4 streams and one left over
    x = rng.standard_normal((streams, inner)).astype(np.float32)
    w, scale = _store(rng.standard_normal((inner, outputs)).astype(np.float32), form)
    start = rng.standard_normal((streams, outputs)).astype(np.float32)
    for count in range(1, streams + 1):
        got = _multiplied(x[:count], w, scale, start[:count])
        expected = ordered_product(x[:count], w, scale, start[:count])
        np.testing.assert_array_equal(got, expected, err_msg=f"{count} streams")


@pytest.mark.parametrize("form", WEIGHT_PRECISIONS)
@pytest.mark.parametrize("streams, inner, outputs", [
    (1, 128, 128), (4, 128, 128), (32, 128, 256), (5, 13, 7), (6, 3, 9), (7, 130, 1), (3, 1, 5),
    (1, 12, 16), (2, 20, 3),
])
def test_product_is_the_same_for_one_stream_or_many(streams, inner, outputs, form):
    """Bit for bit: a stream's outputs do not depend on how many streams share the call or on
    which block it falls in; and they are the product of the stored weights, widened and
    scaled (float64 reference)."""
    rng = np.random.default_rng(streams * 1000 + inner + outputs)
    x = rng.standard_normal((streams, inner)).astype(np.float32)
    w, scale = _store(rng.standard_normal((inner, outputs)).astype(np.float32), form)
    start = rng.standard_normal((streams, outputs)).astype(np.float32)
    together = _multiplied(x, w, scale, start)
    np.testing.assert_array_equal(together, _one_at_a_time(x, w, scale, start))
    meant = widened(w).astype(np.float64) * scale.astype(np.float64)[:, None]
    exact = start.astype(np.float64) + x.astype(np.float64) @ meant
    np.testing.assert_allclose(together, exact, rtol=1e-5, atol=1e-5 * np.sqrt(inner))


@pytest.fixture(scope="module")
def odd_network(tmp_path_factory):
    run = tmp_path_factory.mktemp("odd-widths")
    model = keras_checkpoint(run, ODD_WIDTHS, seed=3)
    return model, load_network(str(run)).network


@pytest.mark.parametrize("streams", [1, 5, 6])
def test_odd_widths_equal_the_full_forward_pass(odd_network, streams):
    """Teacher-forced logits of the loop against Keras on the whole sequence, with widths
    (7, 5, 11, 37) and stream counts (5, 6) that leave remainders in every blocked product."""
    model, network = odd_network
    rf = network.receptive_field
    steps = rf + 10
    sequence = np.random.default_rng(streams).integers(0, ODD_WIDTHS.classes,
                                                       size=(streams, rf - 1 + steps))
    ids = label_ids(ODD_WIDTHS, streams)
    state = prime_state(network, sequence[:, :rf], gate_bias=stream_gate_bias(network, ids),
                        seeds=stream_seeds(0, streams))
    _, logits = generate_codes(network, state, steps, forced=sequence[:, rf:],
                               record_logits=True)
    expected = keras_logits(model, ODD_WIDTHS, sequence, ids)
    assert_logits_close(logits.transpose(1, 0, 2), expected)


@pytest.mark.parametrize("config", [ODD_WIDTHS, PRESETS["tiny"]], ids=["odd-widths", "tiny"])
def test_a_stream_generates_the_same_alone_or_among_others(tmp_path, config):
    """Sampled freely (temperature 1), each of 7 streams gives the same codes and logits bit for
    bit whether it runs alone, as the 7th of 7 (the remainder after a block of 4), or in a
    share of 3: what makes ``--threads`` leave the files unchanged."""
    keras_checkpoint(tmp_path, config, seed=5)
    network = load_network(str(tmp_path)).network
    streams, steps = 7, 300
    ids = label_ids(config, streams)
    seeds = stream_seeds(9, streams)

    def run(members):
        state = prime_state(network, np.empty((len(members), 0)),
                            gate_bias=stream_gate_bias(network, [ids[m] for m in members]),
                            seeds=[seeds[m] for m in members])
        return generate_codes(network, state, steps, record_logits=True)

    codes, logits = run(list(range(streams)))
    for members in ([0], [3], [6], [4, 5, 6], [1, 2]):
        part_codes, part_logits = run(members)
        np.testing.assert_array_equal(part_codes, codes[members])
        np.testing.assert_array_equal(part_logits, logits[:, members])
