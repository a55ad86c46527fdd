"""Gated FFN activations: SwiGLU (silu(g) * u) and GeGLU (gelu_tanh(g) * u, through fp16 as ggml)."""

import numba as nb
import numpy as np

from edgert.kernels.fmath import expf_needs_slow_path, fma32, ggml_expf, ggml_expf_common
from edgert.kernels.quant import round_f16

_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)
_GELU_COEF_A = np.float32(0.044715)


ACT_SILU, ACT_GELU = 0, 1  # act_scalar kinds
ACT_KIND = {"silu": ACT_SILU, "gelu": ACT_GELU}


@nb.njit(cache=True, nogil=True, inline="always")
def silu(x):
    """x / (1 + exp(-x)) with ggml's expf and operation order (ggml_v_silu)."""
    return x / (np.float32(1.0) + ggml_expf(np.float32(0.0) - x))


@nb.njit(cache=True, nogil=True, error_model="numpy")
def swiglu(g, u, out):
    """out[T, n] = silu(g) * u: a branch-free loop of expf's usual case (it vectorises: with
    NumPy's error model, as Python's checks every division for zero, measured 7x slower), and the
    row again with the full expf where some gate needs its slow path (|g| > ~87)."""
    T, n = g.shape
    for t in range(T):
        slow = 0
        for j in range(n):
            x = g[t, j]
            out[t, j] = x / (np.float32(1.0) + ggml_expf_common(np.float32(0.0) - x)) * u[t, j]
            slow |= np.int32(expf_needs_slow_path(np.float32(0.0) - x))
        if slow:
            for j in range(n):
                out[t, j] = silu(g[t, j]) * u[t, j]


@nb.njit(cache=True, nogil=True)
def gelu_f32(x):
    """ggml_gelu_f32 as GCC compiles it (-ffp-contract=fast: 1 + a*x*x becomes one fused
    multiply-add); ggml evaluates it once per fp16 value to fill its GeLU table."""
    inner = fma32(_GELU_COEF_A * x, x, np.float32(1.0))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(_SQRT_2_OVER_PI * x * inner))


@nb.njit(cache=True, nogil=True, inline="always")
def gelu_table(x):
    """gelu evaluated on fp16-rounded input and rounded to fp16 (ggml's GGML_GELU_FP16 table)."""
    if x <= np.float32(-10.0):
        return np.float32(0.0)
    if x >= np.float32(10.0):
        return x
    return round_f16(gelu_f32(round_f16(x)))


@nb.njit(cache=True, nogil=True)
def geglu(g, u, out):
    """out[T, n] = gelu(g) * u (gelu_table)."""
    T, n = g.shape
    for t in range(T):
        for j in range(n):
            out[t, j] = gelu_table(g[t, j]) * u[t, j]


@nb.njit(cache=True, nogil=True, inline="always")
def act_scalar(kind, x):
    """The FFN activation of one gate value: ACT_SILU or ACT_GELU."""
    return gelu_table(x) if kind == 1 else silu(x)
