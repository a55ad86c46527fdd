"""Norm, RoPE, attention and GLU kernels against naive NumPy references."""
import numpy as np
import pytest

from edgert.kernels.activation import geglu, swiglu
from edgert.kernels.attention import attention, store_kv
from edgert.kernels.norm import rmsnorm
from edgert.kernels.quant import F16_TABLE
from edgert.kernels.rope import rope, theta_scale


def f16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def naive_rmsnorm(x, w, eps):
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def test_rmsnorm(rng):
    x = rng.standard_normal((5, 576)).astype(np.float32) * 3
    w = rng.standard_normal(576).astype(np.float32)
    out = np.empty_like(x)
    rmsnorm(x, w, 1e-5, out)
    assert np.allclose(out, naive_rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    rmsnorm(x, w, 1e-5, x)  # in place
    assert np.array_equal(x, out)


def naive_rope(x, pos0, n_rot, base, neox):
    T, H, D = x.shape
    out = x.astype(np.float64).copy()
    inv = base ** (-np.arange(0, n_rot, 2) / n_rot)
    for t in range(T):
        ang = (pos0 + t) * inv
        c, s = np.cos(ang), np.sin(ang)
        if neox:
            a, b = x[t, :, : n_rot // 2], x[t, :, n_rot // 2: n_rot]
            out[t, :, : n_rot // 2] = a * c - b * s
            out[t, :, n_rot // 2: n_rot] = a * s + b * c
        else:
            a, b = x[t, :, 0:n_rot:2], x[t, :, 1:n_rot:2]
            out[t, :, 0:n_rot:2] = a * c - b * s
            out[t, :, 1:n_rot:2] = a * s + b * c
    return out


@pytest.mark.parametrize("neox", [False, True])
def test_rope(neox, rng):
    x = rng.standard_normal((6, 3, 64)).astype(np.float32)
    ref = naive_rope(x, 100, 64, 10000.0, neox)
    rope(x, 100, 64, theta_scale(10000.0, 64), np.float32(1.0), neox)
    # ggml's angles come from repeated float32 multiplication: agree to float32 precision
    assert np.allclose(x, ref, atol=2e-4)


def naive_attention(q, k, v, pos0, window, scale):
    """q [T, H, D]; k, v [n_ctx, Hkv, D] float; fp16 rounding of q and of the probabilities."""
    T, H, D = q.shape
    g = H // k.shape[1]
    out = np.zeros((T, H * D), np.float64)
    for t in range(T):
        p = pos0 + t
        lo = 0 if window <= 0 else max(0, p - window + 1)
        for h in range(H):
            s = (k[lo:p + 1, h // g].astype(np.float64) @ f16(q[t, h]).astype(np.float64)) * scale
            w = np.exp(s - s.max())
            w = f16(w / w.sum())
            out[t, h * D:(h + 1) * D] = w.astype(np.float64) @ v[lo:p + 1, h // g]
    return out


@pytest.mark.parametrize("window", [0, 3])
def test_attention_gqa_window(window, rng):
    n_ctx, Hkv, H, D, T = 16, 2, 6, 32, 5
    k_cache = np.zeros((n_ctx, Hkv, D), np.uint16)
    v_cache = np.zeros((n_ctx, Hkv, D), np.uint16)
    k = rng.standard_normal((10, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((10, Hkv, D)).astype(np.float32)
    store_kv(k, v, k_cache, v_cache, 0)
    assert np.array_equal(F16_TABLE[k_cache[:10]], f16(k))
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    out = np.empty((T, H * D), np.float32)
    pos0 = 10 - T
    attention(q, k_cache, v_cache, pos0, window, np.float32(0.125), out)
    ref = naive_attention(q, f16(k), f16(v), pos0, window, 0.125)
    assert np.allclose(out, ref, atol=2e-5)


def test_swiglu_geglu(rng):
    g = rng.standard_normal((3, 100)).astype(np.float32) * 4
    g[0, :3] = [-12.0, 12.0, 0.0]
    u = rng.standard_normal((3, 100)).astype(np.float32)
    out = np.empty_like(g)
    swiglu(g, u, out)
    g64 = g.astype(np.float64)
    assert np.allclose(out, g64 / (1 + np.exp(-g64)) * u, rtol=1e-5, atol=1e-6)
    geglu(g, u, out)
    gh = f16(g).astype(np.float64)
    gel = 0.5 * gh * (1 + np.tanh(np.sqrt(2 / np.pi) * gh * (1 + 0.044715 * gh * gh)))
    gel = np.where(g <= -10, 0, np.where(g >= 10, g, f16(gel)))
    assert np.allclose(out, gel * u, rtol=1e-3, atol=1e-4)


def test_swiglu_fast_loop_equals_the_scalar_silu_bit_for_bit(rng):
    """swiglu's vectorised loop (expf's usual case) and its slow-path row (a gate beyond ~87
    in magnitude) both give the scalar silu(g) * u of ggml's expf exactly."""
    from edgert.kernels.activation import silu
    g = (rng.standard_normal((2, 300)) * 6).astype(np.float32)
    g[1, 7], g[1, 8] = -100.0, 95.0  # expf's slow path (overflow / underflow scaling)
    u = rng.standard_normal((2, 300)).astype(np.float32)
    out = np.empty_like(g)
    swiglu(g, u, out)
    ref = np.array([[np.float32(silu(a)) * b for a, b in zip(gr, ur)] for gr, ur in zip(g, u)], np.float32)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
