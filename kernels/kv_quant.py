"""KV-cache rows in low-bit formats: quantise one row (one token's K or V of one KV head), dequantise
it, and the Walsh-Hadamard rotation that spreads a head's outlier channels before quantising.

A row of D values is stored as `codes` (D * bits / 8 bytes) and `scales` (fp16 bit patterns, one
per group of G values, two with a minimum). Per group of G values, element j of the group (_pack / _unpack):
  bits 8  : byte j
  bits 4  : low nibble of byte j (j < G/2), high nibble of byte j - G/2 (ggml's q4_0 order)
  bits 2  : bits 2k..2k+1 of byte j % (G/4), k = j // (G/4)
  bits 3  : the 2-bit layout above (G/4 bytes) then one high-bit plane (G/8 bytes: bit k of byte
            j % (G/8), k = j // (G/8))
  bits 16 : fp16, 2 bytes little-endian (no scales)
Symmetric types (q8_0, q4_0: llama.cpp's numerics) store a scale d: x = d * (c - 2^(bits-1));
asymmetric ones store d and a minimum m: x = d * c + m, c in [0, 2^bits - 1].
"""
import math

import numba as nb
import numpy as np

from edgert.kernels.quant import f16_bits, f16_finite_to_f32


@nb.njit(cache=True, nogil=True, inline="always")
def _f16r(x):
    """x rounded to fp16 and its bits: (bits, value as float32)."""
    b = f16_bits(x)
    return b, f16_finite_to_f32(b)


@nb.njit(cache=True, nogil=True, inline="always")
def _roundf(v):
    """C's roundf: half away from zero (Python's round() is half to even)."""
    r = np.floor(abs(v) + np.float32(0.5))
    return -r if v < 0 else r


@nb.njit(cache=True, nogil=True)
def quantize_row(x, bits, G, asym, codes, scales):
    """x: [D] float32 -> codes [D * bits // 8] uint8, scales [D // G * (1 + asym)] uint16."""
    D = x.shape[0]
    if bits == 16:
        for j in range(D):
            b = f16_bits(x[j])
            codes[2 * j] = b & 0xFF
            codes[2 * j + 1] = b >> 8
        return
    c = np.empty(G, np.int32)  # one group's codes
    for g in range(D // G):
        xg = x[g * G:(g + 1) * G]
        if not asym:  # llama.cpp's quantize_row_q8_0 / q4_0
            if bits == 8:
                amax = np.float32(0.0)
                for j in range(G):
                    amax = max(amax, abs(xg[j]))
                q = amax / np.float32(127.0)  # llama.cpp: id = d ? 1/d : 0 (a subnormal amax makes d 0)
                db, d = _f16r(q)
                idd = np.float32(1.0) / q if q != 0 else np.float32(0.0)
                for j in range(G):
                    c[j] = np.int32(_roundf(xg[j] * idd)) + 128
            else:  # q4_0
                amax = np.float32(0.0)
                mx = np.float32(0.0)
                for j in range(G):
                    if abs(xg[j]) > amax:
                        amax = abs(xg[j])
                        mx = xg[j]
                dd = mx / np.float32(-8.0)
                db, d = _f16r(dd)
                idd = np.float32(1.0) / dd if dd != 0 else np.float32(0.0)
                for j in range(G):
                    c[j] = min(15, np.int32(np.int8(xg[j] * idd + np.float32(8.5))))
            scales[g] = db
        else:
            lo = xg[0]
            hi = xg[0]
            for j in range(G):
                lo = min(lo, xg[j])
                hi = max(hi, xg[j])
            qmax = (1 << bits) - 1
            mb, m = _f16r(lo)
            db, d = _f16r((hi - m) / np.float32(qmax))
            idd = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            for j in range(G):
                c[j] = min(qmax, max(0, np.int32(_roundf((xg[j] - m) * idd))))
            scales[2 * g] = db
            scales[2 * g + 1] = mb
        _pack(c, bits, G, codes, g * G * bits // 8)


@nb.njit(cache=True, nogil=True, inline="always")
def dequantize_row(codes, scales, bits, G, asym, out):
    """codes, scales (one row as quantize_row wrote it) -> out [D] float32."""
    D = out.shape[0]
    if bits == 16:
        for j in range(D):
            out[j] = f16_finite_to_f32(np.uint32(codes[2 * j]) | (np.uint32(codes[2 * j + 1]) << np.uint32(8)))
        return
    off = np.float32(1 << (bits - 1))
    for g in range(D // G):
        if asym:
            d = f16_finite_to_f32(scales[2 * g])
            m = f16_finite_to_f32(scales[2 * g + 1])
        else:
            d = f16_finite_to_f32(scales[g])
            m = -off * d
        og = out[g * G:(g + 1) * G]
        _unpack(codes, g * G * bits // 8, bits, G, og)
        for j in range(G):
            og[j] = og[j] * d + m


@nb.njit(cache=True, nogil=True, inline="always")
def hadamard(x):
    """x [D] (D a power of two) -> H x in place, H the orthonormal Walsh-Hadamard matrix (H = H^T = H^-1)."""
    D = x.shape[0]
    h = 1
    while h < D:
        for i in range(0, D, 2 * h):
            for j in range(i, i + h):
                a = x[j]
                b = x[j + h]
                x[j] = a + b
                x[j + h] = a - b
        h *= 2
    s = np.float32(1.0 / math.sqrt(D))
    for j in range(D):
        x[j] *= s


def hadamard_matrix(D: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix [D, D] (the naive reference of hadamard())."""
    H = np.ones((1, 1))
    while H.shape[0] < D:
        H = np.block([[H, H], [H, -H]])
    return (H / math.sqrt(D)).astype(np.float32)


# Channel-wise K (KIVI): a page of positions shares per-channel ranges; each position's row is
# coded against them at its own bit width (one group of D values, no per-row scales).

@nb.njit(cache=True, nogil=True)
def page_range(rows, n, rng):
    """rows: [n_rows, D] float32 (the first n used) -> rng [2, D] fp16 bits (per channel min, max)."""
    D = rows.shape[1]
    for j in range(D):
        lo = rows[0, j]
        hi = rows[0, j]
        for i in range(1, n):
            lo = min(lo, rows[i, j])
            hi = max(hi, rows[i, j])
        rng[0, j] = f16_bits(lo)
        rng[1, j] = f16_bits(hi)


@nb.njit(cache=True, nogil=True)
def quantize_row_ranged(x, bits, rng, codes):
    """x: [D] float32 -> codes [D * bits // 8] against per-channel ranges rng [2, D] (fp16 bits):
    c = round((x - lo) / (hi - lo) * (2^bits - 1)), clamped."""
    D = x.shape[0]
    qmax = (1 << bits) - 1
    c = np.empty(D, np.int32)
    for j in range(D):
        lo = f16_finite_to_f32(rng[0, j])
        w = f16_finite_to_f32(rng[1, j]) - lo
        v = (x[j] - lo) / w * np.float32(qmax) if w > 0 else np.float32(0.0)
        c[j] = min(qmax, max(0, np.int32(_roundf(v))))
    _pack(c, bits, D, codes, 0)


@nb.njit(cache=True, nogil=True, inline="always")
def dequantize_row_ranged(codes, bits, rng, out):
    """codes (quantize_row_ranged's) -> out [D] float32."""
    D = out.shape[0]
    lo = np.empty(D, np.float32)
    w = np.empty(D, np.float32)
    range_f32(rng, lo, w)
    dequantize_row_ranged_f(codes, bits, lo, w, out)


@nb.njit(cache=True, nogil=True, inline="always")
def range_f32(rng, lo, w):
    """A page's ranges rng [2, D] (fp16 bits) -> lo [D] and width w = hi - lo [D], float32."""
    for j in range(lo.shape[0]):
        lo[j] = f16_finite_to_f32(rng[0, j])
        w[j] = f16_finite_to_f32(rng[1, j]) - lo[j]


@nb.njit(cache=True, nogil=True, inline="always")
def dequantize_row_ranged_f(codes, bits, lo, w, out):
    """dequantize_row_ranged with the page's ranges already as float32 (range_f32)."""
    _unpack(codes, 0, bits, out.shape[0], out)
    s = np.float32(1.0 / ((1 << bits) - 1))
    for j in range(out.shape[0]):
        out[j] = lo[j] + out[j] * (w[j] * s)


@nb.njit(cache=True, nogil=True, inline="always")
def _pack(c, bits, G, codes, o):
    """Codes c [G] (ints < 2^bits) -> bytes codes[o:o + G * bits // 8] in the layout above."""
    if bits == 8:
        for j in range(G):
            codes[o + j] = c[j]
    elif bits == 4:
        h = G // 2
        for j in range(h):
            codes[o + j] = c[j] | (c[j + h] << 4)
    else:  # 2 or 3: the low two bits, then (3) the high-bit plane
        q = G // 4
        for j in range(q):
            codes[o + j] = (c[j] & 3) | ((c[j + q] & 3) << 2) | ((c[j + 2 * q] & 3) << 4) | ((c[j + 3 * q] & 3) << 6)
        if bits == 3:
            e = G // 8
            for j in range(e):
                v = 0
                for k in range(8):
                    v |= ((c[j + k * e] >> 2) & 1) << k
                codes[o + q + j] = v


@nb.njit(cache=True, nogil=True, inline="always")
def _unpack(codes, o, bits, G, out):
    """bytes codes[o:] -> the G codes as float32 in out[:G]."""
    if bits == 8:
        for j in range(G):
            out[j] = np.float32(codes[o + j])
    elif bits == 4:
        h = G // 2
        for j in range(h):
            b = codes[o + j]
            out[j] = np.float32(b & 15)
            out[j + h] = np.float32(b >> 4)
    else:
        q = G // 4
        for j in range(q):
            b = codes[o + j]
            out[j] = np.float32(b & 3)
            out[j + q] = np.float32((b >> 2) & 3)
            out[j + 2 * q] = np.float32((b >> 4) & 3)
            out[j + 3 * q] = np.float32(b >> 6)
        if bits == 3:
            e = G // 8
            for k in range(8):
                for j in range(e):
                    out[j + k * e] += np.float32(((codes[o + q + j] >> k) & 1) * 4)
