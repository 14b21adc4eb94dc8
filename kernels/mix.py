"""Down-mixing interleaved frames to mono: the mean of all channels, not only the left one;
and counting the samples a decoder left non-finite."""

import numpy as np

from rainforest.errors import ParameterError
from rainforest.kernels._flags import jit
from rainforest.kernels._validate import as_1d


@jit
def _downmix(frames, out):
    channels = frames.shape[1]
    if channels == 2:
        # The common case, written so LLVM vectorises it; a float64 sum of two float32
        # values is exact, so this equals the general loop below.
        for i in range(frames.shape[0]):
            out[i] = (np.float64(frames[i, 0]) + np.float64(frames[i, 1])) * 0.5
        return
    scale = 1.0 / channels
    for i in range(frames.shape[0]):
        total = 0.0  # float64 accumulator: exact for up to hundreds of channels
        for c in range(channels):
            total += frames[i, c]
        out[i] = total * scale


def downmix(frames, *, out=None):
    """Mean over channels of a (frames, channels) float32 array, as float32.

    Examples
    --------
    >>> downmix(np.array([[1.0, 0.0], [0.5, 0.5]], dtype=np.float32)).tolist()
    [0.5, 0.5]
    """
    frames = np.asarray(frames)
    if frames.ndim != 2 or frames.shape[1] == 0:
        raise ParameterError(f"frames must have shape (frames, channels>=1), got {frames.shape}")
    if frames.dtype != np.float32:
        raise ParameterError(f"frames must be float32, got {frames.dtype}")
    frames = np.ascontiguousarray(frames)
    if out is None:
        out = np.empty(frames.shape[0], dtype=np.float32)
    elif out.shape != (frames.shape[0],) or out.dtype != np.float32:
        raise ParameterError(f"out must be float32 of shape ({frames.shape[0]},)")
    _downmix(frames, out)
    return out


@jit
def _count_non_finite(samples):
    bad = 0
    for i in range(samples.shape[0]):
        # NaN fails every comparison, so one test counts NaN and both infinities.
        bad += not (abs(samples[i]) < np.inf)
    return bad


def count_non_finite(samples):
    """How many of ``samples`` are NaN or infinite (one pass, no temporary array).

    Examples
    --------
    >>> count_non_finite(np.array([0.5, np.nan, -np.inf, 1.0], dtype=np.float32))
    2
    """
    return int(_count_non_finite(as_1d("samples", samples, np.float32)))
