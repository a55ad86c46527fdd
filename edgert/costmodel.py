"""Cost model: predicted decode time per token on a device, from operation counts and bytes.

Every op of one decode step (Model.ops, per layer) is listed with its work (weights, KV
positions, vector elements) and the bytes it moves. Its time is

    matmul:     per matrix  a_q + max(work * b_q, bytes / memory bandwidth) * k_q
    attention:  a + max(work * b, KV bytes / memory bandwidth)
    small op:   a + work * b
    plus the interpreter's time per op call (Python between kernels)

where a (fixed cost of a call) and b (seconds per unit of work, data in cache) come from
microbenchmarks of each kernel on the host (edgert.probes.op_costs), k_q >= 1 is how much slower
than that roofline the kernel runs on weights streamed from DRAM (measured on the host with a
64 MiB matrix, the way decode reads every layer), and the interpreter's time
per op from a tiny random-weight model's decode step less its modelled kernel time. None of them
looks at the model being predicted. For another device the host figures are scaled: work terms
by the ratio of peak vector throughput of the cores used (cores x GHz x lanes x FMA pipes), fixed
costs and the interpreter by the ratio of single-core clock, memory terms by the device's
bandwidth times MEM_EFFICIENCY, and weights read from flash by the profile's flash curve.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgert.gguf_file import type_name

# sustained share of theoretical DRAM bandwidth that a streaming read reaches on the devices'
# LPDDR (edgert assumption, from STREAM-style results on phone and Jetson SoCs: 60-75%); the
# host's bandwidth is measured, so it is used as is.
MEM_EFFICIENCY = 0.7


@dataclass(frozen=True)
class Op:
    name: str          # as in Model.ops
    layer: int         # -1 outside the layers
    kind: str          # matmul | attention | small
    parts: tuple       # matmul: ((qtype name, weights, bytes), ...) one per matrix; else ((kernel, work, bytes),)

    @property
    def nbytes(self) -> int:
        return sum(p[2] for p in self.parts)


def decode_ops(model, pos: int) -> list[Op]:
    """The ops of decoding one token at position pos (pos tokens already cached)."""
    c = model.cfg
    E, hd = c.n_embd, c.head_dim
    ops = [Op("embed", -1, "small", (("embed", E, model.tok_embd.nbytes // c.n_vocab + 4 * E),))]

    def mm(name, il, mats):  # QMatrix, or a tensor left on flash (FlashMatrix / TensorInfo): its file bytes
        return Op(name, il, "matmul", tuple((type_name(w.qtype), w.rows * w.cols, getattr(w, "t", w).nbytes)
                                            for w in mats))

    def small(name, il, kernel, work, nbytes):
        return Op(name, il, "small", ((kernel, work, nbytes),))

    for il, L in enumerate(model.layers):
        window = c.swa_window if c.is_swa(il) else 0
        n_pos = min(pos + 1, window) if window else pos + 1
        kv_bytes = 2 * n_pos * c.n_head_kv * hd * 2
        ops.append(small("attn_norm", il, "rmsnorm", E, 8 * E))
        ops.append(mm("qkv", il, (L.wq, L.wk, L.wv)))
        if c.qk_norm:
            ops += [small("qk_norm", il, "rmsnorm", c.n_head * hd, 8 * c.n_head * hd),
                    small("qk_norm", il, "rmsnorm", c.n_head_kv * hd, 8 * c.n_head_kv * hd)]
        ops += [small("rope", il, "rope", c.n_head * hd, 8 * c.n_head * hd),
                small("rope", il, "rope", c.n_head_kv * hd, 8 * c.n_head_kv * hd),
                small("store_kv", il, "store_kv", c.n_head_kv * hd, 12 * c.n_head_kv * hd),
                Op("attention", il, "attention", (("attention", c.n_head * n_pos * hd, kv_bytes),)),
                mm("attn_out", il, (L.wo,))]
        if L.post_attn_norm is not None:
            ops.append(small("post_attn_norm", il, "rmsnorm", E, 8 * E))
        # a FFN not resident (streamed or sparse) is modelled as its dense product: an upper bound
        # on its work, its bytes as memory traffic (flash reads are not in this model)
        ops.append(small("ffn_norm", il, "rmsnorm", E, 8 * E))
        if c.moe:  # top-k experts of expert 0's shapes, their bytes as memory traffic (the router,
            # n_expert x n_embd, is not modelled: no probe calibrates it and it is small)
            g, u, d = model.ffn[il].experts.layers[il][0]
            k = c.n_expert_used
            ops += [mm("gate_up", il, (g, u) * k),
                    small("act", il, "swiglu", k * g.rows, 12 * k * g.rows),
                    mm("ffn_down", il, (d,) * k)]
        else:
            w_gate, w_up, w_down = ((L.w_gate, L.w_up, L.w_down) if L.w_up is not None else model.ffn_tensors[il])
            ops += [mm("gate_up", il, (w_gate, w_up)),
                    small("act", il, "geglu" if c.ffn_act == "gelu" else "swiglu", c.n_ff, 12 * c.n_ff),
                    mm("ffn_down", il, (w_down,))]
        if L.post_ffn_norm is not None:
            ops.append(small("post_ffn_norm", il, "rmsnorm", E, 8 * E))
    ops += [small("out_norm", -1, "rmsnorm", E, 8 * E), mm("output", -1, (model.output,))]
    return ops


@dataclass(frozen=True)
class Scale:
    """How a device differs from the host the kernels were measured on."""
    compute: float       # device seconds per host second of kernel work
    fixed: float         # ... of fixed call costs and interpreter time
    bandwidth: float     # device bytes/s of memory traffic

    @staticmethod
    def for_device(prof, host, host_threads: int) -> "Scale":
        """Scale from the host running `host_threads` threads to the device's default threads."""
        if prof.name == host.name:
            return Scale(1.0, 1.0, host.mem_bandwidth)
        peak = sum(c.peak_gflops for c in prof.compute_clusters)
        hc = host.clusters[0]
        host_peak = hc.peak_gflops / hc.cores * host_threads
        return Scale(host_peak / peak, host.clusters[0].max_ghz / prof.compute_clusters[0].max_ghz,
                     prof.mem_bandwidth * MEM_EFFICIENCY)


def op_time(op: Op, cal: dict, sc: Scale) -> dict:
    """{'compute', 'memory', 'fixed', 'total'} seconds of one op. compute and memory are the two
    sides of the max(); the side that loses is hidden (overlapped) by the other."""
    comp = mem = fixed = total = 0.0
    for kernel, work, nbytes in op.parts:
        a, b = cal[kernel]
        t_c, t_m = work * b * sc.compute, nbytes / sc.bandwidth
        fixed += a * sc.fixed
        comp += t_c
        if op.kind == "small":
            total += a * sc.fixed + t_c
            continue
        mem += t_m
        k = 1.0
        if op.kind == "matmul" and f"stream:{kernel}" in cal:
            # how much slower the kernel runs on weights streamed from DRAM than the roofline
            # max(in-cache compute, bytes / bandwidth) on the host: the same factor on the device
            host_roof = max(work * b, nbytes / cal["membw"])
            k = max(1.0, work * cal[f"stream:{kernel}"] / host_roof)
        total += a * sc.fixed + max(t_c, t_m) * k
    total += cal["python_per_op"] * sc.fixed
    fixed += cal["python_per_op"] * sc.fixed
    return {"compute": comp, "memory": mem, "fixed": fixed, "total": total}


def predict_decode(model, cal: dict, sc: Scale, pos: int) -> dict:
    """Modelled seconds of one decode token at position pos: total and breakdown by op name."""
    by_op: dict[str, dict] = {}
    for op in decode_ops(model, pos):
        t = op_time(op, cal, sc)
        r = by_op.setdefault(op.name, {"compute": 0.0, "memory": 0.0, "fixed": 0.0, "total": 0.0,
                                       "bytes": 0, "calls": 0})
        for k, v in t.items():
            r[k] += v
        r["bytes"] += op.nbytes
        r["calls"] += 1
    total = sum(r["total"] for r in by_op.values())
    comp = sum(r["compute"] for r in by_op.values())
    mem = sum(r["memory"] for r in by_op.values())
    fixed = sum(r["fixed"] for r in by_op.values())
    return {"total": total, "compute": comp, "memory": mem, "fixed": fixed,
            # what the max() hid: compute + memory + fixed - total
            "overlap": comp + mem + fixed - total, "by_op": by_op,
            "bytes": sum(r["bytes"] for r in by_op.values())}
