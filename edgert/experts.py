"""ExpertStore: one layer's mixture-of-experts FFN, its experts resident or read from flash.

    store(xn, out)   xn [T, n_embd] normed input -> out [T, n_embd]

Per call: the router (resident) gives each token its top-k experts and weights (kernels/moe.py,
llama.cpp's float order); each routed expert computes the tokens routed to it; the outputs are
weighted and summed in slot order as llama.cpp does, so where the experts live never changes the
result. The experts come from an `Experts` source:

- ResidentExperts: every expert's matrices in RAM (a model that fits);
- ExpertCache: per layer a share of slots; a routed expert not cached is read from flash through
  the FlashReader (O_DIRECT) and repacked into a slot, evicting the least recently used with a
  frequency bias (an expert used often survives a short gap). Prefill warms it with the prompt's
  routing. With prefetch, after a decode step's layer l the store applies layer l+1's norm and
  router to the hidden state (pre-gating, training-free) and queues reads of the predicted
  experts, which arrive while layer l+1's attention runs.
  Streaming (`ffn stream`): no cache and no prefetch, every routed expert read on every use.

Expert matrices are either slices of the GGUF's stacked `ffn_{gate,up,down}_exps` tensors or,
in an edgert package, each expert's own tensors `blk.N.ffn_{gate,up,down}_exps.E.weight` at its
own type (bit width chosen at convert time).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from edgert.errors import EdgertError
from edgert.flash import aligned_empty
from edgert.kernels.matmul import matmul
from edgert.kernels.moe import route, router_f32, shared_gate, top_k
from edgert.kernels.norm import rmsnorm
from edgert.kernels.quant import KQUANTS, QMatrix, TYPE_NAMES, repack, repacked_nbytes, row_bytes
from edgert.settings import env

EXPERT_NAMES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
FREQ_BIAS = 2.0  # calls of this layer one past use is worth in the eviction score (x log2(1 + uses))


@dataclass(frozen=True)
class ExpertMatrix:
    """One expert matrix's bytes in the file."""
    name: str        # tensor name (and expert, for a slice of a stacked tensor)
    qtype: int
    rows: int
    cols: int
    offset: int      # absolute file offset
    nbytes: int


def expert_name(il: int, kind: str, e: int) -> str:
    """A package's per-expert tensor: kind in EXPERT_NAMES."""
    return f"blk.{il}.{kind}.{e}.weight"


def expert_matrices(g, c, il: int) -> list[tuple[ExpertMatrix, ExpertMatrix, ExpertMatrix]]:
    """Layer il's experts: [(gate, up, down)] per expert, every shape and type checked."""
    E, F, X = c.n_embd, c.n_ff, c.n_expert
    shapes = {"ffn_gate_exps": (F, E), "ffn_up_exps": (F, E), "ffn_down_exps": (E, F)}
    out = [[None] * 3 for _ in range(X)]
    for k, kind in enumerate(EXPERT_NAMES):
        rows, cols = shapes[kind]
        stacked = f"blk.{il}.{kind}.weight"
        if stacked in g.tensors:
            t = g.check_type(stacked)
            if tuple(t.shape) != (cols, rows, X):
                raise EdgertError(f"{g.path}: tensor '{stacked}' has shape {list(t.shape)}, expected "
                                  f"[{cols}, {rows}, {X}]")
            per = rows * row_bytes(t.qtype, cols)
            if t.nbytes != X * per:
                raise EdgertError(f"{g.path}: tensor '{stacked}' size {t.nbytes} does not match its shape")
            for e in range(X):
                out[e][k] = ExpertMatrix(f"{stacked}[{e}]", t.qtype, rows, cols, t.offset + e * per, per)
            continue
        for e in range(X):
            n = expert_name(il, kind, e)
            if n not in g.tensors:
                raise EdgertError(f"{g.path}: missing tensor '{stacked}' (or the package's per-expert '{n}')")
            t = g.check_type(n)
            if (t.rows, t.cols) != (rows, cols) or len(t.shape) != 2:
                raise EdgertError(f"{g.path}: tensor '{n}' has shape {list(t.shape)}, expected [{cols}, {rows}]")
            if t.nbytes != rows * row_bytes(t.qtype, cols):
                raise EdgertError(f"{g.path}: tensor '{n}' size {t.nbytes} does not match its shape")
            out[e][k] = ExpertMatrix(n, t.qtype, rows, cols, t.offset, t.nbytes)
    return [tuple(x) for x in out]


def held_nbytes(ms) -> int:
    """RAM of one expert's matrices once repacked."""
    return sum(repacked_nbytes(m.qtype, m.rows, m.cols) for m in ms)


def raw_nbytes(ms) -> int:
    """Bytes read from flash for one expert (each matrix page-padded in the staging buffer)."""
    return sum(-(-m.nbytes // 4096) * 4096 for m in ms)


class ResidentExperts:
    """Every expert's matrices in RAM."""

    def __init__(self, g, layers):
        self.layers = layers                                                                 # [il][e] -> ExpertMatrix triple
        self.m = [[tuple(_load(g, x) for x in ms) for ms in experts] for experts in layers]   # [il][e] -> (g, u, d)
        self.nbytes = sum(w.nbytes for lay in self.m for ms in lay for w in ms)

    prefetch_on = False

    def begin(self, il, experts):
        pass

    def get(self, il, e, stats):
        stats.hits += 1
        return self.m[il][e]


def _load(g, x: ExpertMatrix) -> QMatrix:
    raw = np.frombuffer(g._mm, np.uint8, x.nbytes, x.offset)
    q = repack(x.qtype, raw, x.rows, x.cols)
    g._release_range(x.offset, x.nbytes)
    return q


class _Entry:
    __slots__ = ("e", "mats", "buf", "futs", "last", "origin")

    def __init__(self, e, last, origin):
        self.e, self.mats, self.buf, self.futs, self.last, self.origin = e, None, None, None, last, origin


def expert_shares(slots: int, n_layer: int) -> list:
    """slots spread over the layers: every layer gets slots // n_layer, the first slots % n_layer
    one more (0 slots: streaming, no shares)."""
    return [slots // n_layer + (il < slots % n_layer) for il in range(n_layer)]


class ExpertCache:
    """The bytes of `slots` experts (at the largest expert's size) held (repacked) in RAM, shared
    out evenly over the layers (expert_shares), the others read from flash when routed. A layer's
    share is bytes, not a count: with per-expert bit widths (converters/expert_bits.py) a share
    holds more of the smaller experts; with one type throughout it holds exactly its slots.

    slots = 0 streams: each routed expert is read when routed, used and dropped (no cache, no
    prefetch; the reads of one call in flight together, as many as there are staging buffers)."""

    def __init__(self, reader, layers, slots: int, stats, prefetch: bool = True, k: int = 2):
        self.reader, self.layers, self.slots = reader, layers, slots     # layers: [il][e] -> ExpertMatrix triple
        self.share = expert_shares(slots, len(layers))                   # [il] experts layer il may hold
        self.stats = stats                                               # StoreStats (bytes, I/O wait)
        self.stream = slots == 0
        self.prefetch_on = prefetch and not self.stream
        self.cached = [dict() for _ in layers]                           # [il] e -> _Entry
        self.queue = [[] for _ in layers]                                # stream: routed experts not yet issued
        self.tick = [0] * len(layers)                                    # calls of each layer
        self.uses = [np.zeros(len(x), np.int64) for x in layers]         # [il][e] times routed (frequency)
        n = max(raw_nbytes(ms) for lay in layers for ms in lay)
        # staging for reads in flight: a call's misses (top-k) and the next layer's prefetch
        self.n_stage = max(2, 2 * k)
        self.stage = [aligned_empty(n) for _ in range(self.n_stage)]      # n_stage x [largest expert's bytes]
        self.free_stage = list(range(self.n_stage))
        self.inflight = []                                               # [(il, entry)] oldest first
        self.held = max(held_nbytes(ms) for lay in layers for ms in lay)
        self.held_of = [[held_nbytes(ms) for ms in lay] for lay in layers]  # [il][e] RAM once repacked
        self.share_bytes = [n * self.held for n in self.share]             # [il] bytes layer il may hold
        self.used = [0] * len(layers)                                      # [il] bytes it holds

    @staticmethod
    def plan_bytes(layers, slots: int, k: int) -> int:
        """RAM of a cache of `slots` experts in all (0: streaming) with its staging: held experts
        (streaming: as many as reads in flight) + the one a call still computes with when its
        entry is evicted + the staging buffers."""
        held = max(held_nbytes(ms) for lay in layers for ms in lay)
        n = max(raw_nbytes(ms) for lay in layers for ms in lay)
        n_stage = max(2, 2 * k)
        return ((slots or n_stage) + 1) * held + n_stage * n

    @property
    def nbytes(self) -> int:
        return self.plan_bytes(self.layers, self.slots, self.n_stage // 2)

    def _issue(self, il, ent):
        while not self.free_stage:   # every staging buffer busy: land the oldest read first
            self._finish(*self.inflight[0])
        b = self.free_stage.pop()
        buf, o, futs = self.stage[b], 0, []
        for m in self.layers[il][ent.e]:
            futs.append(self.reader.submit(m.offset, buf[o:o + m.nbytes]))
            o += -(-m.nbytes // 4096) * 4096
        ent.buf, ent.futs = b, futs
        self.inflight.append((il, ent))
        self.stats.bytes_read += sum(m.nbytes for m in self.layers[il][ent.e])

    def _finish(self, il, ent):
        """Wait for ent's read (counted as I/O wait) and repack it."""
        t0 = time.perf_counter()
        for f in ent.futs:
            f.result()
        self.stats.io_wait_s += time.perf_counter() - t0
        buf, o, mats = self.stage[ent.buf], 0, []
        for m in self.layers[il][ent.e]:
            mats.append(repack(m.qtype, buf[o:o + m.nbytes], m.rows, m.cols))
            o += -(-m.nbytes // 4096) * 4096
        self.free_stage.append(ent.buf)
        self.inflight.remove((il, ent))
        ent.mats, ent.buf, ent.futs = tuple(mats), None, None

    def _victim(self, il, keep):
        """The entry to evict: lowest last use + FREQ_BIAS * log2(1 + uses), not in keep."""
        best, score = None, None
        for e, ent in self.cached[il].items():
            if e in keep:
                continue
            s = ent.last + FREQ_BIAS * math.log2(1 + self.uses[il][e])
            if score is None or s < score:
                best, score = e, s
        return best

    def _admit(self, il, e, keep, origin) -> "_Entry | None":
        """A new entry for e, its read queued; evicts if the layer's share is full (None: all kept)."""
        d = self.cached[il]
        need = self.held_of[il][e]
        while d and (len(d) >= self.n_stage if self.stream else self.used[il] + need > self.share_bytes[il]):
            v = self._victim(il, keep)
            if v is None:
                return None
            old = d.pop(v)
            self.used[il] -= self.held_of[il][v]
            if old.futs is not None:   # an unused prefetch: its read lands before its buffer is reused
                self._finish(il, old)
        self.used[il] += need
        ent = d[e] = _Entry(e, self.tick[il], origin)
        self._issue(il, ent)
        return ent

    def _request(self, il, experts, origin):
        keep = set(experts)
        for e in experts:
            if e not in self.cached[il] and self._admit(il, e, keep, origin) is None:
                return

    def prefetch(self, il, experts):
        if self.prefetch_on:
            self._request(il, experts, "prefetch")

    def begin(self, il, experts):
        """A call of layer il routing to `experts` (unique): its misses queued at once."""
        self.tick[il] += 1
        self.uses[il][experts] += 1
        if self.stream:
            self.queue[il] = [int(e) for e in experts]
            self._request(il, self.queue[il][:self.n_stage], "demand")
            del self.queue[il][:self.n_stage]
        else:
            self._request(il, [int(e) for e in experts], "demand")

    def get(self, il, e, stats):
        ent = self.cached[il].get(e)
        if ent is None:      # the layer's share was full with this call's other experts
            ent = self._admit(il, e, {e}, "demand")
        if ent.origin == "demand":
            stats.misses += 1
        else:
            stats.hits += 1
        ent.origin, ent.last = None, self.tick[il]
        if ent.futs is not None:
            self._finish(il, ent)
        mats = ent.mats
        if self.stream:      # dropped after this use; the next routed expert's read queued
            del self.cached[il][e]
            self.used[il] -= self.held_of[il][e]
            if self.queue[il]:
                self._request(il, [self.queue[il].pop(0)], "demand")
        return mats


def moe_buffers(cfg, B: int) -> SimpleNamespace:
    """The expert stores' buffers for batches of B tokens (budget.scratch_bytes counts them)."""
    E, X, k = cfg.n_embd, cfg.n_expert, cfg.n_expert_used
    return SimpleNamespace(
        logits=np.empty((B, X), np.float32),      # [B, n_expert] router logits
        idx=np.empty((B, k), np.int32),           # [B, k] routed experts
        w=np.empty((B, k), np.float32),           # [B, k] their weights
        y=np.empty((B, k, E), np.float32),        # [B, k, n_embd] weighted expert outputs
        xg=np.empty((B, E), np.float32),          # [B, n_embd] the tokens of one expert
        yg=np.empty((B, E), np.float32),          # [B, n_embd]
        h=np.empty((1, E), np.float32),           # [1, n_embd] next layer's router input
        pidx=np.empty((1, k), np.int32))          # [1, k] predicted experts


class ExpertStore:
    """One layer's MoE FFN (see the module docstring); `next` is layer il+1's store (prefetch)."""

    def __init__(self, il: int, cfg, router: QMatrix, experts, scratch, stats, resid, bufs,
                 shared=None):
        self.il, self.c, self.router, self.experts, self.s, self.stats = il, cfg, router, experts, scratch, stats
        self.k, self.n_expert = cfg.n_expert_used, cfg.n_expert
        self.resid = resid                  # the model's residual stream [B, n_embd] (x before this FFN's output)
        self.shared = shared                # qwen2moe: (gate_inp_shexp [1, E], gate, up, down) or None
        self.next = None                    # layer il + 1's store (set by the model)
        self.predicted = None               # experts the previous layer predicted for this one
        # bufs: moe_buffers, one set every layer's store shares (the layers run in turn)
        b = bufs
        self.logits, self.idx, self.w, self.y, self.xg, self.yg, self.h, self.pidx = (
            b.logits, b.idx, b.w, b.y, b.xg, b.yg, b.h, b.pidx)

    def __call__(self, xn, out):
        T, ops, s = xn.shape[0], self.s.ops, self.s
        logits, idx, w, y = self.logits[:T], self.idx[:T], self.w[:T], self.y[:T]
        ops.router(self.router, xn, logits, s.act_e)
        route(logits, self.k, self.c.moe_norm_w, idx, w)
        used = np.unique(idx)
        if self.predicted is not None:
            st = self.stats
            right = len(np.intersect1d(self.predicted, used))
            st.predicted += len(self.predicted)
            st.predicted_right += right
            st.routed_predicted += len(used)
            self.predicted = None
        self.experts.begin(self.il, used)
        for e in used:
            tok, slot = np.nonzero(idx == e)
            g, u, d = self.experts.get(self.il, int(e), self.stats)
            n = len(tok)
            xg, yg = self.xg[:n], self.yg[:n]
            xg[:] = xn[tok]
            # one token a call for the K-quants: llama.cpp's mul_mat_id computes each token as a
            # vector product, which their batched kernels round differently (kernels/quant.py)
            step = 1 if (g.qtype in KQUANTS or d.qtype in KQUANTS) and env("EDGERT_MODE") != "fast" else n
            for t0 in range(0, n, step):
                _expert_ffn(g, u, d, xg[t0:t0 + step], yg[t0:t0 + step], s)
            y[tok, slot] = yg * w[tok, slot, None]
        out[:] = y[:, 0]
        for j in range(1, self.k):
            out += y[:, j]
        if self.shared is not None:
            self._shared(xn, out)
        if T == 1 and self.next is not None and self.experts.prefetch_on:
            self._predict_next(out)

    def _shared(self, xn, out):
        """qwen2moe: out += sigmoid(gate_inp_shexp . xn) * ffn_shexp(xn)."""
        T, s = xn.shape[0], self.s
        gi, g, u, d = self.shared
        sg = np.empty((T, 1), np.float32)
        s.ops.router(gi, xn, sg, s.act_e)
        ys = self.yg[:T]
        _expert_ffn(g, u, d, xn, ys, s)
        shared_gate(sg)
        out += ys * sg

    def _predict_next(self, out):
        """Layer il+1's router on the hidden state after this layer (its input but for its own
        attention): queue reads of the experts it picks."""
        nx = self.next
        h = self.h
        np.add(self.resid[:1], out, h)
        rmsnorm(h, nx.norm_w, self.c.rms_eps, h)
        lg = nx.logits[:1]
        self.s.ops.router(nx.router, h, lg, self.s.act_e)
        top_k(lg, self.k, self.pidx)
        nx.predicted = np.sort(self.pidx[0])
        self.experts.prefetch(nx.il, [int(e) for e in nx.predicted])


def router_logits(w, x, out, act):
    """out[T, n_expert] = x @ w.T: an F32 router (an array [n, E]) in llama.cpp's F32 order, else
    the quantised matmul (act: the model's activation buffers)."""
    if isinstance(w, np.ndarray):
        router_f32(w, x, out)
    else:
        matmul(w, x, out, act)


def plain_router(qtype: int, cols: int) -> bool:
    """Whether a router is held as a plain float32 array (its file bytes) rather than repacked."""
    return qtype == 0 and cols % 32 == 0


def load_router(g, name: str, rows: int, cols: int):
    """A router matrix: F32 as a plain array [rows, cols] (router_logits), other types repacked."""
    t = g.tensor(name)
    if plain_router(t.qtype, cols):
        if t.rows != rows or t.cols != cols or t.nbytes != 4 * rows * cols:
            raise EdgertError(f"{g.path}: tensor '{name}' has shape {list(t.shape)}, expected [{cols}, {rows}]")
        return g.raw(name).view(np.float32).reshape(rows, cols).copy()
    return g.load(name, rows, cols)


def _expert_ffn(g, u, d, x, y, s):
    """y[T, E] = down(silu(gate(x)) * up(x)) for one expert, in the model's scratch."""
    T = x.shape[0]
    gate, up = s.gate[:T], s.up[:T]
    s.ops.gate_up(x, [(g, gate), (u, up)], s.act_e)
    s.ops.act(gate, up, gate)
    s.ops.ffn_down(d, gate, y, s.act_q)
