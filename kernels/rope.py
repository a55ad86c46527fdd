"""Rotary position embedding, normal (GPT-J, adjacent pairs) and NeoX (split halves) modes.

Angles follow ggml: theta_i = p * freq_scale * base^(-2i/n_rot), with base^(-2/n_rot) computed in
float32 and applied by repeated multiplication, as ggml_rope_cache_init does.
"""
import numba as nb
import numpy as np


def theta_scale(base: float, n_rot: int) -> np.float32:
    return np.float32(np.power(np.float32(base), np.float32(-2.0) / np.float32(n_rot)))


@nb.njit(cache=True, nogil=True)
def rope(x, pos0, n_rot, tscale, freq_scale, neox):
    """In place. x: [T, n_heads, head_dim]; token t sits at position pos0 + t."""
    T, H, D = x.shape
    half = n_rot // 2
    cs = np.empty(half, np.float32)
    sn = np.empty(half, np.float32)
    for t in range(T):
        theta = np.float32(pos0 + t)
        for i in range(half):
            a = freq_scale * theta
            cs[i] = np.cos(a)
            sn[i] = np.sin(a)
            theta = theta * tscale
        for h in range(H):
            for i in range(half):
                if neox:
                    i0, i1 = i, i + half
                else:
                    i0, i1 = 2 * i, 2 * i + 1
                x0 = x[t, h, i0]
                x1 = x[t, h, i1]
                x[t, h, i0] = x0 * cs[i] - x1 * sn[i]
                x[t, h, i1] = x0 * sn[i] + x1 * cs[i]
