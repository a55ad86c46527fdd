"""Memory bandwidth probe: a parallel streaming read."""
import numba as nb
import numpy as np


@nb.njit(cache=True, parallel=True, fastmath=True)
def read_sum(a, nth):
    """Sum of a [N] float64, one contiguous chunk per thread; the result only keeps the reads alive."""
    chunk = (a.shape[0] + nth - 1) // nth
    part = np.zeros(nth)
    for c in nb.prange(nth):
        s = 0.0
        for i in range(c * chunk, min(a.shape[0], (c + 1) * chunk)):
            s += a[i]
        part[c] = s
    return part.sum()
