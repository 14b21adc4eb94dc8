"""Training throughput of the WaveNet, and its FLOP rate against this machine's matmul peak.

Run with ``python benchmarks/train.py [--config medium] [--batch-size 1] [--target-length 16384]``.
Each round measures, side by side so that machine noise hits all alike:

* peak:        a 4096^3 float32 numpy matmul on every core (the same cores TensorFlow uses),
               measured by ``machine.py`` with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset;
* graph / xla / fused: one rank (``rainforest.train.Trainer``) in a fresh process, with
  ``tf.function``, ``tf.function(jit_compile=True)`` (each with its own network layout,
  ``rainforest.train.network_layout``) and the residual stack in rainforest's own kernels
  (``--compile fused``), in float32 and (``+bf16``) with ``--precision mixed_bfloat16``
  (bfloat16 compute, float32 weights); the default, ``--compile auto --precision auto``,
  picks among these with ``step_choice.fastest``;
* keras:       the straightforward Keras WaveNet a user would otherwise write (causal
  ``Conv1D(dilation_rate=d)`` for tanh and for sigmoid, ``Multiply``, 1x1 ``Conv1D`` for the
  residual and the skip, ``Add``; ``model.compile`` defaults and ``train_on_batch``), the same
  layers, channels and targets;
* fused x2:    two ranks under ``horovodrun -np 2 --gloo``, each with half the cores and the
  same per-rank batch (weak scaling).

Batches are random codes held in memory (the input pipeline is not what is measured) and the
first steps, which trace and compile, are left out. It prints medians with min..max over the
rounds, target samples per second, the scaling efficiency (two ranks against one, same cores)
and the training FLOP rate as a share of the peak, counting 3 x 2 x (forward multiply-adds per
sample) per target sample: forward, and the backward pass's two matmuls per forward matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from machine import ONEDNN_CREATE_VERBOSE, describe, matmul_gflops, onednn_summary

HERE = os.path.abspath(__file__)


def straightforward_keras(model_config, target: int):
    """The Keras WaveNet most tutorials write: one causal dilated Conv1D per gate half."""
    import keras
    from keras import layers

    window = sum(model_config.dilations) + 1 + target
    codes = keras.Input((window,), dtype="int32")
    x = layers.Embedding(model_config.classes, model_config.residual_channels)(codes)
    x = layers.Conv1D(model_config.residual_channels, 2, padding="causal")(x)
    skips = []
    for d in model_config.dilations:
        tanh = layers.Conv1D(model_config.gate_channels, 2, dilation_rate=d, padding="causal",
                             activation="tanh")(x)
        sigmoid = layers.Conv1D(model_config.gate_channels, 2, dilation_rate=d,
                                padding="causal", activation="sigmoid")(x)
        gated = layers.Multiply()([tanh, sigmoid])
        skips.append(layers.Conv1D(model_config.skip_channels, 1)(gated))
        x = layers.Add()([x, layers.Conv1D(model_config.residual_channels, 1)(gated)])
    head = layers.Activation("relu")(layers.Add()(skips))
    head = layers.Conv1D(model_config.skip_channels, 1, activation="relu")(head)
    logits = layers.Conv1D(model_config.classes, 1)(head)
    logits = layers.Cropping1D((window - target, 0))(logits)  # the targets with a full field
    model = keras.Model(codes, logits)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, window


def step_function(config_name: str, mode: str, batch: int, target: int):
    """``(step(i), rank, ranks)``: one training step of ``mode`` on random codes held in memory.

    ``mode`` is ``keras`` (the straightforward Keras WaveNet, ``train_on_batch``) or a
    rainforest compile mode with ``+bf16`` for ``--precision mixed_bfloat16``; the step's
    layout is ``rainforest.train.network_layout``'s choice for it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from rainforest.model_config import PRESETS, receptive_field
    from rainforest.train import TrainConfig, Trainer, init_horovod

    model_config = PRESETS[config_name]
    if mode == "keras":
        model, window = straightforward_keras(model_config, target)
        codes = np.random.default_rng(0).integers(0, 256, (batch, window + 1)).astype(np.int32)
        inputs, targets = codes[:, :-1], codes[:, -target:]
        return (lambda step: model.train_on_batch(inputs, targets)), 0, 1
    hvd = init_horovod()
    compile_mode, _, bf16 = mode.partition("+")
    config = TrainConfig(batch_size=batch, target_length=target, compile=compile_mode,
                         warmup_steps=0, precision="mixed_bfloat16" if bf16 else "float32")
    trainer = Trainer(model_config, config, hvd)
    window = receptive_field(model_config) + target
    rng = np.random.default_rng(hvd.rank())
    windows = rng.integers(0, 256, (batch, window)).astype(np.uint8)
    labels = np.zeros(batch, np.int32)
    # train_step returns host floats, so the step is done when it returns
    return (lambda step: trainer.train_step(windows, labels, step)), hvd.rank(), hvd.size()


def worker(config_name: str, mode: str, batch: int, target: int, steps: int, warmup: int):
    """Time ``steps`` training steps in this process (one rank of however many Horovod has)."""
    step, rank, ranks = step_function(config_name, mode, batch, target)
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        step(index)
        times.append(time.perf_counter() - start)
    if rank == 0:
        print("RESULT " + json.dumps({"step_seconds": float(np.median(times[warmup:])),
                                      "ranks": ranks}), flush=True)


def run_variant(args, mode: str, ranks: int) -> dict:
    command = [sys.executable, HERE, "--worker", mode, "--config", args.config,
               "--batch-size", str(args.batch_size), "--target-length", str(args.target_length),
               "--steps", str(args.steps)]
    if ranks > 1:
        horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        command = [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo",
                   *command]
    output = subprocess.run(command, capture_output=True, text=True, check=False,
                            env={**os.environ, **ONEDNN_CREATE_VERBOSE})
    for line in output.stdout.splitlines():
        if "RESULT " in line:
            return {**json.loads(line.split("RESULT ", 1)[1]),
                    "onednn": onednn_summary(output.stdout)}
    raise RuntimeError(f"{mode} x{ranks} failed:\n{output.stdout[-2000:]}{output.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="medium")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per rank (1 rank)")
    parser.add_argument("--target-length", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.config, args.worker, args.batch_size, args.target_length, args.steps,
               warmup=2)
        return

    from rainforest.model_config import PRESETS, multiply_adds_per_sample, receptive_field

    config = PRESETS[args.config]
    flops_per_sample = 3 * 2 * multiply_adds_per_sample(config)
    cores = len(os.sched_getaffinity(0))
    per_step = args.batch_size * args.target_length
    print(describe())
    print(f"{cores} cores; config {args.config}: "
          f"{len(config.dilations)} layers, receptive field {receptive_field(config)}, "
          f"{multiply_adds_per_sample(config):,} forward multiply-adds per sample")
    print(f"batch: {args.batch_size} x {args.target_length} = {per_step} target samples per "
          "step on every rank (two ranks: twice the global batch, each rank on half the cores)")
    variants = [("graph", 1), ("xla", 1), ("fused", 1), ("graph+bf16", 1), ("xla+bf16", 1),
                ("fused+bf16", 1), ("keras", 1), ("fused", 2)]
    results: dict[str, list[float]] = {f"{m} x{r}": [] for m, r in variants}
    peaks, onednn = [], {}
    for round_index in range(args.rounds):
        peaks.append(matmul_gflops(tensorflow=True))
        for mode, ranks in variants:
            result = run_variant(args, mode, ranks)
            onednn[f"{mode} x{ranks}"] = result["onednn"]
            samples = per_step * ranks  # every rank takes the same batch (weak scaling)
            results[f"{mode} x{ranks}"].append(samples / result["step_seconds"])
        peaks.append(matmul_gflops(tensorflow=True))
        print(f"round {round_index + 1}: " + ", ".join(
            f"{k} {v[-1]:.0f}/s" for k, v in results.items()) + f"; peak {peaks[-1]:.0f} GFLOP/s")
    peak = float(np.median(peaks))
    print(f"\nfloat32 matmul peak, the higher of numpy (OpenBLAS overrides unset) and "
          f"TensorFlow, on {cores} cores: median {peak:.0f} GFLOP/s "
          f"(min {min(peaks):.0f}, max {max(peaks):.0f})")
    print(f"{'variant':<10} {'samples/s':>10} {'min..max':>15} {'GFLOP/s':>8} {'of peak':>8}")
    for name, values in results.items():
        median = float(np.median(values))
        gflops = median * flops_per_sample / 1e9
        print(f"{name:<10} {median:10.0f} {min(values):7.0f}..{max(values):<7.0f} "
              f"{gflops:8.1f} {gflops / peak:8.1%}")
    _print_onednn(onednn)
    _targets(results, peak, flops_per_sample, cores)


def _print_onednn(onednn: dict) -> None:
    """Which oneDNN ISA and kernels each variant ran (XLA's own code runs none)."""
    isas = {summary["isa"] for summary in onednn.values() if summary["isa"]}
    print(f"\noneDNN ISA (ONEDNN_VERBOSE): {'; '.join(sorted(isas)) or 'not reported'}")
    for name, summary in onednn.items():
        kernels = "; ".join(f"{kind} {', '.join(impls)}" for kind, impls
                            in sorted(summary["implementations"].items()))
        kernels = kernels or "no oneDNN primitive (XLA's own code, or _MklMatMul's sgemm call)"
        print(f"  {name:<14} {kernels}")


def _targets(results, peak, flops_per_sample, cores) -> None:
    """The issue's targets, each met or missed, and the three ratios a script reads."""
    from rainforest.step_choice import candidates, fastest

    def verdict(ok):
        return "met" if ok else "MISSED"

    median = {name: float(np.median(values)) for name, values in results.items()}
    keras = median["keras x1"]
    one, two = median["fused x1"], median["fused x2"]
    print(f"\nscaling, fused step: 2 ranks x {cores // 2} core(s) = {two:.0f} samples/s "
          f"({two / 2:.0f} per rank) vs 1 rank x {cores} cores = {one:.0f}: efficiency "
          f"{two / one:.2f} on the same cores (target >= 0.9: {verdict(two / one >= 0.9)})")
    float32 = max(("graph x1", "xla x1", "fused x1"), key=median.get)
    bf16 = max(("graph+bf16 x1", "xla+bf16 x1", "fused+bf16 x1"), key=median.get)
    share = median[float32] * flops_per_sample / 1e9 / peak
    print(f"best float32: {float32}, {share:.1%} of the float32 peak; best bfloat16: {bf16}, "
          f"{median[bf16] / median[float32]:.2f}x the best float32")
    # The candidates --compile auto --precision auto would time here, by their variant names.
    timed = {f"{c}/{p}": f"{c}{'+bf16' if p == 'mixed_bfloat16' else ''} x1"
             for c, p in candidates("auto", "auto", gpu=False)}
    choice = fastest({name: 1 / median[variant] for name, variant in timed.items()})
    default = median[timed["/".join(choice)]]
    print(f"default (--compile auto --precision auto, on these medians): {', '.join(choice)}")
    for what, value, target in (("best float32", median[float32], 1.3),
                                ("best bfloat16", median[bf16], 2.0),
                                ("default", default, 1.8)):
        print(f"{what} / straightforward Keras: {value / keras:.2f}x")
        print(f"  target >= {target}x: {verdict(value / keras >= target)}")


if __name__ == "__main__":
    main()
