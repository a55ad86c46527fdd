"""Causal attention over an fp16 KV cache with grouped-query heads and an optional sliding window.

Numerics follow ggml's CPU path without flash attention: q is rounded to fp16 for the K dot
products (K is fp16), softmax in float32 with a float64 sum, probabilities rounded to fp16 for
the V product.
"""
import numba as nb
import numpy as np

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


@nb.njit(cache=True, parallel=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
def attention(q, k_cache, v_cache, pos0, window, scale, out):
    """q: [T, n_head, head_dim] (roped); caches: [n_ctx, n_kv, head_dim] uint16; out: [T, n_head * head_dim].

    Token t at position p = pos0 + t attends to cache positions max(0, p - window + 1) .. p
    (window <= 0: all of 0 .. p).
    """
    T, H, D = q.shape
    n_kv = k_cache.shape[1]
    group = H // n_kv
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
        mx = np.float32(-np.inf)
        for i in range(n):
            acc = np.float32(0.0)
            for j in range(D):
                acc += qh[j] * f16_finite_to_f32(k_cache[start + i, kh, j])
            acc *= scale
            s[i] = acc
            mx = max(mx, acc)
        tot = 0.0
        for i in range(n):
            e = np.exp(s[i] - mx)
            s[i] = e
            tot += e
        inv = np.float32(1.0 / tot)
        o = out[t, h * D:(h + 1) * D]
        o[:] = 0.0
        for i in range(n):
            pw = round_f16(s[i] * inv)
            for j in range(D):
                o[j] += pw * f16_finite_to_f32(v_cache[start + i, kh, j])
