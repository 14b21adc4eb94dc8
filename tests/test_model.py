"""The WaveNet itself: causality, receptive field, config round trips, conditioning."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rainforest.errors import ParameterError
from rainforest.model_config import (
    PRESETS,
    ModelConfig,
    load_model_config,
    multiply_adds_per_sample,
    receptive_field,
)
from rainforest.network import LAYOUTS, build_model

CONFIGS = {
    "tiny": PRESETS["tiny"],
    "odd-dilations": ModelConfig(dilations=(1, 3, 2, 5, 1), residual_channels=8,
                                 gate_channels=6, skip_channels=12),
    "conditioned": dataclasses.replace(PRESETS["tiny"], labels=("a", "b", "c")),
}


def _logits(model, codes, labels=None):
    if model.config.conditioned:
        labels = np.zeros(codes.shape[0], np.int32) if labels is None else labels
        return model(codes, labels).numpy()
    return model(codes).numpy()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CONFIGS)
def test_output_at_t_ignores_inputs_after_t(name, layout):
    config = CONFIGS[name]
    model = build_model(config, seed=1, layout=layout)
    rf = receptive_field(config)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(2, rf - 1 + 40)).astype(np.int32)
    before = _logits(model, codes)
    for cut in (rf - 1, rf + 7, rf + 30):
        changed = codes.copy()
        changed[:, cut:] = rng.integers(0, 256, size=changed[:, cut:].shape)
        after = _logits(model, changed)
        # Output i sees inputs i .. i + rf - 1, so outputs ending before `cut` are unchanged.
        unaffected = cut - rf + 1
        np.testing.assert_array_equal(after[:, :unaffected], before[:, :unaffected])
        assert np.abs(after[:, unaffected] - before[:, unaffected]).max() > 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CONFIGS)
def test_receptive_field_formula_equals_the_empirical_one(name, layout):
    config = CONFIGS[name]
    model = build_model(config, seed=2, layout=layout)
    rf = receptive_field(config)
    extra = 5
    codes = np.random.default_rng(1).integers(0, 256, size=(1, rf - 1 + extra + 3))
    codes = codes.astype(np.int32)
    reference = _logits(model, codes)[0, -1]
    influences = []
    for position in range(codes.shape[1]):
        changed = codes.copy()
        changed[0, position] = (changed[0, position] + 128) % 256
        influences.append(np.abs(_logits(model, changed)[0, -1] - reference).max() > 0)
    seen = np.flatnonzero(influences)
    assert seen.size == rf
    assert seen[0] == codes.shape[1] - rf and seen[-1] == codes.shape[1] - 1


@pytest.mark.parametrize("batch, targets", [(1, 21), (3, 13)])
@pytest.mark.parametrize("name", [*CONFIGS, "default"])
def test_every_layout_gives_the_sliced_layouts_logits_and_gradients(name, batch, targets):
    """The causal layout and the fused kernels (``rainforest.kernels.train_stack``) against
    the sliced layout, at every config, conditioned or not, for one item and several."""
    import tensorflow as tf

    config = CONFIGS.get(name) or PRESETS[name]
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 256, (batch, receptive_field(config) - 1 + targets))
    labels = np.arange(batch, dtype=np.int32) % 3 if config.conditioned else None
    results = {}
    for layout in LAYOUTS:
        model = build_model(config, seed=5, layout=layout)
        with tf.GradientTape() as tape:
            logits = model(codes, labels) if config.conditioned else model(codes)
            loss = tf.reduce_sum(tf.square(logits))
        gradients = tape.gradient(loss, [v.value for v in model.trainable_variables])
        results[layout] = (logits.numpy(), [tf.convert_to_tensor(g).numpy() for g in gradients])
    logits, gradients = results["sliced"]
    assert logits.shape == (batch, targets, config.classes)
    for layout in LAYOUTS:
        other_logits, other_gradients = results[layout]
        np.testing.assert_allclose(other_logits, logits, rtol=1e-5, atol=1e-5, err_msg=layout)
        for gradient, other in zip(gradients, other_gradients, strict=True):
            scale = float(np.abs(gradient).max())
            assert scale > 0
            np.testing.assert_allclose(other, gradient, rtol=0, atol=1e-5 * scale,
                                       err_msg=layout)


def test_presets_are_as_documented():
    medium = PRESETS["medium"]
    assert len(medium.dilations) == 20
    assert medium.dilations == tuple(2**i for i in range(10)) * 2
    assert (medium.residual_channels, medium.skip_channels, medium.classes) == (64, 128, 256)
    assert receptive_field(medium) == 2 + 2 * 1023
    assert receptive_field(ModelConfig()) == 1024


@pytest.mark.parametrize("name", ["tiny", "odd-dilations"])
def test_multiply_add_count_matches_the_model_weights(name):
    config = CONFIGS[name]
    model = build_model(config)
    kernels = [w for w in model.weights if w.path.endswith("_kernel")]
    counted = sum(int(np.prod(w.shape)) for w in kernels)
    assert multiply_adds_per_sample(config) == counted


def test_conditioning_changes_the_prediction_and_requires_labels():
    config = CONFIGS["conditioned"]
    model = build_model(config, seed=3)
    codes = np.random.default_rng(2).integers(0, 256, (3, receptive_field(config) + 4))
    codes = codes.astype(np.int32)
    by_label = _logits(model, codes, np.array([0, 1, 2], np.int32))
    same = _logits(model, np.repeat(codes[:1], 3, 0), np.array([0, 1, 2], np.int32))
    assert np.abs(same[0] - same[1]).max() > 1e-4
    np.testing.assert_allclose(by_label[0], same[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="conditioned"):
        model(codes)


def test_config_round_trip_and_file(tmp_path):
    config = CONFIGS["conditioned"]
    data = json.loads(json.dumps(config.to_dict()))
    assert ModelConfig.from_dict(data) == config
    path = tmp_path / "model.json"
    path.write_text(json.dumps(PRESETS["medium"].to_dict()))
    assert load_model_config(str(path)) == PRESETS["medium"]
    assert load_model_config("tiny") == PRESETS["tiny"]


@pytest.mark.parametrize("bad, message", [
    ({"dilations": []}, "dilations"),
    ({"dilations": [1, 0]}, "dilations"),
    ({"residual_channels": 0}, "residual_channels"),
    ({"classes": 1}, "classes"),
    ({"labels": ["a", "a"]}, "distinct"),
    ({"colour": "red"}, "does not know"),
])
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(ParameterError, match=message):
        ModelConfig.from_dict(bad)


def test_bad_config_spec(tmp_path):
    with pytest.raises(ParameterError, match="neither a preset"):
        load_model_config("enormous")
    with pytest.raises(ParameterError, match="does not exist"):
        load_model_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ParameterError, match="not valid JSON"):
        load_model_config(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("name", ["tiny", "conditioned"])
def test_fused_layout_under_mixed_bfloat16_is_within_bfloat16_of_the_sliced_one(name):
    """Under a bfloat16 policy the fused kernels take bfloat16 operands and sum in float32;
    the sliced layout rounds every op's output to bfloat16 too: they agree to bfloat16's
    precision, not to float32's."""
    import keras
    import tensorflow as tf

    config = CONFIGS[name]
    codes = np.random.default_rng(6).integers(0, 256, (2, receptive_field(config) + 30))
    labels = np.array([0, 2], np.int32) if config.conditioned else None
    results = {}
    try:
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
        for layout in ("sliced", "fused"):
            model = build_model(config, seed=3, layout=layout)
            with tf.GradientTape() as tape:
                logits = model(codes, labels) if config.conditioned else model(codes)
                loss = tf.reduce_mean(tf.square(logits))
            gradients = tape.gradient(loss, [v.value for v in model.trainable_variables])
            results[layout] = (logits.numpy(),
                               [tf.convert_to_tensor(g).numpy() for g in gradients])
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    (logits, grads), (fused_logits, fused_grads) = results["sliced"], results["fused"]
    assert fused_logits.dtype == np.float32
    assert 1e-4 < np.abs(fused_logits - logits).max() / np.abs(logits).max() < 3e-2
    for gradient, other in zip(grads, fused_grads, strict=True):
        assert np.linalg.norm(other - gradient) <= 0.1 * np.linalg.norm(gradient)
