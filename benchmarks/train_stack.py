"""Where the fused training step's kernels spend their time, pass by pass, with GFLOP/s.

Run with ``python benchmarks/train_stack.py [--config medium] [--threads 2] [--rounds 5]``.
The residual stack of ``rainforest.kernels.train_stack`` runs on random inputs the size of a
``benchmarks/train.py`` step, and each pass is timed on its own (compilation left out):

* forward:    every block's gate product, tanh x sigmoid and residual product;
* skip sum:   the skip products of every block, 6 targets at a time;
* gradients:  every block's d gated, dz, its taps' parts of d x and the chunks'
  weight-gradient parts;
* part sums:  the chunks' parts added in order;
* input:      every block's d x: the taps' parts added (no products).

It prints the median and range of each over the rounds, its multiply-adds as GFLOP/s and as a
share of this machine's float32 matmul peak measured in the same run (numpy, OpenBLAS
overrides unset; ``machine.py``), in float32 and in bfloat16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
from machine import describe, matmul_gflops

from rainforest.kernels import train_stack as kernels
from rainforest.kernels._pairs import to_bfloat16


def _inputs(config, batch: int, targets: int):
    from rainforest.model_config import receptive_field

    rng = np.random.default_rng(0)
    r, g, s = config.residual_channels, config.gate_channels, config.skip_channels
    layers, positions = len(config.dilations), receptive_field(config) - 2 + targets

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    shape = kernels.StackShape(config.dilations, batch, positions, targets, r, g, s)
    weights = (normal(batch, layers, 2 * g, scale=0.1),
               normal(layers, 2 * r, 2 * g, scale=(2 * r) ** -0.5),
               normal(layers - 1, g, r, scale=g ** -0.5), normal(layers - 1, r, scale=0.1),
               normal(layers, g, s, scale=g ** -0.5))
    return shape, normal(batch, positions, r), weights, normal(batch, targets, s)


def _flops(shape) -> dict[str, float]:
    """Multiply-adds x 2 of each pass."""
    r, g, s, t = shape.r, shape.g, shape.s, shape.targets
    rows = shape.batch * int(shape.outputs.sum())
    inner = shape.batch * int(shape.outputs[:-1].sum())  # blocks with a residual
    skip_rows = shape.batch * t * shape.layers
    return {"forward": 2 * (rows * 2 * r * 2 * g + inner * g * r),
            "skip sum": 2 * skip_rows * g * s,
            "gradients": 2 * (inner * r * g + skip_rows * s * g          # d gated
                              + rows * 2 * g * 2 * r                        # d x, both taps
                              + rows * 2 * r * 2 * g + inner * g * r + skip_rows * g * s),
            "part sums": 0, "input": 0}


def _passes(shape, hidden, weights, d_skip, buffers, threads):
    """Wall seconds of each pass of one forward and backward, into ``buffers`` (reused from
    call to call, as training reuses them: fresh memory would add its page faults)."""
    precision = buffers.precision
    padded = shape.pad_weights(*weights)
    bias, wg, wr, br, ws = padded
    pairs = precision == "bfloat16"
    layers = shape.layers
    rows = shape.batch * shape.positions
    buffers.xs[:rows] = hidden.reshape(rows, -1)
    empty = np.empty((0, 0), np.uint16)
    packed = (empty, empty, empty)
    if pairs:
        to_bfloat16(buffers.xs, 0, rows, buffers.x16, 0)
        packed = (kernels._pairs_of(wg, 2 * layers), kernels._pairs_of(wr, layers),
                  kernels._pairs_of(ws, layers))
    numba.set_num_threads(threads)
    times = {}
    started = time.perf_counter()
    kernels._layers_forward(buffers.xs, buffers.acts, buffers.gated, bias, wg, wr, br,
                            shape.dilations, shape.lengths, shape.x_offsets, shape.act_offsets,
                            shape.targets, shape.batch, pairs, buffers.x16, buffers.gated16,
                            packed[0], packed[1])
    times["forward"] = time.perf_counter() - started
    started = time.perf_counter()
    kernels._skip_sum(buffers.skip, buffers.gated, ws, shape.dilations, shape.lengths,
                      shape.act_offsets, shape.targets, pairs, buffers.gated16, packed[2])
    times["skip sum"] = time.perf_counter() - started
    times.update(kernels.timed_backward(shape, d_skip, padded, buffers, threads=threads))
    return times


def main() -> None:
    from rainforest.model_config import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="medium")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--target-length", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=len(__import__("os").sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = PRESETS[args.config]
    shape, hidden, weights, d_skip = _inputs(config, args.batch_size, args.target_length)
    print(describe())
    print(f"config {args.config}, batch {args.batch_size} x {args.target_length} targets, "
          f"{args.threads} thread(s)")
    flops = _flops(shape)
    for precision in kernels.PRECISIONS:
        buffers = kernels.StackBuffers(shape, precision)
        _passes(shape, hidden, weights, d_skip, buffers, args.threads)  # compile
        rounds = []
        for _ in range(args.rounds):
            rounds.append(_passes(shape, hidden, weights, d_skip, buffers, args.threads))
        peak = matmul_gflops()
        total = [sum(r.values()) for r in rounds]
        print(f"\n{precision}: the float32 peak in this run {peak:.0f} GFLOP/s on "
              f"{args.threads} thread(s) of numpy")
        print(f"  {'pass':<11} {'ms':>8} {'min..max':>15} {'GFLOP/s':>8} {'of peak':>8}")
        for name in rounds[0]:
            values = [1e3 * r[name] for r in rounds]
            median = statistics.median(values)
            rate = flops[name] / median / 1e6 if flops[name] else float("nan")
            print(f"  {name:<11} {median:8.1f} {min(values):7.1f}..{max(values):<7.1f} "
                  f"{rate:8.1f} {rate / peak:8.1%}")
        median_total = statistics.median(total)
        rate = sum(flops.values()) / median_total / 1e9
        print(f"  {'all':<11} {1e3 * median_total:8.1f} {1e3 * min(total):7.1f}.."
              f"{1e3 * max(total):<7.1f} {rate:8.1f} {rate / peak:8.1%}")


if __name__ == "__main__":
    main()
