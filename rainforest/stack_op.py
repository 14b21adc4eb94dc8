"""The residual stack as one TensorFlow operation that runs rainforest's own kernels.

The ``fused`` layout of :class:`rainforest.network.WaveNet` calls :func:`residual_stack` in
place of its blocks. Forward and backward are :mod:`rainforest.kernels.train_stack`, reached
through ``tf.numpy_function`` under ``tf.custom_gradient``: the forward returns the skip sum and
keeps each block's input, gate values and gated output for the backward, which returns the
gradients of the stack's input, its per-item gate biases and its stacked weights. Everything
else (the input lookup, label conditioning, the output head, the loss, Adam, Horovod) stays
TensorFlow's, and the weights keep their names and shapes.

The kernels run on :func:`kernel_threads` threads and give the same bits on any number of them.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np
import tensorflow as tf

from rainforest.errors import RainforestError
from rainforest.kernels.train_stack import (
    StackBuffers,
    StackShape,
    stack_backward,
    stack_forward,
)


def kernel_threads() -> int:
    """This process's share of the cores: TensorFlow's intra-op threads when set (a rank
    sets them to cores / local ranks), else every core it may run on."""
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


#: Stack shapes whose buffers a process keeps (a training batch and a held-out one).
_SHAPES_KEPT = 2


class _Workspaces:
    """This process's :class:`StackBuffers`: two per shape, used in turn, so that a forward
    never overwrites what the backward of the one before it still reads. A forward's token
    names its buffers and the forward; its backward refuses buffers filled since."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shapes: OrderedDict[tuple, list] = OrderedDict()
        self._forwards = 0

    def for_forward(self, shape: StackShape, precision: str) -> tuple[int, StackBuffers]:
        with self._lock:
            key = (shape.key, precision)
            if key not in self._shapes:
                while len(self._shapes) >= _SHAPES_KEPT:
                    self._shapes.popitem(last=False)
                self._shapes[key] = [[None, -1], [None, -1]]  # [buffers, token] per slot
            self._shapes.move_to_end(key)
            self._forwards += 1
            slot = self._shapes[key][self._forwards % 2]
            if slot[0] is None:
                slot[0] = StackBuffers(shape, precision)
            slot[1] = self._forwards
            return self._forwards, slot[0]

    def for_backward(self, shape: StackShape, precision: str, token: int) -> StackBuffers:
        with self._lock:
            slots = self._shapes.get((shape.key, precision))
            slot = slots[token % 2] if slots else None
            if slot is None or slot[1] != token:
                raise RainforestError(
                    "the residual stack's saved activations were overwritten before its "
                    "gradient ran (two forwards of one shape between a forward and its "
                    "gradient); train with --compile graph, and report this")
            return slot[0]


_WORKSPACES = _Workspaces()


def residual_stack(hidden, gate_bias, gate_kernel, residual_kernel, residual_bias, skip_kernel,
                   *, dilations, targets: int, threads: int, precision: str = "float32"):
    """The skip sum (batch, targets, skip), without the skip biases, of the blocks; its
    products in ``precision`` (float32, or bfloat16 operands summed in float32).

    ``hidden`` (batch, positions, residual) is the first block's input, ``gate_bias`` (batch,
    blocks, 2 gate) every block's gate bias for each item (conditioning included), and the
    kernels are the blocks' stacked: gate (blocks, 2 residual, 2 gate), residual (blocks - 1,
    gate, residual) with its bias (blocks - 1, residual), skip (blocks, gate, skip).
    """
    dilations = tuple(int(d) for d in dilations)

    def shape_of(hidden_array, residual_array, skip_array) -> StackShape:
        batch, positions, residual = hidden_array.shape
        return StackShape(dilations, batch, positions, targets, residual,
                          residual_array.shape[1], skip_array.shape[2])

    def forward(hidden_array, *weights):
        shape = shape_of(hidden_array, weights[2], weights[4])
        token, buffers = _WORKSPACES.for_forward(shape, precision)
        # The backward pass of this token reads the same weights: lay them out once a step.
        buffers.padded_weights = shape.pad_weights(*weights)
        skip = stack_forward(shape, hidden_array, buffers.padded_weights, buffers,
                             threads=threads)
        return skip.copy(), np.int64(token)  # the buffers are reused: the skip sum is not

    def backward(d_skip, token, hidden_array, *weights):
        shape = shape_of(hidden_array, weights[2], weights[4])
        buffers = _WORKSPACES.for_backward(shape, precision, int(token))
        return stack_backward(shape, d_skip, buffers.padded_weights, buffers, threads=threads)

    @tf.custom_gradient
    def stack(hidden, gate_bias, gate_kernel, residual_kernel, residual_bias, skip_kernel):
        inputs = [hidden, gate_bias, gate_kernel, residual_kernel, residual_bias, skip_kernel]
        skip, token = tf.numpy_function(forward, inputs, [tf.float32, tf.int64],
                                        stateful=True, name="residual_stack")
        skip.set_shape([hidden.shape[0], targets, skip_kernel.shape[2]])

        def gradient(d_skip):
            grads = tf.numpy_function(backward, [d_skip, token, *inputs], [tf.float32] * 6,
                                      stateful=True, name="residual_stack_gradient")
            for grad, value in zip(grads, inputs, strict=True):
                grad.set_shape(value.shape)
            return grads

        return skip, gradient

    return stack(*(tf.cast(value, tf.float32) for value in (
        hidden, gate_bias, gate_kernel, residual_kernel, residual_bias, skip_kernel)))


__all__ = ["kernel_threads", "residual_stack"]
