"""GGUF quantisation blocks: lossless repacking into separate arrays, row dequantisation and the
activation quantisation that llama.cpp applies before its integer dot products.

Repacked layout (one `QMatrix` per weight matrix, `R` rows of `C` columns). Every type uses the
same five arrays so that one compiled kernel serves all of them:

    qs : uint8   [R, *]   packed quants (nibbles, bytes, low bits)
    qh : uint8   [R, *]   high bits (Q5_0, Q6_K), else [R, 0]
    sc : uint8   [R, *]   sub-block scales / mins as stored (Q4_K: 6-bit sc then m; Q6_K: int8^0x80)
    d  : float32 [R, *]   block scales (F32/F16: the weights themselves)
    m  : float32 [R, *]   block minimums (Q4_1 m, Q4_K dmin), else [R, 0]

A row unpacks (see `unpack_row`) into integer-valued floats `wq[C]` and per-sub-block `ws`, `wm`
so that  w[j] = wq[j] * ws[j // S] + wm[j // S]  exactly as gguf-py / ggml dequantise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba as nb
import numpy as np

# ggml type ids (gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K = 0, 1, 2, 3, 6, 8, 12, 14
# activation formats (what llama.cpp quantises the input vector to: its vec_dot_type)
ACT_F32, ACT_F16, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = 0, 1, 2, 3, 4

TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q8_0: "Q8_0",
              Q4_K: "Q4_K", Q6_K: "Q6_K"}
# qtype -> (elements per block, bytes per block)
BLOCK = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22),
         Q8_0: (32, 34), Q4_K: (256, 144), Q6_K: (256, 210)}
# qtype -> (activation format, sub-block size S of the weight scales, activation block size A)
DOT = {F32: (ACT_F32, 32, 32), F16: (ACT_F16, 32, 32), Q4_0: (ACT_Q8_0, 32, 32),
       Q4_1: (ACT_Q8_1, 32, 32), Q5_0: (ACT_Q8_0, 32, 32), Q8_0: (ACT_Q8_0, 32, 32),
       Q4_K: (ACT_Q8_K, 32, 256), Q6_K: (ACT_Q8_K, 16, 256)}


@dataclass(frozen=True)
class QMatrix:
    """A weight matrix [rows, cols] in the repacked layout (see module docstring)."""
    qtype: int
    rows: int
    cols: int
    qs: np.ndarray
    qh: np.ndarray
    sc: np.ndarray
    d: np.ndarray
    m: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.qs, self.qh, self.sc, self.d, self.m))

    def arrays(self):
        return self.qs, self.qh, self.sc, self.d, self.m


def row_bytes(qtype: int, cols: int) -> int:
    epb, bpb = BLOCK[qtype]
    return cols // epb * bpb


# ============================================================================================
# Repacking (NumPy, once at load)
# ============================================================================================

def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes [..., 2] -> float32 [...] (exact)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def repack(qtype: int, raw: np.ndarray, rows: int, cols: int) -> QMatrix:
    """GGUF tensor bytes (uint8, rows * row_bytes) -> QMatrix. Lossless."""
    if qtype not in BLOCK:
        raise ValueError(f"unsupported quant type {qtype}")
    epb, bpb = BLOCK[qtype]
    if cols % epb:
        raise ValueError(f"row length {cols} is not a multiple of the {TYPE_NAMES[qtype]} block {epb}")
    nb_ = cols // epb
    raw = np.asarray(raw, dtype=np.uint8)
    if raw.size != rows * nb_ * bpb:
        raise ValueError(f"expected {rows * nb_ * bpb} bytes, got {raw.size}")
    e8 = np.zeros((rows, 0), np.uint8)
    ef = np.zeros((rows, 0), np.float32)
    if qtype == F32:
        w = raw.view(np.float32).reshape(rows, cols)
        return QMatrix(qtype, rows, cols, e8, e8, e8, w.copy(), ef)
    if qtype == F16:
        w = raw.view(np.float16).reshape(rows, cols).astype(np.float32)
        return QMatrix(qtype, rows, cols, e8, e8, e8, w, ef)
    b = raw.reshape(rows, nb_, bpb)
    c = np.ascontiguousarray
    if qtype == Q4_0:
        return QMatrix(qtype, rows, cols, c(b[:, :, 2:18]).reshape(rows, -1), e8, e8,
                       _f16(b[:, :, 0:2]), ef)
    if qtype == Q4_1:
        return QMatrix(qtype, rows, cols, c(b[:, :, 4:20]).reshape(rows, -1), e8, e8,
                       _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4]))
    if qtype == Q5_0:
        return QMatrix(qtype, rows, cols, c(b[:, :, 6:22]).reshape(rows, -1),
                       c(b[:, :, 2:6]).reshape(rows, -1), e8, _f16(b[:, :, 0:2]), ef)
    if qtype == Q8_0:
        # int8 quants stored offset-binary (q ^ 0x80 = q + 128) so the kernel reads uint8 only
        return QMatrix(qtype, rows, cols, c(b[:, :, 2:34]).reshape(rows, -1) ^ np.uint8(0x80),
                       e8, e8, _f16(b[:, :, 0:2]), ef)
    if qtype == Q4_K:
        return QMatrix(qtype, rows, cols, c(b[:, :, 16:144]).reshape(rows, -1), e8,
                       c(b[:, :, 4:16]).reshape(rows, -1), _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4]))
    # Q6_K: ql[128] qh[64] scales[16] (int8) d
    return QMatrix(qtype, rows, cols, c(b[:, :, 0:128]).reshape(rows, -1),
                   c(b[:, :, 128:192]).reshape(rows, -1),
                   c(b[:, :, 192:208]).reshape(rows, -1) ^ np.uint8(0x80), _f16(b[:, :, 208:210]), ef)


# ============================================================================================
# Row unpacking (Numba): one row -> integer-valued floats + sub-block scales and mins
# ============================================================================================

@nb.njit(cache=True, nogil=True)
def unpack_row(qtype, qs, qh, sc, d, m, r, wq, ws, wm):
    """Unpack row r. wq: float32 [C] integer quants; ws, wm: float32 [C / S] (S from DOT).

    For F32/F16, wq holds the weights and ws = 1, wm = 0.
    """
    C = wq.shape[0]
    if qtype == 0 or qtype == 1:  # F32 / F16
        for j in range(C):
            wq[j] = d[r, j]
        for j in range(ws.shape[0]):
            ws[j] = np.float32(1.0)
            wm[j] = np.float32(0.0)
    elif qtype == 2 or qtype == 3 or qtype == 6:  # Q4_0, Q4_1, Q5_0
        off = np.float32(8.0) if qtype == 2 else (np.float32(0.0) if qtype == 3 else np.float32(16.0))
        for b in range(C // 32):
            if qtype == 6:
                h = (np.uint32(qh[r, 4 * b]) | (np.uint32(qh[r, 4 * b + 1]) << 8)
                     | (np.uint32(qh[r, 4 * b + 2]) << 16) | (np.uint32(qh[r, 4 * b + 3]) << 24))
            else:
                h = np.uint32(0)
            for j in range(16):
                v = qs[r, 16 * b + j]
                lo = (v & 15) | (((h >> j) & 1) << 4)
                hi = (v >> 4) | (((h >> (j + 16)) & 1) << 4)
                wq[32 * b + j] = np.float32(lo) - off
                wq[32 * b + 16 + j] = np.float32(hi) - off
            ws[b] = d[r, b]
            wm[b] = m[r, b] if qtype == 3 else np.float32(0.0)
    elif qtype == 8:  # Q8_0
        for b in range(C // 32):
            for j in range(32):
                wq[32 * b + j] = np.float32(qs[r, 32 * b + j]) - np.float32(128.0)
            ws[b] = d[r, b]
            wm[b] = np.float32(0.0)
    elif qtype == 12:  # Q4_K: 8 sub-blocks of 32, 6-bit scales and mins
        for b in range(C // 256):
            db = d[r, b]
            dm = m[r, b]
            s0 = 12 * b
            for jj in range(8):
                if jj < 4:
                    scv = sc[r, s0 + jj] & 63
                    mv = sc[r, s0 + jj + 4] & 63
                else:
                    scv = (sc[r, s0 + jj + 4] & 0xF) | ((sc[r, s0 + jj - 4] >> 6) << 4)
                    mv = (sc[r, s0 + jj + 4] >> 4) | ((sc[r, s0 + jj] >> 6) << 4)
                ws[8 * b + jj] = db * np.float32(scv)
                wm[8 * b + jj] = -(dm * np.float32(mv))
            for c4 in range(4):
                q0 = 128 * b + 32 * c4
                o = 256 * b + 64 * c4
                for l in range(32):
                    v = qs[r, q0 + l]
                    wq[o + l] = np.float32(v & 15)
                    wq[o + 32 + l] = np.float32(v >> 4)
    elif qtype == 14:  # Q6_K: 16 sub-blocks of 16, int8 scales
        for b in range(C // 256):
            db = d[r, b]
            for s in range(16):
                ws[16 * b + s] = db * (np.float32(sc[r, 16 * b + s]) - np.float32(128.0))
                wm[16 * b + s] = np.float32(0.0)
            for half in range(2):
                ql0 = 128 * b + 64 * half
                qh0 = 64 * b + 32 * half
                o = 256 * b + 128 * half
                for l in range(32):
                    a = qs[r, ql0 + l]
                    a2 = qs[r, ql0 + l + 32]
                    h = qh[r, qh0 + l]
                    wq[o + l] = np.float32((a & 15) | ((h & 3) << 4)) - np.float32(32.0)
                    wq[o + l + 32] = np.float32((a2 & 15) | (((h >> 2) & 3) << 4)) - np.float32(32.0)
                    wq[o + l + 64] = np.float32((a >> 4) | (((h >> 4) & 3) << 4)) - np.float32(32.0)
                    wq[o + l + 96] = np.float32((a2 >> 4) | (((h >> 6) & 3) << 4)) - np.float32(32.0)


@nb.njit(cache=True, nogil=True)
def dequantize_row(qtype, qs, qh, sc, d, m, r, S, out):
    """Row r of a QMatrix -> float32 out[C], bit-exact with gguf.quants.dequantize."""
    C = out.shape[0]
    ws = np.empty(C // S, np.float32)
    wm = np.empty(C // S, np.float32)
    unpack_row(qtype, qs, qh, sc, d, m, r, out, ws, wm)
    if qtype <= 1:
        return
    for j in range(C):
        if qtype == 3 or qtype == 12:
            out[j] = out[j] * ws[j // S] + wm[j // S]
        else:
            out[j] = out[j] * ws[j // S]


def dequantize(w: QMatrix) -> np.ndarray:
    """The whole matrix as float32 [rows, cols] (tests and tools only; never in the decode loop)."""
    out = np.empty((w.rows, w.cols), np.float32)
    S = DOT[w.qtype][1]
    for r in range(w.rows):
        dequantize_row(w.qtype, *w.arrays(), r, S, out[r])
    return out


# ============================================================================================
# fp16 rounding (numba has no float16 type)
# ============================================================================================

@nb.njit(cache=True, nogil=True, inline="always")
def round_f16(x):
    """float32 -> nearest fp16 value (round half to even), returned as float32."""
    ax = abs(x)
    if ax == 0.0 or not np.isfinite(ax):
        return x
    if ax >= np.float32(65520.0):
        return np.float32(np.inf) if x > 0 else np.float32(-np.inf)
    mant, e = math.frexp(ax)  # ax = mant * 2**e, 0.5 <= mant < 1
    q = math.ldexp(1.0, e - 11) if e > -14 else 2.0 ** -24
    r = np.float32(np.rint(ax / q) * q)
    return r if x > 0 else -r


@nb.njit(cache=True, nogil=True)
def f16_bits(x):
    """float32 -> fp16 bit pattern (uint16) with round-half-even; x must be finite."""
    v = round_f16(x)
    sign = np.uint16(0x8000) if (v < 0 or (v == 0 and np.signbit(v))) else np.uint16(0)
    av = abs(v)
    if av == 0:
        return sign
    if not np.isfinite(av):
        return sign | np.uint16(0x7C00)
    mant, e = math.frexp(av)
    if e - 1 < -14:  # subnormal
        return sign | np.uint16(np.int64(av * np.float32(2.0 ** 24)))
    return sign | np.uint16(((e - 1 + 15) << 10) | np.int64((mant * 2 - 1) * 1024))


F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
F16_TABLE.setflags(write=False)


# ============================================================================================
# Activation quantisation (llama.cpp quantize_row_q8_0 / q8_1 (AVX2 path) and q8_K (ref))
# ============================================================================================

@nb.njit(cache=True, nogil=True)
def quantize_act_row(act, x, xq, xd, xs, S):
    """One activation row x[K] -> xq[K] (integer-valued float32), xd[K / A], xs[K / S].

    xs holds d * sum(q) per weight sub-block (Q8_1: fp16-rounded, as llama.cpp stores it).
    """
    K = x.shape[0]
    if act == 0:  # F32
        for j in range(K):
            xq[j] = x[j]
        for b in range(xd.shape[0]):
            xd[b] = np.float32(1.0)
        return
    if act == 1:  # F16
        for j in range(K):
            xq[j] = round_f16(x[j])
        for b in range(xd.shape[0]):
            xd[b] = np.float32(1.0)
        return
    if act == 2 or act == 3:  # Q8_0 / Q8_1, blocks of 32
        for b in range(K // 32):
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(x[32 * b + j]))
            dd = amax / np.float32(127.0)
            idd = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            s = 0.0
            for j in range(32):
                q = np.rint(x[32 * b + j] * idd)
                xq[32 * b + j] = q
                s += q
            xd[b] = round_f16(dd)
            if act == 3:
                xs[b] = round_f16(dd * np.float32(s))
        return
    # Q8_K, blocks of 256, scale from the signed value of largest magnitude
    for b in range(K // 256):
        amax = np.float32(0.0)
        mx = np.float32(0.0)
        for j in range(256):
            ax = abs(x[256 * b + j])
            if ax > amax:
                amax = ax
                mx = x[256 * b + j]
        if amax == 0:
            for j in range(256):
                xq[256 * b + j] = 0.0
            xd[b] = 0.0
            for s in range(256 // S):
                xs[256 // S * b + s] = 0.0
            continue
        iscale = np.float32(-127.0) / mx
        for j in range(256):
            xq[256 * b + j] = min(np.float32(127.0), np.rint(iscale * x[256 * b + j]))
        dd = np.float32(1.0) / iscale
        xd[b] = dd
        for s in range(256 // S):
            t = np.float32(0.0)
            for j in range(S):
                t += xq[256 * b + S * s + j]
            xs[256 // S * b + s] = dd * t
