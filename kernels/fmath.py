"""Float arithmetic exactly as ggml's CPU backend does it, for the kernels that must give llama.cpp's
results bit for bit: a fused multiply-add, ggml's vectorised expf (ggml_v_expf, used by its
softmax and SiLU), and the horizontal sums of its AVX2 code.

ggml_v_expf is a polynomial with a maximum error of about 1.5 ulp (ARM's optimized-routines
algorithm); libm's expf is correctly rounded almost everywhere, so the two differ in the last bit
now and then, and a last-bit difference before an 8-bit or fp16 rounding step occasionally becomes
a real one. Here each AVX2 lane operation is one scalar operation in the same order, with the same
fused multiply-adds.
"""
import numba as nb
import numpy as np
from numba.core import types
from numba.extending import intrinsic

from edgert.kernels.quant import _f32_to_u32, _python_under_disable_jit, _u32_to_f32


def _fma32_python(a, b, c):
    """a * b + c rounded once to float32 (exact rational arithmetic, then the nearest float32,
    ties to even): NUMBA_DISABLE_JIT's stand-in for the fused multiply-add."""
    from fractions import Fraction
    a, b, c = np.float32(a), np.float32(b), np.float32(c)
    if not (np.isfinite(a) and np.isfinite(b) and np.isfinite(c)):
        return np.float32(a * b + c)
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    v = np.float32(float(exact))
    if not np.isfinite(v):
        return v
    cands = (np.nextafter(v, np.float32(-np.inf)), v, np.nextafter(v, np.float32(np.inf)))
    return min(cands, key=lambda x: (abs(Fraction(float(x)) - exact), int(np.array(x).view(np.uint32)) & 1))


@_python_under_disable_jit(_fma32_python)
@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c in float32 with one rounding (llvm.fma.f32; vfmadd on x86)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen


def _h(s: str) -> np.float32:
    return np.float32(float.fromhex(s))


_R = _h("0x1.8p23")
_LOG2E = _h("0x1.715476p+0")
_LN2_HI = _h("0x1.62e4p-1")
_LN2_LO = _h("0x1.7f7d1cp-20")
_C1, _C2, _C3, _C4, _C5 = (_h("0x1.0e4020p-7"), _h("0x1.573e2ep-5"), _h("0x1.555e66p-3"),
                           _h("0x1.fffdb6p-2"), _h("0x1.ffffecp-1"))


@nb.njit(cache=True, nogil=True, inline="always")
def _expf_parts(x):
    """ggml_v_expf's common steps: n = round(x / ln 2), e = the bits of 2^n before the bias,
    k = 2^n, j = the polynomial in the remainder."""
    x = np.float32(x)
    z = fma32(x, _LOG2E, _R)
    n = z - _R
    b = fma32(-n, _LN2_LO, fma32(-n, _LN2_HI, x))
    e = np.uint32((np.uint32(_f32_to_u32(z)) << np.uint32(23)) & np.uint32(0xFFFFFFFF))
    k = _u32_to_f32(np.uint32((e + np.uint32(0x3F800000)) & np.uint32(0xFFFFFFFF)))
    u = b * b
    j = fma32(fma32(fma32(_C1, b, _C2), u, fma32(_C3, b, _C4)), u, _C5 * b)
    return n, e, k, j


@nb.njit(cache=True, nogil=True, inline="always")
def ggml_expf_common(x):
    """ggml_expf for |round(x * log2(e))| <= 126 (the usual case), branch-free so that a loop of it
    vectorises; expf_needs_slow_path tells when it does not apply."""
    n, e, k, j = _expf_parts(x)
    return fma32(k, j, k)


@nb.njit(cache=True, nogil=True, inline="always")
def expf_needs_slow_path(x):
    return abs(fma32(np.float32(x), _LOG2E, _R) - _R) > np.float32(126.0)


@nb.njit(cache=True, nogil=True, inline="always")
def ggml_expf(x):
    """exp(x) as ggml_v_expf computes each lane (ggml-cpu/vec.h, AVX2 branch)."""
    n, e, k, j = _expf_parts(x)
    an = abs(n)
    if not an > np.float32(126.0):
        return fma32(k, j, k)
    g = 0x82000000 if n <= np.float32(0.0) else 0
    s1 = _u32_to_f32(np.uint32((g + 0x7F000000) & 0xFFFFFFFF))
    if an > np.float32(192.0):
        return s1 * s1
    s2 = _u32_to_f32(np.uint32((np.int64(e) - g) & 0xFFFFFFFF))
    return fma32(s2, j, s2) * s1


@nb.njit(cache=True, nogil=True, inline="always")
def hsum8(a):
    """Sum of a[0:8] in the order of llama.cpp's hsum_float_8 / tinyBLAS hsum: the high half plus
    the low half, then lanes 0 + 2 and 1 + 3, then those two."""
    x0 = a[4] + a[0]
    x1 = a[5] + a[1]
    x2 = a[6] + a[2]
    x3 = a[7] + a[3]
    return (x0 + x2) + (x1 + x3)


@nb.njit(cache=True, nogil=True, inline="always")
def reduce_4x8(a):
    """Sum of a[4, 8] in the order of GGML_F32x8_REDUCE (ggml_vec_dot_f16's accumulators):
    a0 + a2 and a1 + a3, their sum, then lanes k + (k + 4), then two horizontal adds."""
    t0 = _lane4(a, 0) + _lane4(a, 4)
    t1 = _lane4(a, 1) + _lane4(a, 5)
    t2 = _lane4(a, 2) + _lane4(a, 6)
    t3 = _lane4(a, 3) + _lane4(a, 7)
    return (t0 + t1) + (t2 + t3)


@nb.njit(cache=True, nogil=True, inline="always")
def _lane4(a, k):
    return (a[0, k] + a[2, k]) + (a[1, k] + a[3, k])
