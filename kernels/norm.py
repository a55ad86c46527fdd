"""RMSNorm, as ggml computes it (sum of squares in float64, scale in float32)."""
import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def rmsnorm(x, w, eps, out):
    """out[T, n] = x / sqrt(mean(x^2) + eps) * w. x, out: [T, n]; w: [n]. out may alias x."""
    T, n = x.shape
    for t in range(T):
        s = 0.0
        for j in range(n):
            s += np.float64(x[t, j] * x[t, j])
        mean = np.float32(s / n)
        scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
        for j in range(n):
            out[t, j] = (x[t, j] * scale) * w[j]
