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


#: How the blocks lay out time. ``"sliced"``: each block's output is its dilation shorter
#: than its input (the dilated taps are slices), and only the targets' positions of each gate
#: output reach the skip sum; XLA fuses those slices into the products. ``"causal"``: each
#: block keeps its length (zeros before the start, as a causal convolution), no large
#: activation is sliced, and the skip sum is cropped once; without XLA every slice of a large
#: activation costs about as much as a product. Both compute the same logits from the same
#: weights; which step runs which is ``rainforest.train.network_layout``'s choice.
#: ``"fused"``: the sliced layout's arithmetic in rainforest's own kernels, every block in one
#: TensorFlow operation (``rainforest.stack_op``); under a bfloat16 policy its products take
#: bfloat16 operands and sum in float32.
LAYOUTS = ("sliced", "causal", "fused")


class ResidualBlock(keras.layers.Layer):
    """One gated, dilated residual block: kernel-2 dilated conv -> tanh x sigmoid -> 1x1s.

    Returns the residual output (``None`` for the last block) and the gate output, which the
    model projects into the skip sum.
    """

    def __init__(self, config: ModelConfig, dilation: int, *, has_residual: bool,
                 layout: str, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.dilation = dilation
        self.has_residual = has_residual
        self.layout = layout

    def _sliced_halves(self, hidden):
        d, g = self.dilation, self.config.gate_channels
        r = self.config.residual_channels
        past, current = hidden[:, :-d], hidden[:, d:]
        # One matmul for both taps and both halves: (2r) -> (filter, gate).
        taps = ops.concatenate([past, current], axis=-1)
        z = ops.matmul(taps, ops.reshape(self.gate_kernel, (2 * r, 2 * g))) + self.gate_bias
        return z[..., :g], z[..., g:], current

    def _causal_halves(self, hidden):
        d, g = self.dilation, self.config.gate_channels
        padded = ops.pad(hidden, [[0, 0], [d, 0], [0, 0]])
        # One convolution per half: slicing the small kernel is cheap, slicing the
        # (batch, time, 2 x gate) product is not.
        halves = [ops.conv(padded, self.gate_kernel[..., part], dilation_rate=d)
                  + self.gate_bias[part] for part in (slice(None, g), slice(g, None))]
        return halves[0], halves[1], hidden

    def call(self, hidden, condition):
        g = self.config.gate_channels
        halves = self._causal_halves if self.layout == "causal" else self._sliced_halves
        filter_half, gate_half, current = halves(hidden)
        if condition is not None:
            projected = ops.expand_dims(ops.matmul(condition, self.condition_kernel), 1)
            filter_half = filter_half + projected[..., :g]
            gate_half = gate_half + projected[..., g:]
        gated = ops.tanh(filter_half) * ops.sigmoid(gate_half)
        if not self.has_residual:
            return None, gated
        return ops.matmul(gated, self.residual_kernel) + self.residual_bias + current, gated


class WaveNet(keras.Model):
    """The network. Call ``model(codes)`` or ``model(codes, labels)`` for conditioned configs.

    ``codes`` has shape ``(batch, receptive_field - 1 + T)``; the logits have shape
    ``(batch, T, classes)``. ``layout`` is one of :data:`LAYOUTS`.
    """

    def __init__(self, config: ModelConfig, layout: str = "sliced", **kwargs):
        # A fixed name, not Keras's per-process counter (wave_net_1, ...): the optimizer's
        # slot names include it, and a checkpoint must load in any process.
        kwargs.setdefault("name", "wave_net")
        super().__init__(**kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.config = config
        self.layout = layout
        self.receptive_field = receptive_field(config)
        last = len(config.dilations) - 1
        self.blocks = [
            ResidualBlock(config, d, has_residual=k != last, layout=layout, name=block_name(k))
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
        if self.layout == "fused":
            skip_sum = self._fused_skip_sum(hidden, condition, target_length)
        else:
            gate_outputs = []
            for block in self.blocks:
                hidden, gated = block(hidden, condition=condition)
                gate_outputs.append(gated)
            skip_sum = self._skip_sum(gate_outputs, target_length)
        skip_bias = sum(b.skip_bias for b in self.blocks)
        out = ops.relu(skip_sum + skip_bias)
        out = ops.relu(ops.matmul(out, self.output1_kernel) + self.output1_bias)
        logits = ops.matmul(out, self.output2_kernel) + self.output2_bias
        return ops.cast(logits, "float32")

    def _fused_skip_sum(self, hidden, condition, target_length):
        """Every block in one operation of rainforest's kernels (the ``fused`` layout, which
        runs on TensorFlow alone)."""
        import tensorflow as tf

        from rainforest.stack_op import kernel_threads, residual_stack

        def stacked(name, blocks, empty_shape):
            if not blocks:  # one block: it has no residual
                return tf.zeros((0, *empty_shape))
            # float32 whatever the policy: the kernels round to bfloat16 themselves
            return tf.cast(tf.stack([getattr(b, name).value for b in blocks]), tf.float32)

        r, g = self.config.residual_channels, self.config.gate_channels
        blocks, inner = self.blocks, self.blocks[:-1]  # the last block has no residual
        gate_bias = stacked("gate_bias", blocks, ())[None]  # (1, blocks, 2g)
        if condition is None:
            gate_bias = tf.repeat(gate_bias, tf.shape(hidden)[0], axis=0)
        else:  # each item's labels shift its gate biases
            gate_bias = gate_bias + tf.einsum("bc,kcg->bkg", tf.cast(condition, tf.float32),
                                              stacked("condition_kernel", blocks, ()))
        gate_kernel = tf.reshape(stacked("gate_kernel", blocks, ()), (len(blocks), 2 * r, 2 * g))
        skip_sum = residual_stack(
            hidden, gate_bias, gate_kernel, stacked("residual_kernel", inner, (g, r)),
            stacked("residual_bias", inner, (r,)), stacked("skip_kernel", blocks, ()),
            dilations=self.config.dilations, targets=int(target_length),
            threads=kernel_threads(),
            precision="bfloat16" if self.compute_dtype == "bfloat16" else "float32")
        return tf.cast(skip_sum, self.compute_dtype)

    def _skip_sum(self, gate_outputs, target_length):
        """sum_k gated_k @ skip_kernel_k over the targets' positions (without the biases)."""
        if self.layout == "causal":
            skip_sum = None
            for block, gated in zip(self.blocks, gate_outputs, strict=True):
                skip = ops.matmul(gated, block.skip_kernel)
                skip_sum = skip if skip_sum is None else skip_sum + skip
            # The targets are the last positions: those with a whole receptive field.
            return skip_sum[:, -target_length:]
        # sum_k gated_k @ W_k == concat_k(gated_k) @ stack_k(W_k): one wide, efficient matmul
        # instead of one narrow matmul and one full-size addition per block.
        skip_kernel = ops.concatenate([b.skip_kernel for b in self.blocks], axis=0)
        return ops.matmul(ops.concatenate([g[:, -target_length:] for g in gate_outputs],
                                          axis=-1), skip_kernel)


def build_model(config: ModelConfig, *, seed: int = 0, layout: str = "sliced") -> WaveNet:
    """A ``WaveNet`` with its weights created; call it on ``codes`` or ``(codes, labels)``.

    ``layout`` (one of :data:`LAYOUTS`) changes how the graph is built, not what it computes.

    Examples
    --------
    >>> import numpy as np
    >>> from rainforest.model_config import PRESETS
    >>> model = build_model(PRESETS["tiny"])
    >>> tuple(model(np.full((1, model.receptive_field + 9), 128)).shape)
    (1, 10, 256)
    """
    keras.utils.set_random_seed(seed)
    model = WaveNet(config, layout)
    model.build_weights()
    return model
