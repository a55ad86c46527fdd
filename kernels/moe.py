"""Mixture-of-experts routing, as llama.cpp computes it (src/llama-graph.cpp build_moe_ffn).

Per token: probabilities = softmax(router logits) with ggml's float order (ggml_v_expf over
chunks of 8 experts, each chunk's sum in float32 then added in double; libm expf for a tail of
n % 8), the top-k by probability (ggml_argsort_top_k: descending; ties to the lower index), their
probabilities as weights, renormalised to sum 1 where the architecture says (sum in double,
rounded to float32, clamped below at 6.1e-5, then a float32 division).
"""
import numba as nb
import numpy as np

from edgert.kernels.fmath import fma32, ggml_expf, hsum8, reduce_4x8


@nb.njit(cache=True, nogil=True)
def router_f32(w, x, out):
    """out[T, n] = x[T, K] @ w[n, K].T for an F32 router in llama.cpp's order for F32 products on
    x86 (AVX2). One token: ggml_vec_dot_f32, four accumulators of 8 lanes (element i in
    accumulator i // 8 % 4, lane i % 8), reduced as GGML_F32x8_REDUCE; a batch: tinyBLAS, 8 lanes
    each a fused multiply-add chain over elements l, l + 8, ..., then its horizontal sum. K a
    multiple of 32."""
    T, K = x.shape
    lanes = np.empty(8, np.float32)
    if T == 1:
        acc = np.empty((4, 8), np.float32)
        for r in range(w.shape[0]):
            acc[:] = 0
            for c in range(0, K, 32):
                for a in range(4):
                    for l in range(8):
                        acc[a, l] = fma32(x[0, c + 8 * a + l], w[r, c + 8 * a + l], acc[a, l])
            out[0, r] = reduce_4x8(acc)
        return
    for t in range(T):
        for r in range(w.shape[0]):
            lanes[:] = 0
            for c in range(0, K, 8):
                for l in range(8):
                    lanes[l] = fma32(w[r, c + l], x[t, c + l], lanes[l])
            out[t, r] = hsum8(lanes)


@nb.njit(cache=True, nogil=True, inline="always")
def _select(v, k, out):
    """out[:k]: indices of the k largest values of v, largest first, the lower index on ties."""
    for j in range(k):
        b = -1
        for i in range(v.shape[0]):
            taken = False
            for jj in range(j):
                if out[jj] == i:
                    taken = True
            if not taken and (b < 0 or v[i] > v[b]):
                b = i
        out[j] = b


@nb.njit(cache=True, nogil=True)
def route(logits, k, norm_w, idx, w):
    """logits [T, n_expert] -> idx [T, k] (int32, best first), w [T, k] (float32)."""
    T, n = logits.shape
    p = np.empty(n, np.float32)
    c8 = np.empty(8, np.float32)
    for t in range(T):
        mx = np.float32(-np.inf)
        for i in range(n):
            mx = max(mx, logits[t, i])
        tot = 0.0
        n8 = n - n % 8
        for c in range(0, n8, 8):
            for l in range(8):
                v = ggml_expf(np.float32(logits[t, c + l] - mx))
                p[c + l] = v
                c8[l] = v
            tot += np.float64(hsum8(c8))
        for i in range(n8, n):
            v = np.float32(np.exp(np.float32(logits[t, i] - mx)))
            p[i] = v
            tot += np.float64(v)
        inv = np.float32(1.0 / tot)
        for i in range(n):
            p[i] = p[i] * inv
        _select(p, k, idx[t])
        for j in range(k):
            w[t, j] = p[idx[t, j]]
        if norm_w:
            s = 0.0
            for j in range(k):
                s += np.float64(w[t, j])
            s32 = max(np.float32(s), np.float32(6.103515625e-5))
            for j in range(k):
                w[t, j] = w[t, j] / s32


@nb.njit(cache=True, nogil=True)
def top_k(logits, k, idx):
    """idx [T, k]: the k largest logits of each row (the same order as their softmax, without it):
    what the next layer's router predicts from a hidden state."""
    for t in range(logits.shape[0]):
        _select(logits[t], k, idx[t])


@nb.njit(cache=True, nogil=True)
def shared_gate(g):
    """g [T, 1] -> sigmoid(g) as qwen2moe's graph computes it: silu(g) / g, silu of a one-element
    row being ggml's scalar tail (libm expf)."""
    for t in range(g.shape[0]):
        x = g[t, 0]
        g[t, 0] = (x / (np.float32(1.0) + np.float32(np.exp(-x)))) / x
