"""Numba kernels for the per-sample work, installed as ``rainforest.kernels``.

Each kernel is a private ``@jit`` function doing the work plus a public wrapper that checks its
input and raises :class:`rainforest.errors.ParameterError` naming the offending value. Every
kernel has a slow numpy twin in ``tests/reference.py``.
"""

from rainforest.kernels.mix import count_non_finite, downmix
from rainforest.kernels.mulaw import DECODE_TABLE, mulaw_decode, mulaw_encode
from rainforest.kernels.trim import peak_amplitude, relative_threshold, trim_bounds
from rainforest.kernels.windows import (
    cut_windows,
    random_window_starts,
    strided_window_starts,
)

__all__ = [
    "DECODE_TABLE",
    "count_non_finite",
    "cut_windows",
    "downmix",
    "mulaw_decode",
    "mulaw_encode",
    "peak_amplitude",
    "random_window_starts",
    "relative_threshold",
    "strided_window_starts",
    "trim_bounds",
]
