"""Generation speed of the fused loop against its alternatives, on the "medium" config.

Run with ``python benchmarks/generate.py [--rounds N] [--pieces]``. Every round times, side by
side so that machine noise hits all alike (the medians over rounds are printed), for each
``--precision`` (float32, bfloat16, int8 weights):

* B = 1, 1 core:  ``generate_codes`` (the product's one-stream path);
* B = 32, 1 core: one call, the product's register tiles of 4 streams;
* B = 32, all cores: the streams shared among one thread per core (nogil kernel), as
  ``rainforest generate --threads`` does;
* naive:  the full Keras model over the last receptive field for every sample (the approach
  generation replaces; ``tf.function`` compiled, so it is the fast version of it);
* queue:  a straightforward fast-WaveNet in numpy: per-layer queues, one numpy call per
  product per layer per sample (Paine et al. 2016, the algorithm without fusion);
* limits: the peak (a large float32 numpy matmul on 1 core and on all cores, measured by
  ``machine.py`` with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset) and each precision's
  bandwidth bound (bytes of weights per sample over the rate one core reads an array of that
  size from its caches).

``--pieces`` adds where a step goes (``pieces.py``): products, gates, output stack, sampling.

The weights are random (scaled like Glorot initialisation); speed does not depend on their
values. Targets: one stream >= 32,000 samples/s on one core, i.e. twice real time at 16 kHz,
so one core can preview a song while it is made; B = 32 on all cores >= 60% of the peak, since
a batch shares each weight read across streams and should then be compute-bound; float32
>= 100x the naive loop, the "whole network per sample" way this loop replaces.
"""

import argparse
import os
import time
from collections import deque

import numpy as np
from machine import describe, matmul_peak
from numba import njit
from pieces import profile

from rainforest.generate import generate_threaded
from rainforest.kernels.fused_loop import WEIGHT_PRECISIONS, generate_codes
from rainforest.kernels.priming import fuse, prime_state, stream_gate_bias, stream_seeds
from rainforest.model_config import PRESETS, multiply_adds_per_sample, weight_layout


def random_weights(config, seed=0):
    rng = np.random.default_rng(seed)
    weights = {}
    for owner, entries in weight_layout(config).items():
        for name, shape in entries:
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
            scale = 0.1 if len(shape) == 1 else 1.0 / np.sqrt(fan_in)
            key = f"{owner}/{name}" if owner else name
            weights[key] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return weights


def fresh_state(network, streams, seed=0):
    return prime_state(network, np.empty((streams, 0)),
                       gate_bias=stream_gate_bias(network, [0] * streams),
                       seeds=stream_seeds(seed, streams))


def fused_rate(network, streams, samples):
    """Samples per second (all streams together) of one fused call."""
    state = fresh_state(network, streams)
    started = time.perf_counter()
    generate_codes(network, state, samples)
    return streams * samples / (time.perf_counter() - started)


def fused_threads_rate(network, streams, samples, threads):
    """The streams shared among ``threads`` threads running the nogil kernel at once."""
    state = fresh_state(network, streams)
    states = [state.take(share) for share in np.array_split(np.arange(streams), threads)]
    started = time.perf_counter()
    generate_threaded(network, states, samples, 1.0)
    return streams * samples / (time.perf_counter() - started)


def draw(logits, rng):
    """Inverse-CDF sample of softmax(logits), in numpy (the baselines' sampler)."""
    p = np.exp(logits - logits.max())
    return min(int(np.searchsorted(np.cumsum(p), rng.random() * p.sum())), logits.shape[0] - 1)


class QueueWaveNet:
    """Fast WaveNet, straightforwardly in numpy: a deque per layer, one call per product."""

    def __init__(self, weights, config, seed=0):
        self.w = weights
        self.config = config
        self.names = [f"block{k:02d}" for k in range(len(config.dilations))]
        r = config.residual_channels
        self.queues = [deque([np.zeros(r, np.float32)] * d, maxlen=d) for d in config.dilations]
        self.codes = [config.classes // 2, config.classes // 2]
        self.rng = np.random.default_rng(seed)

    def step(self):
        w = self.w
        x = (w["input_previous"][self.codes[0]] + w["input_current"][self.codes[1]]
             + w["input_bias"])
        skip = np.zeros(self.config.skip_channels, np.float32)
        last = len(self.names) - 1
        for k, name in enumerate(self.names):
            past = self.queues[k][0]
            self.queues[k].append(x)
            kernel = w[f"{name}/gate_kernel"]
            z = past @ kernel[0] + x @ kernel[1] + w[f"{name}/gate_bias"]
            half = z.shape[0] // 2
            gated = np.tanh(z[:half]) / (1 + np.exp(-z[half:]))
            skip += gated @ w[f"{name}/skip_kernel"] + w[f"{name}/skip_bias"]
            if k != last:
                x = x + gated @ w[f"{name}/residual_kernel"] + w[f"{name}/residual_bias"]
        head = np.maximum(np.maximum(skip, 0) @ w["output1_kernel"] + w["output1_bias"], 0)
        logits = head @ w["output2_kernel"] + w["output2_bias"]
        self.codes = [self.codes[1], draw(logits, self.rng)]


def queue_rate(weights, config, samples):
    generator = QueueWaveNet(weights, config)
    started = time.perf_counter()
    for _ in range(samples):
        generator.step()
    return samples / (time.perf_counter() - started)


class NaiveKeras:
    """The whole network over the last receptive field for every new sample."""

    def __init__(self, weights, config):
        import tensorflow as tf

        from rainforest.network import build_model

        self.model = build_model(config)
        by_name = {v.path.removeprefix(self.model.name + "/"): v for v in self.model.weights}
        for name, array in weights.items():
            by_name[name].assign(array)
        self.forward = tf.function(lambda codes: self.model(codes)[0, -1])
        self.window = np.full((1, 2 + sum(config.dilations)), config.classes // 2, np.int32)
        self.rng = np.random.default_rng(0)
        self.forward(self.window)  # trace once

    def step(self):
        logits = self.forward(self.window).numpy().astype(np.float64)
        self.window = np.roll(self.window, -1, axis=1)
        self.window[0, -1] = draw(logits, self.rng)


def naive_rate(naive, samples):
    started = time.perf_counter()
    for _ in range(samples):
        naive.step()
    return samples / (time.perf_counter() - started)


@njit(fastmath=True, nogil=True)
def _read_all(data, repeats):
    total = np.float32(0.0)
    for _ in range(repeats):
        for i in range(data.shape[0]):
            total += data[i]
    return total


def read_bandwidth(nbytes, repeats=200):
    """GB/s at which one core reads an array of ``nbytes`` over and over (cache-resident
    as far as it fits, like the weights in the loop)."""
    data = np.ones(nbytes // 4, np.float32)
    _read_all(data, 1)
    started = time.perf_counter()
    _read_all(data, repeats)
    return nbytes * repeats / (time.perf_counter() - started) / 1e9


def _round(runs, networks, weights, config, naive, args, cores):
    """One round of every measurement, appended to ``runs``."""
    for precision, network in networks.items():
        runs[f"{precision} B=1 1 core"].append(fused_rate(network, 1, args.samples))
        # A quarter of the samples per stream: a call of 500 (as before) left the threaded
        # run paying thread start-up, first touches and the idle core's clock ramp-up.
        runs[f"{precision} B=32 1 core"].append(fused_rate(network, 32, args.samples // 4))
        runs[f"{precision} B=32 {cores} cores"].append(
            fused_threads_rate(network, 32, args.samples // 4, cores))
        runs[f"{precision} read GB/s"].append(read_bandwidth(network.nbytes))
    runs["queue numpy B=1"].append(queue_rate(weights, config, 300))
    if naive is not None:
        runs["naive keras B=1"].append(naive_rate(naive, 20))
    runs["peak GFLOP/s 1 core"].append(matmul_peak(threads=1)["gflops"])
    runs[f"peak GFLOP/s {cores} cores"].append(matmul_peak()["gflops"])


def _report(median, runs, networks, flops, cores):
    peak_one, peak_all = median["peak GFLOP/s 1 core"], median[f"peak GFLOP/s {cores} cores"]
    print(f"\n{'':28s}{'samples/s':>12s}  {'min..max':>19s}  {'GFLOP/s':>8s}  "
          f"{'% peak':>7s}  {'% bandwidth bound':>17s}")
    for name, values in runs.items():
        if "GB/s" in name or "GFLOP" in name:
            continue
        rate = median[name]
        precision = name.split()[0]
        peak = peak_all if f"{cores} cores" in name and cores > 1 else peak_one
        line = (f"{name:28s}{rate:12,.0f}  {min(values):9,.0f}..{max(values):<9,.0f}  "
                f"{rate * flops / 1e9:8.1f}  {100 * rate * flops / 1e9 / peak:6.1f}%")
        if precision in networks and "B=1 " in name:
            bound = median[f"{precision} read GB/s"] * 1e9 / networks[precision].nbytes
            line += f"  {100 * rate / bound:16.0f}%"
        print(line)
    print(f"\npeak (numpy float32 matmul, OpenBLAS overrides unset): {peak_one:.0f} GFLOP/s on "
          f"1 core, {peak_all:.0f} on {cores}; every precision multiplies in float32, so this "
          "is the peak of each")
    for precision, network in networks.items():
        gbs = median[f"{precision} read GB/s"]
        print(f"  {precision:9s}: {network.nbytes / 1e6:.2f} MB of weights per sample; one core "
              f"reads them at {gbs:.1f} GB/s -> bandwidth bound "
              f"{gbs * 1e9 / network.nbytes:,.0f} samples/s")
    return peak_all


def _targets(median, networks, cores, flops, peak_all):
    def verdict(ok):
        return "met" if ok else "MISSED"

    best = max(networks, key=lambda p: median[f"{p} B=1 1 core"])
    single = median[f"{best} B=1 1 core"]
    print(f"\nsingle stream, 1 core: best {best} {single:,.0f} samples/s = "
          f"{single / 16000:.2f}x real time at 16 kHz (float32 "
          f"{median['float32 B=1 1 core']:,.0f}; target >= 32,000: {verdict(single >= 32000)})")
    batched = {p: median[f"{p} B=32 {cores} cores"] for p in networks}
    top = max(batched, key=batched.get)
    share = batched[top] * flops / 1e9 / peak_all
    print(f"B=32 on {cores} cores: best {top} {batched[top]:,.0f} samples/s = {100 * share:.0f}% "
          f"of the {peak_all:.0f} GFLOP/s peak (target >= 60%: {verdict(share >= 0.6)})")
    float32 = median["float32 B=1 1 core"]
    if "naive keras B=1" in median:
        ratio = float32 / median["naive keras B=1"]
        print(f"fused float32 / naive Keras: {ratio:,.0f}x (target >= 100x: "
              f"{verdict(ratio >= 100)})")
    print(f"fused float32 / queue numpy: {float32 / median['queue numpy B=1']:,.1f}x")


def _pieces(networks, rounds, samples):
    """``--pieces``: each piece's share of a step (see pieces.py), B = 1 and B = 32 on 1 core."""
    print(f"\nper-piece profile, 1 core: microseconds per step (the best of 10 short runs) and "
          f"share of the whole step (medians of {rounds} rounds, share min..max)")
    for precision, network in networks.items():
        for streams, steps in ((1, samples // 80), (32, samples // 640)):
            runs = [profile(network, fresh_state(network, streams), steps) for _ in range(rounds)]
            whole = np.array([run["whole step"] for run in runs])
            parts = []
            for name in ("products", "gates", "output stack", "sampling"):
                seconds = np.array([run[name] for run in runs])
                shares = 100 * seconds / whole
                parts.append(f"{name} {1e6 * np.median(seconds):.1f} us {np.median(shares):.0f}% "
                             f"({shares.min():.0f}..{shares.max():.0f})")
            rest = 100 - sum(100 * np.median([run[n] / run["whole step"] for run in runs])
                             for n in ("products", "gates", "output stack", "sampling"))
            print(f"  {precision} B={streams}: step {1e6 * np.median(whole):.1f} us = "
                  f"{'; '.join(parts)}; rest {rest:.0f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8000,
                        help="samples per stream for the single-stream fused runs")
    parser.add_argument("--no-keras", action="store_true",
                        help="skip the naive Keras baseline (no TensorFlow on this machine)")
    parser.add_argument("--pieces", action="store_true",
                        help="also time the pieces of a step: products, gates, output stack, "
                             "sampling")
    args = parser.parse_args()

    config = PRESETS["medium"]
    weights = random_weights(config)
    float32 = fuse(weights, config)
    networks = {p: float32.at_precision(p) for p in WEIGHT_PRECISIONS}
    cores = os.cpu_count() or 1
    flops = 2 * multiply_adds_per_sample(config)
    print(describe())
    print(f"config medium: {len(config.dilations)} layers, receptive field "
          f"{float32.receptive_field}, {flops / 1e6:.3f} MFLOP per sample")
    for network in networks.values():  # compile every path once, outside the timing
        for streams in (1, 32):
            generate_codes(network, fresh_state(network, streams), 4)
    naive = None if args.no_keras else NaiveKeras(weights, config)

    runs = {}
    for precision in WEIGHT_PRECISIONS:
        for name in ("B=1 1 core", "B=32 1 core", f"B=32 {cores} cores", "read GB/s"):
            runs[f"{precision} {name}"] = []
    for name in ("queue numpy B=1", "naive keras B=1", "peak GFLOP/s 1 core",
                 f"peak GFLOP/s {cores} cores"):
        runs[name] = []
    for round_ in range(args.rounds):
        _round(runs, networks, weights, config, naive, args, cores)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    median = {name: float(np.median(values)) for name, values in runs.items() if values}
    runs = {name: values for name, values in runs.items() if values}
    peak_all = _report(median, runs, networks, flops, cores)
    _targets(median, networks, cores, flops, peak_all)
    if args.pieces:
        _pieces(networks, args.rounds, args.samples)


if __name__ == "__main__":
    main()
