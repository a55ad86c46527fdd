"""Sparse FFN for one decode token: only the selected neurons, read from cluster slots.

A cluster is C consecutive neurons (in the package's hot-to-cold order) stored as one 4 KiB-aligned
byte range; a slot of the neuron cache holds one cluster exactly as it lies in the package, so a
flash read lands in its slot with no repacking. Inside a cluster every field is a [C, width]
array at a fixed offset (converters/package.py writes it, edgert/package.py describes it):

    gate  qs qh sc d m    the neuron's gate row in the row layout of kernels/simd.py (lossless)
    up    qs qh sc d m    its up row, the same
    down  qs qh sc d m    its down column along n_embd, Q8_0 (qs: int8 bits) or Q5_0 (qs nibbles,
                          qh high bits), in the same row layout

`lay` holds (offset, row bytes) of the 15 fields in that order. The gate and up dot products are the AVX2 integer kernels of
kernels/simd.py (bit-identical with llama.cpp's per row); the down projection is a float
accumulation of a * column (llama.cpp has no column-wise product to match).
"""
from __future__ import annotations

import numba as nb
import numpy as np

from edgert.kernels.activation import act_scalar
from edgert.kernels.simd import dot

@nb.njit(cache=True, nogil=True, inline="always")
def _row_dot(qtype, base, lay, f, r, px, pxd, pxs, nblk, tmp):
    """Dot product of row r of the field group starting at field f (gate: 0, up: 5) with the
    quantised activation at px / pxd / pxs."""
    pq = base + lay[2 * f] + r * lay[2 * f + 1]
    ph = base + lay[2 * f + 2] + r * lay[2 * f + 3]
    psc = base + lay[2 * f + 4] + r * lay[2 * f + 5]
    pd = base + lay[2 * f + 6] + r * lay[2 * f + 7]
    pm = base + lay[2 * f + 8] + r * lay[2 * f + 9]
    dot(qtype, 1, False, pq, ph, psc, pd, pm, px, pxd, pxs, nblk, 0, 0, 0, tmp.ctypes.data, 0)
    return tmp[0]


@nb.njit(cache=True, nogil=True, inline="always")
def _axpy_q8_0(p, q, d, a, w):
    """p[E] += a * (the Q8_0 column q [E] int8, d [E / 32] scales). The block scales are first
    spread over w [E] so the accumulation is one flat loop over E that LLVM vectorises (p and w
    are the caller's local arrays, so it knows they alias nothing; nested 32-element loops, or
    arrays passed in, stayed scalar: measured 0.27-0.31 ns per element single-threaded, this 0.10;
    one scale per column would be 0.03)."""
    for b in range(d.shape[0]):
        w[32 * b:32 * b + 32] = a * d[b]
    for e in range(p.shape[0]):
        p[e] += w[e] * np.float32(q[e])


@nb.njit(cache=True, nogil=True, inline="always")
def _axpy_q5_0(p, qs, qh, d, a, w):
    """p[E] += a * (the Q5_0 column: nibbles qs [E / 2], high bits qh [E / 8], scales d [E / 32]);
    value = (nibble | high bit << 4) - 16, each spread into w [E] scaled, then one flat loop."""
    for b in range(d.shape[0]):
        sb = a * d[b]
        hb = (np.uint32(qh[4 * b]) | (np.uint32(qh[4 * b + 1]) << 8) | (np.uint32(qh[4 * b + 2]) << 16)
              | (np.uint32(qh[4 * b + 3]) << 24))
        for j in range(16):
            v = qs[16 * b + j]
            w[32 * b + j] = sb * np.float32((np.int32(v & 15) | np.int32(((hb >> j) & 1) << 4)) - 16)
            w[32 * b + 16 + j] = sb * np.float32((np.int32(v >> 4) | np.int32(((hb >> (j + 16)) & 1) << 4)) - 16)
    for e in range(p.shape[0]):
        p[e] += w[e]


@nb.njit(cache=True, parallel=True, nogil=True)
def sparse_ffn(gtype, utype, dtype, act, slots, slots_i8, slots_f32, C, lay, xg8, xgd, xgs, nblk_g,
               xu8, xud, xus, nblk_u, sel, n_sel, gate_in, gthresh, athresh, acts, part, out, nthreads):
    """out[E] = sum over selected neurons k with |act(g_k)| > gthresh and |act(g_k) * u_k| >
    athresh of act(g_k) * u_k * down_k (a neuron below the first threshold costs its gate row,
    one below the second its gate and up rows).

    slots: uint8 [n_slots, CB] cluster slots (slots_i8 / slots_f32: the same memory as int8 and
    float32); sel: int64 [n] slot * C + row of each selected neuron (first n_sel used); xg* / xu*:
    the input quantised for the gate / the up type (nblk_* blocks a row); gate_in: float32 [n] precomputed gate values
    (gate-first), or an empty array to compute them here; acts: float32 [n] out, the neurons'
    activations; part: float32 [nthreads, E] scratch."""
    E = out.shape[0]
    CB = slots.shape[1]
    px, pxd, pxs = xg8.ctypes.data, xgd.ctypes.data, xgs.ctypes.data
    pu, pud, pus = xu8.ctypes.data, xud.ctypes.data, xus.ctypes.data
    have_gate = gate_in.shape[0] > 0
    chunk = (n_sel + nthreads - 1) // nthreads
    for c in nb.prange(nthreads):
        tmp = np.empty(1, np.float32)
        w = np.empty(E, np.float32)      # [E] one neuron's scaled column (local: no aliasing)
        p = np.zeros(E, np.float32)      # [E] this thread's partial sum (local, copied out at the end)
        for k in range(c * chunk, min(n_sel, (c + 1) * chunk)):
            s = sel[k] // C
            r = sel[k] - s * C
            base = slots.ctypes.data + s * CB
            if have_gate:
                g = gate_in[k]
            else:
                g = _row_dot(gtype, base, lay, 0, r, px, pxd, pxs, nblk_g, tmp)
            ag = act_scalar(act, g)
            if abs(ag) <= gthresh:
                acts[k] = 0.0
                continue
            u = _row_dot(utype, base, lay, 5, r, pu, pud, pus, nblk_u, tmp)
            a = ag * u
            if abs(a) <= athresh:
                acts[k] = 0.0
                continue
            acts[k] = a
            q0 = lay[20] + r * lay[21]           # byte offset of the down column's quants
            h0 = lay[22] + r * lay[23]           # ... of its high bits (Q5_0)
            d0 = (lay[26] + r * lay[27]) // 4    # float32 index of its scales
            dd = slots_f32[s, d0:d0 + E // 32]
            if dtype == 8:
                _axpy_q8_0(p, slots_i8[s, q0:q0 + E], dd, a, w)
            else:
                _axpy_q5_0(p, slots[s, q0:q0 + E // 2], slots[s, h0:h0 + E // 8], dd, a, w)
        part[c, :] = p
    for e in range(E):
        t = np.float32(0.0)
        for c in range(nthreads):
            t += part[c, e]
        out[e] = t


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def predict_gate(x, a_q, a_s, b_q, b_s, h, out):
    """Low-rank gate predictor: out[n_ff] = (b_q * b_s) @ ((a_q * a_s) @ x).
    x [E] float32; a_q int8 [r, E], a_s [r]; b_q int8 [n_ff, r], b_s [n_ff]; h [r] scratch."""
    R, E = a_q.shape
    for k in range(R):
        t = np.float32(0.0)
        for e in range(E):
            t += np.float32(a_q[k, e]) * x[e]
        h[k] = t * a_s[k]
    for j in range(b_q.shape[0]):
        t = np.float32(0.0)
        for k in range(R):
            t += np.float32(b_q[j, k]) * h[k]
        out[j] = t * b_s[j]


@nb.njit(cache=True, nogil=True)
def select_above(act, score, thresh, out_idx):
    """Indices j with |act(score[j])| > thresh into out_idx; returns how many."""
    n = 0
    for j in range(score.shape[0]):
        if abs(act_scalar(act, score[j])) > thresh:
            out_idx[n] = j
            n += 1
    return n
