"""The Keras 3 WaveNet network (TensorFlow backend), built from a ``ModelConfig``.

The weight layout is described in ``rainforest.model_config``, which is kept apart so that
reading a checkpoint's config never loads TensorFlow. This module never imports horovod.
"""

from __future__ import annotations

import keras
from keras import ops

from rainforest.model_config import ModelConfig, block_name, receptive_field


class ResidualBlock(keras.layers.Layer):
    """One gated, dilated residual block: kernel-2 dilated conv -> tanh x sigmoid -> 1x1s."""

    def __init__(self, config: ModelConfig, dilation: int, *, has_residual: bool, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.dilation = dilation
        self.has_residual = has_residual

    def build_weights(self) -> None:
        c = self.config
        r, g, s = c.residual_channels, c.gate_channels, c.skip_channels
        self.gate_kernel = self.add_weight(shape=(2, r, 2 * g), name="gate_kernel",
                                           initializer="glorot_uniform")
        self.gate_bias = self.add_weight(shape=(2 * g,), name="gate_bias", initializer="zeros")
        if c.conditioned:
            self.condition_kernel = self.add_weight(
                shape=(c.condition_channels, 2 * g), name="condition_kernel",
                initializer="glorot_uniform")
        if self.has_residual:
            self.residual_kernel = self.add_weight(shape=(g, r), name="residual_kernel",
                                                   initializer="glorot_uniform")
            self.residual_bias = self.add_weight(shape=(r,), name="residual_bias",
                                                 initializer="zeros")
        self.skip_kernel = self.add_weight(shape=(g, s), name="skip_kernel",
                                           initializer="glorot_uniform")
        self.skip_bias = self.add_weight(shape=(s,), name="skip_bias", initializer="zeros")
        self.built = True

    def call(self, hidden, condition, target_length):
        d, g = self.dilation, self.config.gate_channels
        r = self.config.residual_channels
        past, current = hidden[:, :-d], hidden[:, d:]
        # One matmul for both taps and both halves: (2r) -> (filter, gate).
        taps = ops.concatenate([past, current], axis=-1)
        z = ops.matmul(taps, ops.reshape(self.gate_kernel, (2 * r, 2 * g))) + self.gate_bias
        if condition is not None:
            z = z + ops.expand_dims(ops.matmul(condition, self.condition_kernel), 1)
        gated = ops.tanh(z[..., :g]) * ops.sigmoid(z[..., g:])
        # The skip projection is applied to all blocks at once by the model (one big matmul).
        skip_input = gated[:, -target_length:]
        if not self.has_residual:
            return None, skip_input
        residual = ops.matmul(gated, self.residual_kernel) + self.residual_bias + current
        return residual, skip_input


class WaveNet(keras.Model):
    """The network. Call ``model(codes)`` or ``model(codes, labels)`` for conditioned configs.

    ``codes`` has shape ``(batch, receptive_field - 1 + T)``; the logits have shape
    ``(batch, T, classes)``.
    """

    def __init__(self, config: ModelConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.receptive_field = receptive_field(config)
        last = len(config.dilations) - 1
        self.blocks = [
            ResidualBlock(config, d, has_residual=k != last, name=block_name(k))
            for k, d in enumerate(config.dilations)
        ]

    def build_weights(self) -> None:
        c = self.config
        r, s = c.residual_channels, c.skip_channels
        # A kernel-2 causal conv over one-hot codes, as two lookup tables.
        self.input_previous = self.add_weight(shape=(c.classes, r), name="input_previous",
                                              initializer="glorot_uniform")
        self.input_current = self.add_weight(shape=(c.classes, r), name="input_current",
                                             initializer="glorot_uniform")
        self.input_bias = self.add_weight(shape=(r,), name="input_bias", initializer="zeros")
        if c.conditioned:
            self.label_embedding = self.add_weight(
                shape=(len(c.labels), c.condition_channels), name="label_embedding",
                initializer="random_normal")
        for block in self.blocks:
            block.build_weights()
        self.output1_kernel = self.add_weight(shape=(s, s), name="output1_kernel",
                                              initializer="glorot_uniform")
        self.output1_bias = self.add_weight(shape=(s,), name="output1_bias", initializer="zeros")
        self.output2_kernel = self.add_weight(shape=(s, c.classes), name="output2_kernel",
                                              initializer="glorot_uniform")
        self.output2_bias = self.add_weight(shape=(c.classes,), name="output2_bias",
                                            initializer="zeros")
        self.built = True

    def call(self, codes, labels=None):
        codes = ops.cast(codes, "int32")
        length = codes.shape[1]
        if length is None:
            length = ops.shape(codes)[1]
        target_length = length - self.receptive_field + 1
        hidden = (ops.take(self.input_previous, codes[:, :-1], axis=0)
                  + ops.take(self.input_current, codes[:, 1:], axis=0) + self.input_bias)
        hidden = ops.cast(hidden, self.compute_dtype)
        condition = None
        if self.config.conditioned:
            if labels is None:
                raise ValueError("this model is conditioned on labels; call model(codes, labels)")
            condition = ops.take(self.label_embedding, ops.cast(labels, "int32"), axis=0)
            condition = ops.cast(condition, self.compute_dtype)
        skip_inputs = []
        for block in self.blocks:
            hidden, skip_input = block(hidden, condition=condition, target_length=target_length)
            skip_inputs.append(skip_input)
        # sum_k gated_k @ W_k == concat_k(gated_k) @ stack_k(W_k): one wide, efficient matmul
        # instead of one narrow matmul and one full-size addition per block.
        skip_kernel = ops.concatenate([b.skip_kernel for b in self.blocks], axis=0)
        skip_bias = sum(b.skip_bias for b in self.blocks)
        skip_sum = ops.matmul(ops.concatenate(skip_inputs, axis=-1), skip_kernel) + skip_bias
        out = ops.relu(skip_sum)
        out = ops.relu(ops.matmul(out, self.output1_kernel) + self.output1_bias)
        logits = ops.matmul(out, self.output2_kernel) + self.output2_bias
        return ops.cast(logits, "float32")


def build_model(config: ModelConfig, *, seed: int = 0) -> WaveNet:
    """A ``WaveNet`` with its weights created; call it on ``codes`` or ``(codes, labels)``.

    Examples
    --------
    >>> import numpy as np
    >>> from rainforest.model_config import PRESETS
    >>> model = build_model(PRESETS["tiny"])
    >>> tuple(model(np.full((1, model.receptive_field + 9), 128)).shape)
    (1, 10, 256)
    """
    keras.utils.set_random_seed(seed)
    model = WaveNet(config)
    model.build_weights()
    return model
