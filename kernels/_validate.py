"""Input checks shared by the public kernel wrappers."""

import numpy as np

from rainforest.errors import ParameterError


def as_1d(name, array, dtype):
    """Return ``array`` as a C-contiguous 1-D array of ``dtype`` or raise ParameterError."""
    array = np.asarray(array)
    if array.ndim != 1:
        raise ParameterError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype != dtype:
        if dtype == np.uint8 and array.dtype.kind != "u" and array.dtype.kind != "i":
            raise ParameterError(f"{name} must hold integer codes, got dtype {array.dtype}")
        if np.dtype(dtype).kind == "f" and array.dtype.kind not in "fiu":
            raise ParameterError(f"{name} must be numeric, got dtype {array.dtype}")
        if dtype == np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
            raise ParameterError(
                f"{name} must hold codes in 0..255, got range {array.min()}..{array.max()}"
            )
        array = array.astype(dtype)
    return np.ascontiguousarray(array)


def positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ParameterError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
