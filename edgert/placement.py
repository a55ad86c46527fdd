"""The placement plan: before any weight is read, where every tensor lives.

    resident  in RAM (attention, norms, the LM head, predictors; the FFN when it fits)
    cached    a NeuronStore keeps the hottest FFN clusters pinned and an LRU of others in RAM,
              the rest is read from flash when a token needs it (packages only)
    stream    the FFN read from flash for every use (plain GGUF files bigger than the budget)
    flash     token-embedding rows read per token

Mixture-of-experts models (edgert/experts.py): everything but the experts resident; the experts
`dense` (all resident), `cached` (an expert cache of as many experts per layer as the budget
leaves, with prefetch) or `stream` (every routed expert read from flash on every use).

Computed from the file's tensors, the context and batch sizes, and the memory left after the
process's measured fixed cost (interpreter, libraries, kernels, tokenizer). `--ffn` forces a
choice; `auto` keeps the FFN resident when everything fits, else caches it (package) or streams it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgert.budget import kv_bytes, mib, scratch_bytes
from edgert.errors import EdgertError

FFN_NAMES = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
PACKAGE_SUFFIXES = ("ffn_clusters", "ffn_perm", "ffn_freq", "ffn_thresh", "gate_thresh", "pred_a", "pred_a_scale",
                    "pred_b", "pred_b_scale", "pred_thresh")
MIN_SLOTS = 2       # neuron-cache slots per layer below which a sparse plan is refused (one read while one computes)
SMALL_BATCH = 64    # prompt batch when the FFN is not resident
SLACK = 24 << 20    # allocator and interpreter growth after planning (measured: 5-15 MiB)


@dataclass
class Placement:
    ffn: str                  # dense | stream | sparse
    embd: str                 # resident | flash
    output: str               # resident | flash (the LM head)
    selector: str             # predictor | gate (sparse only)
    sparsity: float
    fixed: int                # measured RSS of the process when planning
    limit: int
    plan: dict = field(default_factory=dict)   # category -> bytes on top of `fixed`
    cache_bytes: int = 0      # neuron cache, all layers (sparse)
    n_batch: int = 512        # prompt batch the scratch is sized for
    dense_layers: int = 0     # stream: the first layers whose FFN is resident all the same
    expert_slots: int = 0     # cached experts over all layers (mixture-of-experts, ffn cached; experts.expert_shares)

    @property
    def peak(self) -> int:
        return _peak(self.plan)

    def lines(self) -> list[str]:
        """The plan, as llama.cpp prints its offload summary."""
        out = [f"placement: ffn {self.ffn}" + (f" ({self.selector} selector, sparsity {self.sparsity:g}, "
                                                f"neuron cache {mib(self.cache_bytes)})" if self.ffn == "sparse" else "")
               + (f" (expert cache: {self.expert_slots} experts, {mib(self.cache_bytes)})"
                  if self.ffn == "cached" else "")
               + (f" ({self.dense_layers} layers resident)" if self.ffn == "stream" and self.dense_layers else "")
               + f", token embedding {self.embd}, LM head {self.output}",
               f"placement: fixed process cost {mib(self.fixed)} measured + "
               + ", ".join(f"{k} {mib(v)}" for k, v in self.plan.items() if v)
               + f": peak {mib(self.fixed + self.peak)} of budget {mib(self.limit)} (load staging is freed "
               f"before the caches are allocated)"]
        return out


def memory_report(p: Placement, peak_rss: int, budget_source: str = "") -> dict:
    """The plan and the measurement in one place (MiB): every planned category on top of the
    measured fixed cost, the planned peak, the measured peak RSS and the budget. The same numbers
    `run --verbose` prints, the bench JSON carries and a refusal quotes."""
    rows = {"fixed process cost (measured at plan time)": p.fixed}
    rows.update({f"{k} (planned)": v for k, v in p.plan.items() if v})
    rows["planned peak (load staging freed before the caches)"] = p.fixed + p.peak
    rows["measured peak RSS"] = peak_rss
    rows["memory budget" + (f" ({budget_source})" if budget_source else "")] = p.limit
    rows["headroom (budget - measured peak)"] = p.limit - peak_rss
    return {k: round(v / 2**20, 1) for k, v in rows.items()}


def _loaded_staging(p: Placement, stg: dict, tied: bool, gate_resident: bool) -> int:
    """Loading's transient bytes for the matrices this plan loads (those left on flash load nothing)."""
    keys = ["other"]
    if p.embd == "resident" or tied:
        keys.append("embd")
    if p.output == "resident" and not tied:
        keys.append("output")
    if p.ffn == "dense" or p.dense_layers:
        keys += ["ffn", "gate"]
    elif p.ffn == "sparse" and (p.selector == "gate" or gate_resident):
        keys.append("gate")
    return max([stg.get(k, 0) for k in keys] + [0])


def _lm_head_to_flash(p: Placement, g, by):
    from edgert.streamed import FlashMatrix
    p.output = "flash"
    p.plan["weights"] -= by["output"]
    p.plan["lm head staging"] = FlashMatrix.plan_bytes(g.tensors["output.weight"])


def _peak(plan: dict) -> int:
    """Peak bytes of a plan: loading's staging is released before the caches, KV cache and
    scratch are allocated, so it counts only where it is larger than them."""
    late = sum(v for k, v in plan.items() if k not in ("weights", "embedding", "ffn", "ffn gate (resident)", "experts",
                                                         "ffn (resident layers)", "predictors", "load staging"))
    return sum(plan.values()) - late - plan.get("load staging", 0) + max(late, plan.get("load staging", 0))


def _role(name: str) -> str:
    if name.endswith(PACKAGE_SUFFIXES) and name.startswith("blk."):
        return "package"
    if name.endswith(FFN_NAMES):
        return "ffn"
    if name.startswith("blk.") and any(f".{k}." in name for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
        return "experts"
    if name == "token_embd.weight":
        return "embd"
    return "other"


def plan_placement(g, c, n_ctx: int, n_batch: int, limit: int, fixed: int, mode: str = "auto",
                   pkg=None, selector: str = "auto", sparsity: float | None = None,
                   source: str = "", gate_resident: bool = False, kv_fmt=None) -> Placement:
    """The plan; selector auto: the exact gate (better quality: docs/neuron-cache.md) when the
    gate matrices fit beside a cache, else the predictor."""
    if selector == "auto":
        try:
            return _plan(g, c, n_ctx, n_batch, limit, fixed, mode, pkg, "gate", sparsity, source, gate_resident,
                         kv_fmt)
        except EdgertError:
            selector = "predictor"
    return _plan(g, c, n_ctx, n_batch, limit, fixed, mode, pkg, selector, sparsity, source, gate_resident, kv_fmt)


def _plan(g, c, n_ctx, n_batch, limit, fixed, mode, pkg, selector, sparsity, source, gate_resident,
          kv_fmt) -> Placement:
    from edgert.experts import plain_router
    from edgert.streamed import staging_bytes
    from edgert.kernels.quant import CHUNK_ROWS, Q5_0, Q8_0, repack_staging_bytes, repacked_nbytes
    by = {"other": 0, "ffn": 0, "embd": 0, "vectors": 0, "package": 0, "gate": 0, "output": 0, "experts": 0}
    stg = {}  # the largest loading transient of each kind of matrix: only what is loaded counts
    staging = 0
    for n, t in g.tensors.items():
        role = _role(n)
        if role == "package":
            if not n.endswith(("ffn_clusters", "ffn_freq")):  # clusters: the cache; freq: convert only
                by["package"] += t.nbytes
            continue
        if len(t.shape) == 1:
            by["vectors"] += t.nbytes
            continue
        g.check_type(n)
        if role == "experts":  # the expert store's (_plan_experts)
            by["experts"] += repacked_nbytes(t.qtype, t.rows, t.cols)
            continue
        held = Q8_0 if g.expand_q5 and t.qtype == Q5_0 else t.qtype
        router = n.endswith("ffn_gate_inp.weight") and plain_router(t.qtype, t.cols)
        b = t.nbytes if router else repacked_nbytes(held, t.rows, t.cols)  # an F32 router: a plain array
        by[role] += b
        if n.endswith("ffn_gate.weight"):
            by["gate"] += b
        if n == "output.weight":
            by["output"] = b
        key = "output" if n == "output.weight" else ("gate" if n.endswith("ffn_gate.weight") else role)
        stg[key] = max(stg.get(key, 0), repack_staging_bytes(t.qtype, t.cols, min(t.rows, CHUNK_ROWS)))
        staging = max(staging, stg[key])
    tied = "output.weight" not in g.tensors
    kv = kv_bytes(c, n_ctx, kv_fmt)
    if c.moe:
        return _plan_experts(g, c, n_ctx, n_batch, limit, fixed, mode, source, kv_fmt, by, stg, staging, tied)
    dense = {"weights": by["other"] + by["vectors"], "kv cache": kv,
             "scratch": scratch_bytes(c, n_batch), "load staging": staging, "embedding": by["embd"], "ffn": by["ffn"]}
    auto = mode == "auto"
    if auto:
        mode = "dense" if _peak(dense) <= limit - fixed - SLACK else ("sparse" if pkg is not None else "stream")
    if mode != "dense":  # prompts in batches of at most SMALL_BATCH: less scratch (the FFN is on flash anyway)
        n_batch = min(n_batch, SMALL_BATCH)
    base = {"weights": by["other"] + by["vectors"], "kv cache": kv,
            "scratch": scratch_bytes(c, n_batch), "load staging": staging}
    avail = limit - fixed - SLACK
    if avail <= 0:
        raise EdgertError(f"{g.path}: the memory budget {mib(limit)} ({source}) is below this process's fixed cost "
                          f"{mib(fixed)} (interpreter, libraries, kernels, tokenizer) + {mib(SLACK)} slack")
    layers = [tuple(g.tensors[f"blk.{il}.{k}"] for k in FFN_NAMES) for il in range(c.n_layer)]
    stream_stage = 2 * staging_bytes(layers) + max(sum(repacked_nbytes(t.qtype, t.rows, t.cols) for t in ts)
                                               for ts in layers)
    if mode not in ("dense", "stream", "sparse"):
        raise EdgertError(f"--ffn {mode}: must be auto, dense, stream or sparse")
    if mode == "sparse" and pkg is None:
        raise EdgertError(f"{g.path}: --ffn sparse needs an edgert package (make one with edgert convert)")
    s = sparsity if sparsity is not None else (float(pkg.recipe["sparsity"]) if pkg else 0.0)
    p = Placement(mode, "resident", "resident", selector, s, fixed, limit, n_batch=n_batch)
    if mode == "dense":
        p.plan = dense
    else:
        p.embd = "resident" if tied else "flash"
        p.plan = {**base, "embedding": by["embd"] if tied else 0, "ffn staging": stream_stage}
        if mode == "sparse":
            if selector not in ("predictor", "gate"):
                raise EdgertError(f"--selector {selector}: must be auto, predictor or gate")
            p.plan["predictors"] = by["package"]
            if selector == "gate" or gate_resident:
                p.plan["ffn gate (resident)"] = by["gate"]
            from edgert.package import cluster_layout
            tg, tu = layers[0][0], layers[0][1]
            L = cluster_layout(tg.qtype, tu.qtype, c.n_embd, pkg.C, pkg.down_type)
            n_cl = -(-c.n_ff // pkg.C)
            p.plan["load staging"] = _loaded_staging(p, stg, tied, gate_resident)
            room = avail - _peak(p.plan)
            per_layer = min(n_cl, room // (c.n_layer * L.nbytes))
            if per_layer < n_cl and "ffn staging" in p.plan:
                # not every cluster fits: no dense prefill staging (prompts run through the sparse
                # path token by token), its bytes go to the cache
                del p.plan["ffn staging"]
                room = avail - _peak(p.plan)
                per_layer = min(n_cl, room // (c.n_layer * L.nbytes))
            if per_layer < MIN_SLOTS and not tied:  # the LM head to flash, read every token
                _lm_head_to_flash(p, g, by)
                p.plan["load staging"] = _loaded_staging(p, stg, tied, gate_resident)
                room = avail - _peak(p.plan)
                per_layer = min(n_cl, room // (c.n_layer * L.nbytes))
            if per_layer < MIN_SLOTS:
                raise EdgertError(
                    f"{g.path}: the memory budget {mib(limit)} ({source}) leaves {mib(max(room, 0))} for the neuron cache "
                    f"after the fixed cost {mib(fixed)} and " + ", ".join(f"{k} {mib(v)}" for k, v in p.plan.items() if v)
                    + f"; at least {mib(MIN_SLOTS * L.nbytes * c.n_layer)} ({MIN_SLOTS} clusters a layer) is needed")
            p.cache_bytes = per_layer * c.n_layer * L.nbytes
            p.plan["neuron cache"] = p.cache_bytes
        else:
            p.plan["load staging"] = _loaded_staging(p, stg, tied, gate_resident)
            if _peak(p.plan) > avail and not tied:  # the LM head to flash too when it does not fit
                _lm_head_to_flash(p, g, by)
                p.plan["load staging"] = _loaded_staging(p, stg, tied, gate_resident)
            # auto: as many layers' FFN resident as fit; the others streamed
            per_layer = by["ffn"] // c.n_layer
            if auto:  # resident layers load their FFN: count that loading's transient
                p.plan["load staging"] = max(p.plan["load staging"], stg.get("ffn", 0), stg.get("gate", 0))
            p.dense_layers = int(min(c.n_layer, max(0, avail - _peak(p.plan)) // max(per_layer, 1))) if auto else 0
            if p.dense_layers == c.n_layer:  # all of it after all (the embedding on flash, smaller batches)
                p.ffn = "dense"
                del p.plan["ffn staging"]
                p.plan["ffn"] = by["ffn"]
            elif p.dense_layers:
                p.plan["ffn (resident layers)"] = p.dense_layers * per_layer
    p.plan["load staging"] = _loaded_staging(p, stg, tied, gate_resident)
    need = _peak(p.plan)
    if need > avail:
        parts = ", ".join(f"{k} {mib(v)}" for k, v in p.plan.items() if v)
        hints = ["lower -c / --ctx-size"] + (["use --ffn stream"] if p.ffn == "dense" else []) + \
            (["an edgert package runs it sparse from flash (edgert convert)"] if pkg is None else [])
        raise EdgertError(f"{g.path}: needs {mib(need)} resident ({parts}) on top of the process's fixed cost "
                          f"{mib(fixed)} but the memory budget is {mib(limit)} ({source}); " + "; ".join(hints))
    return p


def _plan_experts(g, c, n_ctx, n_batch, limit, fixed, mode, source, kv_fmt, by, stg, staging, tied) -> Placement:
    """A mixture-of-experts model: the non-expert weights resident, the experts as the budget allows."""
    from edgert.experts import ExpertCache, expert_matrices
    avail = limit - fixed - SLACK
    if avail <= 0:
        raise EdgertError(f"{g.path}: the memory budget {mib(limit)} ({source}) is below this process's fixed cost "
                          f"{mib(fixed)} (interpreter, libraries, kernels, tokenizer) + {mib(SLACK)} slack")
    if mode not in ("auto", "dense", "stream", "cached", "sparse"):
        raise EdgertError(f"--ffn {mode}: must be auto, dense, stream or cached for a mixture-of-experts model")
    layers = [expert_matrices(g, c, il) for il in range(c.n_layer)]
    k = c.n_expert_used
    plan = {"weights": by["other"] + by["vectors"], "embedding": by["embd"], "kv cache": kv_bytes(c, n_ctx, kv_fmt),
            "scratch": scratch_bytes(c, n_batch), "load staging": staging}
    if mode == "auto":
        mode = "dense" if _peak({**plan, "experts": by["experts"]}) <= avail else "cached"
    mode = "cached" if mode == "sparse" else mode
    p = Placement(mode, "resident", "resident", "router", 0.0, fixed, limit, plan, n_batch=n_batch)
    if mode == "dense":
        plan["experts"] = by["experts"]
    else:
        p.n_batch = min(n_batch, SMALL_BATCH)
        plan["scratch"] = scratch_bytes(c, p.n_batch)
        L = c.n_layer
        if not tied and _peak(plan) + ExpertCache.plan_bytes(layers, L, k) > avail:
            _lm_head_to_flash(p, g, by)
        plan["load staging"] = _loaded_staging(p, stg, tied, False)
        if mode == "stream":
            plan["expert staging"] = ExpertCache.plan_bytes(layers, 0, k)
        else:
            # the cache is allocated after loading's staging is freed: the largest that fits the peak
            cache = lambda n: _peak({**plan, "expert cache": ExpertCache.plan_bytes(layers, n, k)})
            lo, hi = L, L * c.n_expert  # at least one expert a layer; the largest total that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if cache(mid) <= avail else (lo, mid - 1)
            slots = lo
            room = avail - _peak({**plan, "load staging": 0})
            if cache(slots) > avail:
                raise EdgertError(
                    f"{g.path}: the memory budget {mib(limit)} ({source}) leaves {mib(max(room, 0))} for the expert "
                    f"cache after the fixed cost {mib(fixed)} and " + ", ".join(f"{n} {mib(v)}" for n, v in plan.items() if v)
                    + f"; at least {mib(ExpertCache.plan_bytes(layers, L, k))} (one expert a layer) is needed")
            p.expert_slots = slots
            p.cache_bytes = ExpertCache.plan_bytes(layers, slots, k)
            plan["expert cache"] = p.cache_bytes
    need = _peak(plan)
    if need > avail:
        parts = ", ".join(f"{n} {mib(v)}" for n, v in plan.items() if v)
        raise EdgertError(f"{g.path}: needs {mib(need)} resident ({parts}) on top of the process's fixed cost "
                          f"{mib(fixed)} but the memory budget is {mib(limit)} ({source}); lower -c / --ctx-size "
                          f"or use --ffn cached / stream")
    return p
