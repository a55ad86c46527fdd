"""The KV cache: an object with a format (DESIGN.md, "KV cache is an object with a format").

- `f16` for both K and V: fp16 rows and llama.cpp's float order (kernels/attention.py
  `attention`), bit for bit.
- A uniform quantised type per row (`q8_0`, `q4_0` as llama.cpp computes them; edgert's
  asymmetric `q8`, `q4`, `q3`, `q2` with one fp16 scale and minimum per 64 values), rows
  Hadamard-rotated per head before quantising (RotateKV, as llama.cpp now does; q rotated alike,
  the output rotated back).
- `auto`: token-adaptive bit widths (EdgeQAT's idea applied to the cache). Each cached position
  (every KV head's row of one layer) lives in one of three tiers. Attention sinks (the first
  `sinks` positions) and the recent `window` stay in the top tier (K fp16, V q8_0); a position leaving
  the window goes to the middle tier if its importance (the mean attention probability it has
  received per query token, accumulated inside the attention kernel) beats the least important
  position there, which is then demoted to the bottom tier, requantised in place; else to the
  bottom tier. The middle tier's share follows the bit budget `--kv-bits` at every length: the
  memory held is the budget's from the start (tiers sized for n_ctx positions), and the bits in
  use are within it once the context is long enough to pay for the top tier (n0 (b0 - b2) /
  (B - b2) positions). Lost bits cannot come back, so positions are never promoted.
  Below the top tier K is quantised channel-wise (KIVI): each page of `page` positions has a
  per-channel min and max (fp16), and every position's K row is coded against them at its own
  bit width. Measured on real models (docs/kv-cache.md), per-row K quantisation is what breaks
  small models (Qwen2.5-Coder-0.5B: perplexity 9.5 -> 46 with 4-bit rows), because K's channels
  have large, slowly rotating offsets; channel-wise ranges over nearby positions fit them. V stays
  per row (rotated), where it errs least.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numba as nb
import numpy as np

from edgert.errors import EdgertError
from edgert.kernels.attention import attention_buf, attention_kv, store_kv
from edgert.kernels.kv_quant import (dequantize_row, dequantize_row_ranged, hadamard, page_range, quantize_row,
                                     quantize_row_ranged)

log = logging.getLogger(__name__)


PAGE = 64  # positions sharing K's per-channel ranges (auto's lower tiers)


@dataclass(frozen=True)
class KVType:
    name: str
    bits: int      # code bits per value
    group: int     # values per scale (0: none)
    asym: bool     # a minimum per group as well as a scale
    channel: bool = False  # K coded against per-channel ranges of its page (auto's lower tiers)

    def row_bytes(self, D: int) -> int:
        return D * self.bits // 8

    def n_scales(self, D: int) -> int:
        return 0 if self.group == 0 or self.channel else D // self.group * (2 if self.asym else 1)

    def bits_per_value(self, D: int, page: int = PAGE) -> float:
        """Bits per cached value, scales included (a channel-wise row: its share of its page's
        fp16 min and max per channel)."""
        return (self.row_bytes(D) + 2 * self.n_scales(D)) * 8 / D + (32 / page if self.channel else 0.0)

    def channelwise(self) -> "KVType":
        return KVType(self.name, self.bits, 0, True, True)


# name -> type; names as llama.cpp's -ctk / -ctv where llama.cpp has the type
KV_TYPES = {t.name: t for t in (
    KVType("f16", 16, 0, False),
    KVType("q8_0", 8, 32, False),   # llama.cpp's q8_0: scale per 32, x = d * q
    KVType("q4_0", 4, 32, False),   # llama.cpp's q4_0: scale per 32, x = d * (q - 8)
    KVType("q8", 8, 64, True),      # edgert: scale and minimum per 64
    KVType("q4", 4, 64, True),
    KVType("q3", 3, 64, True),
    KVType("q2", 2, 64, True),
)}
TYPE_NAMES = tuple(KV_TYPES) + ("auto",)
TOP = "f16/q8_0"  # auto's top tier (sinks, recent window): K fp16 (its channel ranges come from it), V q8_0
# auto's lower tiers: two adjacent rungs of this K/V ladder (bits per value 8.5, 6.5, 4.5, 3.5, 3).
# K gets the bits: measured on Qwen2.5-Coder-0.5B at 2,048 positions, V at 2 bits below the top
# tier costs little (attention weights the error of a V row by the row's probability), K at 2 bits
# a lot, 3 bits little (docs/kv-cache.md)
LADDER = ("q8", "q8/q4", "q4", "q4/q2", "q3/q2")
N_TIERS = 3


def kv_type(name: str, D: int, flag: str) -> KVType:
    t = KV_TYPES.get(name)
    if t is None:
        raise EdgertError(f"{flag} {name}: unknown KV cache type (one of {', '.join(TYPE_NAMES)})")
    if t.group and D % min(t.group, D):
        raise EdgertError(f"{flag} {name}: head size {D} is not a multiple of the type's group {t.group}")
    if t.group > D:  # a head smaller than the group: one group per head
        t = KVType(t.name, t.bits, D, t.asym)
    return t


@dataclass(frozen=True)
class KVFormat:
    """What the user asked for: -ctk, -ctv, --kv-bits (auto's average bits per cached value,
    scales included), --kv-tiers (auto's three types, top to bottom), sinks and window."""
    type_k: str = "f16"
    type_v: str = "f16"
    bits: float | None = None
    tiers: tuple | None = None
    sinks: int = 4
    window: int = 64
    rotate: bool = True

    @property
    def adaptive(self) -> bool:
        return "auto" in (self.type_k, self.type_v)

    def max_batch(self, n_ctx: int) -> int:
        """The most tokens one store may add (auto: the window holds a whole batch)."""
        return self.window if self.adaptive else n_ctx

    def label(self) -> str:
        s = f"K {self.type_k} V {self.type_v}"
        if self.adaptive:
            s += f" ({self.bits:g} bits)"
        return s


def f16_nbytes(n_layer: int, n_kv: int, D: int, n_ctx: int) -> int:
    """An f16 cache's K and V bytes (the reference the other formats are measured against)."""
    return 2 * n_layer * n_ctx * n_kv * D * 2


def _tier_counts(N, n0, b, B):
    """Rows allowed in the middle tier when N rows are cached, n0 of them in the top tier, tier
    row bits b = (b0, b1, b2), average budget B bits per row: b0 n0 + b1 n1 + b2 (N - n0 - n1) <= B N."""
    if b[1] <= b[2]:
        return N - n0
    return int(max(0.0, min(N - n0, (B * N - b[0] * n0 - b[2] * (N - n0)) / (b[1] - b[2]))))


@dataclass(frozen=True)
class KVLayout:
    """The cache's shape for a format: per tier the K and V types and the rows each layer holds."""
    tiers_k: tuple
    tiers_v: tuple
    n_slots: tuple    # positions per layer in each tier (a position: every KV head's row)
    row_bits: tuple   # bits per cached value of a row in each tier (K and V averaged, scales included)

    def nbytes(self, n_layer: int, n_kv: int, D: int, n_ctx: int) -> int:
        pools = sum(n * n_kv * (tk.row_bytes(D) + 2 * tk.n_scales(D) + tv.row_bytes(D) + 2 * tv.n_scales(D))
                    for tk, tv, n in zip(self.tiers_k, self.tiers_v, self.n_slots))
        # tier int8, slot int32, importance float32 per position; the free-slot stacks int32; K's
        # per-channel ranges (fp16 min and max) per page and head
        if len(self.n_slots) == 1:  # f16: the float32 rows attention converts to, once per process
            return n_layer * pools + 2 * n_ctx * n_kv * D * 4
        maps = n_ctx * (1 + 4 + 4) + sum(self.n_slots) * 4
        if any(t.channel for t in self.tiers_k):
            maps += -(-n_ctx // PAGE) * n_kv * 2 * D * 2
        return n_layer * (pools + maps)


@functools.lru_cache(maxsize=64)  # the plan, the budget and the cache each ask for the same format
def layout(n_kv: int, D: int, n_ctx: int, f: KVFormat) -> KVLayout:
    """The types and tier sizes for format f (errors name the flag at fault)."""
    def bits(tk, tv):
        return tuple((a.bits_per_value(D) + b.bits_per_value(D)) / 2 for a, b in zip(tk, tv))
    if f.type_k == f.type_v == "f16":
        t = (KV_TYPES["f16"],)
        return KVLayout(t, t, (n_ctx,), (16.0,))
    if not f.adaptive:
        tk, tv = (kv_type(f.type_k, D, "-ctk"),) * N_TIERS, (kv_type(f.type_v, D, "-ctv"),) * N_TIERS
        return KVLayout(tk, tv, (n_ctx, 0, 0), bits(tk, tv))
    if f.bits is None:
        raise EdgertError("-ctk / -ctv auto needs --kv-bits AVG (average bits per cached value, e.g. 3.5)")
    N = n_ctx
    n0 = min(n_ctx, f.sinks + f.window)
    if f.window < PAGE:
        raise EdgertError(f"--kv-window {f.window}: auto needs at least {PAGE} (a page of K ranges)")
    def types(names):  # a tier's name: "TYPE" for K and V, or "KTYPE/VTYPE"
        tk = tuple(kv_type(n.split("/")[0] if f.type_k == "auto" else f.type_k, D, "--kv-tiers") for n in names)
        tv = tuple(kv_type(n.split("/")[-1] if f.type_v == "auto" else f.type_v, D, "--kv-tiers") for n in names)
        if f.type_k == "auto":  # K below the top tier channel-wise against its page's ranges
            tk = (tk[0],) + tuple(t.channelwise() for t in tk[1:])
        return tk, tv

    names = f.tiers
    if names is None:  # the top tier, then the two rungs around what the budget leaves below it
        top = bits(*types((TOP, TOP, TOP)))[0]
        rest = (f.bits * N - top * n0) / max(1, N - n0)
        lo = next((i for i, n in enumerate(LADDER) if bits(*types((n,) * 3))[1] <= rest + 1e-9), None)
        if lo is None:
            raise EdgertError(
                f"--kv-bits {f.bits:g}: too few for a {n_ctx}-token context: the cheapest type "
                f"({LADDER[-1]}) needs {bits(*types((LADDER[-1],) * 3))[1]:g} bits per value and the top "
                f"tier's {f.sinks} sinks + {f.window} recent positions {top:g}")
        names = (TOP, LADDER[max(0, lo - 1)], LADDER[lo])
    if len(names) != N_TIERS:
        raise EdgertError(f"--kv-tiers {','.join(names)}: name {N_TIERS} types, top to bottom")
    tk, tv = types(names)
    b = bits(tk, tv)
    # the bottom tier is sized for its fullest moment: while the budget's share of the middle tier
    # is below the positions that have left the window, the rest wait in the bottom tier (never promoted)
    n2 = max([N - n0 - _tier_counts(N, n0, b, f.bits)] +
             [max(0, t - n0 - _tier_counts(t, n0, b, f.bits)) for t in range(n0 + 1, N)])
    n1 = N - n0 - n2
    if b[0] * n0 + b[1] * n1 + b[2] * (N - n0 - n1) > f.bits * N * 1.0001:
        least = (b[0] * n0 + b[2] * (N - n0)) / N
        raise EdgertError(f"--kv-bits {f.bits:g}: too few for tiers {','.join(names)} at {n_ctx} positions "
                          f"(at least {least:.3g} bits per value: {n0} positions in {names[0]})")
    return KVLayout(tk, tv, (n0, n1, n2), b)


class KVCache:
    """The cache of every layer for up to n_ctx positions. `store` then `attend` per layer and
    batch; `reset` forgets everything; `nbytes` is what it holds (charged to the budget)."""

    def __init__(self, n_layer: int, n_kv: int, D: int, n_ctx: int, fmt: KVFormat = KVFormat()):
        self.fmt, self.n_layer, self.n_kv, self.D, self.n_ctx = fmt, n_layer, n_kv, D, n_ctx
        self.layout = lay = layout(n_kv, D, n_ctx, fmt)
        self.tiers_k, self.tiers_v, self.n_slots, self.row_bits = lay.tiers_k, lay.tiers_v, lay.n_slots, lay.row_bits
        self.exact = len(self.n_slots) == 1
        if self.exact:  # fp16 bits: [n_layer, n_ctx, n_head_kv, head_dim]
            self.k = np.zeros((n_layer, n_ctx, n_kv, D), np.uint16)
            self.v = np.zeros((n_layer, n_ctx, n_kv, D), np.uint16)
            # the rows in use as float32 for attention, shared by the layers: [n_ctx, n_kv, head_dim]
            self.kf = np.empty((n_ctx, n_kv, D), np.float32)
            self.vf = np.empty((n_ctx, n_kv, D), np.float32)
            return
        chan = any(t.channel for t in self.tiers_k)
        self.rot_k = fmt.rotate and not chan and self.tiers_k[0].name != "f16" and D & (D - 1) == 0
        self.rot_v = fmt.rotate and self.tiers_v[0].name != "f16" and D & (D - 1) == 0
        # [tier, 4]: bits, group, asym, channel-wise
        self.kspec = np.array([(t.bits, t.group, t.asym, t.channel) for t in self.tiers_k], np.int64)
        self.vspec = np.array([(t.bits, t.group, t.asym, t.channel) for t in self.tiers_v], np.int64)
        # per tier: codes [n_layer, n_slots, n_kv, row_bytes] uint8 and scales [n_layer, n_slots,
        # n_kv, n_scales] uint16 (a tier without slots keeps one dummy slot: the kernels see three)
        self.kc, self.ks, self.vc, self.vs = [], [], [], []
        for i in range(N_TIERS):
            n = max(1, self.n_slots[i])
            tk, tv = self.tiers_k[i], self.tiers_v[i]
            self.kc.append(np.zeros((n_layer, n, n_kv, tk.row_bytes(D)), np.uint8))
            self.ks.append(np.zeros((n_layer, n, n_kv, tk.n_scales(D)), np.uint16))
            self.vc.append(np.zeros((n_layer, n, n_kv, tv.row_bytes(D)), np.uint8))
            self.vs.append(np.zeros((n_layer, n, n_kv, tv.n_scales(D)), np.uint16))
        self.tier = np.full((n_layer, n_ctx), -1, np.int8)     # [layer, position] its tier, -1: empty
        self.slot = np.zeros((n_layer, n_ctx), np.int32)       # [layer, position] its slot in the tier
        self.imp = np.zeros((n_layer, n_ctx), np.float32)      # [layer, position] attention received
        # per layer and tier a stack of free slots: [n_layer, sum(n_slots)], tier i's at off[i]
        self.off = np.cumsum((0,) + self.n_slots[:-1]).astype(np.int64)
        self.free = np.zeros((n_layer, sum(self.n_slots)), np.int32)
        self.nfree = np.zeros((n_layer, N_TIERS), np.int64)
        self.hw = np.zeros(n_layer, np.int64)                  # positions stored per layer
        # K's per-channel ranges: [n_layer, n_pages, n_kv, 2 (min, max), head_dim] fp16 bits
        n_pages = -(-n_ctx // PAGE) if chan else 1
        self.krange = np.zeros((n_layer, n_pages, n_kv, 2, D), np.uint16)
        self.page_done = np.zeros((n_layer, n_pages), np.bool_)
        self.buf = np.empty(D, np.float32)
        self.pbuf = np.empty((PAGE, D), np.float32)            # [page, head_dim] one page's K rows
        self.reset()
        self._args = [self._layer_args(il) for il in range(n_layer)]

    def _layer_args(self, il):
        return ((self.kc[0][il], self.kc[1][il], self.kc[2][il]), (self.ks[0][il], self.ks[1][il], self.ks[2][il]),
                (self.vc[0][il], self.vc[1][il], self.vc[2][il]), (self.vs[0][il], self.vs[1][il], self.vs[2][il]),
                self.kspec, self.vspec, self.tier[il], self.slot[il])

    def reset(self):
        if self.exact:
            return
        self.tier[:] = -1
        self.imp[:] = 0
        self.page_done[:] = False
        self.hw[:] = 0
        for i, n in enumerate(self.n_slots):
            self.free[:, self.off[i]:self.off[i] + n] = np.arange(n - 1, -1, -1, dtype=np.int32)  # slot 0 first
            self.nfree[:, i] = n
        if not self.fmt.adaptive:  # one tier: a position's slot is fixed
            self.slot[:] = np.arange(self.n_ctx, dtype=np.int32)

    def rewind(self, n: int) -> int:
        """Forget positions n.. (a conversation whose new prompt shares only its first n tokens
        with what is cached); returns the positions kept. Fixed-slot formats keep n; the
        token-adaptive one hands out slots by importance as positions arrive, so it starts over (0)."""
        if self.exact:
            return n
        if self.fmt.adaptive:
            self.reset()
            return 0
        self.tier[:, n:] = -1
        self.hw[:] = np.minimum(self.hw, n)
        return n

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes(self.n_layer, self.n_kv, self.D, self.n_ctx)

    def bits_per_value(self) -> float:
        """Bytes held per cached value (K and V, every position of the context), in bits."""
        return self.nbytes * 8 / (2 * self.n_layer * self.n_kv * self.n_ctx * self.D)

    def max_batch(self) -> int:
        return self.fmt.max_batch(self.n_ctx)

    def store(self, il: int, k3: np.ndarray, v3: np.ndarray, pos0: int):
        """k3, v3: [T, n_kv, head_dim] float32 (roped) -> the cache at positions pos0 .. pos0 + T - 1."""
        if pos0 + k3.shape[0] > self.n_ctx:
            raise EdgertError(f"KV cache: positions up to {pos0 + k3.shape[0]} do not fit its {self.n_ctx}")
        if self.exact:
            store_kv(k3, v3, self.k[il], self.v[il], pos0)
            return
        kc, ks, vc, vs, kspec, vspec, tier, slot = self._args[il]
        T = k3.shape[0]
        if self.fmt.adaptive:
            end = pos0 + T
            r0 = min(end, self.fmt.sinks + self.fmt.window)
            cap1 = min(self.n_slots[1], _tier_counts(end, r0, self.row_bits, self.fmt.bits))
            ok = admit(kc, ks, vc, vs, kspec, vspec, self.krange[il], self.page_done[il], tier, slot, self.imp[il],
                       self.free[il], self.off, self.nfree[il], int(self.hw[il]), pos0, T, self.fmt.sinks,
                       self.fmt.window, cap1, self.buf, self.pbuf)
            if not ok:
                raise EdgertError(f"KV cache: layer {il} ran out of slots at position {end} (a bug)")
        else:  # one tier, fixed slots (the importance is not used)
            tier[pos0:pos0 + T] = 0
        self.hw[il] = pos0 + T
        store_rows(k3, v3, pos0, kc[0], ks[0], vc[0], vs[0], kspec, vspec, tier, slot, self.rot_k, self.rot_v)

    def attend(self, il: int, q3: np.ndarray, pos0: int, window: int, scale, out: np.ndarray):
        """q3: [T, n_head, head_dim] -> out [T, n_head * head_dim] over positions 0 .. pos0 + T - 1."""
        if self.exact:
            attention_buf(q3, self.k[il], self.v[il], pos0, window, scale, out, self.kf, self.vf)
            return
        kc, ks, vc, vs, kspec, vspec, tier, slot = self._args[il]
        attention_kv(q3, kc, ks, vc, vs, kspec, vspec, self.krange[il], PAGE, tier, slot, pos0, window, scale,
                     self.rot_k, self.rot_v, out, self.imp[il], nb.get_num_threads())

    def histogram(self, n: int) -> dict:
        """Cached (layer, position)s per type at n positions, and the average bits per value in use."""
        if self.exact:
            return {"f16": self.n_layer * n, "bits_in_use": 16.0}
        t = self.tier[:, :n]
        counts = np.bincount(t[t >= 0].ravel().astype(np.int64), minlength=N_TIERS)
        out = {}
        for i, c in enumerate(counts):
            if c:
                out[self._tier_name(i)] = out.get(self._tier_name(i), 0) + int(c)
        out["bits_in_use"] = float(np.dot(counts, self.row_bits) / max(1, counts.sum()))
        return out

    def _tier_name(self, i: int) -> str:
        k, v = self.tiers_k[i].name, self.tiers_v[i].name
        return k if k == v else f"{k}/{v}"

    def describe(self) -> str:
        if self.exact:
            return f"KV cache f16, {self.nbytes / 2**20:.1f} MiB"
        tiers = [self._tier_name(i) for i in range(len(self.n_slots))]
        names = ",".join(dict.fromkeys(t for t, n in zip(tiers, self.n_slots) if n))
        rot = "+".join(x for x, on in (("K", self.rot_k), ("V", self.rot_v)) if on) or "none"
        s = f"KV cache {self.fmt.label()}: {names}, {self.bits_per_value():.2f} bits per value held, " \
            f"{self.nbytes / 2**20:.1f} MiB, Hadamard rotation {rot}"
        if self.fmt.adaptive:
            s += f", {self.fmt.sinks} sinks + {self.fmt.window} recent in {tiers[0]}, " \
                 f"tiers of {self.n_slots[0]}/{self.n_slots[1]}/{self.n_slots[2]} positions per layer"
        return s


@nb.njit(cache=True, parallel=True, nogil=True)
def store_rows(k3, v3, pos0, kc0, ks0, vc0, vs0, kspec, vspec, tier, slot, rot_k, rot_v):
    """The T new positions' rows of every head, rotated where asked, quantised into the tier-0
    slots they were given (tier 0 is always per row)."""
    T, H, D = k3.shape
    for th in nb.prange(T * H):
        t, h = th // H, th % H
        s = slot[pos0 + t]
        x = np.empty(D, np.float32)
        for j in range(D):
            x[j] = k3[t, h, j]
        if rot_k:
            hadamard(x)
        quantize_row(x, kspec[0, 0], kspec[0, 1], kspec[0, 2], kc0[s, h], ks0[s, h])
        for j in range(D):
            x[j] = v3[t, h, j]
        if rot_v:
            hadamard(x)
        quantize_row(x, vspec[0, 0], vspec[0, 1], vspec[0, 2], vc0[s, h], vs0[s, h])


@nb.njit(cache=True, nogil=True)
def _pop(free, off, nfree, t):
    nfree[t] -= 1
    return free[off[t] + nfree[t]]


@nb.njit(cache=True, nogil=True)
def _push(free, off, nfree, t, s):
    free[off[t] + nfree[t]] = s
    nfree[t] += 1


@nb.njit(cache=True, nogil=True)
def _recode(codes, scales, spec, rng, src, s, dst, d, buf):
    """One row from (tier src, slot s) to (tier dst, slot d), via buf [head_dim]; rng: the row's
    page ranges [2, head_dim] for channel-wise tiers."""
    if spec[src, 3]:
        dequantize_row_ranged(codes[src][s], spec[src, 0], rng, buf)
    else:
        dequantize_row(codes[src][s], scales[src][s], spec[src, 0], spec[src, 1], spec[src, 2], buf)
    if spec[dst, 3]:
        quantize_row_ranged(buf, spec[dst, 0], rng, codes[dst][d])
    else:
        quantize_row(buf, spec[dst, 0], spec[dst, 1], spec[dst, 2], codes[dst][d], scales[dst][d])


@nb.njit(cache=True, nogil=True)
def _move(kc, ks, vc, vs, kspec, vspec, krange, tier, slot, free, off, nfree, pos, dst, buf):
    """Position pos (every head) requantised from its tier into a free slot of tier dst."""
    if nfree[dst] == 0:
        return False
    src, s = tier[pos], slot[pos]
    d = _pop(free, off, nfree, dst)
    page = pos // PAGE if krange.shape[0] > 1 else 0
    for h in range(kc[0].shape[1]):
        _recode((kc[0][:, h], kc[1][:, h], kc[2][:, h]), (ks[0][:, h], ks[1][:, h], ks[2][:, h]), kspec,
                krange[page, h], src, s, dst, d, buf)
        _recode((vc[0][:, h], vc[1][:, h], vc[2][:, h]), (vs[0][:, h], vs[1][:, h], vs[2][:, h]), vspec,
                krange[page, h], src, s, dst, d, buf)
    _push(free, off, nfree, src, s)
    tier[pos] = dst
    slot[pos] = d
    return True


@nb.njit(cache=True, nogil=True)
def _fix_page(kc, ks, kspec, krange, page_done, tier, slot, p, sinks, n, pbuf):
    """Page p's per-channel K ranges from its rows cached so far (below n; all in the top tier;
    sinks left out: BOS's K is an outlier that would widen every channel). A batch that ends
    past the page leaves its later rows to be clamped to these ranges."""
    a, b = max(p * PAGE, sinks), min((p + 1) * PAGE, n)
    if b > a:
        for h in range(kc[0].shape[1]):
            for pos in range(a, b):
                t, s = tier[pos], slot[pos]
                dequantize_row(kc[t][s, h], ks[t][s, h], kspec[t, 0], kspec[t, 1], kspec[t, 2], pbuf[pos - a])
            page_range(pbuf, b - a, krange[p, h])
    page_done[p] = True


@nb.njit(cache=True, nogil=True)
def admit(kc, ks, vc, vs, kspec, vspec, krange, page_done, tier, slot, imp, free, off, nfree, hw, pos0, T, sinks,
          window, cap1, buf, pbuf):
    """Make room for positions pos0 .. pos0 + T - 1 in the top tier (auto format), one layer.

    Positions from pos0 on (a shorter context re-run) are freed. A position leaving the recent
    window goes to the middle tier while it holds fewer than cap1; after that it displaces the
    middle tier's least important position (demoted to the bottom tier) when its own importance is
    higher, else goes to the bottom tier itself (to the middle one when the bottom one is full:
    early in a context where the budget's share of the middle tier grows faster than the
    context). Importance: attention received per query token since the position was cached.
    Returns False if a tier ran out of slots."""
    for pos in range(pos0, hw):
        if kspec[1, 3]:
            page_done[pos // PAGE] = False
        if tier[pos] >= 0:
            _push(free, off, nfree, tier[pos], slot[pos])
            tier[pos] = -1
    end = pos0 + T
    for pos in range(max(sinks, pos0 - window), min(pos0, max(sinks, end - window))):
        if tier[pos] != 0:
            continue
        if kspec[1, 3] and not page_done[pos // PAGE]:
            _fix_page(kc, ks, kspec, krange, page_done, tier, slot, pos // PAGE, sinks, pos0, pbuf)
        n1 = 0
        mn = np.float32(3.0e38)
        mp = -1
        for pp in range(sinks, pos0):
            if tier[pp] == 1:
                n1 += 1
                sc = imp[pp] / np.float32(pos0 - pp)
                if sc < mn:
                    mn, mp = sc, pp
        # the three tiers hold n_ctx positions: when one of the two lower tiers is full, the other has room
        if (n1 < cap1 and nfree[1] > 0) or nfree[2] == 0:
            ok = _move(kc, ks, vc, vs, kspec, vspec, krange, tier, slot, free, off, nfree, pos, 1, buf)
        elif mp >= 0 and imp[pos] / np.float32(pos0 - pos) > mn:
            ok = _move(kc, ks, vc, vs, kspec, vspec, krange, tier, slot, free, off, nfree, mp, 2, buf) and \
                _move(kc, ks, vc, vs, kspec, vspec, krange, tier, slot, free, off, nfree, pos, 1, buf)
        else:
            ok = _move(kc, ks, vc, vs, kspec, vspec, krange, tier, slot, free, off, nfree, pos, 2, buf)
        if not ok:
            return False
    for pos in range(pos0, end):
        if nfree[0] == 0:
            return False
        tier[pos] = 0
        slot[pos] = _pop(free, off, nfree, 0)
        imp[pos] = 0.0
    return True
