"""GGUF quantisation blocks: lossless repacking, row dequantisation, and the activation
quantisation that llama.cpp applies before its integer dot products.

Repacked layout: the rows of a matrix W [R rows, C columns] are grouped in tiles of TILE rows
(the last tile zero-padded); inside a tile the GGUF block fields are split into separate arrays
and *transposed*, so that the row index moves fastest and each tile is one contiguous piece:

    qs : uint8   [n_tiles, row_bytes_q, TILE]  packed quants (nibbles / bytes / low bits)
    qh : uint8   [n_tiles, row_bytes_h, TILE]  high bits (Q5_0: 4 bytes a block, Q6_K: 64 a super-block,
                                               Q3_K: its hmask, Q5_K: its qh, 32 a super-block)
    sc : uint8   [n_tiles, n_sub, TILE]        sub-block scales (Q6_K: int8 ^ 0x80; Q4_K, Q5_K: 8 scales,
                                               8 mins; Q2_K: 16 scales, 16 mins; Q3_K: 16 scales + 32)
    d  : float32 [n_tiles, n_blocks, TILE]     block scales (F32/F16: the weights, [n_tiles, C, TILE])
    m  : float32 [n_tiles, n_blocks, TILE]     block minimums (Q4_1 m, Q4_K dmin), else empty

Why: a kernel runs its innermost loop over the TILE rows of a tile, a loop that LLVM vectorises
without reductions (loops over the 16-32 elements of one block do not vectorise in Numba: measured
7x slower), and a thread streams whole tiles, contiguous in memory (a row-transposed layout
without tiles streamed from DRAM at half the rate). Q8_0 quants are stored as q ^ 0x80 (= q + 128).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numba as nb
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic
import numpy as np

# ggml type ids (gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14
# activation formats (what llama.cpp quantises the input vector to: its vec_dot_type)
ACT_F32, ACT_F16, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class QType:
    """One GGUF weight type: its block, the activation format llama.cpp quantises the input to
    for it (its vec_dot_type), and how edgert holds it."""
    id: int            # ggml type id
    name: str
    block: int         # elements per block
    block_bytes: int   # bytes per block in GGUF
    act: int           # activation format (ACT_*)
    S: int             # sub-block size of the weight scales (the activation's sums are per S)
    A: int             # activation block size (one scale per A)
    repacked_bpb: int  # bytes per block after repacking (fp16 scales -> float32, K-quant scales unpacked)
    kquant: bool       # a K-quant (super-blocks of 256)
    rows: bool         # has the integer row-layout kernels of kernels/simd.py


QTYPES = (
    QType(F32, "F32", 1, 4, ACT_F32, 32, 32, 4, False, False),
    QType(F16, "F16", 1, 2, ACT_F16, 32, 32, 4, False, False),
    QType(Q4_0, "Q4_0", 32, 18, ACT_Q8_0, 32, 32, 20, False, True),
    QType(Q4_1, "Q4_1", 32, 20, ACT_Q8_1, 32, 32, 24, False, True),
    QType(Q5_0, "Q5_0", 32, 22, ACT_Q8_0, 32, 32, 24, False, True),
    QType(Q5_1, "Q5_1", 32, 24, ACT_Q8_1, 32, 32, 28, False, True),
    QType(Q8_0, "Q8_0", 32, 34, ACT_Q8_0, 32, 32, 36, False, True),
    QType(Q2_K, "Q2_K", 256, 84, ACT_Q8_K, 16, 256, 104, True, True),
    QType(Q3_K, "Q3_K", 256, 110, ACT_Q8_K, 16, 256, 116, True, True),
    QType(Q4_K, "Q4_K", 256, 144, ACT_Q8_K, 32, 256, 152, True, True),
    QType(Q5_K, "Q5_K", 256, 176, ACT_Q8_K, 32, 256, 184, True, True),
    QType(Q6_K, "Q6_K", 256, 210, ACT_Q8_K, 16, 256, 212, True, True),
)
QTYPE = {q.id: q for q in QTYPES}
QTYPE_BY_NAME = {q.name: q for q in QTYPES}
# views of the table used across the code base
TYPE_NAMES = {q.id: q.name for q in QTYPES}
BLOCK = {q.id: (q.block, q.block_bytes) for q in QTYPES}                # qtype -> (elements, bytes) per block
DOT = {q.id: (q.act, q.S, q.A) for q in QTYPES}                        # qtype -> (act format, S, A)
REPACKED_BPB = {q.id: q.repacked_bpb for q in QTYPES}
KQUANTS = tuple(q.id for q in QTYPES if q.kquant)
ROW_TYPES = tuple(q.id for q in QTYPES if q.rows)  # types with a row layout for kernels/simd.py


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
    layout: str = "tiles"  # or "rows" / "rows8" (kernels/simd.py, where an x86 ISA is chosen)

    @cached_property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.qs, self.qh, self.sc, self.d, self.m))

    def arrays(self):
        return self.qs, self.qh, self.sc, self.d, self.m

    def row_slice(self, r0: int, r1: int) -> "QMatrix":
        """Rows r0:r1 (multiples of TILE, or r1 = rows) as a QMatrix of views."""
        u = ROWS_PER_INDEX[self.layout]
        return QMatrix(self.qtype, r1 - r0, self.cols, *(a[r0 // u:-(-r1 // u)] for a in self.arrays()),
                       self.layout)


TILE = 64  # rows per tile
G8 = 8     # rows interleaved per group in the "rows8" layout
# rows of the matrix per leading index of its arrays, by layout
ROWS_PER_INDEX = {"tiles": TILE, "rows": 1, "rows8": G8}
ROW_LAYOUTS = ("rows", "rows8")  # the layouts of kernels/simd.py (int8 activations)


def layout_for(qtype: int, rows: int | None = None) -> str:
    """The layout a matrix of this type (and row count) is repacked to on this machine: Q4_K as
    "rows8" where the rows come in whole groups of 8 (its decode kernel reads 8 rows a step),
    other row types as "rows", where an x86 ISA is chosen; else "tiles"."""
    from edgert.kernels.isa import current
    if qtype not in ROW_TYPES or current().layout != "rows":
        return "tiles"
    return "rows8" if qtype == Q4_K and (rows is None or rows % G8 == 0) else "rows"


def interleave8(a: np.ndarray, nb_: int) -> np.ndarray:
    """Per-row fields [R, nb * k] -> the rows8 layout [R / 8, nb * 8 * k]: for each group of 8
    rows, block b of the 8 rows one after another (a decode step reads one contiguous piece)."""
    R, w = a.shape
    k = w // nb_ if nb_ else 0
    return np.ascontiguousarray(a.reshape(R // G8, G8, nb_, k).transpose(0, 2, 1, 3)).reshape(R // G8, nb_ * G8 * k)


def repacked_nbytes(qtype: int, rows: int, cols: int, layout: str | None = None) -> int:
    """Resident bytes of a repacked [rows, cols] matrix (tiles: rows padded to whole tiles)."""
    epb, _ = BLOCK[qtype]
    if (layout or layout_for(qtype, rows)) in ROW_LAYOUTS:
        return rows * (cols // epb) * REPACKED_BPB[qtype]
    return -(-rows // TILE) * TILE * (cols // epb) * REPACKED_BPB[qtype]


def row_bytes(qtype: int, cols: int) -> int:
    epb, bpb = BLOCK[qtype]
    return cols // epb * bpb


# ============================================================================================
# Repacking (NumPy, once at load)
# ============================================================================================

def _tiles(a: np.ndarray) -> np.ndarray:
    """Per-row fields [R, k] -> [n_tiles, k, TILE] (rows zero-padded to a multiple of TILE)."""
    R, k = a.shape
    nt = (R + TILE - 1) // TILE
    pad = np.zeros((nt * TILE, k), a.dtype)
    pad[:R] = a
    return np.ascontiguousarray(pad.reshape(nt, TILE, k).transpose(0, 2, 1))


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes [R, nb, 2] -> float32 [n_tiles, nb, TILE] (exact)."""
    return _tiles(np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32))


def _t(b: np.ndarray, rows: int) -> np.ndarray:
    """Byte fields [R, nb, k] -> [n_tiles, nb * k, TILE]."""
    return _tiles(np.ascontiguousarray(b).reshape(rows, -1))


def _k4_scales(sc12: np.ndarray) -> np.ndarray:
    """Q4_K packed 6-bit scales [R, nb, 12] -> [R, nb, 16]: 8 scales then 8 mins."""
    q = sc12.astype(np.uint8)
    out = np.empty(q.shape[:2] + (16,), np.uint8)
    out[..., 0:4] = q[..., 0:4] & 63
    out[..., 8:12] = q[..., 4:8] & 63
    out[..., 4:8] = (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)
    out[..., 12:16] = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return out


def _f16_rows(b: np.ndarray, o: int) -> np.ndarray:
    """The fp16 field at byte o of every block [R, nb, bytes] -> float32 [R, nb] (exact)."""
    return np.ascontiguousarray(b[:, :, o:o + 2]).view(np.float16)[..., 0].astype(np.float32)


def _k3_scales(sc12: np.ndarray) -> np.ndarray:
    """Q3_K packed 6-bit scales [R, nb, 12] -> [R, nb, 16] unsigned (the scale is the value - 32):
    low 4 bits from bytes 0-7 (low nibbles for scales 0-7, high nibbles for 8-15), high 2 bits
    from bytes 8-11 (scale i: byte 8 + i % 4, bits 2 * (i // 4))."""
    q = sc12.astype(np.uint8)
    out = np.empty(q.shape[:2] + (16,), np.uint8)
    for i in range(16):
        lo = (q[..., i] & 15) if i < 8 else (q[..., i - 8] >> 4)
        out[..., i] = lo | (((q[..., 8 + i % 4] >> (2 * (i // 4))) & 3) << 4)
    return out


LOW_K = (Q2_K, Q3_K, Q5_K)  # the K-quants whose row and tile layouts hold the same per-row fields


def _low_k_fields(qtype: int, b: np.ndarray):
    """Q2_K / Q3_K / Q5_K blocks [R, nb, bytes] -> per-row fields (qs, qh, sc, d, m), each [R, k]:
    quants and high bits as in GGUF, scales unpacked (Q2_K: 16 scales, 16 mins; Q3_K: 16 scales
    + 32; Q5_K: 8 scales, 8 mins), d and dmin as float32 [R, nb] (Q3_K: no m)."""
    R = b.shape[0]
    flat = lambda a: np.ascontiguousarray(a).reshape(R, -1)  # noqa: E731
    none8, nonef = np.zeros((R, 0), np.uint8), np.zeros((R, 0), np.float32)
    if qtype == Q5_K:  # d dmin scales[12] qh[32] qs[128]
        return (flat(b[:, :, 48:176]), flat(b[:, :, 16:48]), flat(_k4_scales(b[:, :, 4:16])),
                _f16_rows(b, 0), _f16_rows(b, 2))
    if qtype == Q2_K:  # scales[16] (scale | min << 4) qs[64] d dmin
        sm = np.concatenate([b[:, :, 0:16] & np.uint8(15), b[:, :, 0:16] >> np.uint8(4)], axis=2)
        return flat(b[:, :, 16:80]), none8, flat(sm), _f16_rows(b, 80), _f16_rows(b, 82)
    # Q3_K: hmask[32] qs[64] scales[12] d
    return (flat(b[:, :, 32:96]), flat(b[:, :, 0:32]), flat(_k3_scales(b[:, :, 96:108])),
            _f16_rows(b, 108), nonef)


def _repack_rows(qtype: int, b: np.ndarray, rows: int, cols: int) -> QMatrix:
    """GGUF blocks [R, nb, bytes per block] of a row type -> the row layout of simd.py: quants and
    high bits as in the file, one row after another; scales (and minimums) as float32; K-quant
    sub-block scales unpacked."""
    e8 = np.zeros((rows, 0), np.uint8)
    if qtype in LOW_K:
        return QMatrix(qtype, rows, cols, *_low_k_fields(qtype, b), "rows")
    if qtype == Q4_K:  # d dmin scales[12] qs[128]
        d = _f16_rows(b, 0)  # [R, nb]
        m = _f16_rows(b, 2)  # [R, nb] dmin
        sc = _k4_scales(b[:, :, 4:16]).reshape(rows, -1)                                    # [R, nb * 16]
        qs = np.ascontiguousarray(b[:, :, 16:144]).reshape(rows, -1)                        # [R, nb * 128]
        return QMatrix(qtype, rows, cols, qs, e8, sc, d, m, "rows")
    if qtype == Q6_K:  # ql[128] qh[64] scales[16] d
        d = _f16_rows(b, 208)  # [R, nb]
        ql = np.ascontiguousarray(b[:, :, 0:128]).reshape(rows, -1)                            # [R, nb * 128]
        qh = np.ascontiguousarray(b[:, :, 128:192]).reshape(rows, -1)                          # [R, nb * 64]
        sc = np.ascontiguousarray(b[:, :, 192:208]).reshape(rows, -1)                          # [R, nb * 16] int8 bits
        return QMatrix(qtype, rows, cols, ql, qh, sc, d, np.zeros((rows, 0), np.float32), "rows")
    d = _f16_rows(b, 0)   # [R, nb]
    m = np.zeros((rows, 0), np.float32)
    qh = e8
    if qtype == Q4_1:
        qs = np.ascontiguousarray(b[:, :, 4:20]).reshape(rows, -1)                        # [R, nb * 16]
        m = _f16_rows(b, 2)  # [R, nb]
    elif qtype == Q4_0:
        qs = np.ascontiguousarray(b[:, :, 2:18]).reshape(rows, -1)                        # [R, nb * 16]
    elif qtype == Q5_0:
        qs = np.ascontiguousarray(b[:, :, 6:22]).reshape(rows, -1)                        # [R, nb * 16]
        qh = np.ascontiguousarray(b[:, :, 2:6]).reshape(rows, -1)                         # [R, nb * 4]
    elif qtype == Q5_1:  # d m qh[4] qs[16]
        qs = np.ascontiguousarray(b[:, :, 8:24]).reshape(rows, -1)                        # [R, nb * 16]
        qh = np.ascontiguousarray(b[:, :, 4:8]).reshape(rows, -1)                         # [R, nb * 4]
        m = _f16_rows(b, 2)  # [R, nb]
    else:
        qs = np.ascontiguousarray(b[:, :, 2:34]).reshape(rows, -1)                        # [R, nb * 32] int8 bits
    return QMatrix(qtype, rows, cols, qs, qh, e8, d, m, "rows")


def repack(qtype: int, raw: np.ndarray, rows: int, cols: int, layout: str | None = None) -> QMatrix:
    """GGUF tensor bytes (uint8, rows * row_bytes) -> QMatrix in `layout` (default: this
    machine's, layout_for). Lossless."""
    if qtype not in BLOCK:
        raise ValueError(f"unsupported quant type {qtype}")
    epb, bpb = BLOCK[qtype]
    if cols % epb:
        raise ValueError(f"row length {cols} is not a multiple of the {TYPE_NAMES[qtype]} block {epb}")
    nb_ = cols // epb
    raw = np.asarray(raw, dtype=np.uint8)
    if raw.size != rows * nb_ * bpb:
        raise ValueError(f"expected {rows * nb_ * bpb} bytes, got {raw.size}")
    layout = layout or layout_for(qtype, rows)
    if layout in ROW_LAYOUTS and qtype not in ROW_TYPES:
        raise ValueError(f"{TYPE_NAMES[qtype]} has no {layout} layout (only {', '.join(TYPE_NAMES[t] for t in ROW_TYPES)})")
    if layout == "rows8":
        if rows % G8:
            raise ValueError(f"the rows8 layout needs whole groups of {G8} rows, not {rows}")
        q = _repack_rows(qtype, raw.reshape(rows, nb_, bpb), rows, cols)
        return QMatrix(qtype, rows, cols, *(interleave8(a, nb_) for a in q.arrays()), "rows8")
    if layout == "rows":
        return _repack_rows(qtype, raw.reshape(rows, nb_, bpb), rows, cols)
    nt = (rows + TILE - 1) // TILE
    e8 = np.zeros((nt, 0, TILE), np.uint8)
    ef = np.zeros((nt, 0, TILE), np.float32)
    if qtype == F32:
        w = raw.view(np.float32).reshape(rows, cols)
        return QMatrix(qtype, rows, cols, e8, e8, e8, _tiles(w), ef)
    if qtype == F16:
        w = raw.view(np.float16).reshape(rows, cols).astype(np.float32)
        return QMatrix(qtype, rows, cols, e8, e8, e8, _tiles(w), ef)
    b = raw.reshape(rows, nb_, bpb)
    if qtype == Q4_0:
        return QMatrix(qtype, rows, cols, _t(b[:, :, 2:18], rows), e8, e8, _f16(b[:, :, 0:2]), ef)
    if qtype == Q4_1:
        return QMatrix(qtype, rows, cols, _t(b[:, :, 4:20], rows), e8, e8,
                       _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4]))
    if qtype == Q5_0:
        return QMatrix(qtype, rows, cols, _t(b[:, :, 6:22], rows), _t(b[:, :, 2:6], rows), e8,
                       _f16(b[:, :, 0:2]), ef)
    if qtype == Q5_1:
        return QMatrix(qtype, rows, cols, _t(b[:, :, 8:24], rows), _t(b[:, :, 4:8], rows), e8,
                       _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4]))
    if qtype == Q8_0:
        return QMatrix(qtype, rows, cols, _t(b[:, :, 2:34] ^ np.uint8(0x80), rows), e8, e8,
                       _f16(b[:, :, 0:2]), ef)
    if qtype == Q4_K:
        return QMatrix(qtype, rows, cols, _t(b[:, :, 16:144], rows), e8,
                       _t(_k4_scales(b[:, :, 4:16]), rows), _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4]))
    if qtype in LOW_K:
        qs, qh, sc, d, m = _low_k_fields(qtype, b)
        return QMatrix(qtype, rows, cols, _tiles(qs), _tiles(qh), _tiles(sc), _tiles(d),
                       _tiles(m) if m.size else ef)
    # Q6_K: ql[128] qh[64] scales[16] (int8) d
    return QMatrix(qtype, rows, cols, _t(b[:, :, 0:128], rows), _t(b[:, :, 128:192], rows),
                   _t(b[:, :, 192:208] ^ np.uint8(0x80), rows), _f16(b[:, :, 208:210]), ef)


CHUNK_ROWS = 2048  # rows repacked at a time while loading


def mmap_chunks(raw: np.ndarray, qtype: int, rows: int, cols: int, chunk_rows: int = CHUNK_ROWS,
                release=None):
    """Chunks (r0, r1, bytes) of a tensor held in memory (an mmap view); release(lo, hi) drops
    a chunk's byte range once the consumer asks for the next one."""
    rb = row_bytes(qtype, cols)
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        yield r0, r1, raw[r0 * rb:r1 * rb]
        if release:
            release(r0 * rb, r1 * rb)


def repack_chunked(qtype: int, rows: int, cols: int, chunks, layout: str | None = None) -> QMatrix:
    """repack() a tensor a few thousand rows at a time, from an iterator of (r0, r1, bytes)
    chunks in order (chunk starts a multiple of TILE), into the final arrays: loading a large
    matrix (an embedding table) needs only a small transient buffer."""
    layout = layout or layout_for(qtype, rows)
    unit = ROWS_PER_INDEX[layout]
    out = None
    for r0, r1, raw in chunks:
        assert r0 % TILE == 0
        q = repack(qtype, raw, r1 - r0, cols, layout)
        if out is None:
            if r1 == rows:  # one chunk: no copy
                for _ in chunks:
                    pass
                return q
            out = [np.empty((-(-rows // unit),) + a.shape[1:], a.dtype) for a in q.arrays()]
        for o, a in zip(out, q.arrays()):
            o[r0 // unit:r0 // unit + a.shape[0]] = a
    return QMatrix(qtype, rows, cols, *out, layout)


def expand_q5_0(q: QMatrix) -> QMatrix:
    """A repacked Q5_0 matrix as a repacked Q8_0 one holding the same values (q - 16 as the
    stored byte - 128, the same scales): Q5_0's products then run in the faster Q8_0 loop, with
    the same activation format (Q8_0) and the same integer block sums (the float scaling may round
    differently in the last bit), for 1.5x the memory."""
    if q.layout == "rows":
        R, nb_ = q.d.shape
        qs = q.qs.reshape(R, nb_, 16)
        bits = np.unpackbits(q.qh.reshape(R, nb_, 4), axis=2, bitorder="little")  # [R, nb, 32]
        val = np.empty((R, nb_, 32), np.uint8)
        val[:, :, :16] = (qs & np.uint8(15)) | (bits[:, :, :16] << np.uint8(4))
        val[:, :, 16:] = (qs >> np.uint8(4)) | (bits[:, :, 16:] << np.uint8(4))
        val -= np.uint8(16)  # as int8: the value
        e8 = np.zeros((R, 0), np.uint8)
        return QMatrix(Q8_0, q.rows, q.cols, val.reshape(R, nb_ * 32), e8, e8, q.d,
                       np.zeros((R, 0), np.float32), "rows")
    nt, nbytes_, tile = q.qs.shape
    nb_ = nbytes_ // 16
    qs = q.qs.reshape(nt, nb_, 16, tile)
    bits = np.unpackbits(q.qh.reshape(nt, nb_, 4, tile), axis=2, bitorder="little")  # [nt, nb, 32, TILE]
    val = np.empty((nt, nb_, 32, tile), np.uint8)
    val[:, :, :16] = (qs & np.uint8(15)) | (bits[:, :, :16] << np.uint8(4))
    val[:, :, 16:] = (qs >> np.uint8(4)) | (bits[:, :, 16:] << np.uint8(4))
    val += np.uint8(112)  # Q8_0 repacked bytes are value + 128; Q5_0 values are val - 16
    e8 = np.zeros((nt, 0, tile), np.uint8)
    return QMatrix(Q8_0, q.rows, q.cols, val.reshape(nt, nb_ * 32, tile), e8, e8, q.d,
                   np.zeros((nt, 0, tile), np.float32))


def repack_staging_bytes(qtype: int, cols: int, chunk_rows: int = CHUNK_ROWS) -> int:
    """Upper bound of the transient memory of loading one matrix: two raw chunk buffers (read
    ahead) and about three copies of a chunk inside repack."""
    return 5 * chunk_rows * max(row_bytes(qtype, cols), repacked_nbytes(qtype, TILE, cols) // TILE)


# ============================================================================================
# Row dequantisation (Numba): one row, e.g. an embedding lookup; bit-exact with gguf-py
# ============================================================================================

def dequantize_row(w: QMatrix, r: int, out: np.ndarray):
    """Row r of a QMatrix -> float32 out[C], bit-exact with gguf.quants.dequantize."""
    if w.layout == "rows8":  # one row's fields taken out of its group
        g, lane = divmod(r, G8)
        nb_ = w.d.shape[1] // G8
        qs, qh, sc, d, m = (a[g].reshape(nb_, G8, -1)[:, lane].reshape(1, -1) if a.size else a[:1]
                            for a in w.arrays())
        _dequantize_row_rows_k(w.qtype, qs, qh, sc, d, m, 0, out)
    elif w.layout == "rows" and w.qtype in LOW_K:  # a row's fields as a one-row tile
        _dequantize_row_tiles(w.qtype, *(a[r].reshape(1, -1, 1) if a.shape[1] else a[:1].reshape(1, 0, 1)
                                         for a in w.arrays()), 0, out)
    elif w.layout == "rows" and w.qtype in KQUANTS:
        _dequantize_row_rows_k(w.qtype, w.qs, w.qh, w.sc, w.d, w.m, r, out)
    elif w.layout == "rows":
        _dequantize_row_rows(w.qtype, w.qs, w.qh, w.d, w.m, r, out)
    else:
        _dequantize_row_tiles(w.qtype, *w.arrays(), r, out)


@nb.njit(cache=True, nogil=True)
def _dequantize_row_rows(qtype, qs, qh, d, m, r, out):
    """dequantize_row for the row layout (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)."""
    for b in range(out.shape[0] // 32):
        db = d[r, b]
        if qtype == 8:
            for j in range(32):
                out[32 * b + j] = db * np.float32(np.int8(qs[r, 32 * b + j]))
            continue
        off = np.float32(8.0) if qtype == 2 else np.float32(16.0)  # (Q4_1, Q5_1: no offset, a minimum)
        for j in range(16):
            v = qs[r, 16 * b + j]
            lo = np.float32(v & 15)
            hi = np.float32(v >> 4)
            if qtype == 6 or qtype == 7:
                lo += np.float32(16 * ((qh[r, 4 * b + j // 8] >> (j % 8)) & 1))
                hi += np.float32(16 * ((qh[r, 4 * b + 2 + j // 8] >> (j % 8)) & 1))
            if qtype == 3 or qtype == 7:
                out[32 * b + j] = db * lo + m[r, b]
                out[32 * b + 16 + j] = db * hi + m[r, b]
            else:
                out[32 * b + j] = db * (lo - off)
                out[32 * b + 16 + j] = db * (hi - off)


@nb.njit(cache=True, nogil=True, inline="always")
def _q6_values(a, a2, hb):
    """Q6_K: the four values (q - 32) held by low-bit bytes a (ql[l]), a2 (ql[l + 32]) and high-bit
    byte hb (qh[l]): elements l, l + 32, l + 64, l + 96 of the 128-element half."""
    return (np.float32((a & 15) | ((hb & 3) << 4)) - np.float32(32.0),
            np.float32((a2 & 15) | (((hb >> 2) & 3) << 4)) - np.float32(32.0),
            np.float32((a >> 4) | (((hb >> 4) & 3) << 4)) - np.float32(32.0),
            np.float32((a2 >> 4) | (((hb >> 6) & 3) << 4)) - np.float32(32.0))


@nb.njit(cache=True, nogil=True)
def _dequantize_row_rows_k(qtype, qs, qh, sc, d, m, r, out):
    """dequantize_row for the row layout of Q4_K and Q6_K (blocks as in GGUF, Q4_K scales unpacked)."""
    for b in range(out.shape[0] // 256):
        if qtype == 12:
            for c4 in range(4):
                s_lo = d[r, b] * np.float32(sc[r, 16 * b + 2 * c4])
                s_hi = d[r, b] * np.float32(sc[r, 16 * b + 2 * c4 + 1])
                m_lo = m[r, b] * np.float32(sc[r, 16 * b + 8 + 2 * c4])
                m_hi = m[r, b] * np.float32(sc[r, 16 * b + 8 + 2 * c4 + 1])
                for l in range(32):
                    v = qs[r, 128 * b + 32 * c4 + l]
                    out[256 * b + 64 * c4 + l] = s_lo * np.float32(v & 15) - m_lo
                    out[256 * b + 64 * c4 + 32 + l] = s_hi * np.float32(v >> 4) - m_hi
        else:
            for h in range(2):
                for l in range(32):
                    a = qs[r, 128 * b + 64 * h + l]
                    a2 = qs[r, 128 * b + 64 * h + 32 + l]
                    hb = qh[r, 64 * b + 32 * h + l]
                    q1, q2, q3, q4 = _q6_values(a, a2, hb)
                    e = 256 * b + 128 * h + l
                    s0 = 16 * b + 8 * h + l // 16
                    out[e] = d[r, b] * np.float32(np.int8(sc[r, s0])) * q1
                    out[e + 32] = d[r, b] * np.float32(np.int8(sc[r, s0 + 2])) * q2
                    out[e + 64] = d[r, b] * np.float32(np.int8(sc[r, s0 + 4])) * q3
                    out[e + 96] = d[r, b] * np.float32(np.int8(sc[r, s0 + 6])) * q4


@nb.njit(cache=True, nogil=True)
def _dequantize_row_tiles(qtype, qs, qh, sc, d, m, r, out):
    """dequantize_row for the tiled layout."""
    C = out.shape[0]
    ti = r // TILE
    tr = r % TILE
    if qtype == 0 or qtype == 1:  # F32 / F16
        for j in range(C):
            out[j] = d[ti, j, tr]
    elif qtype == 2 or qtype == 3 or qtype == 6 or qtype == 7:  # Q4_0, Q4_1, Q5_0, Q5_1
        off = np.float32(8.0) if qtype == 2 else (np.float32(16.0) if qtype == 6 else np.float32(0.0))
        for b in range(C // 32):
            db = d[ti, b, tr]
            for j in range(16):
                v = qs[ti, 16 * b + j, tr]
                lo = np.float32(v & 15)
                hi = np.float32(v >> 4)
                if qtype == 6 or qtype == 7:
                    lo += np.float32(16 * ((qh[ti, 4 * b + j // 8, tr] >> (j % 8)) & 1))
                    hi += np.float32(16 * ((qh[ti, 4 * b + 2 + j // 8, tr] >> (j % 8)) & 1))
                if qtype == 3 or qtype == 7:
                    out[32 * b + j] = db * lo + m[ti, b, tr]
                    out[32 * b + 16 + j] = db * hi + m[ti, b, tr]
                else:
                    out[32 * b + j] = db * (lo - off)
                    out[32 * b + 16 + j] = db * (hi - off)
    elif qtype == 8:  # Q8_0
        for b in range(C // 32):
            for j in range(32):
                out[32 * b + j] = d[ti, b, tr] * (np.float32(qs[ti, 32 * b + j, tr]) - np.float32(128.0))
    elif qtype == 12 or qtype == 13:  # Q4_K / Q5_K: d * sc * q - dmin * m, 8 sub-blocks of 32
        for b in range(C // 256):  # (Q5_K: a fifth bit from qh, bit 2c4 / 2c4 + 1 of byte l)
            for c4 in range(4):
                s_lo = d[ti, b, tr] * np.float32(sc[ti, 16 * b + 2 * c4, tr])
                s_hi = d[ti, b, tr] * np.float32(sc[ti, 16 * b + 2 * c4 + 1, tr])
                m_lo = m[ti, b, tr] * np.float32(sc[ti, 16 * b + 8 + 2 * c4, tr])
                m_hi = m[ti, b, tr] * np.float32(sc[ti, 16 * b + 8 + 2 * c4 + 1, tr])
                for l in range(32):
                    v = qs[ti, 128 * b + 32 * c4 + l, tr]
                    lo, hi = v & 15, v >> 4
                    if qtype == 13:
                        h = qh[ti, 32 * b + l, tr]
                        lo += 16 * ((h >> (2 * c4)) & 1)
                        hi += 16 * ((h >> (2 * c4 + 1)) & 1)
                    out[256 * b + 64 * c4 + l] = s_lo * np.float32(lo) - m_lo
                    out[256 * b + 64 * c4 + 32 + l] = s_hi * np.float32(hi) - m_hi
    elif qtype == 10 or qtype == 11:  # Q2_K / Q3_K: 16 sub-blocks of 16, element 128j + 32k + l
        for b in range(C // 256):
            for j in range(2):
                for k in range(4):
                    for l in range(32):
                        sb = 8 * j + 2 * k + l // 16
                        q = np.float32((qs[ti, 64 * b + 32 * j + l, tr] >> (2 * k)) & 3)
                        e = 256 * b + 128 * j + 32 * k + l
                        if qtype == 10:  # d * scale * q - dmin * min
                            out[e] = (d[ti, b, tr] * np.float32(sc[ti, 32 * b + sb, tr]) * q
                                      - m[ti, b, tr] * np.float32(sc[ti, 32 * b + 16 + sb, tr]))
                        else:  # d * (scale - 32) * (q - 4 where the high bit is clear)
                            if (qh[ti, 32 * b + l, tr] >> (4 * j + k)) & 1 == 0:
                                q -= np.float32(4.0)
                            out[e] = d[ti, b, tr] * (np.float32(sc[ti, 16 * b + sb, tr]) - np.float32(32.0)) * q
    elif qtype == 14:  # Q6_K: d * sc * (q - 32), 16 sub-blocks of 16
        for b in range(C // 256):
            for h in range(2):
                for l in range(32):
                    a = qs[ti, 128 * b + 64 * h + l, tr]
                    a2 = qs[ti, 128 * b + 64 * h + 32 + l, tr]
                    hb = qh[ti, 64 * b + 32 * h + l, tr]
                    q1, q2, q3, q4 = _q6_values(a, a2, hb)
                    e = 256 * b + 128 * h + l
                    s0 = 16 * b + 8 * h + l // 16
                    out[e] = d[ti, b, tr] * (np.float32(sc[ti, s0, tr]) - np.float32(128.0)) * q1
                    out[e + 32] = d[ti, b, tr] * (np.float32(sc[ti, s0 + 2, tr]) - np.float32(128.0)) * q2
                    out[e + 64] = d[ti, b, tr] * (np.float32(sc[ti, s0 + 4, tr]) - np.float32(128.0)) * q3
                    out[e + 96] = d[ti, b, tr] * (np.float32(sc[ti, s0 + 6, tr]) - np.float32(128.0)) * q4


def dequantize(w: QMatrix) -> np.ndarray:
    """The whole matrix as float32 [rows, cols] (tests and tools only; never in the decode loop)."""
    out = np.empty((w.rows, w.cols), np.float32)
    for r in range(w.rows):
        dequantize_row(w, r, out[r])
    return out


# ============================================================================================
# fp16 rounding (numba has no float16 type)
# ============================================================================================

def _python_under_disable_jit(py):
    """With NUMBA_DISABLE_JIT the kernels run as Python and an intrinsic has no Python body:
    use py, its plain-Python equivalent, instead."""
    def wrap(intr):
        return py if nb.config.DISABLE_JIT else intr
    return wrap


@_python_under_disable_jit(lambda x: np.array(x, np.float32).view(np.uint32)[()])
@intrinsic
def _f32_to_u32(typingctx, x):
    """Bit pattern of a float32 (LLVM bitcast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@_python_under_disable_jit(lambda u: np.array(u, np.uint32).view(np.float32)[()])
@intrinsic
def _u32_to_f32(typingctx, u):
    """float32 with bit pattern u (LLVM bitcast)."""
    if u != types.uint32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@nb.njit(cache=True, nogil=True, inline="always")
def f16_bits(x):
    """float32 -> fp16 bit pattern (uint16), round half to even, on the bits (NumPy's
    npy_floatbits_to_halfbits): a few integer operations instead of frexp/ldexp."""
    f = np.int64(_f32_to_u32(np.float32(x)))
    h_sgn = (f & 0x80000000) >> 16
    f_exp = f & 0x7F800000
    if f_exp >= 0x47800000:  # overflow to inf, or inf / nan
        if f_exp == 0x7F800000 and (f & 0x007FFFFF) != 0:
            return np.uint16(h_sgn | 0x7E00)
        return np.uint16(h_sgn | 0x7C00)
    if f_exp <= 0x38000000:  # a half subnormal, or zero
        if f_exp < 0x33000000:
            return np.uint16(h_sgn)
        e = f_exp >> 23
        f_sig = (0x00800000 + (f & 0x007FFFFF)) >> (113 - e)
        if (f_sig & 0x3FFF) != 0x1000 or (f & 0x7FF) != 0:
            f_sig += 0x1000
        return np.uint16(h_sgn + (f_sig >> 13))
    h_exp = (f_exp - 0x38000000) >> 13
    f_sig = f & 0x007FFFFF
    if (f_sig & 0x3FFF) != 0x1000:
        f_sig += 0x1000
    return np.uint16(h_sgn + h_exp + (f_sig >> 13))  # a mantissa carry rounds into the exponent


@nb.njit(cache=True, nogil=True, inline="always")
def f16_to_f32(h):
    """fp16 bit pattern -> float32 (exact)."""
    hh = np.int64(h)
    sign = (hh & 0x8000) << 16
    e = hh & 0x7C00
    if e == 0x7C00:
        return _u32_to_f32(np.uint32(sign | 0x7F800000 | ((hh & 0x3FF) << 13)))
    if e == 0:
        v = np.float32(hh & 0x3FF) * np.float32(2.0 ** -24)
        return -v if sign else v
    return _u32_to_f32(np.uint32(sign | (((hh & 0x7FFF) << 13) + 0x38000000)))


@nb.njit(cache=True, nogil=True, inline="always")
def f16_finite_to_f32(h):
    """Finite fp16 bit pattern -> float32 (exact), branch-free so that loops over a KV cache
    vectorise: the fp16 exponent and mantissa placed in a float32's bits, times 2^112, re-bias
    the exponent (subnormal halves become exact normal floats)."""
    hh = np.uint32(h)
    bits = np.uint32(np.uint32(np.uint32(hh & np.uint32(0x8000)) << np.uint32(16))
                     | np.uint32(np.uint32(hh & np.uint32(0x7FFF)) << np.uint32(13)))
    return _u32_to_f32(bits) * np.float32(2.0 ** 112)


@nb.njit(cache=True, nogil=True, inline="always")
def round_f16(x):
    """float32 -> nearest fp16 value (round half to even), returned as float32."""
    return f16_to_f32(f16_bits(x))


with np.errstate(invalid="ignore"):  # the NaN halves (NumPy on aarch64 warns converting them)
    F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
F16_TABLE.setflags(write=False)


# ============================================================================================
# Activation quantisation (llama.cpp quantize_row_q8_0 / q8_1 (AVX2 path) and q8_K (ref))
# ============================================================================================

@nb.njit(cache=True, nogil=True)
def quantize_act_row(act, x, xq, xd, xs, S):
    """One activation row x[K] -> xq[K] (integer-valued float32), xd[K / A], xs[K / S].

    xs holds, per weight sub-block, d * sum(q) for Q8_1 (fp16-rounded, as llama.cpp stores it)
    and the integer sum(q) for Q8_K (its bsums).
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
            xs[256 // S * b + s] = t  # the integer sum (llama.cpp's bsums), exact in float32
