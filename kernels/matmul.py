"""Quantised matrix products on the repacked (transposed) GGUF blocks: GEMV for decode, GEMM
for prefill, one kernel for every quant type.

The activation rows are first quantised to the format llama.cpp uses for that weight type (its
vec_dot_type), so each block's inner sum is a sum of integer products, exact in float32 and equal
to llama.cpp's; only the scale arithmetic differs in rounding order.

Loop order: each thread owns a contiguous run of output rows [r0, r1). For a tile of up to TT
tokens and for each block, it accumulates per-row partial sums over the block's quants with the
innermost loop running over the rows (contiguous in the transposed layout: vectorised, no
reductions), then folds the block's scales in. Weights are read once per token tile.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from edgert.kernels.quant import DOT, QMatrix, quantize_act_row

TT = 4  # tokens per tile: weights of a block are reused TT times from L1
_FM = {"reassoc", "contract", "nsz", "arcp"}


@nb.njit(cache=True, parallel=True, nogil=True)
def quantize_act(act, x, xq, xd, xs, S):
    """x: [T, K] -> xq [T, K], xd [T, K / A], xs [T, K / S] (see quant.quantize_act_row)."""
    for t in nb.prange(x.shape[0]):
        quantize_act_row(act, x[t], xq[t], xd[t], xs[t], S)


@nb.njit(cache=True, nogil=True, inline="always")
def _lo(v):
    return np.float32(np.uint8(v & np.uint8(15)))


@nb.njit(cache=True, nogil=True, inline="always")
def _hi(v):
    return np.float32(np.uint8(v >> np.uint8(4)))


@nb.njit(cache=True, nogil=True, fastmath=_FM)
def _tile(qtype, qs, qh, sc, d, m, xq, xd, xs, out, r0, r1, t0, tt, s, acc):
    """out[t0:t0+tt, r0:r1] for one row range and token tile. s: [4, TT, n], acc: [TT, n] scratch."""
    C = xq.shape[1]
    n = r1 - r0
    acc[:, :] = 0.0
    if qtype == 0 or qtype == 1:  # F32 / F16: d is W.T [C, R]
        for c in range(C):
            w = d[c, r0:r1]
            for k in range(tt):
                xv = xq[t0 + k, c]
                a = acc[k]
                for r in range(n):
                    a[r] += w[r] * xv
    elif qtype == 2 or qtype == 3 or qtype == 6:  # Q4_0, Q4_1, Q5_0: blocks of 32
        off = np.float32(8.0) if qtype == 2 else (np.float32(0.0) if qtype == 3 else np.float32(16.0))
        for b in range(C // 32):
            s[0, :tt, :] = 0.0
            for j in range(16):
                row = qs[16 * b + j, r0:r1]
                hl = qh[4 * b + j // 8, r0:r1] if qtype == 6 else row
                hh = qh[4 * b + 2 + j // 8, r0:r1] if qtype == 6 else row
                sh = np.uint8(j % 8)
                for k in range(tt):
                    xl = xq[t0 + k, 32 * b + j]
                    xh = xq[t0 + k, 32 * b + 16 + j]
                    sk = s[0, k]
                    if qtype == 6:
                        for r in range(n):
                            v = row[r]
                            ql = _lo(v) + np.float32(np.uint8((hl[r] >> sh) & np.uint8(1)) * np.uint8(16))
                            qq = _hi(v) + np.float32(np.uint8((hh[r] >> sh) & np.uint8(1)) * np.uint8(16))
                            sk[r] += (ql - off) * xl + (qq - off) * xh
                    else:
                        for r in range(n):
                            v = row[r]
                            sk[r] += (_lo(v) - off) * xl + (_hi(v) - off) * xh
            db = d[b, r0:r1]
            for k in range(tt):
                sx = xd[t0 + k, b]
                a = acc[k]
                sk = s[0, k]
                if qtype == 3:
                    mb = m[b, r0:r1]
                    mx = xs[t0 + k, b]
                    for r in range(n):
                        a[r] += sk[r] * (db[r] * sx) + mb[r] * mx
                else:
                    for r in range(n):
                        a[r] += sk[r] * (db[r] * sx)
    elif qtype == 8:  # Q8_0
        for b in range(C // 32):
            s[0, :tt, :] = 0.0
            for j in range(32):
                row = qs[32 * b + j, r0:r1]
                for k in range(tt):
                    xv = xq[t0 + k, 32 * b + j]
                    sk = s[0, k]
                    for r in range(n):
                        sk[r] += (np.float32(row[r]) - np.float32(128.0)) * xv
            db = d[b, r0:r1]
            for k in range(tt):
                sx = xd[t0 + k, b]
                a = acc[k]
                sk = s[0, k]
                for r in range(n):
                    a[r] += sk[r] * (db[r] * sx)
    elif qtype == 12:  # Q4_K: super-blocks of 256, 8 sub-blocks of 32 (scale and min each)
        for b in range(C // 256):
            db = d[b, r0:r1]
            dm = m[b, r0:r1]
            for c4 in range(4):
                s[0, :tt, :] = 0.0
                s[1, :tt, :] = 0.0
                for l in range(32):
                    row = qs[128 * b + 32 * c4 + l, r0:r1]
                    for k in range(tt):
                        xl = xq[t0 + k, 256 * b + 64 * c4 + l]
                        xh = xq[t0 + k, 256 * b + 64 * c4 + 32 + l]
                        s0 = s[0, k]
                        s1 = s[1, k]
                        for r in range(n):
                            v = row[r]
                            s0[r] += _lo(v) * xl
                            s1[r] += _hi(v) * xh
                sc0 = sc[16 * b + 2 * c4, r0:r1]
                sc1 = sc[16 * b + 2 * c4 + 1, r0:r1]
                mn0 = sc[16 * b + 8 + 2 * c4, r0:r1]
                mn1 = sc[16 * b + 8 + 2 * c4 + 1, r0:r1]
                for k in range(tt):
                    sx = xd[t0 + k, b]
                    bs0 = xs[t0 + k, 8 * b + 2 * c4]
                    bs1 = xs[t0 + k, 8 * b + 2 * c4 + 1]
                    a = acc[k]
                    s0 = s[0, k]
                    s1 = s[1, k]
                    for r in range(n):
                        a[r] += (db[r] * sx) * (s0[r] * np.float32(sc0[r]) + s1[r] * np.float32(sc1[r])) \
                            - dm[r] * (np.float32(mn0[r]) * bs0 + np.float32(mn1[r]) * bs1)
    elif qtype == 14:  # Q6_K: super-blocks of 256, 16 sub-blocks of 16, int8 scales
        for b in range(C // 256):
            db = d[b, r0:r1]
            for h in range(2):
                for lh in range(2):
                    for i in range(4):
                        s[i, :tt, :] = 0.0
                    for l in range(16 * lh, 16 * lh + 16):
                        ra = qs[128 * b + 64 * h + l, r0:r1]
                        rb = qs[128 * b + 64 * h + 32 + l, r0:r1]
                        rh = qh[64 * b + 32 * h + l, r0:r1]
                        e = 256 * b + 128 * h + l
                        for k in range(tt):
                            x1 = xq[t0 + k, e]
                            x2 = xq[t0 + k, e + 32]
                            x3 = xq[t0 + k, e + 64]
                            x4 = xq[t0 + k, e + 96]
                            s0 = s[0, k]
                            s1 = s[1, k]
                            s2 = s[2, k]
                            s3 = s[3, k]
                            for r in range(n):
                                a_ = ra[r]
                                b_ = rb[r]
                                hb = rh[r]
                                s0[r] += (np.float32(np.uint8((a_ & np.uint8(15)) | ((hb & np.uint8(3)) << np.uint8(4)))) - np.float32(32.0)) * x1
                                s1[r] += (np.float32(np.uint8((b_ & np.uint8(15)) | (((hb >> np.uint8(2)) & np.uint8(3)) << np.uint8(4)))) - np.float32(32.0)) * x2
                                s2[r] += (np.float32(np.uint8((a_ >> np.uint8(4)) | (((hb >> np.uint8(4)) & np.uint8(3)) << np.uint8(4)))) - np.float32(32.0)) * x3
                                s3[r] += (np.float32(np.uint8((b_ >> np.uint8(4)) | ((hb >> np.uint8(6)) << np.uint8(4)))) - np.float32(32.0)) * x4
                    sb = 16 * b + 8 * h + lh
                    c0 = sc[sb, r0:r1]
                    c1 = sc[sb + 2, r0:r1]
                    c2 = sc[sb + 4, r0:r1]
                    c3 = sc[sb + 6, r0:r1]
                    for k in range(tt):
                        sx = xd[t0 + k, b]
                        a = acc[k]
                        s0 = s[0, k]
                        s1 = s[1, k]
                        s2 = s[2, k]
                        s3 = s[3, k]
                        for r in range(n):
                            a[r] += (db[r] * sx) * (s0[r] * (np.float32(c0[r]) - np.float32(128.0))
                                                    + s1[r] * (np.float32(c1[r]) - np.float32(128.0))
                                                    + s2[r] * (np.float32(c2[r]) - np.float32(128.0))
                                                    + s3[r] * (np.float32(c3[r]) - np.float32(128.0)))
    for k in range(tt):
        out[t0 + k, r0:r1] = acc[k, :n]


@nb.njit(cache=True, parallel=True, nogil=True)
def matmul_q(qtype, qs, qh, sc, d, m, xq, xd, xs, out, nthreads):
    """out[T, R] = X @ W.T for a QMatrix W and activations quantised for its type.

    xq: [T, C] integer-valued float32, xd: [T, C / A] block scales, xs: [T, C / S] d * sum(q).
    """
    T = xq.shape[0]
    R = out.shape[1]
    chunk = (R + nthreads - 1) // nthreads
    for c in nb.prange(nthreads):
        r0 = c * chunk
        r1 = min(R, r0 + chunk)
        if r1 <= r0:
            continue
        s = np.empty((4, TT, r1 - r0), np.float32)   # per-block partial sums
        acc = np.empty((TT, r1 - r0), np.float32)    # per-row results of a token tile
        for t0 in range(0, T, TT):
            _tile(qtype, qs, qh, sc, d, m, xq, xd, xs, out, r0, r1, t0, min(TT, T - t0), s, acc)


class ActBuffers:
    """Preallocated quantised-activation buffers for inputs of width up to K and up to T rows.

    Flat storage so that every view handed to a kernel is C-contiguous (Numba types a sliced 2-D
    view as layout 'A', which compiles a second, slower copy of each kernel)."""

    def __init__(self, T: int, K: int):
        self.T, self.K = T, K
        self.xq = np.empty(T * K, np.float32)                 # [T, K]
        self.xd = np.empty(T * max(K // 32, 1), np.float32)   # [T, K / A]
        self.xs = np.empty(T * max(K // 16, 1), np.float32)   # [T, K / S]


def quantize_for(w: QMatrix, x: np.ndarray, buf: ActBuffers):
    """Quantise x [T, K] for weight w's dot type; returns (xq, xd, xs) views."""
    act, S, A = DOT[w.qtype]
    T, K = x.shape
    xq = buf.xq[:T * K].reshape(T, K)
    xd = buf.xd[:T * (K // A)].reshape(T, K // A)
    xs = buf.xs[:T * (K // S)].reshape(T, K // S)
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
        if done != DOT[w.qtype]:
            xq, xd, xs = quantize_for(w, x, buf)
            done = DOT[w.qtype]
        matmul_q(w.qtype, w.qs, w.qh, w.sc, w.d, w.m, xq, xd, xs, out, nb.get_num_threads())
