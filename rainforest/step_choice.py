"""`train --compile auto --precision auto`: how to run the training step on this machine.

Which step is fastest depends on the machine, and not in a way a rule can know: on one AMD
EPYC (AVX512_BF16, no AMX) XLA ran our float32 step 1.2x faster than graph mode, and graph
mode in bfloat16 1.5x faster than graph mode in float32, while bfloat16 under XLA was the
slowest of all (docs/performance.md). So a run long enough to repay it times a few steps of
each candidate, on every rank at once, and trains with the fastest. A shorter run, and an
elastic one (whose ranks must not meet in a collective before the first commit), takes
:func:`rule`'s choice. Every choice is logged and saved with its reason in the checkpoints,
and a resumed run keeps the choice it was started with.
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
TIMED_COMPILES = ("graph", "xla")
#: A run with fewer steps left than this takes the rule's choice: timing every candidate
#: costs about as much as a few dozen steps (each compiles its own step).
MEASURE_FROM_STEPS = 300
#: Timed steps per candidate, after one untimed step that traces and compiles.
TRIAL_STEPS = 3
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
    """The choice without timing: graph mode; bfloat16 compute on a GPU, float32 on a CPU."""
    if compile_mode == "auto":
        compile_mode = "graph"
    if precision == "auto":
        precision = "mixed_bfloat16" if gpu else "float32"
    return compile_mode, precision


def candidates(compile_mode: str, precision: str, gpu: bool) -> list[tuple[str, str]]:
    """The (compile, precision) pairs worth timing for what was asked.

    On a CPU, XLA in bfloat16 is left out unless asked for: TensorFlow 2.18's XLA CPU runtime
    ran it at half the speed of XLA in float32 (docs/performance.md), so it cannot win.
    """
    compiles = TIMED_COMPILES if compile_mode == "auto" else (compile_mode,)
    if precision != "auto":
        precisions: tuple[str, ...] = (precision,)
    else:
        precisions = ("float32", "mixed_bfloat16") if native_bfloat16(gpu) else ("float32",)
    return [(c, p) for p in precisions for c in compiles
            if gpu or compile_mode != "auto" or (c, p) != ("xla", "mixed_bfloat16")]


def fastest(seconds: dict[str, float]) -> tuple[str, str]:
    """The fastest candidate (a tie goes to the first: float32 before bfloat16).

    bfloat16 needs no head start: trained the same steps from the same seed, it ended level
    with float32 in held-out bits, and a trial of a few steps understated its speed over a
    whole run (1.08-1.16x against 1.45x; docs/performance.md, Time to quality).

    >>> fastest({"graph/float32": 0.90, "xla/float32": 0.62, "graph/mixed_bfloat16": 0.58})
    ('graph', 'mixed_bfloat16')
    >>> fastest({"xla/float32": 0.60, "graph/mixed_bfloat16": 0.60})
    ('xla', 'float32')
    """
    compile_mode, precision = min(seconds, key=seconds.get).split("/")
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
