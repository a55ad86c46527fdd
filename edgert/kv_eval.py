"""KV cache formats compared on held-out text: perplexity and mean KL divergence against edgert's
f16 KV on the same chunks (llama-perplexity's chunks: n_ctx tokens, BOS first, second half
scored), and the bytes each format holds. llama.cpp's own KV types (llama-cpp-python `type_k` /
`type_v`, flash attention, as llama.cpp requires for a quantised V) are run on the same token ids.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from edgert.errors import EdgertError
from edgert.kv_cache import KV_TYPES, KVFormat, f16_nbytes, layout
from edgert.perplexity import chunk_logits

log = logging.getLogger(__name__)

LLAMA_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids


@dataclass
class KVRow:
    label: str
    engine: str                 # edgert | llama.cpp
    kind: str                   # f16 | uniform | adaptive | llama.cpp
    bits: float                 # bits per cached value held (scales included; maps excluded)
    kv_bytes: int               # bytes the cache holds (edgert: everything, maps included)
    nll: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    top1: list = field(default_factory=list)

    def summary(self, f16_bytes: int) -> dict:
        nll, kl = np.concatenate(self.nll), np.concatenate(self.kl)
        return {"label": self.label, "engine": self.engine, "kind": self.kind, "bits": self.bits,
                "kv_bytes": self.kv_bytes, "vs_f16_bytes": self.kv_bytes / f16_bytes,
                "ppl": math.exp(nll.mean()), "kl": float(kl.mean()),
                "top1": float(np.concatenate(self.top1).mean()), "n_scored": len(nll)}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """[N, V] float32 logits -> log-probabilities, float32, row by row (bounded memory)."""
    out = np.empty_like(z, dtype=np.float32)
    for i in range(len(z)):
        r = z[i].astype(np.float64)
        m = r.max()
        out[i] = r - (m + np.log(np.exp(r - m).sum()))
    return out


def _score(row: KVRow, lp_ref: np.ndarray, logits: np.ndarray, targets: np.ndarray):
    lp = _log_softmax(logits)
    row.nll.append(-lp[np.arange(len(targets)), targets].astype(np.float64))
    p = np.exp(lp_ref.astype(np.float64))
    row.kl.append((p * (lp_ref - lp)).sum(axis=1))
    row.top1.append((lp.argmax(axis=1) == lp_ref.argmax(axis=1)).astype(np.float64))


def held_bits(c, n_ctx: int, fmt: KVFormat) -> float:
    """Bits per cached value of format fmt's values and scales (what --kv-bits counts)."""
    lay = layout(c.n_head_kv, c.head_dim, n_ctx, fmt)
    if len(lay.n_slots) == 1:
        return 16.0
    return float(np.dot(lay.n_slots, lay.row_bits) / n_ctx)


def uniform_bits(c, n_ctx: int, tier: str, fmt: KVFormat) -> float:
    """The --kv-bits that puts every position below the top tier at `tier` (auto with one lower type)."""
    f = KVFormat("auto", "auto", 16.0, (fmt.tiers[0] if fmt.tiers else "f16/q8_0", tier, tier), fmt.sinks, fmt.window)
    lay = layout(c.n_head_kv, c.head_dim, n_ctx, f)
    n0 = lay.n_slots[0]
    return (lay.row_bits[0] * n0 + lay.row_bits[1] * (n_ctx - n0)) / n_ctx + 1e-6


def compare(model, ids, n_ctx: int, n_chunks: int, bos, formats: list, llama_types: list, threads: int = 2,
            on_row=None) -> list[dict]:
    """formats: [(label, kind, KVFormat)] run on `model` (its KV cache swapped per format);
    llama_types: llama.cpp KV types ('q8_0', ...) for K and V. -> one summary dict per format."""
    ids = np.asarray(ids, np.int64)
    if len(ids) < n_ctx:
        raise EdgertError(f"the text has {len(ids)} tokens, fewer than one chunk of {n_ctx} (lower -c)")
    n = min(n_chunks, len(ids) // n_ctx)
    c = model.cfg
    rows = [KVRow(lb, "edgert", kind, held_bits(c, n_ctx, f), layout(c.n_head_kv, c.head_dim, n_ctx, f).nbytes(
        c.n_layer, c.n_head_kv, c.head_dim, n_ctx)) for lb, kind, f in formats]
    llamas = []
    if llama_types:
        import llama_cpp
        for t in llama_types:
            if t not in LLAMA_TYPES:
                raise EdgertError(f"llama.cpp KV type {t}: one of {', '.join(LLAMA_TYPES)}")
            ll = llama_cpp.Llama(model.path, n_ctx=n_ctx, n_batch=512, n_threads=threads, logits_all=True,
                                 verbose=False, type_k=LLAMA_TYPES[t], type_v=LLAMA_TYPES[t], flash_attn=True)
            bits = KV_TYPES[t].bits_per_value(c.head_dim)
            llamas.append(ll)
            f16 = f16_nbytes(c.n_layer, c.n_head_kv, c.head_dim, n_ctx)
            rows.append(KVRow(f"llama.cpp {t}", "llama.cpp", "llama.cpp", bits, int(f16 * bits / 16)))
    ref = KVRow("f16", "edgert", "f16", 16.0, 0)
    first = n_ctx // 2
    for i in range(n):
        chunk = ids[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos is not None:
            chunk[0] = bos
        targets = chunk[first + 1:]
        model.set_kv(KVFormat())
        lp_ref = _log_softmax(chunk_logits(model, chunk, False)[first:n_ctx - 1])
        ref.nll.append(-lp_ref[np.arange(len(targets)), targets].astype(np.float64))
        for row, (_, _, f) in zip(rows, formats):
            model.set_kv(f)
            _score(row, lp_ref, chunk_logits(model, chunk, False)[first:n_ctx - 1], targets)
            log.info("chunk %d %s: nll %.4f", i, row.label, row.nll[-1].mean())
        for row, ll in zip(rows[len(formats):], llamas):
            ll.reset()  # eval() then drops the cached positions from 0 on
            ll.eval(chunk.tolist())
            _score(row, lp_ref, np.array(ll.scores[first:n_ctx - 1], np.float32), targets)
        if on_row is not None:
            on_row(i, n)
    f16_bytes = f16_nbytes(c.n_layer, c.n_head_kv, c.head_dim, n_ctx)
    ref.kv_bytes = f16_bytes
    ref.kl = [np.zeros_like(x) for x in ref.nll]
    ref.top1 = [np.ones_like(x) for x in ref.nll]
    return [ref.summary(f16_bytes)] + [r.summary(f16_bytes) for r in rows]
