"""The one place where Numba compilation flags for rainforest kernels are set."""

import os

import numba
from numba.core import codegen, config

#: njit never falls back to object mode; nogil: Dask threads and tf.data can run kernels
#: concurrently; cache: compile once per machine, not once per worker process.
JIT_OPTIONS = dict(nogil=True, cache=True, fastmath=False, boundscheck=False)


def _full_width_vectors() -> None:
    """Let LLVM use 512-bit vectors on AVX-512 CPUs.

    LLVM tunes Skylake-X and later for 256-bit vectors (its ``prefer-256-bit`` tuning flag),
    which leaves half of each AVX-512 register unused: the fused generation loop's products
    ran 1.23x faster (bfloat16 weights) with full width, measured in benchmarks/generate.py.
    Only this process's Numba config is changed, never the environment, so Dask workers and
    Slurm jobs on other CPUs detect their own features; ``NUMBA_CPU_FEATURES`` set by the user
    wins. Results do not change: no kernel lets the compiler reassociate sums.
    """
    if os.environ.get("NUMBA_CPU_FEATURES") or config.CPU_FEATURES is not None:
        return
    features = codegen.get_host_cpu_features()
    if "+avx512f" in features.split(","):
        config.CPU_FEATURES = features + ",-prefer-256-bit"


_full_width_vectors()


def register_tile_columns() -> int:
    """float32 output columns per stream in a register tile of the fused generation loop: 4
    vector registers (64 columns) where AVX-512 offers 32 registers, else 2 (16 columns) of
    AVX2's 16, so that 4 streams' outputs, a row of weights and a broadcast factor fit."""
    features = config.CPU_FEATURES or codegen.get_host_cpu_features()
    return 64 if "+avx512f" in features.split(",") else 16


def bfloat16_dot_products() -> bool:
    """Whether this CPU has AVX512_BF16 (VDPBF16PS: two bfloat16 products added to a float32
    per lane, twice the float32 multiply-adds of an FMA); without it the kernels emulate it."""
    features = config.CPU_FEATURES or codegen.get_host_cpu_features()
    return "+avx512bf16" in features.split(",")


def jit(function):
    """Compile ``function`` with the project-wide Numba options."""
    return numba.njit(**JIT_OPTIONS)(function)
