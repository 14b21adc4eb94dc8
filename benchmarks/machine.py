"""What the benchmarks compare against: this machine's float32 matmul peak, and its CPU.

These machines set ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` for old OpenBLAS builds; with
them numpy's matmul runs an AVX2 kernel at about half the speed the CPU allows. The peak is
therefore measured in a child process with both variables unset for that one command (never
in tests or CI), and the kernel that ran is reported from threadpoolctl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

_CHILD = r"""
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_info

size, repeats = int(sys.argv[1]), int(sys.argv[2])
a = np.random.default_rng(0).random((size, size), dtype=np.float32)
a @ a
times = []
for _ in range(repeats):
    start = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - start)
blas = [i for i in threadpool_info() if i.get("user_api") == "blas"] or [{}]
print(json.dumps({"gflops": 2 * size**3 / min(times) / 1e9,
                  "architecture": blas[0].get("architecture"),
                  "library": blas[0].get("internal_api"), "threads": blas[0].get("num_threads")}))
"""


def matmul_peak(size: int = 4096, repeats: int = 3, *, threads: int | None = None) -> dict:
    """Best-of-``repeats`` float32 ``size``^3 numpy matmul on every core (or on ``threads``),
    OpenBLAS unhindered.

    Returns ``gflops`` and the BLAS ``architecture``, ``library`` and ``threads`` that ran.
    """
    env = {k: v for k, v in os.environ.items() if k not in _OPENBLAS_OVERRIDES}
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    result = subprocess.run([sys.executable, "-c", _CHILD, str(size), str(repeats)],
                            env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


_TF_CHILD = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf

size, repeats = int(sys.argv[1]), int(sys.argv[2])
a = tf.random.uniform((size, size), dtype=tf.float32)
product = tf.function(lambda x: tf.matmul(x, x))
product(a).numpy()
times = []
for _ in range(repeats):
    start = time.perf_counter()
    product(a).numpy()
    times.append(time.perf_counter() - start)
print(json.dumps({"gflops": 2 * size**3 / min(times) / 1e9}))
"""


def tensorflow_matmul_gflops(size: int = 4096, repeats: int = 3) -> float:
    """Best-of-``repeats`` float32 matmul in TensorFlow (oneDNN/Eigen; no OpenBLAS) on every
    core, in a child process, or NaN where TensorFlow is not installed."""
    result = subprocess.run([sys.executable, "-c", _TF_CHILD, str(size), str(repeats)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return float("nan")
    return json.loads(result.stdout.strip().splitlines()[-1])["gflops"]


def matmul_gflops(size: int = 4096, repeats: int = 3, *, tensorflow: bool = False) -> float:
    """The float32 matmul peak in GFLOP/s: numpy's (see :func:`matmul_peak`), or the higher of
    numpy's and TensorFlow's with ``tensorflow=True``."""
    peak = matmul_peak(size, repeats)["gflops"]
    if tensorflow:
        other = tensorflow_matmul_gflops(size, repeats)
        peak = max(peak, other) if other == other else peak
    return peak


def cpu_model() -> str:
    """The CPU's model name and the vector extensions that matter here, from ``lscpu``."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (lscpu failed)"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return (f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores, flags: "
            f"{' '.join(f for f in wanted if f in flags) or 'none of ' + ' '.join(wanted)}")


def describe() -> str:
    """One line for the top of a benchmark's output."""
    peak = matmul_peak()
    return (f"CPU: {cpu_model()}\nBLAS: {peak['library']} {peak['architecture']} kernel, "
            f"{peak['threads']} threads (OpenBLAS overrides unset for the peak only)")


#: Child environment for :func:`onednn_summary`: oneDNN prints its ISA and, once per primitive
#: it creates, the implementation chosen, so the timed steps (cached primitives) print nothing.
ONEDNN_CREATE_VERBOSE = {"ONEDNN_VERBOSE": "profile_create"}


def onednn_summary(output: str) -> dict:
    """The ISA and the implementations per primitive kind in a child's ``ONEDNN_VERBOSE``
    output (``profile_create`` or ``1``; horovodrun's line prefixes are skipped).

    >>> onednn_summary("onednn_verbose,info,cpu,isa:Intel AVX-512\\n[1,0]<stdout>:onednn_verbose,"
    ...                "primitive,create:cache_miss,cpu,matmul,brg_matmul:avx512_core,undef,x")
    {'isa': 'Intel AVX-512', 'implementations': {'matmul': ['brg_matmul:avx512_core']}}
    """
    isa, implementations = None, {}
    for line in output.splitlines():
        start = line.find("onednn_verbose,")
        if start < 0:
            continue
        fields = line[start:].split(",")
        if fields[1:3] == ["info", "cpu"] and fields[3].startswith("isa:"):
            isa = ",".join(fields[3:])[len("isa:"):]
        elif "primitive" in fields[1:3]:
            at = fields.index("primitive") + 1
            if fields[at].startswith(("create", "exec")) and fields[at + 1] == "cpu":
                kind, implementation = fields[at + 2], fields[at + 3]
                known = implementations.setdefault(kind, [])
                if implementation and implementation not in known:
                    known.append(implementation)
    return {"isa": isa, "implementations": implementations}
