"""Quantised matrix-vector / matrix-matrix products on the repacked GGUF blocks.

The activation rows are quantised once per matmul to the format llama.cpp uses for that weight
type (its vec_dot_type), so the inner sums are sums of integer products, exact in float32 and
equal to llama.cpp's integer dot products; only the scale arithmetic differs in rounding order.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from edgert.kernels.quant import DOT, QMatrix, quantize_act_row, unpack_row


@nb.njit(cache=True, parallel=True, nogil=True)
def quantize_act(act, x, xq, xd, xs, S):
    """x: [T, K] -> xq [T, K], xd [T, K / A], xs [T, K / S] (see quant.quantize_act_row)."""
    for t in nb.prange(x.shape[0]):
        quantize_act_row(act, x[t], xq[t], xd[t], xs[t], S)


@nb.njit(cache=True, parallel=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def matmul_q(qtype, qs, qh, sc, d, m, S, A, xq, xd, xs, out, nthreads):
    """out[T, R] = X @ W.T for a QMatrix W [R, C] and quantised activations X.

    xq: [T, C] integer-valued float32, xd: [T, C / A] block scales, xs: [T, C / S] d * sum(q).
    Rows are split into one contiguous chunk per thread; each row is unpacked once into a
    thread-local buffer and reused for every token of the batch.
    """
    T, C = xq.shape
    R = out.shape[1]
    nsb = C // S
    per_a = A // S
    has_min = qtype == 3 or qtype == 12
    chunk = (R + nthreads - 1) // nthreads
    for c in nb.prange(nthreads):
        wq = np.empty(C, np.float32)   # [C] integer quants
        ws = np.empty(nsb, np.float32)  # [C / S] sub-block scales
        wm = np.empty(nsb, np.float32)  # [C / S] sub-block mins
        for r in range(c * chunk, min(R, (c + 1) * chunk)):
            unpack_row(qtype, qs, qh, sc, d, m, r, wq, ws, wm)
            for t in range(T):
                acc = np.float32(0.0)
                for b in range(nsb):
                    s = np.float32(0.0)
                    for j in range(b * S, b * S + S):
                        s += wq[j] * xq[t, j]
                    acc += s * (ws[b] * xd[t, b // per_a])
                    if has_min:
                        acc += wm[b] * xs[t, b]
                out[t, r] = acc


class ActBuffers:
    """Preallocated quantised-activation buffers for one input width K and up to T rows."""

    def __init__(self, T: int, K: int):
        self.xq = np.empty((T, K), np.float32)          # [T, K]
        self.xd = np.empty((T, max(K // 32, 1)), np.float32)  # [T, K / A]
        self.xs = np.empty((T, max(K // 16, 1)), np.float32)  # [T, K / S]


def quantize_for(w: QMatrix, x: np.ndarray, buf: ActBuffers):
    """Quantise x [T, K] for weight w's dot type; returns views (xq, xd, xs)."""
    act, S, A = DOT[w.qtype]
    T, K = x.shape
    xq, xd, xs = buf.xq[:T, :K], buf.xd[:T, : K // A], buf.xs[:T, : K // S]
    quantize_act(act, x, xq, xd, xs, S)
    return xq, xd, xs


def matmul(w: QMatrix, x: np.ndarray, out: np.ndarray, buf: ActBuffers):
    """out[T, R] = x[T, C] @ w.T."""
    matmuls(x, [(w, out)], buf)
    return out


def matmuls(x: np.ndarray, pairs, buf: ActBuffers):
    """Several products of the same input x [T, C]: pairs of (QMatrix, out [T, R]). The input is
    quantised once per distinct activation format (e.g. Q, K, V or gate and up together)."""
    done = None
    for w, out in pairs:
        act, S, A = DOT[w.qtype]
        if done != (act, S, A):
            xq, xd, xs = quantize_for(w, x, buf)
            done = (act, S, A)
        matmul_q(w.qtype, w.qs, w.qh, w.sc, w.d, w.m, S, A, xq, xd, xs, out, nb.get_num_threads())
