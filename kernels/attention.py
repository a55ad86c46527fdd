"""Causal attention over an fp16 KV cache with grouped-query heads and an optional sliding window.

Numerics are ggml's CPU path without flash attention, operation for operation (see attention()),
so that a model's logits equal llama.cpp's bit for bit where the matrix products do too.
"""
import numba as nb
import numpy as np

from edgert.kernels.fmath import expf_needs_slow_path, fma32, ggml_expf, ggml_expf_common, hsum8, reduce_4x8
from edgert.kernels.kv_quant import dequantize_row, dequantize_row_ranged_f, hadamard, range_f32
from edgert.kernels.quant import f16_bits, f16_finite_to_f32, round_f16


@nb.njit(cache=True, nogil=True)
def store_kv(k, v, k_cache, v_cache, pos0):
    """k, v: [T, n_kv, head_dim] float32 -> caches [n_ctx, n_kv, head_dim] uint16 (fp16 bits)."""
    T, H, D = k.shape
    for t in range(T):
        for h in range(H):
            for j in range(D):
                k_cache[pos0 + t, h, j] = f16_bits(k[t, h, j])
                v_cache[pos0 + t, h, j] = f16_bits(v[t, h, j])


@nb.njit(cache=True, nogil=True, inline="always")
def _dot_f16_one(q16, kf, a):
    """q16 . kf for a one-token batch in ggml_vec_dot_f16's order (head_dim a multiple of 32):
    4 accumulators of 8 lanes, element d in accumulator d // 8 % 4, GGML_F32x8_REDUCE's tree.
    kf: a K row as float32 (exact from fp16); a: [4, 8] float32 scratch."""
    a[:, :] = 0.0
    for d0 in range(0, q16.shape[0], 8):
        r = (d0 >> 3) & 3
        for l in range(8):
            a[r, l] = fma32(kf[d0 + l], q16[d0 + l], a[r, l])
    return reduce_4x8(a)


@nb.njit(cache=True, nogil=True)
def attention(q, k_cache, v_cache, pos0, window, scale, out):
    """attention_buf with scratch of its own (tests, probes)."""
    P = pos0 + q.shape[0]
    kf = np.empty((P, k_cache.shape[1], k_cache.shape[2]), np.float32)
    vf = np.empty((P, k_cache.shape[1], k_cache.shape[2]), np.float32)
    attention_buf(q, k_cache, v_cache, pos0, window, scale, out, kf, vf)


@nb.njit(cache=True, parallel=True, nogil=True)
def attention_buf(q, k_cache, v_cache, pos0, window, scale, out, kf, vf):
    """q: [T, n_head, head_dim] (roped); caches: [n_ctx, n_kv, head_dim] uint16; out: [T, n_head * head_dim];
    kf, vf: float32 scratch [>= pos0 + T, n_kv, head_dim].

    Token t at position p = pos0 + t attends to cache positions max(0, p - window + 1) .. p
    (window <= 0: all of 0 .. p). Every float operation is llama.cpp's (CPU, no flash attention):
    q rounded to fp16; K dot products in its order (ggml_vec_dot_f16 for one token, tinyBLAS for
    a batch); softmax with ggml's expf, summed in chunks of 8 positions from position 0 (masked
    positions count as 0); probabilities rounded to fp16; the V products accumulated per output
    element with position i in lane i % 8 (and, for one token, accumulator i // 8 % 4).
    """
    T, H, D = q.shape
    n_kv = k_cache.shape[1]
    group = H // n_kv
    decode = T == 1
    P = pos0 + T
    # kf, vf: [>= P, n_kv, head_dim] scratch for the cache rows in use as float32 (allocated once by
    # the caller: a fresh 1.5 MiB array per layer and token costs its page faults every time)
    kt = np.empty((n_kv, D, 0 if decode else P), np.float32)  # [n_kv, head_dim, P] K transposed (batches)
    for pp in nb.prange(P):
        for h in range(n_kv):
            for j in range(D):
                kf[pp, h, j] = f16_finite_to_f32(k_cache[pp, h, j])
                vf[pp, h, j] = f16_finite_to_f32(v_cache[pp, h, j])
                if not decode:
                    kt[h, j, pp] = kf[pp, h, j]
    for th in nb.prange(T * H):
        t = th // H
        h = th % H
        kh = h // group
        p = pos0 + t
        start = 0 if window <= 0 else max(0, p - window + 1)
        n = p + 1 - start
        qh = np.empty(D, np.float32)
        for j in range(D):
            qh[j] = round_f16(q[t, h, j])
        s = np.empty(n, np.float32)
        if decode:
            a48 = np.empty((4, 8), np.float32)
            for i in range(n):
                s[i] = _dot_f16_one(qh, kf[start + i, kh], a48) * scale
        else:
            # tinyBLAS's order with the positions in the vector: lane l accumulates elements
            # l, l + 8, ... of the head in sequence, for all positions at once
            lanes = np.zeros((8, n), np.float32)
            for c in range(D // 8):
                for l in range(8):
                    qv = qh[8 * c + l]
                    row = kt[kh, 8 * c + l, start:start + n]
                    ln = lanes[l]
                    for i in range(n):
                        ln[i] = fma32(row[i], qv, ln[i])
            for i in range(n):
                s[i] = (((lanes[4, i] + lanes[0, i]) + (lanes[6, i] + lanes[2, i]))
                        + ((lanes[5, i] + lanes[1, i]) + (lanes[7, i] + lanes[3, i]))) * scale
        mx = np.float32(-np.inf)
        for i in range(n):
            mx = max(mx, s[i])
        e = np.empty(n, np.float32)
        for i in range(n):  # vectorised: ggml's expf without its rare range branch
            e[i] = ggml_expf_common(s[i] - mx)
        for i in range(n):  # the rare arguments below about -87 (underflow range)
            if expf_needs_slow_path(s[i] - mx):
                e[i] = ggml_expf(s[i] - mx)
        s, e = e, s
        tot = 0.0
        c8 = np.zeros(8, np.float32)
        for c in range(start // 8, p // 8 + 1):
            for l in range(8):
                i = 8 * c + l - start
                c8[l] = s[i] if 0 <= i < n else np.float32(0.0)
            tot += np.float64(hsum8(c8))
        inv = np.float32(1.0 / tot)
        o = out[t, h * D:(h + 1) * D]
        if decode:
            a = np.zeros((4, 8, D), np.float32)
            for i in range(n):
                pos = start + i
                r, l = (pos >> 3) & 3, pos & 7
                pw = round_f16(s[i] * inv)
                for j in range(D):
                    a[r, l, j] = fma32(vf[pos, kh, j], pw, a[r, l, j])
            red = np.empty((4, 8), np.float32)
            for j in range(D):
                for r in range(4):
                    for l in range(8):
                        red[r, l] = a[r, l, j]
                o[j] = reduce_4x8(red)
        else:
            a8 = np.zeros((8, D), np.float32)
            for i in range(n):
                pos = start + i
                pw = round_f16(s[i] * inv)
                for j in range(D):
                    a8[pos & 7, j] = fma32(vf[pos, kh, j], pw, a8[pos & 7, j])
            c8b = np.empty(8, np.float32)
            for j in range(D):
                for l in range(8):
                    c8b[l] = a8[l, j]
                o[j] = hsum8(c8b)


# ============================================================================================
# Attention over a quantised KV cache (edgert/kv_cache.py): every cached row read in its own
# format, one row at a time, shared by the query heads of its group (no float copy of the cache)
# ============================================================================================

_FAST = {"reassoc", "contract", "arcp", "nsz"}  # reorder sums (vectorised dots); no inf/nan assumptions


@nb.njit(cache=True, nogil=True, inline="always")
def _row(codes, scales, spec, rng, page, tr, sl, kh, pos, buf, pg, lo, w):
    """Cached row (position pos, KV head kh) in tier tr, slot sl -> buf [head_dim] float32: spec[tr, 3]
    says channel-wise (against the per-channel ranges rng of pos's page; lo / w hold page pg[0]'s
    as float32, reloaded when the page changes) or per row with scales."""
    if spec[tr, 3]:
        p = pos // page
        if pg[0] != p:
            range_f32(rng[p, kh], lo, w)
            pg[0] = p
        dequantize_row_ranged_f(codes[tr][sl, kh], spec[tr, 0], lo, w, buf)
    else:
        dequantize_row(codes[tr][sl, kh], scales[tr][sl, kh], spec[tr, 0], spec[tr, 1], spec[tr, 2], buf)


@nb.njit(cache=True, nogil=True, fastmath=_FAST)
def _attend_item(q, kc, ks, vc, vs, kspec, vspec, krange, page, tier, slot, kh, group, t0, t1, lo, hi, pos0,
                 window, scale, rot_k, e_out, acc_out, m_out, l_out):
    """One work item: the query rows (t, h) for t in [t0, t1), h in KV head kh's group, over cache
    positions [lo, hi). Writes the unnormalised probabilities e_out [R, hi - lo], the row maxima
    m_out [R], sums l_out [R] and V sums acc_out [R, D] (rotated space when V is rotated)."""
    D = q.shape[2]
    R = (t1 - t0) * group
    n = hi - lo
    qr = np.empty((R, D), np.float32)  # [R, head_dim] the queries, rotated as K is
    for r in range(R):
        t = t0 + r // group
        h = kh * group + r % group
        for j in range(D):
            qr[r, j] = q[t, h, j]
        if rot_k:
            hadamard(qr[r])
    buf = np.empty(D, np.float32)      # [head_dim] one cached row, dequantised
    rlo = np.empty(D, np.float32)      # [head_dim] the current K page's channel minima and widths
    rw = np.empty(D, np.float32)
    pg = np.full(1, -1, np.int64)
    for r in range(R):
        m_out[r] = np.float32(-3.0e38)
    for i in range(n):
        pos = lo + i
        _row(kc, ks, kspec, krange, page, tier[pos], slot[pos], kh, pos, buf, pg, rlo, rw)
        for r in range(R):
            p = pos0 + t0 + r // group
            if pos > p or (window > 0 and pos <= p - window):
                e_out[r, i] = np.float32(-3.0e38)
            else:
                a = np.float32(0.0)
                for j in range(D):
                    a += qr[r, j] * buf[j]
                a *= scale
                e_out[r, i] = a
                m_out[r] = max(m_out[r], a)
    for r in range(R):
        tot = np.float32(0.0)
        er = e_out[r]
        mr = m_out[r]
        for i in range(n):
            x = er[i] - mr
            er[i] = ggml_expf_common(x) if x > np.float32(-87.0) else np.float32(0.0)
            tot += er[i]
        l_out[r] = tot
    acc_out[:, :] = 0.0
    for i in range(n):
        pos = lo + i
        _row(vc, vs, vspec, krange, page, tier[pos], slot[pos], kh, pos, buf, pg, rlo, rw)
        for r in range(R):
            w = e_out[r, i]
            if w != 0.0:
                ar = acc_out[r]
                for j in range(D):
                    ar[j] += w * buf[j]


@nb.njit(cache=True, parallel=True, nogil=True, fastmath=_FAST)
def attention_kv(q, kc, ks, vc, vs, kspec, vspec, krange, page, tier, slot, pos0, window, scale, rot_k, rot_v, out,
                 imp, nthreads):
    """q: [T, n_head, head_dim] (roped); kc / vc: per tier the code rows [n_slots, n_kv, row_bytes]
    uint8, ks / vs: their scales [n_slots, n_kv, n_scales] uint16; kspec / vspec: [n_tiers, 4]
    (bits, group, asym, channel-wise); krange: [n_pages, n_kv, 2, head_dim] fp16 bits, the
    per-channel ranges of each page of `page` positions (channel-wise tiers); tier / slot: [n_ctx]
    where each cached position lives; out: [T, n_head * head_dim]; imp: [n_ctx] float32, += the
    attention probability each cached position receives, summed over the query tokens and heads
    of this call (the importance score, accumulated here: no second pass over the cache). Rows are stored Hadamard-rotated where rot_k / rot_v: q is rotated the same
    way and the output rotated back. Same masking as attention(); float order free (fastmath)."""
    T, H, D = q.shape
    n_kv = kc[0].shape[1]
    group = H // n_kv
    if T == 1:  # decode: split the positions too, partial softmaxes merged below (flash-decoding)
        p = pos0
        start = 0 if window <= 0 else max(0, p - window + 1)
        n = p + 1 - start
        nsplit = max(1, min(n // 64, (2 * nthreads + n_kv - 1) // n_kv))
        chunk = (n + nsplit - 1) // nsplit
        e = np.empty((n_kv, group, n), np.float32)          # [n_kv, group, n] probabilities (unnormalised)
        acc = np.empty((n_kv, nsplit, group, D), np.float32)  # [n_kv, split, group, head_dim]
        ms = np.empty((n_kv, nsplit, group), np.float32)
        ls = np.empty((n_kv, nsplit, group), np.float32)
        for it in nb.prange(n_kv * nsplit):
            kh, sp = it // nsplit, it % nsplit
            a, b = sp * chunk, min(n, (sp + 1) * chunk)
            _attend_item(q, kc, ks, vc, vs, kspec, vspec, krange, page, tier, slot, kh, group, 0, 1, start + a,
                         start + b, pos0, window, scale, rot_k, e[kh, :, a:b], acc[kh, sp], ms[kh, sp], ls[kh, sp])
        w = np.empty(nsplit, np.float32)
        for kh in range(n_kv):
            for r in range(group):
                M = np.float32(-3.0e38)
                for sp in range(nsplit):
                    M = max(M, ms[kh, sp, r])
                L = np.float32(0.0)
                for sp in range(nsplit):
                    w[sp] = np.exp(ms[kh, sp, r] - M)
                    L += w[sp] * ls[kh, sp, r]
                o = out[0, (kh * group + r) * D:(kh * group + r + 1) * D]
                o[:] = 0.0
                for sp in range(nsplit):
                    f = w[sp] / L
                    for j in range(D):
                        o[j] += f * acc[kh, sp, r, j]
                    for i in range(sp * chunk, min(n, (sp + 1) * chunk)):
                        imp[start + i] += e[kh, r, i] * f
                if rot_v:
                    hadamard(o)
        return
    TQ = 16  # query tokens per work item
    ntile = (T + TQ - 1) // TQ
    P = pos0 + T
    part = np.zeros((ntile, n_kv, P), np.float32)  # [tile, n_kv, positions] importance per item
    for it in nb.prange(n_kv * ntile):
        kh, tl = it // ntile, it % ntile
        t0, t1 = tl * TQ, min(T, (tl + 1) * TQ)
        lo = 0 if window <= 0 else max(0, pos0 + t0 - window + 1)
        hi = pos0 + t1
        R = (t1 - t0) * group
        e = np.empty((R, hi - lo), np.float32)
        acc = np.empty((R, D), np.float32)
        ms = np.empty(R, np.float32)
        ls = np.empty(R, np.float32)
        _attend_item(q, kc, ks, vc, vs, kspec, vspec, krange, page, tier, slot, kh, group, t0, t1, lo, hi, pos0,
                     window, scale, rot_k, e, acc, ms, ls)
        pr = part[tl, kh]
        for r in range(R):
            t = t0 + r // group
            h = kh * group + r % group
            inv = np.float32(1.0) / ls[r]
            o = out[t, h * D:(h + 1) * D]
            for j in range(D):
                o[j] = acc[r, j] * inv
            if rot_v:
                hadamard(o)
            er = e[r]
            for i in range(hi - lo):
                pr[lo + i] += er[i] * inv
    for tl in range(ntile):
        for kh in range(n_kv):
            for i in range(P):
                imp[i] += part[tl, kh, i]
