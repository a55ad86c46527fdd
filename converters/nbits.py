"""GGUF weight blocks -> ONNX Runtime's MatMulNBits / GatherBlockQuantized form, without re-quantising.

MatMulNBits dequantises a weight as (code - zero_point) * scale per block of `block` values along
K, codes of 4 or 8 bits. Every ggml type used by the supported models maps onto that exactly:

| ggml  | bits | block | code            | zero point | scale            | min term  |
|-------|------|-------|-----------------|------------|------------------|-----------|
| Q4_0  | 4    | 32    | q               | 8          | d                | -         |
| Q4_1  | 4    | 32    | q               | 0          | d                | + m       |
| Q5_0  | 8    | 32    | q (5 bits)      | 16         | d                | -         |
| Q5_1  | 8    | 32    | q (5 bits)      | 0          | d                | + m       |
| Q8_0  | 8    | 32    | q + 128         | 128        | d                | -         |
| Q4_K  | 4    | 32    | q               | 0          | d * sc (float32) | - dmin*m  |
| Q5_K  | 8    | 32    | q (5 bits)      | 0          | d * sc (float32) | - dmin*m  |
| Q6_K  | 8    | 16    | q (6 bits)      | 32         | d * sc (float32) | -         |

The scales are the float32 products ggml's (and gguf-py's) dequantisation computes, so
(code - zp) * scale is the same float32 as ggml's d * q (one rounding each). A type with a per-block
minimum keeps it as a separate term the graph adds as blocksum(x) @ mins^T (MatMulNBits' float zero
point would be -m / d: a division, not exact). The decoders below follow gguf-py's
`dequantize_blocks` field by field; tests check (code - zp) * scale + min against
`gguf.quants.dequantize` bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K

from edgert.errors import EdgertError

QK_K = 256


@dataclass
class NBits:
    """One matrix [N, K] as MatMulNBits codes: value = (codes - zp) * scales (+ mins) per block."""
    bits: int             # 4 or 8
    block: int            # values per scale along K
    codes: np.ndarray     # [N, K] uint8
    scales: np.ndarray    # [N, K / block] float32
    zp: int               # zero point, one for the whole matrix
    mins: np.ndarray | None  # [N, K / block] float32 added to each value of the block, or None

    def packed(self) -> np.ndarray:
        """MatMulNBits' B input [N, K / block, block * bits / 8]: codes packed low nibble first."""
        N, K = self.codes.shape
        c = self.codes.reshape(N, K // self.block, self.block)
        if self.bits == 8:
            return np.ascontiguousarray(c)
        return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray | None:
        """MatMulNBits' zero_points [N, ceil(n_blocks * bits / 8)] (None: the op's default 2^(bits-1))."""
        if self.zp == 1 << (self.bits - 1):
            return None
        N, nb = self.scales.shape
        if self.bits == 8:
            return np.full((N, nb), self.zp, np.uint8)
        return np.full((N, (nb + 1) // 2), self.zp | (self.zp << 4), np.uint8)

    def dequantize(self) -> np.ndarray:
        """[N, K] float32, as MatMulNBits (plus the min term) computes it."""
        N, K = self.codes.shape
        c = self.codes.reshape(N, K // self.block, self.block).astype(np.float32) - np.float32(self.zp)
        w = c * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.reshape(N, K)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """ggml's nibble order: the low nibbles of `half` bytes are values 0..half-1, the high ones the next half."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, half) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def _q5_high(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: the 32 fifth bits of a block from its uint32."""
    n = qh.shape[0]
    bits = np.ascontiguousarray(qh).view(np.uint32).reshape(n, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
    return (bits & np.uint32(1)).astype(np.uint8)


def _decode(qtype: int, b: np.ndarray):
    """Blocks [n, bytes] -> (codes [n, values], scales [n, sub], zp, mins [n, sub] | None, bits, block)."""
    n = b.shape[0]
    if qtype == Q.Q4_0:
        return _nibbles(b[:, 2:], 16), _f16(b[:, :2]), 8, None, 4, 32
    if qtype == Q.Q4_1:
        return _nibbles(b[:, 4:], 16), _f16(b[:, :2]), 0, _f16(b[:, 2:4]), 4, 32
    if qtype == Q.Q5_0:
        return _nibbles(b[:, 6:], 16) | (_q5_high(b[:, 2:6]) << 4), _f16(b[:, :2]), 16, None, 8, 32
    if qtype == Q.Q5_1:
        return _nibbles(b[:, 8:], 16) | (_q5_high(b[:, 4:8]) << 4), _f16(b[:, :2]), 0, _f16(b[:, 2:4]), 8, 32
    if qtype == Q.Q8_0:
        return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(b[:, :2]), 128, None, 8, 32
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
        scales = (d * sc.astype(np.float32)).reshape(n, 8)
        mins = -(dmin * m.astype(np.float32)).reshape(n, 8)  # d * q - dm == d * q + (-dm), exactly
        if qtype == Q.Q4_K:
            return _nibbles(b[:, 16:], 32), scales, 0, mins, 4, 32
        qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = _nibbles(b[:, 48:], 32) | ((qh & np.uint8(1)).reshape(n, QK_K) << 4)
        return q, scales, 0, mins, 8, 32
    if qtype == Q.Q6_K:
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        scales = (d * sc.view(np.int8).astype(np.float32)).reshape(n, 16)
        lo = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
        hi = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
        return lo.reshape(n, -1, 32) | (hi.reshape(n, -1, 32) << 4), scales, 32, None, 8, 16
    raise EdgertError(f"ggml type {Q(qtype).name if qtype in Q._value2member_map_ else qtype}: no MatMulNBits "
                      f"mapping (supported: {', '.join(t.name for t in SUPPORTED)})")


SUPPORTED = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
BLOCK_VALUES = {Q.Q4_0: 32, Q.Q4_1: 32, Q.Q5_0: 32, Q.Q5_1: 32, Q.Q8_0: 32, Q.Q4_K: QK_K, Q.Q5_K: QK_K, Q.Q6_K: QK_K}


def to_nbits(qtype: int, raw: np.ndarray, rows: int, cols: int, name: str = "") -> NBits:
    """A GGUF tensor's bytes (uint8, rows * row bytes) -> its MatMulNBits form, losslessly."""
    if qtype not in BLOCK_VALUES:
        _decode(qtype, raw[:0].reshape(0, 1))  # raises, naming the type
    bv = BLOCK_VALUES[qtype]
    if cols % bv:
        raise EdgertError(f"tensor '{name}': {cols} columns are not whole {Q(qtype).name} blocks")
    blocks = np.ascontiguousarray(raw).reshape(rows * (cols // bv), -1)
    codes, scales, zp, mins, bits, block = _decode(qtype, blocks)
    return NBits(bits, block, np.ascontiguousarray(codes.reshape(rows, cols), np.uint8),
                 np.ascontiguousarray(scales.reshape(rows, cols // block), np.float32), zp,
                 None if mins is None else np.ascontiguousarray(mins.reshape(rows, cols // block), np.float32))
