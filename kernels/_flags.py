"""The one place where Numba compilation flags for rainforest kernels are set."""

import numba

#: njit never falls back to object mode; nogil: Dask threads and tf.data can run kernels
#: concurrently; cache: compile once per machine, not once per worker process.
JIT_OPTIONS = dict(nogil=True, cache=True, fastmath=False, boundscheck=False)


def jit(function):
    """Compile ``function`` with the project-wide Numba options."""
    return numba.njit(**JIT_OPTIONS)(function)
