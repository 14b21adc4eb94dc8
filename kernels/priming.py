"""What the fused loop starts from: its network laid out from a checkpoint's named weights,
the plain numpy forward pass, and each stream's primed state.

:func:`fuse` turns the weights :func:`rainforest.checkpoint.read_weights` returns into a
:class:`~rainforest.kernels.fused_loop.FusedNetwork`; :func:`forward_logits` is the full,
teacher-forced pass in numpy (the same arithmetic as the Keras model, without TensorFlow);
:func:`prime_state` fills every layer's ring buffer from one batched forward pass over the
last receptive field of a prime, or of silence (:func:`silence_code`) when there is none.
"""

from __future__ import annotations

import numpy as np

from rainforest.errors import ParameterError
from rainforest.kernels.fused_loop import FusedNetwork, StreamState
from rainforest.model_config import ModelConfig, block_name


def silence_code(classes: int) -> int:
    """The code of 0.0, the input before any audio: 128 for 8-bit mu-law, whose codes 127 and
    128 straddle zero (``floor(mu / 2 + 0.5)`` with ``mu = classes - 1``)."""
    return classes // 2


def fuse(weights: dict[str, np.ndarray], config: ModelConfig) -> FusedNetwork:
    """Lay out named weights, as :func:`rainforest.checkpoint.read_weights` returns them, for
    the fused loop."""
    layers = len(config.dilations)
    g, r = config.gate_channels, config.residual_channels
    blocks = [block_name(k) for k in range(layers)]
    gate_kernels = np.stack([weights[f"{b}/gate_kernel"] for b in blocks])
    residual_kernel = np.zeros((layers, g, r), np.float32)
    residual_bias = np.zeros((layers, r), np.float32)
    for k, b in enumerate(blocks[:-1]):
        residual_kernel[k] = weights[f"{b}/residual_kernel"]
        residual_bias[k] = weights[f"{b}/residual_bias"]
    if config.conditioned:
        # Each label's embedding through each block's condition kernel: a constant gate bias.
        condition = np.stack([weights["label_embedding"] @ weights[f"{b}/condition_kernel"]
                              for b in blocks], axis=1)
    else:
        condition = np.zeros((0, layers, 2 * g), np.float32)
    return FusedNetwork(
        dilations=config.dilations,
        input_previous=weights["input_previous"], input_current=weights["input_current"],
        input_bias=weights["input_bias"],
        gate_kernel=gate_kernels.reshape(layers, 2 * r, 2 * g),
        gate_bias=np.stack([weights[f"{b}/gate_bias"] for b in blocks]),
        condition=condition,
        residual_kernel=residual_kernel, residual_bias=residual_bias,
        skip_kernel=np.stack([weights[f"{b}/skip_kernel"] for b in blocks]),
        skip_bias=np.sum([weights[f"{b}/skip_bias"] for b in blocks], axis=0),
        output1_kernel=weights["output1_kernel"], output1_bias=weights["output1_bias"],
        output2_kernel=weights["output2_kernel"], output2_bias=weights["output2_bias"],
    )


def stream_gate_bias(network: FusedNetwork, label_ids) -> np.ndarray:
    """Per-stream gate bias (B, L, 2G): the block biases plus each stream's label term."""
    label_ids = np.asarray(label_ids, dtype=np.int64)
    bias = np.broadcast_to(network.gate_bias, (label_ids.shape[0],) + network.gate_bias.shape)
    if network.condition.shape[0]:
        if label_ids.min() < 0 or label_ids.max() >= network.condition.shape[0]:
            raise ParameterError(f"label ids must lie in 0..{network.condition.shape[0] - 1}")
        return bias + network.condition[label_ids]
    return bias.copy()


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _block(network: FusedNetwork, layer: int, hidden, gate_bias):
    """One block over whole sequences (B, n, R): the gated output and next hidden (n - d)."""
    d = network.dilations[layer]
    gate, residual = network.gate_kernel.shape[2] // 2, network.residual_channels
    past, current = hidden[:, :-d], hidden[:, d:]
    kernel = network.gate_kernel[layer]
    z = past @ kernel[:residual] + current @ kernel[residual:] + gate_bias[:, None, layer]
    gated = np.tanh(z[..., :gate]) * _sigmoid(z[..., gate:])
    following = (current + gated @ network.residual_kernel[layer]
                 + network.residual_bias[layer])
    return gated, following


def forward_logits(network: FusedNetwork, codes, gate_bias) -> np.ndarray:
    """The full (teacher-forced) forward pass in numpy float32: (B, n - RF + 1, classes).

    The same arithmetic as the Keras model, for machines without TensorFlow.
    """
    codes = np.asarray(codes, dtype=np.int64)
    rf = network.receptive_field
    hidden = (network.input_previous[codes[:, :-1]] + network.input_current[codes[:, 1:]]
              + network.input_bias)
    targets = codes.shape[1] - rf + 1
    skip = np.zeros((codes.shape[0], targets, network.skip_bias.shape[0]), np.float32)
    for layer in range(network.layers):
        gated, hidden = _block(network, layer, hidden, gate_bias)
        skip += gated[:, -targets:] @ network.skip_kernel[layer]
    head = np.maximum(skip + network.skip_bias, 0)
    head = np.maximum(head @ network.output1_kernel + network.output1_bias, 0)
    return head @ network.output2_kernel + network.output2_bias


def prime_state(network: FusedNetwork, codes, *, gate_bias, seeds) -> StreamState:
    """The loop's state after reading ``codes`` (B, n): one batched forward pass.

    Only the last receptive field of ``codes`` matters; shorter primes are padded on the left
    with silence, so an empty prime is the state after a receptive field of silence. The next
    step reads the last two codes and predicts the code after them.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ParameterError(f"prime codes must be (streams, length), got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= network.classes):
        raise ParameterError(f"prime codes must lie in 0..{network.classes - 1}")
    streams = codes.shape[0]
    rf = network.receptive_field
    if codes.shape[1] < rf:
        pad = np.full((streams, rf - codes.shape[1]), silence_code(network.classes), np.int64)
        codes = np.concatenate([pad, codes], axis=1)
    window = codes[:, -rf:]
    # Window time tau: the input layer's output at tau reads codes tau-1 and tau; the next step
    # is tau = rf - 1, so every layer needs its input at times rf-1-d .. rf-2.
    position = rf - 1
    hidden = (network.input_previous[window[:, :-2]] + network.input_current[window[:, 1:-1]]
              + network.input_bias)
    times = np.arange(1, rf - 1)
    rings = np.empty((streams, int(network.dilations.sum()), network.residual_channels),
                     np.float32)
    for layer in range(network.layers):
        d = int(network.dilations[layer])
        rows = network.ring_offsets[layer] + times[-d:] % d
        rings[:, rows] = hidden[:, -d:]
        if layer + 1 < network.layers:
            _, hidden = _block(network, layer, hidden, gate_bias)
            times = times[d:]
    rng_states = np.array([np.random.SeedSequence(int(seed)).generate_state(1, np.uint64)[0]
                           for seed in seeds], dtype=np.uint64)
    return StreamState(rings, window[:, -2:], rng_states, gate_bias, position)


def stream_seeds(seed: int, streams: int) -> list[int]:
    """Independent per-stream seeds derived from one ``--seed``."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(streams, np.uint64)]
