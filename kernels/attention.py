"""Causal attention over an fp16 KV cache with grouped-query heads and an optional sliding window.

Numerics are ggml's CPU path without flash attention, operation for operation (see attention()),
so that a model's logits equal llama.cpp's bit for bit where the matrix products do too.
"""
import numba as nb
import numpy as np

from edgert.kernels.fmath import expf_needs_slow_path, fma32, ggml_expf, ggml_expf_common, hsum8, reduce_4x8
from edgert.kernels.quant import f16_bits, f16_finite_to_f32, round_f16


@nb.njit(cache=True, nogil=True)
def store_kv(k, v, k_cache, v_cache, pos0):
    """k, v: [T, n_kv, head_dim] float32 -> caches [n_ctx, n_kv, head_dim] uint16 (fp16 bits)."""
    T, H, D = k.shape
    for t in range(T):
        for h in range(H):
            for j in range(D):
                k_cache[pos0 + t, h, j] = f16_bits(k[t, h, j])
                v_cache[pos0 + t, h, j] = f16_bits(v[t, h, j])


@nb.njit(cache=True, nogil=True, inline="always")
def _dot_f16_one(q16, kf, a):
    """q16 . kf for a one-token batch in ggml_vec_dot_f16's order (head_dim a multiple of 32):
    4 accumulators of 8 lanes, element d in accumulator d // 8 % 4, GGML_F32x8_REDUCE's tree.
    kf: a K row as float32 (exact from fp16); a: [4, 8] float32 scratch."""
    a[:, :] = 0.0
    for d0 in range(0, q16.shape[0], 8):
        r = (d0 >> 3) & 3
        for l in range(8):
            a[r, l] = fma32(kf[d0 + l], q16[d0 + l], a[r, l])
    return reduce_4x8(a)


@nb.njit(cache=True, parallel=True, nogil=True)
def attention(q, k_cache, v_cache, pos0, window, scale, out):
    """q: [T, n_head, head_dim] (roped); caches: [n_ctx, n_kv, head_dim] uint16; out: [T, n_head * head_dim].

    Token t at position p = pos0 + t attends to cache positions max(0, p - window + 1) .. p
    (window <= 0: all of 0 .. p). Every float operation is llama.cpp's (CPU, no flash attention):
    q rounded to fp16; K dot products in its order (ggml_vec_dot_f16 for one token, tinyBLAS for
    a batch); softmax with ggml's expf, summed in chunks of 8 positions from position 0 (masked
    positions count as 0); probabilities rounded to fp16; the V products accumulated per output
    element with position i in lane i % 8 (and, for one token, accumulator i // 8 % 4).
    """
    T, H, D = q.shape
    n_kv = k_cache.shape[1]
    group = H // n_kv
    decode = T == 1
    P = pos0 + T
    kf = np.empty((P, n_kv, D), np.float32)  # [P, n_kv, head_dim] the cache rows in use, as float32
    vf = np.empty((P, n_kv, D), np.float32)
    kt = np.empty((n_kv, D, 0 if decode else P), np.float32)  # [n_kv, head_dim, P] K transposed (batches)
    for pp in nb.prange(P):
        for h in range(n_kv):
            for j in range(D):
                kf[pp, h, j] = f16_finite_to_f32(k_cache[pp, h, j])
                vf[pp, h, j] = f16_finite_to_f32(v_cache[pp, h, j])
                if not decode:
                    kt[h, j, pp] = kf[pp, h, j]
    for th in nb.prange(T * H):
        t = th // H
        h = th % H
        kh = h // group
        p = pos0 + t
        start = 0 if window <= 0 else max(0, p - window + 1)
        n = p + 1 - start
        qh = np.empty(D, np.float32)
        for j in range(D):
            qh[j] = round_f16(q[t, h, j])
        s = np.empty(n, np.float32)
        if decode:
            a48 = np.empty((4, 8), np.float32)
            for i in range(n):
                s[i] = _dot_f16_one(qh, kf[start + i, kh], a48) * scale
        else:
            # tinyBLAS's order with the positions in the vector: lane l accumulates elements
            # l, l + 8, ... of the head in sequence, for all positions at once
            lanes = np.zeros((8, n), np.float32)
            for c in range(D // 8):
                for l in range(8):
                    qv = qh[8 * c + l]
                    row = kt[kh, 8 * c + l, start:start + n]
                    ln = lanes[l]
                    for i in range(n):
                        ln[i] = fma32(row[i], qv, ln[i])
            for i in range(n):
                s[i] = (((lanes[4, i] + lanes[0, i]) + (lanes[6, i] + lanes[2, i]))
                        + ((lanes[5, i] + lanes[1, i]) + (lanes[7, i] + lanes[3, i]))) * scale
        mx = np.float32(-np.inf)
        for i in range(n):
            mx = max(mx, s[i])
        e = np.empty(n, np.float32)
        for i in range(n):  # vectorised: ggml's expf without its rare range branch
            e[i] = ggml_expf_common(s[i] - mx)
        for i in range(n):  # the rare arguments below about -87 (underflow range)
            if expf_needs_slow_path(s[i] - mx):
                e[i] = ggml_expf(s[i] - mx)
        s, e = e, s
        tot = 0.0
        c8 = np.zeros(8, np.float32)
        for c in range(start // 8, p // 8 + 1):
            for l in range(8):
                i = 8 * c + l - start
                c8[l] = s[i] if 0 <= i < n else np.float32(0.0)
            tot += np.float64(hsum8(c8))
        inv = np.float32(1.0 / tot)
        o = out[t, h * D:(h + 1) * D]
        if decode:
            a = np.zeros((4, 8, D), np.float32)
            for i in range(n):
                pos = start + i
                r, l = (pos >> 3) & 3, pos & 7
                pw = round_f16(s[i] * inv)
                for j in range(D):
                    a[r, l, j] = fma32(vf[pos, kh, j], pw, a[r, l, j])
            red = np.empty((4, 8), np.float32)
            for j in range(D):
                for r in range(4):
                    for l in range(8):
                        red[r, l] = a[r, l, j]
                o[j] = reduce_4x8(red)
        else:
            a8 = np.zeros((8, D), np.float32)
            for i in range(n):
                pos = start + i
                pw = round_f16(s[i] * inv)
                for j in range(D):
                    a8[pos & 7, j] = fma32(vf[pos, kh, j], pw, a8[pos & 7, j])
            c8b = np.empty(8, np.float32)
            for j in range(D):
                for l in range(8):
                    c8b[l] = a8[l, j]
                o[j] = hsum8(c8b)
