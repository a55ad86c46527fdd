"""Rotary position embedding, normal (GPT-J, adjacent pairs) and NeoX (split halves) modes.

Angles follow ggml: theta_i = p * freq_scale * base^(-2i/n_rot), with base^(-2/n_rot) computed in
float32 and applied by repeated multiplication, as ggml_rope_cache_init does.
"""
import numba as nb
import numpy as np

from edgert.kernels.fmath import fma32


def _libm_powf():
    import ctypes
    import ctypes.util
    try:
        f = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6").powf
    except (OSError, AttributeError):
        return None
    f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    return f


_POWF = _libm_powf()


def theta_scale(base: float, n_rot: int) -> np.float32:
    """base^(-2 / n_rot) in float32 with the C library's powf, as ggml computes it (NumPy's float32
    power differs in the last bit for some bases, e.g. 10000 and 100000 with n_rot 64)."""
    e = np.float32(-2.0) / np.float32(n_rot)
    if _POWF is not None:
        return np.float32(_POWF(np.float32(base), e))
    return np.float32(np.power(np.float32(base), e))


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
                # ggml's rotate_pairs as GCC contracts it (-ffp-contract=fast): one product fused
                x[t, h, i0] = fma32(x0, cs[i], -(x1 * sn[i]))
                x[t, h, i1] = fma32(x0, sn[i], x1 * cs[i])
