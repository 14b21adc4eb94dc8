"""Where a training step's time goes, op by op: the straightforward Keras WaveNet beside ours.

Run with ``python benchmarks/train_ops.py [--config medium] [--variants keras graph ...]``.
Each variant (``benchmarks/train.py``'s names: ``keras``, ``graph``, ``xla``, ``graph+bf16``)
runs in two fresh processes of one rank after 3 untimed steps:

* TensorFlow's profiler records 2 steps; the table sums each op type's durations per step
  (XLA runs its whole step as a few ``Execute`` calls, so its table says little);
* ``ONEDNN_VERBOSE=1`` (with timestamps) times every oneDNN primitive of 2 more steps, by kind
  (convolution, matmul, reorder, ...), with the ISA and kernels it chose.

Ops run one at a time in rainforest's steps (``init_horovod`` sets one inter-op thread); Keras
keeps TensorFlow's default pool, so its op times can sum to more than its step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from machine import describe, onednn_summary
from train import step_function

HERE = os.path.abspath(__file__)
WARMUP, STEPS = 3, 2


def _op_times(logdir: str) -> dict[str, list[float]]:
    """{op type: [ms, count]} summed over the host threads of a profiler trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as trace:
        space.ParseFromString(trace.read())
    ops: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                # TensorFlow op events are named "name:Type"; the executor's own are not
                name, colon, op_type = names.get(event.metadata_id, "").rpartition(":")
                if colon and name and (op_type[:1].isupper() or op_type.startswith("_")):
                    if op_type not in ("Process", "Run"):
                        ops[op_type][0] += event.duration_ps / 1e9
                        ops[op_type][1] += 1
    return dict(ops)


def worker(config_name: str, mode: str, target: int, profile: bool) -> None:
    import tensorflow as tf

    step, _, _ = step_function(config_name, mode, 1, target)
    for index in range(WARMUP):
        step(index)
    logdir = tempfile.TemporaryDirectory(prefix="train_ops") if profile else None
    if profile:
        tf.profiler.experimental.start(logdir.name)
    started = time.time() * 1e3  # oneDNN's verbose timestamps are ms since the epoch
    clock = time.perf_counter()
    for index in range(WARMUP, WARMUP + STEPS):
        step(index)
    wall = (time.perf_counter() - clock) / STEPS
    if profile:
        tf.profiler.experimental.stop()
    ops = {}
    if profile:
        ops = _op_times(logdir.name)
        logdir.cleanup()
    print("RESULT " + json.dumps({"step_ms": wall * 1e3, "started": started, "ops": ops}),
          flush=True)


def _run(args, mode: str, profile: bool) -> tuple[dict, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if not profile:
        env.update(ONEDNN_VERBOSE="1", ONEDNN_VERBOSE_TIMESTAMP="1")
    command = [sys.executable, HERE, "--worker", mode, "--config", args.config,
               "--target-length", str(args.target_length)] + ([] if profile else ["--no-profile"])
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    for line in output.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), output.stdout
    raise RuntimeError(f"{mode} failed:\n{output.stdout[-2000:]}{output.stderr[-3000:]}")


def _primitive_times(verbose: str, started: float) -> dict[str, list[float]]:
    """{primitive kind: [ms, count]} of the exec lines stamped after ``started``."""
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for line in verbose.splitlines():
        fields = line.split(",")
        if len(fields) > 5 and fields[0] == "onednn_verbose" and fields[3] == "exec":
            if float(fields[1]) >= started:
                kinds[fields[5]][0] += float(fields[-1])
                kinds[fields[5]][1] += 1
    return dict(kinds)


def _print_table(title: str, rows: dict[str, list[float]], limit: int) -> None:
    print(f"  {title:<38} {'ms/step':>8} {'calls/step':>10}")
    ranked = sorted(rows.items(), key=lambda item: -item[1][0])
    for name, (ms, calls) in ranked[:limit]:
        print(f"  {name:<38} {ms / STEPS:8.1f} {calls / STEPS:10.0f}")
    rest = sum(ms for _, (ms, _) in ranked[limit:])
    print(f"  {'(the rest)':<38} {rest / STEPS:8.1f}")
    print(f"  {'(sum)':<38} {sum(ms for ms, _ in rows.values()) / STEPS:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="medium")
    parser.add_argument("--target-length", type=int, default=16384,
                        help="targets per step (one window)")
    parser.add_argument("--variants", nargs="+", default=["keras", "graph", "graph+bf16", "xla"])
    parser.add_argument("--top", type=int, default=16, help="op types listed per variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.config, args.worker, args.target_length, not args.no_profile)
        return
    print(describe())
    for mode in args.variants:
        profiled, _ = _run(args, mode, profile=True)
        timed, verbose = _run(args, mode, profile=False)
        onednn = onednn_summary(verbose)
        print(f"\n== {mode}: {profiled['step_ms']:.0f} ms a step under the profiler, "
              f"{timed['step_ms']:.0f} ms under ONEDNN_VERBOSE; ISA: {onednn['isa']}")
        _print_table("TensorFlow op type", profiled["ops"], args.top)
        _print_table("oneDNN primitive", _primitive_times(verbose, timed["started"]), args.top)
        for kind, implementations in sorted(onednn["implementations"].items()):
            print(f"  {kind}: {', '.join(implementations)}")


if __name__ == "__main__":
    main()
