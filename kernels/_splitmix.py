"""splitmix64, the one random generator of the kernels (training windows, generation sampling).

Steele, Lea and Flood, "Fast splittable pseudorandom number generators" (OOPSLA 2014), with the
constants of Vigna's public-domain reference. Chosen because it is a few integer operations,
which ``tests/reference.py`` reproduces exactly in plain Python. A state advances by
:data:`GOLDEN` per draw, so skipping ``n`` draws is one multiply (mod 2**64).
"""

import numpy as np

from rainforest.kernels._flags import jit

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@jit
def _mix(state):
    """The splitmix64 output of a state the caller has already advanced by GOLDEN."""
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))
