"""Per-expert bit widths (EdgeMoE's expert-wise quantisation): a mixture-of-experts GGUF -> an
edgert expert package in which every expert is its own tensors at its own ggml type, chosen from a
calibrated sensitivity under a target of expert bytes read per token.

    convert_experts(src, out, calib_text, "calib.txt", types=("Q2_K", "Q3_K", "Q4_K", "Q8_0"), size=0.65)

1. Base: the source quantised to Q8_0 by llama.cpp's quantiser (a temporary file). The non-expert
   tensors (attention, norms, routers, embedding, LM head) are taken from it as llama.cpp made them.
2. Calibration: edgert's own forward pass on the base over the calibration text records, per
   layer, every token's FFN input (after the FFN norm) and its routing (top-k experts, weights).
3. Sensitivity: each expert quantised at each candidate type by llama.cpp's quantiser
   (ggml_quantize_chunk), dequantised by gguf-py, and run on the calibration tokens routed to it;
   cost[e, q] = sum over those tokens of weight^2 * |f_q(x) - f(x)|^2, divided by the number of
   calibration tokens: the squared error the expert's quantisation adds to the residual stream,
   per token (f: the expert at the source's precision).
4. Allocation: every expert starts at the cheapest type; repeatedly the upgrade with the largest
   cost reduction per byte of expected reads (bytes x the expert's routing frequency) is taken
   while the expected expert bytes read per token stay within `size` x those of every expert at
   Q4_K (`uniform` instead puts every expert at one type: the baseline).
5. The package (edgert/package.py, kind "experts"): the stacked `blk.N.ffn_*_exps.weight` replaced
   by `blk.N.ffn_*_exps.E.weight`, sha256 per tensor, temp file + rename.
"""
from __future__ import annotations

import logging
import os
import tempfile

import numpy as np

from edgert.errors import EdgertError

log = logging.getLogger(__name__)
KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
DEFAULT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q8_0")
REFERENCE = "Q4_K"  # `size` is a fraction of the bytes of every expert at this type


def _qtype(name: str) -> int:
    from edgert.kernels.quant import QTYPE_BY_NAME, ROW_TYPES
    q = QTYPE_BY_NAME.get(name.upper())
    if q is None or q.id not in ROW_TYPES:
        raise EdgertError(f"expert type {name!r}: not one edgert computes on (row kernels: "
                          f"{', '.join(QTYPE_BY_NAME[n].name for n in QTYPE_BY_NAME if QTYPE_BY_NAME[n].id in ROW_TYPES)})")
    return q.id


def expert_floats(path: str, il: int) -> list[np.ndarray]:
    """Layer il's experts at the source's precision: [gate [X, F, E], up [X, F, E], down [X, E, F]]
    as float32 (gguf-py's dequantisation of whatever type the file holds)."""
    import gguf
    r = gguf.GGUFReader(path)
    by = {t.name: t for t in r.tensors}
    out = []
    for k in KINDS:
        t = by.get(f"blk.{il}.{k}.weight")
        if t is None:
            raise EdgertError(f"{path}: no tensor 'blk.{il}.{k}.weight' (a stacked mixture-of-experts layout)")
        out.append(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    return out


def _silu(x):
    return x / (1.0 + np.exp(-x))


def expert_out(g, u, d, x):
    """SwiGLU expert: [n, E] -> [n, E] (float32)."""
    return (_silu(x @ g.T) * (x @ u.T)) @ d.T


def requantised(qtype: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(GGUF blocks, their dequantisation) of float32 [R, C] at qtype: llama.cpp's quantiser, gguf-py's
    dequantiser."""
    import gguf

    from edgert.converters.quantize import quantize_rows
    raw = quantize_rows(qtype, w)
    R = w.shape[0]
    return raw, np.asarray(gguf.quants.dequantize(raw.reshape(R, -1), gguf.GGMLQuantizationType(qtype)), np.float32)


def record_routing(model, ids, window: int, progress=None):
    """-> per layer (X [N, E] FFN inputs, idx [N, k] routed experts, w [N, k] their weights) over the
    tokens `ids` in windows of `window` (fresh contexts), from edgert's forward pass."""
    from edgert.experts import ExpertStore
    recs = [([], [], []) for _ in range(model.cfg.n_layer)]
    orig = ExpertStore.__call__

    def spy(self, xn, out):
        orig(self, xn, out)
        n = xn.shape[0]
        r = recs[self.il]
        r[0].append(xn.copy())
        r[1].append(self.idx[:n].copy())
        r[2].append(self.w[:n].copy())
    ExpertStore.__call__ = spy
    try:
        for s in range(0, len(ids), window):
            model.reset()
            model.forward(ids[s:s + window])
            if progress:
                progress(min(window, len(ids) - s))
    finally:
        ExpertStore.__call__ = orig
        model.reset()
    return [tuple(np.concatenate(a) for a in r) for r in recs]


def sensitivity(floats, X, idx, w, qtypes, n_tokens: int, max_tokens: int = 1024):
    """cost [n_expert, len(qtypes)] and the quantised blocks {(e, q): [gate, up, down] blocks} of one
    layer (docstring step 3)."""
    gate, up, down = floats
    n_expert = gate.shape[0]
    cost = np.zeros((n_expert, len(qtypes)))
    blocks = {}
    for e in range(n_expert):
        rows, slot = np.nonzero(idx == e)
        if len(rows) > max_tokens:   # an even sample of a busy expert's tokens, weights scaled back
            pick = np.linspace(0, len(rows) - 1, max_tokens).astype(int)
            rows, slot = rows[pick], slot[pick]
        scale = (np.count_nonzero(idx == e) / max(1, len(rows)))
        xe, we = X[rows].astype(np.float32), w[rows, slot].astype(np.float64)
        ref = expert_out(gate[e], up[e], down[e], xe) if len(rows) else None
        for j, q in enumerate(qtypes):
            parts = [requantised(q, m[e]) for m in (gate, up, down)]
            blocks[e, q] = [p[0] for p in parts]
            if ref is not None:
                y = expert_out(parts[0][1], parts[1][1], parts[2][1], xe)
                cost[e, j] = scale * float(np.sum(we ** 2 * np.sum((y - ref).astype(np.float64) ** 2, 1))) / n_tokens
    return cost, blocks


def allocate(cost, freq, nbytes, target: float) -> np.ndarray:
    """Type index per expert (cost [N, Q] of the N experts of every layer, freq [N] routing
    frequencies, nbytes [Q] one expert's bytes per type, cheapest first): greedy upgrades by cost
    reduction per expected byte while sum(freq * nbytes[choice]) <= target."""
    N, Q = cost.shape
    choice = np.zeros(N, int)
    spent = float(np.sum(freq * nbytes[choice]))
    if spent > target * (1 + 1e-9):
        raise EdgertError(f"the expert size target ({target / 2**20:.2f} MiB read per token) is below every expert at "
                          f"the cheapest type ({spent / 2**20:.2f} MiB): raise --expert-size or add a cheaper type")
    while True:
        best, pick = 0.0, None
        for i in range(N):
            for j in range(choice[i] + 1, Q):
                extra = freq[i] * (nbytes[j] - nbytes[choice[i]])
                gain = cost[i, choice[i]] - cost[i, j]
                if gain <= 0 or spent + extra > target * (1 + 1e-9):
                    continue
                ratio = gain / extra if extra > 0 else np.inf
                if ratio > best:
                    best, pick = ratio, (i, j, extra)
        if pick is None:
            return choice
        i, j, extra = pick
        choice[i], spent = j, spent + extra


def convert_experts(src_path: str, out_path: str, calib_text: str, calib_name: str, types=DEFAULT_TYPES,
                    size: float = 0.65, uniform: str | None = None, calib_tokens: int = 4096, window: int = 512,
                    progress=None, tokenizer=None) -> dict:
    """Write the expert package out_path from the MoE GGUF src_path; returns the recipe written."""
    from edgert.converters.package import file_sha256, write_package
    from edgert.converters.quantize import quantize
    from edgert.experts import expert_name
    from edgert.gguf_file import GGUFFile
    from edgert.kernels.quant import TYPE_NAMES, row_bytes
    from edgert.model import Model
    from edgert.package import CONVERTER_VERSION, is_package
    from edgert.tokenizer import Tokenizer
    if os.path.abspath(src_path) == os.path.abspath(out_path):
        raise EdgertError(f"{out_path}: the output would overwrite the source model")
    qtypes = sorted({_qtype(t) for t in ([uniform] if uniform else types)},
                    key=lambda q: row_bytes(q, 256))   # cheapest first
    if not 0 < size <= 4:
        raise EdgertError(f"--expert-size {size}: must be in (0, 4] (a fraction of every expert at {REFERENCE})")
    src = GGUFFile(src_path)
    try:
        if is_package(src):
            raise EdgertError(f"{src_path}: already an edgert package; convert its source GGUF")
        from edgert.config import config_from_gguf
        c = config_from_gguf(src)
        if not c.moe:
            raise EdgertError(f"{src_path}: not a mixture of experts (no expert_count); expert bit widths need one")
        if c.n_ff_shexp:
            log.info("%s: the shared expert stays at the base type", src_path)
        src_types = {TYPE_NAMES[src.tensors[f"blk.0.{k}.weight"].qtype] for k in KINDS}
        arch = src.get("general.architecture")
    finally:
        src.close()
    d = os.path.dirname(os.path.abspath(out_path)) or "."
    fd, base_path = tempfile.mkstemp(prefix=".edgert-base-", suffix=".gguf", dir=d)
    os.close(fd)
    try:
        quantize(src_path, base_path, "Q8_0", requantize=True)
        model = Model(base_path, n_ctx=window, n_batch=window)
        tok = tokenizer or Tokenizer(model.gguf.metadata, src_path)
        ids = np.asarray(tok.encode(calib_text, add_special=False), np.int64)[:calib_tokens]
        if len(ids) < window:
            raise EdgertError(f"{calib_name}: {len(ids)} tokens of calibration text, at least {window} needed")
        done = {"calibrate": 0, "write": 0}

        def step(stage, total):  # progress(stage, done so far, total) from increments
            def f(n):
                done[stage] += n
                progress(stage, done[stage], total)
            return f if progress else None
        routing = record_routing(model, ids, window, step("calibrate", len(ids)))
        model.gguf.close()
        del model
        E, F, X = c.n_embd, c.n_ff, c.n_expert
        per_type = np.array([F * row_bytes(q, E) * 2 + E * row_bytes(q, F) for q in qtypes], np.float64)
        costs, freqs, blocks = [], [], {}
        for il in range(c.n_layer):
            Xl, idx, w = routing[il]
            cost, b = sensitivity(expert_floats(src_path, il), Xl, idx, w, qtypes, len(ids))
            costs.append(cost)
            freqs.append(np.bincount(idx.ravel(), minlength=X) / len(ids))
            blocks.update({(il,) + k: v for k, v in b.items()})
            if progress:
                progress("sensitivity", il + 1, c.n_layer)
        cost, freq = np.concatenate(costs), np.concatenate(freqs)
        ref_bytes = float(np.sum(freq) * (F * row_bytes(_qtype(REFERENCE), E) * 2 + E * row_bytes(_qtype(REFERENCE), F)))
        if uniform:
            choice = np.zeros(len(cost), int)
        else:
            choice = allocate(cost, freq, per_type, size * ref_bytes)
        read = float(np.sum(freq * per_type[choice]))
        out_blocks, drop = {}, set()
        for il in range(c.n_layer):
            for k in KINDS:
                drop.add(f"blk.{il}.{k}.weight")
            for e in range(X):
                q = qtypes[choice[il * X + e]]
                for k, raw in zip(KINDS, blocks[il, e, q]):
                    rows, cols = (E, F) if k == "ffn_down_exps" else (F, E)
                    out_blocks[expert_name(il, k, e)] = (raw, q, (cols, rows))
        counts = {TYPE_NAMES[q]: int(np.sum(choice == j)) for j, q in enumerate(qtypes)}
        recipe = {"kind": "experts", "source_name": os.path.basename(src_path), "source_sha256": file_sha256(src_path),
                  "converter_version": CONVERTER_VERSION, "source_expert_types": ",".join(sorted(src_types)),
                  "expert_types": ",".join(f"{n}:{v}" for n, v in counts.items()),
                  "expert_size_target": float(size if not uniform else 0.0), "expert_reference_type": REFERENCE,
                  "expert_bytes_read_per_token": read, "expert_bytes_read_per_token_reference": ref_bytes,
                  "sensitivity_cost_total": float(np.sum(cost[np.arange(len(cost)), choice])),
                  "calib_name": os.path.basename(calib_name), "calib_tokens": int(len(ids)),
                  "calib_sha256": __import__("hashlib").sha256(calib_text.encode()).hexdigest(),
                  "base_type": "Q8_0 (llama.cpp's quantiser)"}
        base = GGUFFile(base_path)
        try:
            write_package(out_path, base, arch, recipe, [], {}, drop=drop, blocks=out_blocks,
                          progress=step("write", sum(b[0].nbytes for b in out_blocks.values())
                                        + sum(t.nbytes for n, t in base.tensors.items() if n not in drop)))
        finally:
            base.close()
        log.info("%s: experts %s; expected expert bytes read per token %.2f MiB (%.0f%% of uniform %s)", out_path,
                 recipe["expert_types"], read / 2**20, 100 * read / ref_bytes, REFERENCE)
        return recipe
    finally:
        if os.path.exists(base_path):
            os.unlink(base_path)
