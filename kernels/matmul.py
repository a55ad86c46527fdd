"""Quantised matrix products on the repacked (transposed) GGUF blocks: GEMV for decode, GEMM
for prefill, one kernel for every quant type.

The activation rows are first quantised to the format llama.cpp uses for that weight type (its
vec_dot_type), so each block's inner sum is a sum of integer products, exact in float32 and equal
to llama.cpp's; only the scale arithmetic differs in rounding order.

Loop order: each thread owns a contiguous run of row tiles (quant.TILE rows each). For a tile
of up to TT tokens and for each block, it accumulates per-row partial sums over the block's
quants with the innermost loop running over the tile's rows (contiguous: vectorised, no
reductions), then folds the block's scales in. A tile's weights stay in L1 for all tokens.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from edgert.kernels.fmath import fma32
from edgert.kernels.quant import DOT, KQUANTS, ROW_LAYOUTS, TILE, QMatrix, quantize_act_row
from edgert.kernels.simd import matmul_rows, matmul_rows8

TT = 4  # tokens per tile: weights of a block are reused TT times from L1
_FM = {"reassoc", "contract", "nsz", "arcp"}


@nb.njit(cache=True, parallel=True, nogil=True)
def quantize_act(act, x, xq, xd, xs, S):
    """x: [T, K] -> xq [T, K], xd [T, K / A], xs [T, K / S] (see quant.quantize_act_row)."""
    for t in nb.prange(x.shape[0]):
        quantize_act_row(act, x[t], xq[t], xd[t], xs[t], S)


@nb.njit(cache=True, nogil=True)
def quantize_act_serial(act, x, xq, xd, xs, S):
    """quantize_act for a few rows (decode): no parallel region to launch."""
    for t in range(x.shape[0]):
        quantize_act_row(act, x[t], xq[t], xd[t], xs[t], S)


_THREADS = [nb.config.NUMBA_NUM_THREADS]  # threads the kernels split work for (set_threads)


def set_threads(n: int):
    """Set Numba's thread count and the split the matmul kernels use (reading it back from
    Numba costs a microsecond per call)."""
    nb.set_num_threads(n)
    _THREADS[0] = n


@nb.njit(cache=True, nogil=True, inline="always")
def _lo(v):
    return np.float32(np.uint8(v & np.uint8(15)))


@nb.njit(cache=True, nogil=True, inline="always")
def _hi(v):
    return np.float32(np.uint8(v >> np.uint8(4)))


@nb.njit(cache=True, nogil=True)
def _hsum8_strict(a0, a1, a2, a3, a4, a5, a6, a7):
    """hsum_float_8's order, compiled without fast-math (the caller's reassociation would not
    keep it: LLVM keeps each instruction's own flags when it inlines this)."""
    return ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3))


@nb.njit(cache=True, nogil=True, fastmath=_FM)
def _tile(qtype, qs, qh, sc, d, m, xq, xd, xs, out, ti, t0, tt, s, acc, h32):
    """out[t0:t0+tt, rows of tile ti] for one row tile and token tile.
    s: [4, TT, TILE] partial sums, acc: [TT, TILE] results, h32: [TILE] int32 (scratch). Q4_K and
    Q6_K: _tile_k. Inner loops index the
    arrays directly (a slice per iteration costs more than the 64-row loop it feeds)."""
    C = xq.shape[1]
    acc[:, :] = 0.0
    f128 = np.float32(128.0)
    f32_ = np.float32(32.0)
    if qtype == 0 or qtype == 1:  # F32 / F16: d holds the weights [C, TILE]
        for c in range(C):
            for k in range(tt):
                xv = xq[t0 + k, c]
                for r in range(TILE):
                    acc[k, r] += d[ti, c, r] * xv
    elif qtype == 2 or qtype == 3 or qtype == 6 or qtype == 7:  # Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32
        off = np.float32(8.0) if qtype == 2 else (np.float32(16.0) if qtype == 6 else np.float32(0.0))
        for b in range(C // 32):
            s[0, :tt, :] = 0.0
            if qtype == 6 or qtype == 7:
                # the block's 32 high bits of each row as one int32 (bit j: element j, bit j + 16:
                # element j + 16), so the inner loop shifts 32-bit lanes instead of bytes
                for r in range(TILE):
                    h32[r] = (np.int32(qh[ti, 4 * b, r]) | (np.int32(qh[ti, 4 * b + 1, r]) << 8)
                              | (np.int32(qh[ti, 4 * b + 2, r]) << 16) | (np.int32(qh[ti, 4 * b + 3, r]) << 24))
                for j in range(16):
                    i = 16 * b + j
                    sl, sh = np.int32(31 - j), np.int32(15 - j)  # bit j, j + 16 -> the sign bit
                    for k in range(tt):
                        xl = xq[t0 + k, 32 * b + j]
                        xh = xq[t0 + k, 32 * b + 16 + j]
                        xl16, xh16 = np.float32(16.0) * xl, np.float32(16.0) * xh
                        for r in range(TILE):
                            # value = nibble - off, plus 16 where the high bit is set: a masked add
                            v = qs[ti, i, r]
                            hv = h32[r]
                            a = (_lo(v) - off) * xl + (_hi(v) - off) * xh
                            if np.int32(hv << sl) < 0:
                                a += xl16
                            if np.int32(hv << sh) < 0:
                                a += xh16
                            s[0, k, r] += a
            else:
                for j in range(16):
                    i = 16 * b + j
                    for k in range(tt):
                        xl = xq[t0 + k, 32 * b + j]
                        xh = xq[t0 + k, 32 * b + 16 + j]
                        for r in range(TILE):
                            v = qs[ti, i, r]
                            s[0, k, r] += (_lo(v) - off) * xl + (_hi(v) - off) * xh
            for k in range(tt):
                sx = xd[t0 + k, b]
                if qtype == 3 or qtype == 7:
                    mx = xs[t0 + k, b]
                    for r in range(TILE):
                        acc[k, r] += s[0, k, r] * (d[ti, b, r] * sx) + m[ti, b, r] * mx
                else:
                    for r in range(TILE):
                        acc[k, r] += s[0, k, r] * (d[ti, b, r] * sx)
    elif qtype == 8:  # Q8_0
        for b in range(C // 32):
            s[0, :tt, :] = 0.0
            for j in range(32):
                for k in range(tt):
                    xv = xq[t0 + k, 32 * b + j]
                    for r in range(TILE):
                        s[0, k, r] += (np.float32(qs[ti, 32 * b + j, r]) - f128) * xv
            for k in range(tt):
                sx = xd[t0 + k, b]
                for r in range(TILE):
                    acc[k, r] += s[0, k, r] * (d[ti, b, r] * sx)
    r0 = ti * TILE
    nv = min(TILE, out.shape[1] - r0)
    for k in range(tt):
        for r in range(nv):
            out[t0 + k, r0 + r] = acc[k, r]


@nb.njit(cache=True, nogil=True, inline="always")
def _sum_lanes(lanes8, acc, tt, accm, add_m):
    """acc = llama.cpp's hsum_float_8 of the eight lane chains (+ the minimums' chain accm)."""
    for k in range(tt):
        for r in range(TILE):
            acc[k, r] = _hsum8_strict(lanes8[0, k, r], lanes8[1, k, r], lanes8[2, k, r], lanes8[3, k, r],
                                      lanes8[4, k, r], lanes8[5, k, r], lanes8[6, k, r], lanes8[7, k, r])
            if add_m:
                acc[k, r] += accm[k, r]


@nb.njit(cache=True, nogil=True, inline="always")
def _mins_bsums(qtype, sc, xs, ti, b, r, t):
    """Q2_K / Q5_K: the integer sum over a super-block of min x the activation's block sums
    (Q2_K per 16: 16 mins after the 16 scales; Q5_K per 32: 8 after 8), exact in float32."""
    mm = np.float32(0.0)
    if qtype == 10:
        for j in range(16):
            mm += np.float32(sc[ti, 32 * b + 16 + j, r]) * xs[t, 16 * b + j]
    else:
        for j in range(8):
            mm += np.float32(sc[ti, 16 * b + 8 + j, r]) * xs[t, 8 * b + j]
    return mm


@nb.njit(cache=True, nogil=True, inline="always")
def _tiled_step(lanes, mm, dw, dmin, has_min, dx, acc, k, r):
    """llama.cpp's tiled K-quant matmul (ggml-cpu/tiled, batches of 8 tokens or more), one
    super-block of one row and token: the exact integer total S of the lanes, res = d * S,
    res = fma(-dmin, M, res) (M the minimums' integer sum; 0 for types without), then
    acc = fma(res, dx, acc)."""
    tot = 0.0
    for L in range(8):
        tot += np.float64(lanes[L])
    res = dw * np.float32(tot)
    if has_min:
        res = fma32(-dmin, mm, res)
    acc[k, r] = fma32(res, dx, acc[k, r])


@nb.njit(cache=True, nogil=True)
def _tile_k(qtype, qs, qh, sc, d, m, xq, xd, xs, out, ti, t0, tt, s, acc, s64, accm, lanes8, s32):
    """_tile for the K-quants, in llama.cpp's float order exactly (so no fast-math here: the
    integer sums are exact in any order, but the float chains must not be reassociated)."""
    C = xq.shape[1]
    acc[:, :] = 0.0
    f128 = np.float32(128.0)
    if qtype == 12:  # Q4_K: super-blocks of 256, 8 sub-blocks of 32 (scale and min each)
        # llama.cpp repacks Q4_K (8x8 interleaved, AVX2) and computes, per row and token, exact
        # integer sums I = sum_j sc_j * (q . x)_j and M = sum_j min_j * sum(x)_j fed to two float
        # chains, acc = fma(I, d * dx, acc) and accm = fma(M, dmin * dx, accm), out = acc - accm:
        # its gemm (tokens in whole groups of 4) once per 64 elements, its gemv (the T % 4 tokens
        # left over, and decode) once per super-block
        T = xq.shape[0]
        n_gemm = T - T % 4
        accm[:tt, :] = 0.0
        for b in range(C // 256):
            s64[0, :tt, :] = 0.0
            s64[1, :tt, :] = 0.0
            for c4 in range(4):
                s[0, :tt, :] = 0.0
                s[1, :tt, :] = 0.0
                for l in range(32):
                    i = 128 * b + 32 * c4 + l
                    for k in range(tt):
                        xl = xq[t0 + k, 256 * b + 64 * c4 + l]
                        xh = xq[t0 + k, 256 * b + 64 * c4 + 32 + l]
                        for r in range(TILE):
                            v = qs[ti, i, r]
                            s[0, k, r] += _lo(v) * xl
                            s[1, k, r] += _hi(v) * xh
                j0 = 16 * b + 2 * c4
                for k in range(tt):
                    bs0 = np.float64(xs[t0 + k, 8 * b + 2 * c4])
                    bs1 = np.float64(xs[t0 + k, 8 * b + 2 * c4 + 1])
                    sx = xd[t0 + k, b]
                    gemm = t0 + k < n_gemm
                    for r in range(TILE):
                        i_sb = (np.float64(s[0, k, r]) * np.float64(sc[ti, j0, r])
                                + np.float64(s[1, k, r]) * np.float64(sc[ti, j0 + 1, r]))
                        m_sb = np.float64(sc[ti, j0 + 8, r]) * bs0 + np.float64(sc[ti, j0 + 9, r]) * bs1
                        if gemm:
                            acc[k, r] = fma32(np.float32(i_sb), d[ti, b, r] * sx, acc[k, r])
                            accm[k, r] = fma32(np.float32(m_sb), m[ti, b, r] * sx, accm[k, r])
                        else:
                            s64[0, k, r] += i_sb
                            s64[1, k, r] += m_sb
            for k in range(tt):
                if t0 + k >= n_gemm:
                    sx = xd[t0 + k, b]
                    for r in range(TILE):
                        acc[k, r] = fma32(np.float32(s64[0, k, r]), d[ti, b, r] * sx, acc[k, r])
                        accm[k, r] = fma32(np.float32(s64[1, k, r]), m[ti, b, r] * sx, accm[k, r])
        for k in range(tt):
            for r in range(TILE):
                acc[k, r] = acc[k, r] - accm[k, r]
    elif qtype == 10 or qtype == 11:  # Q2_K / Q3_K: super-blocks of 256, 16 sub-blocks of 16
        # llama.cpp (ggml_vec_dot_q{2,3}_K_q8_K, AVX2, every batch size): eight int32 lanes per
        # super-block, lane L holding scale x quant x x over bytes 4L..4L+3 of each 32-element
        # group; Q2_K first fuses dmin * (min . bsums) per lane pair of sub-blocks (2L, 2L + 1),
        # then d * lane into the lane's float chain; the eight chains summed at the end.
        # The lane sums are integers below 2^24: exact in float32 in any order. 8 tokens or more:
        # its tiled kernel (_tiled_step).
        tiled = xq.shape[0] >= 8
        lanes8[:, :tt, :] = 0.0
        for b in range(C // 256):
            s32[0, :, :tt, :] = 0.0
            for j in range(2):
                for kk in range(4):
                    sh = np.uint8(2 * kk)
                    hb = np.uint8(4 * j + kk)
                    for h in range(2):
                        sb = 8 * j + 2 * kk + h  # the 16 bytes of this half share a sub-block
                        for k in range(tt):
                            s[:, k, :] = 0.0
                            for l4 in range(4):
                                for i in range(4):
                                    l = 16 * h + 4 * l4 + i
                                    xv = xq[t0 + k, 256 * b + 128 * j + 32 * kk + l]
                                    for r in range(TILE):
                                        q = np.float32((qs[ti, 64 * b + 32 * j + l, r] >> sh) & np.uint8(3))
                                        if qtype == 11 and (qh[ti, 32 * b + l, r] >> hb) & np.uint8(1) == 0:
                                            q -= np.float32(4.0)
                                        s[l4, k, r] += q * xv
                            for l4 in range(4):
                                for r in range(TILE):
                                    if qtype == 10:
                                        scv = np.float32(sc[ti, 32 * b + sb, r])
                                    else:
                                        scv = np.float32(sc[ti, 16 * b + sb, r]) - np.float32(32.0)
                                    s32[0, 4 * h + l4, k, r] += s[l4, k, r] * scv
            for k in range(tt):
                dd = xd[t0 + k, b]
                for r in range(TILE):
                    if tiled:
                        if qtype == 10:
                            _tiled_step(s32[0, :, k, r], _mins_bsums(qtype, sc, xs, ti, b, r, t0 + k),
                                        d[ti, b, r], m[ti, b, r], True, dd, acc, k, r)
                        else:  # Q3_K: no minimums
                            _tiled_step(s32[0, :, k, r], np.float32(0.0), d[ti, b, r], np.float32(0.0), False,
                                        dd, acc, k, r)
                        continue
                    dl = dd * d[ti, b, r]
                    if qtype == 10:
                        dmin = -(dd * m[ti, b, r])
                        for L in range(8):
                            prod = (np.float32(sc[ti, 32 * b + 16 + 2 * L, r]) * xs[t0 + k, 16 * b + 2 * L]
                                    + np.float32(sc[ti, 32 * b + 17 + 2 * L, r]) * xs[t0 + k, 16 * b + 2 * L + 1])
                            lanes8[L, k, r] = fma32(dmin, prod, lanes8[L, k, r])
                    for L in range(8):
                        lanes8[L, k, r] = fma32(dl, s32[0, L, k, r], lanes8[L, k, r])
        if not tiled:
            _sum_lanes(lanes8, acc, tt, accm, False)
    elif qtype == 13:  # Q5_K: super-blocks of 256, 8 sub-blocks of 32 (scale and min each)
        # llama.cpp (ggml_vec_dot_q5_K_q8_K, AVX2, every batch size): lanes as Q2_K's over each
        # 64-element chunk's two halves (scales 2j, 2j + 1), d * lane into eight float chains; the
        # minimums as one scalar chain, summs += dmin * (min . bsums); result hsum(lanes) + summs.
        # 8 tokens or more: its tiled kernel (_tiled_step)
        tiled = xq.shape[0] >= 8
        lanes8[:, :tt, :] = 0.0
        accm[:tt, :] = 0.0
        for b in range(C // 256):
            s32[0, :, :tt, :] = 0.0
            for j in range(4):
                for h in range(2):
                    hb = np.uint8(2 * j + h)
                    for k in range(tt):
                        s32[1, :, k, :] = 0.0
                        for L in range(8):
                            for i in range(4):
                                l = 4 * L + i
                                xv = xq[t0 + k, 256 * b + 64 * j + 32 * h + l]
                                for r in range(TILE):
                                    v = qs[ti, 128 * b + 32 * j + l, r]
                                    nib = (v & np.uint8(15)) if h == 0 else (v >> np.uint8(4))
                                    q = np.float32(nib | (((qh[ti, 32 * b + l, r] >> hb) & np.uint8(1)) << np.uint8(4)))
                                    s32[1, L, k, r] += q * xv
                        for L in range(8):
                            for r in range(TILE):
                                s32[0, L, k, r] += s32[1, L, k, r] * np.float32(sc[ti, 16 * b + 2 * j + h, r])
            for k in range(tt):
                dd = xd[t0 + k, b]
                for r in range(TILE):
                    mm = _mins_bsums(qtype, sc, xs, ti, b, r, t0 + k)
                    if tiled:
                        _tiled_step(s32[0, :, k, r], mm, d[ti, b, r], m[ti, b, r], True, dd, acc, k, r)
                        continue
                    accm[k, r] = fma32(-(dd * m[ti, b, r]), mm, accm[k, r])
                    dl = dd * d[ti, b, r]
                    for L in range(8):
                        lanes8[L, k, r] = fma32(dl, s32[0, L, k, r], lanes8[L, k, r])
        if not tiled:
            _sum_lanes(lanes8, acc, tt, accm, True)
    elif qtype == 14:  # Q6_K: super-blocks of 256, 16 sub-blocks of 16, int8 scales
        # llama.cpp, fewer than 8 tokens: ggml_vec_dot_q6_K_q8_K (AVX2), eight int32 lanes per
        # super-block, lane L holding the elements at byte L*4..L*4+3 of each 32-byte group
        # (scale x unsigned 6-bit quant x x) minus 32 * (sc . sum(x)) over elements 32L..32L+31;
        # each lane fused-multiply-added with d * dx into its own float chain, summed at the end.
        # 8 tokens or more: its tiled kernel, the super-block's exact integer total S and
        # acc = fma(d * S, dx, acc)
        tiled = xq.shape[0] >= 8
        lanes8[:, :tt, :] = 0.0
        acc[:tt, :] = 0.0
        for b in range(C // 256):
            for h in range(2):
                for L in range(8):
                    sb = 16 * b + 8 * h + (L >> 2)  # the 4 elements of lane L share each vector's scale
                    for k in range(tt):
                        s[:, k, :] = 0.0
                        for l in range(4 * L, 4 * L + 4):
                            ia = 128 * b + 64 * h + l
                            ih = 64 * b + 32 * h + l
                            e = 256 * b + 128 * h + l
                            x1 = xq[t0 + k, e]
                            x2 = xq[t0 + k, e + 32]
                            x3 = xq[t0 + k, e + 64]
                            x4 = xq[t0 + k, e + 96]
                            for r in range(TILE):
                                a_ = qs[ti, ia, r]
                                b_ = qs[ti, ia + 32, r]
                                hb = qh[ti, ih, r]
                                s[0, k, r] += np.float32(np.uint8((a_ & np.uint8(15)) | ((hb & np.uint8(3)) << np.uint8(4)))) * x1
                                s[1, k, r] += np.float32(np.uint8((b_ & np.uint8(15)) | (((hb >> np.uint8(2)) & np.uint8(3)) << np.uint8(4)))) * x2
                                s[2, k, r] += np.float32(np.uint8((a_ >> np.uint8(4)) | (((hb >> np.uint8(4)) & np.uint8(3)) << np.uint8(4)))) * x3
                                s[3, k, r] += np.float32(np.uint8((b_ >> np.uint8(4)) | ((hb >> np.uint8(6)) << np.uint8(4)))) * x4
                        for r in range(TILE):
                            # 4 raw sums of at most 4 * 63 * 127, times scales of at most 128: exact
                            s32[h, L, k, r] = (s[0, k, r] * (np.float32(sc[ti, sb, r]) - f128)
                                               + s[1, k, r] * (np.float32(sc[ti, sb + 2, r]) - f128)
                                               + s[2, k, r] * (np.float32(sc[ti, sb + 4, r]) - f128)
                                               + s[3, k, r] * (np.float32(sc[ti, sb + 6, r]) - f128))
            for k in range(tt):
                dd = xd[t0 + k, b]
                for L in range(8):
                    for r in range(TILE):
                        s64[L, k, r] = np.float64(s32[0, L, k, r]) + np.float64(s32[1, L, k, r])
                    t_a = np.float64(xs[t0 + k, 16 * b + 2 * L])
                    t_b = np.float64(xs[t0 + k, 16 * b + 2 * L + 1])
                    for r in range(TILE):
                        sub = 32.0 * ((np.float64(sc[ti, 16 * b + 2 * L, r]) - 128.0) * t_a
                                      + (np.float64(sc[ti, 16 * b + 2 * L + 1, r]) - 128.0) * t_b)
                        s64[L, k, r] -= sub
                if tiled:
                    for r in range(TILE):
                        _tiled_step(s64[:, k, r], np.float32(0.0), d[ti, b, r], np.float32(0.0), False, dd, acc, k, r)
                else:
                    for L in range(8):
                        for r in range(TILE):
                            lanes8[L, k, r] = fma32(dd * d[ti, b, r], np.float32(s64[L, k, r]), lanes8[L, k, r])
        if not tiled:
            _sum_lanes(lanes8, acc, tt, accm, False)
    r0 = ti * TILE
    nv = min(TILE, out.shape[1] - r0)
    for k in range(tt):
        for r in range(nv):
            out[t0 + k, r0 + r] = acc[k, r]


@nb.njit(cache=True, parallel=True, nogil=True)
def matmul_q(qtype, qs, qh, sc, d, m, xq, xd, xs, out, nthreads):
    """out[T, R] = X @ W.T for a QMatrix W and activations quantised for its type.

    xq: [T, C] integer-valued float32, xd: [T, C / A] block scales, xs: [T, C / S] d * sum(q).
    Each thread takes a contiguous run of row tiles; a tile's weights stay in L1 for all tokens.
    """
    T = xq.shape[0]
    nt = d.shape[0]
    chunk = (nt + nthreads - 1) // nthreads
    for c in nb.prange(nthreads):
        s = np.empty((4, TT, TILE), np.float32)   # per-block partial sums
        acc = np.empty((TT, TILE), np.float32)    # per-row results of a token tile
        h32 = np.empty(TILE, np.int32)            # per-row high bits of a Q5_0 block
        s64 = np.empty((8, TT, TILE), np.float64)  # K-quants: exact integer sums of a super-block
        accm = np.empty((TT, TILE), np.float32)    # Q4_K, Q5_K: the minimums' float chain
        lanes8 = np.empty((8, TT, TILE), np.float32)  # Q2_K, Q3_K, Q5_K, Q6_K: llama.cpp's eight float lanes
        s32 = np.empty((2, 8, TT, TILE), np.float32)  # exact lane sums (Q6_K per half; Q2/3/5_K [0] total, [1] part)
        for ti in range(c * chunk, min(nt, (c + 1) * chunk)):
            for t0 in range(0, T, TT):
                if qtype in KQUANTS:
                    _tile_k(qtype, qs, qh, sc, d, m, xq, xd, xs, out, ti, t0, min(TT, T - t0), s, acc, s64, accm,
                            lanes8, s32)
                else:
                    _tile(qtype, qs, qh, sc, d, m, xq, xd, xs, out, ti, t0, min(TT, T - t0), s, acc, h32)


class ActBuffers:
    """Preallocated quantised-activation buffers for inputs of width up to K and up to T rows.

    Flat storage so that every view handed to a kernel is C-contiguous (Numba types a sliced 2-D
    view as layout 'A', which compiles a second, slower copy of each kernel)."""

    def __init__(self, T: int, K: int):
        self.xq = np.empty(T * K, np.float32)                 # [T, K]
        self.x8 = np.empty(T * K, np.int8)                    # [T, K] (row-layout weights)
        self.xd = np.empty(T * max(K // 32, 1), np.float32)   # [T, K / A]
        self.xs = np.empty(T * max(K // 16, 1), np.float32)   # [T, K / S]
        self.views = {}  # (T, K, A, S, layout) -> (xq, xd, xs) views, made once


def quantize_for(w: QMatrix, x: np.ndarray, buf: ActBuffers):
    """Quantise x [T, K] for weight w's dot type; returns (xq, xd, xs) views (xq: int8 for
    row-layout weights, integer-valued float32 for tiled ones)."""
    act, S, A = DOT[w.qtype]
    T, K = x.shape
    key = (T, K, A, S, w.layout)
    v = buf.views.get(key)
    if v is None:
        q = buf.x8 if w.layout in ROW_LAYOUTS else buf.xq
        v = buf.views[key] = (q[:T * K].reshape(T, K), buf.xd[:T * (K // A)].reshape(T, K // A),
                              buf.xs[:T * (K // S)].reshape(T, K // S))
    xq, xd, xs = v
    (quantize_act if T >= TT else quantize_act_serial)(act, x, xq, xd, xs, S)
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
        if done != (DOT[w.qtype], w.layout):
            xq, xd, xs = quantize_for(w, x, buf)
            done = (DOT[w.qtype], w.layout)
        if w.layout == "rows8":
            matmul_rows8(w.qs, w.sc, w.d, w.m, xq, xd, xs, out, _THREADS[0])
        elif w.layout == "rows":
            matmul_rows(w.qtype, w.qs, w.qh, w.sc, w.d, w.m, xq, xd, xs, out, _THREADS[0])
        else:
            matmul_q(w.qtype, w.qs, w.qh, w.sc, w.d, w.m, xq, xd, xs, out, _THREADS[0])
