"""The Keras 3 WaveNet network (TensorFlow backend), built from a ``ModelConfig``.

The weights are created from the layout in ``rainforest.model_config`` (kept apart so that
reading a checkpoint never loads TensorFlow): their names, shapes and initializers are
written there once. This module never imports horovod.
"""

from __future__ import annotations

import keras
from keras import ops

from rainforest.model_config import (
    ModelConfig,
    block_name,
    initializer_of,
    receptive_field,
    weight_layout,
)


def add_weights(layer: keras.layers.Layer, entries) -> None:
    """Create ``layer``'s weights from its part of the layout, each as an attribute by name."""
    for name, shape in entries:
        setattr(layer, name, layer.add_weight(shape=shape, name=name,
                                              initializer=initializer_of(name)))
    layer.built = True


class ResidualBlock(keras.layers.Layer):
    """One gated, dilated residual block: kernel-2 dilated conv -> tanh x sigmoid -> 1x1s."""

    def __init__(self, config: ModelConfig, dilation: int, *, has_residual: bool, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.dilation = dilation
        self.has_residual = has_residual

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
        layout = weight_layout(self.config)
        add_weights(self, layout[""])
        for block in self.blocks:
            add_weights(block, layout[block.name])

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
