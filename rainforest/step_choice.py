"""`train --compile auto --precision auto`: how to run the training step on this machine.

Which step is fastest depends on the machine, and not in a way a rule can know: on one AMD
EPYC (AVX512_BF16, no AMX) XLA ran our float32 step 1.2x faster than graph mode, and graph
mode in bfloat16 1.5x faster than graph mode in float32, while bfloat16 under XLA was the
slowest of all (docs/performance.md); rainforest's own kernels (``--compile fused``) beat them
all on the CPUs measured. So a run long enough to repay it times a few steps of each
candidate, on every rank at once, and trains with the fastest; a candidate in bfloat16
changes the numerics, so it must win by :data:`BFLOAT16_MARGIN`. A shorter run, and an
elastic one (whose ranks must not meet in a collective before the first commit), takes
:func:`rule`'s choice. Every choice is logged and saved with its reason and timings in the
checkpoints, and a resumed run keeps the choice it was started with.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rainforest.model_config import ModelConfig, receptive_field

#: The compile modes `--compile auto` times (eager is for debugging, never fast).
TIMED_COMPILES = ("graph", "xla", "fused")
#: How much faster than the fastest float32 step a bfloat16 one must be to be chosen: a
#: choice that changes the numerics must not flip from one run to the next on noise.
BFLOAT16_MARGIN = 1.10
#: A run with fewer steps left than this takes the rule's choice: timing every candidate
#: costs about as much as a few dozen steps (each compiles its own step).
MEASURE_FROM_STEPS = 300
#: Timed steps per candidate, after one untimed step that traces and compiles.
TRIAL_STEPS = 5
#: CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic; without one, TensorFlow
#: emulates bfloat16 and it cannot win.
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class StepChoice:
    """The compile mode and precision a run trains with, and why."""

    compile: str
    precision: str
    reason: str
    #: median seconds a step of each timed candidate ("graph/float32"), slowest rank's
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gpu_present() -> bool:
    """Whether TensorFlow sees a GPU."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def native_bfloat16(gpu: bool) -> bool:
    """Whether this machine computes in bfloat16 natively (a GPU, or a CPU flag)."""
    if gpu:
        return True
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def rule(compile_mode: str, precision: str, gpu: bool) -> tuple[str, str]:
    """The choice without timing: on a CPU rainforest's fused kernels in float32, on a GPU
    graph mode in bfloat16."""
    if precision == "auto":
        precision = "mixed_bfloat16" if gpu else "float32"
    if compile_mode == "auto":
        compile_mode = "fused" if (not gpu and precision == "float32") else "graph"
    return compile_mode, precision


def candidates(compile_mode: str, precision: str, gpu: bool) -> list[tuple[str, str]]:
    """The (compile, precision) pairs worth timing for what was asked.

    On a CPU, XLA in bfloat16 is left out unless asked for: TensorFlow 2.18's XLA CPU runtime
    ran it at half the speed of XLA in float32 (docs/performance.md), so it cannot win. The
    fused kernels run on a CPU only.
    """
    compiles = TIMED_COMPILES if compile_mode == "auto" else (compile_mode,)
    if compile_mode == "auto":
        compiles = tuple(c for c in compiles if not (gpu and c == "fused"))
    if precision != "auto":
        precisions: tuple[str, ...] = (precision,)
    else:
        precisions = ("float32", "mixed_bfloat16") if native_bfloat16(gpu) else ("float32",)
    return [(c, p) for p in precisions for c in compiles
            if gpu or compile_mode != "auto" or (c, p) != ("xla", "mixed_bfloat16")]


def fastest(seconds: dict[str, float]) -> tuple[str, str]:
    """The fastest candidate; one in bfloat16 only if it beats the fastest float32 one by
    :data:`BFLOAT16_MARGIN` (a tie goes to the first listed).

    >>> fastest({"graph/float32": 0.90, "xla/float32": 0.62, "graph/mixed_bfloat16": 0.55})
    ('graph', 'mixed_bfloat16')
    >>> fastest({"xla/float32": 0.60, "graph/mixed_bfloat16": 0.58})
    ('xla', 'float32')
    """
    best = min(seconds, key=seconds.get)
    exact = {name: value for name, value in seconds.items() if name.endswith("/float32")}
    if exact and not best.endswith("/float32"):
        best_exact = min(exact, key=exact.get)
        if seconds[best] * BFLOAT16_MARGIN > seconds[best_exact]:
            best = best_exact
    compile_mode, precision = best.split("/")
    return compile_mode, precision


def choose(model_config: ModelConfig, config, hvd, *, gpu: bool, steps_left: int,
           elastic: bool, build_trainer: Callable[[Any], Any],
           log: Callable[[str], None] = print) -> StepChoice:
    """Resolve ``config.compile`` and ``config.precision`` (a ``TrainConfig``); every rank calls.

    ``build_trainer(config)`` makes a ``rainforest.train.Trainer`` for a candidate config.
    """
    options = candidates(config.compile, config.precision, gpu)
    if len(options) == 1:
        return StepChoice(*options[0], reason="as asked")
    compile_mode, precision = rule(config.compile, config.precision, gpu)
    if elastic:
        why = "an elastic run does not time candidates (its ranks may not meet before its " \
              "first commit)"
        return StepChoice(compile_mode, precision, reason=f"{why}; the rule's choice")
    if steps_left < MEASURE_FROM_STEPS:
        why = f"{steps_left} step(s) are too few to repay timing candidates (from " \
              f"{MEASURE_FROM_STEPS})"
        return StepChoice(compile_mode, precision, reason=f"{why}; the rule's choice")
    log(f"timing {TRIAL_STEPS} steps of each of " + ", ".join(f"{c}/{p}" for c, p in options)
        + " to choose the training step (--compile auto / --precision auto) ...")
    seconds = {f"{c}/{p}": _step_seconds(build_trainer(
        dataclasses.replace(config, compile=c, precision=p)), model_config, config, hvd)
        for c, p in options}
    compile_mode, precision = fastest(seconds)
    timed = ", ".join(f"{name} {value:.3f} s" for name, value in seconds.items())
    return StepChoice(compile_mode, precision, seconds=seconds,
                      reason=f"the fastest of {len(seconds)} timed a step ({timed})")


def _step_seconds(trainer, model_config: ModelConfig, config, hvd) -> float:
    """Median seconds of :data:`TRIAL_STEPS` steps on random codes, on the slowest rank."""
    import tensorflow as tf

    rng = np.random.default_rng(hvd.rank())
    window = receptive_field(model_config) + config.target_length
    windows = rng.integers(0, model_config.classes, (config.batch_size, window)).astype(np.uint8)
    labels = np.zeros(config.batch_size, np.int32)
    times = []
    for _ in range(1 + TRIAL_STEPS):
        start = time.perf_counter()
        trainer.train_step(windows, labels, 0)  # returns host floats: the step is done
        times.append(time.perf_counter() - start)
    local = statistics.median(times[1:])
    # Horovod: every rank must choose the same: the slowest rank's time decides
    return float(hvd.allreduce(tf.constant(local, tf.float64), op=hvd.Max))
