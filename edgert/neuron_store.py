"""NeuronStore: one layer's FFN as neuron clusters, cached in RAM, read from flash when missing.

Decode (one token):
  1. select candidate neurons: the low-rank predictor's gate estimate (no FFN weight read), or
     the exact gate of the resident gate matrix (gate-first, PowerInfer-2's two-phase load), above
     a candidate threshold calibrated to find most (the recipe's recall) of the neurons kept;
     a neuron is kept when |act(gate) * up| is above the layer's threshold for the sparsity, and
     the kernel tests that exactly (a dropped candidate costs its gate, or gate and up, rows);
  2. map them to clusters (C neurons each, hot to cold); clusters not in the cache are queued on
     the FlashReader (O_DIRECT) into LRU slots;
  3. compute the selected neurons of the clusters already cached while the misses are in flight,
     then those of the missed clusters as they arrive (cluster-level I/O / compute overlap).
The cache is segmented: the hottest clusters are pinned in the first slots (loaded once), the
other slots are an LRU. Prefill (several tokens) runs dense through a StreamFFN when the plan has
room for its staging, else token by token through this store.
"""
from __future__ import annotations

import time

import numpy as np

from edgert.errors import EdgertError
from edgert.flash import aligned_empty
from edgert.kernels.activation import ACT_KIND
from edgert.kernels.matmul import ActBuffers, matmul, quantize_for
from edgert.kernels.quant import DOT, BLOCK, QMatrix
from edgert.kernels.sparse import predict_gate, select_above, sparse_ffn


class _ActSpec:
    """quantize_for needs a weight's type and layout only."""

    def __init__(self, qtype):
        self.qtype, self.layout = qtype, "rows"


class NeuronStore:
    def __init__(self, g, il: int, cfg, layout, n_slots: int, n_pinned: int, reader, level: int,
                 selector: str, scratch, stream, stats, gate: QMatrix | None = None, nthreads: int = 1,
                 measure_recall: bool = False, cached_candidates: bool = True):
        p = f"blk.{il}."
        self.il, self.C, self.L = il, layout.C, layout
        self.E, self.n_ff = cfg.n_embd, cfg.n_ff
        self.act = ACT_KIND[cfg.ffn_act]
        self.reader, self.stream, self.stats, self.s = reader, stream, stats, scratch
        self.selector, self.gate = selector, gate
        self.cached_candidates = cached_candidates
        self.measure_recall = measure_recall and gate is not None
        t = g.tensors[p + "ffn_clusters"]
        self.cl_offset, self.n_clusters = t.offset, t.rows
        self.perm = g.raw(p + "ffn_perm").view(np.int32).copy()                  # [n_ff] hot pos -> neuron
        self.inv_perm = np.empty_like(self.perm)                                 # [n_ff] neuron -> hot pos
        self.inv_perm[self.perm] = np.arange(self.n_ff, dtype=np.int32)
        self.thresh = float(g.raw(p + "ffn_thresh").view(np.float32)[level])      # |act(g) * u|
        self.gthresh = float(g.raw(p + "gate_thresh").view(np.float32)[level])    # |act(g)| candidates
        self.pthresh = float(g.raw(p + "pred_thresh").view(np.float32)[level])
        r = int(g.tensors[p + "pred_a"].shape[1])
        self.a_q = g.raw(p + "pred_a").view(np.int8).reshape(r, self.E).copy()        # [r, E]
        self.a_s = g.raw(p + "pred_a_scale").view(np.float32).copy()                   # [r]
        self.b_q = g.raw(p + "pred_b").view(np.int8).reshape(self.n_ff, r).copy()      # [n_ff, r] hot order
        self.b_s = g.raw(p + "pred_b_scale").view(np.float32).copy()                   # [n_ff]
        for n in ("ffn_perm", "ffn_thresh", "gate_thresh", "pred_a", "pred_a_scale", "pred_b", "pred_b_scale", "pred_thresh"):
            g.release(p + n)
        self.gtype, self.utype = layout.gate_type, layout.up_type
        self.nblk_g = self.E // BLOCK[self.gtype][0]
        self.nblk_u = self.E // BLOCK[self.utype][0]
        same = DOT[self.gtype] == DOT[self.utype]
        self.act_u = scratch.act_e if same else ActBuffers(1, self.E)  # up's input format, if another
        # the cache: slots of whole clusters, exactly as in the file
        n_slots = min(n_slots, self.n_clusters)
        self.n_pinned = min(n_pinned, n_slots)
        self.slots = aligned_empty(n_slots * layout.nbytes).reshape(n_slots, layout.nbytes)  # [n_slots, CB]
        self.slots_i8 = self.slots.view(np.int8)
        self.slots_f32 = self.slots.view(np.float32)
        self.slot_of = np.full(self.n_clusters, -1, np.int64)   # [n_clusters] slot or -1
        self.cluster_in = np.full(n_slots, -1, np.int64)        # [n_slots] cluster or -1
        self.stamp = np.zeros(n_slots, np.int64)                # [n_slots] last use (LRU)
        self.stamp[:self.n_pinned] = np.iinfo(np.int64).max      # pinned: never evicted
        self.tick = 0
        # per-token scratch
        self.h = np.empty(r, np.float32)                        # [r]
        self.pred = np.empty(self.n_ff, np.float32)             # [n_ff] predicted / exact gate
        self.idx = np.empty(self.n_ff, np.int64)                # [n_ff] selected hot positions
        self.sel = np.empty(self.n_ff, np.int64)                # [n_ff] slot * C + row
        self.gsel = np.empty(self.n_ff, np.float32)             # [n_ff] exact gate of selected (gate-first)
        self.acts = np.empty(self.n_ff, np.float32)             # [n_ff]
        self.part = np.zeros((nthreads, self.E), np.float32)    # [threads, E]
        self.out2 = np.empty(self.E, np.float32)                # [E]
        self.nthreads = nthreads
        self.no_gate = np.empty(0, np.float32)
        self.xq_spec = _ActSpec(self.gtype)
        self.xu_spec = None if same else _ActSpec(self.utype)
        self.section = (layout.gate_bytes, layout.updown_bytes) if selector == "gate" else (0, layout.nbytes)

    # ---------------------------------------------------------------------------------------

    def pin_hottest(self):
        """Fill the pinned slots with the hottest clusters (one sequential read)."""
        n = self.n_pinned
        if n:
            self.reader.read_into(self.cl_offset, self.slots[:n].reshape(-1))
            self.stats.bytes_read += self.slots[:n].nbytes
            self.slot_of[:n] = np.arange(n)
            self.cluster_in[:n] = np.arange(n)

    def _select(self, x) -> int:
        """Hot positions of the active neurons into self.idx; returns how many."""
        if self.selector == "gate":
            g = self.pred.reshape(1, -1)
            matmul(self.gate, x.reshape(1, -1), g, self.s.act_e)   # exact gate, source order
            n = select_above(self.act, self.pred, self.gthresh, self.idx)
            pick = np.zeros(self.n_ff, np.bool_)           # [n_ff] hot order
            pick[self.inv_perm[self.idx[:n]]] = True
            self.idx[:n] = np.flatnonzero(pick)             # sorted hot positions, O(n_ff)
            self.gsel[:n] = self.pred[self.perm[self.idx[:n]]]
            return n
        predict_gate(x, self.a_q, self.a_s, self.b_q, self.b_s, self.h, self.pred)
        n = select_above(self.act, self.pred, self.pthresh, self.idx)
        if self.cached_candidates:
            # every neuron of a cached cluster is a candidate too: it costs no read, and the kernel's
            # exact tests decide (the predictor misses neurons with large products: measured +57%
            # perplexity at 30% sparsity on Qwen2.5-Coder-0.5B when it alone decides)
            pick = np.zeros(self.n_clusters * self.C, np.bool_)   # [clusters * C] hot positions
            pick[self.idx[:n]] = True
            pick.reshape(self.n_clusters, self.C)[self.slot_of >= 0] = True
            sel = np.flatnonzero(pick[:self.n_ff])
            n = len(sel)
            self.idx[:n] = sel
        if self.measure_recall:  # the exact gate's candidates, against the predictor's
            g = np.empty((1, self.n_ff), np.float32)
            matmul(self.gate, x.reshape(1, -1), g, self.s.act_e)
            exact = np.empty(self.n_ff, np.int64)
            k = select_above(self.act, g[0], self.gthresh, exact)
            picked = np.zeros(self.n_ff, np.bool_)
            picked[self.idx[:n]] = True
            self.stats.recall_hits += int(picked[self.inv_perm[exact[:k]]].sum())
            self.stats.recall_total += k
        return n

    def __call__(self, xn, out):
        if xn.shape[0] > 1:
            if self.stream is not None:
                self.stream(xn, out)
            else:
                for t in range(xn.shape[0]):
                    self(xn[t:t + 1], out[t:t + 1])
            return
        st = self.stats
        x = xn[0]
        n = self._select(x)
        self.last_computed = []  # hot positions computed this token (filled by _compute)
        idx = self.idx[:n]
        cl = idx // self.C
        need = np.flatnonzero(np.bincount(cl, minlength=self.n_clusters))  # idx is sorted: clusters in order
        self.tick += 1
        slot = self.slot_of[need]
        miss = need[slot < 0]
        hit_slots = slot[slot >= 0]
        self.stamp[hit_slots[hit_slots >= self.n_pinned]] = self.tick
        st.clusters_needed += len(need)
        st.clusters_hit += len(need) - len(miss)
        st.neurons_total += self.n_ff
        st.neurons_selected += n
        # the input quantised once for gate and up (twice if their formats differ)
        xq = quantize_for(self.xq_spec, xn, self.s.act_e)
        xu = xq if self.xu_spec is None else quantize_for(self.xu_spec, xn, self.act_u)
        # misses go into LRU slots in rounds: all at once when enough slots are free, else half the
        # LRU region at a time, round i + 1 read into one half while round i is computed
        lru = np.arange(self.n_pinned, len(self.stamp))
        if len(miss) and len(lru) == 0:
            raise EdgertError(f"layer {self.il}: the neuron cache has no LRU slot for a missed cluster")
        half = max(1, len(lru) // 2)
        free = lru[self.stamp[lru] < self.tick]
        remaining = miss
        cur = None
        if len(remaining) and len(free):
            k = len(remaining) if len(remaining) <= len(free) else min(half, len(free))
            free = free[np.argsort(self.stamp[free], kind="stable")]
            cur = self._issue(remaining[:k], free[:k])
            remaining = remaining[k:]
        slot_of_sel = self.slot_of[cl]
        self._compute(idx, slot_of_sel, slot_of_sel >= 0, xq, xu, out, skip=cur)   # hits, while misses arrive
        while cur is not None or len(remaining):
            if cur is None:  # nothing in flight: the hits' slots are free now
                k = min(len(remaining), half)
                cur = self._issue(remaining[:k], lru[np.argsort(self.stamp[lru], kind="stable")][:k])
                remaining = remaining[k:]
            clusters, slots, futs = cur
            t0 = time.perf_counter()
            for f in futs:
                f.result()
            st.io_wait_s += time.perf_counter() - t0
            nxt = None
            if len(remaining):
                others = lru[~np.isin(lru, slots)]
                others = others[np.argsort(self.stamp[others], kind="stable")]
                k = min(len(remaining), half, len(others))
                if k:
                    nxt = self._issue(remaining[:k], others[:k])
                    remaining = remaining[k:]
            mine = np.zeros(self.n_clusters, np.bool_)
            mine[clusters] = True
            slot_of_sel = self.slot_of[cl]
            self._compute(idx, slot_of_sel, mine[cl] & (slot_of_sel >= 0), xq, xu, self.out2)
            out[0] += self.out2
            cur = nxt
        self.last_computed = np.concatenate(self.last_computed) if self.last_computed else idx[:0]

    def _issue(self, clusters, slots) -> list:
        """Map clusters into slots (evicting what they held) and queue their reads."""
        old = self.cluster_in[slots]
        self.slot_of[old[old >= 0]] = -1
        self.cluster_in[slots] = clusters
        self.slot_of[clusters] = slots
        self.stamp[slots] = self.tick
        off0, nb = self.section
        self.stats.bytes_read += len(clusters) * nb
        return clusters, slots, [self.reader.submit(self.cl_offset + int(c) * self.L.nbytes + off0,
                                                    self.slots[s, off0:off0 + nb]) for c, s in zip(clusters, slots)]

    def _compute(self, idx, slot_of_sel, mask, xq, xu, out, skip=None):
        """out = the FFN of the selected neurons in mask (skip: a round in flight, not ready)."""
        if skip is not None:
            busy = np.zeros(self.n_clusters, np.bool_)
            busy[skip[0]] = True
            mask = mask & ~busy[idx // self.C]
        m = np.flatnonzero(mask)
        k = len(m)
        o = out[0] if out.ndim == 2 else out
        if k == 0:
            o[:] = 0.0
            return
        self.sel[:k] = slot_of_sel[m] * self.C + (idx[m] - (idx[m] // self.C) * self.C)
        if self.selector == "gate":  # exact gates, already above the candidate threshold
            gate_in, gthresh = self.gsel[m], np.float32(-1.0)
        else:                        # predicted: the exact gate is the first test, in the kernel
            gate_in, gthresh = self.no_gate, np.float32(self.gthresh)
        sparse_ffn(self.gtype, self.utype, self.L.down_type, self.act, self.slots, self.slots_i8, self.slots_f32, self.C,
                   self.L.lay, xq[0][0], xq[1][0], xq[2][0], self.nblk_g, xu[0][0], xu[1][0], xu[2][0],
                   self.nblk_u, self.sel, k, gate_in, gthresh, np.float32(self.thresh), self.acts, self.part,
                   o, self.nthreads)
        done = self.acts[:k] != 0
        self.stats.neurons_computed += int(np.count_nonzero(done))
        self.last_computed.append(idx[m][done])
