"""Memory bandwidth probe: a parallel streaming read."""
import numba as nb
import numpy as np


@nb.njit(cache=True, fastmath=True)
def _sum(b):
    # a loop from 0 over a whole view: LLVM vectorises it (a range(lo, hi) over the parent array,
    # with possibly negative indices, stays scalar and measures the add latency, not memory)
    s = 0.0
    for i in range(b.shape[0]):
        s += b[i]
    return s


@nb.njit(cache=True, parallel=True)
def read_sum(a, nth):
    """Sum of a [N] float64, one contiguous chunk per thread; the result only keeps the reads alive."""
    chunk = (a.shape[0] + nth - 1) // nth
    part = np.zeros(nth)
    for c in nb.prange(nth):
        part[c] = _sum(a[c * chunk:min(a.shape[0], (c + 1) * chunk)])
    return part.sum()
