"""edgert profile: where decode time, bytes and memory go, per op and per layer.

Runs the prompt and N traced decode tokens (the tables), then measures the tracer's cost with
-r x N tokens alternating untraced / traced token by token, and prints: the per-op table (time, %, calls, bytes, GB/s), the per-layer
table, the I/O counters of loading, the RSS timeline and the tracer's own cost. --trace writes
Chrome Trace Event JSON (ph X spans per layer / op / I/O request, ph C counters for RSS, bytes
read and KV bytes, ph M thread names) that opens in Perfetto (ui.perfetto.dev).
"""
from __future__ import annotations

import time

from edgert.apps.common import add_model_args, err, load, parser, pct


def build_parser():
    p = parser("profile", __doc__)
    add_model_args(p)
    p.add_argument("-p", "--prompt", default="The history of the transistor begins", help="prompt text")
    p.add_argument("-n", "--n-predict", type=int, default=64, help="decode tokens to profile")
    p.add_argument("-r", "--repetitions", type=int, default=7,
                   help="runs of N tokens, alternating untraced / traced, that measure the tracer's cost")
    p.add_argument("--trace", metavar="FILE", help="write a Chrome trace (JSON) of the traced run")
    p.add_argument("--direct-io", action="store_true", help="load weights with O_DIRECT (no page cache)")
    return p


def decode_run(model, ids, n, tracer=None):
    """decode_fixed, with the tracer's per-token counters (RSS, KV MiB, bytes read) when traced
    -> (perf_counter time the decode started, seconds of decode)."""
    import psutil

    from edgert.simulate import decode_fixed
    proc = psutil.Process()
    per_tok_kv = model.kv_bytes // model.n_ctx
    start = []

    def mark(i):
        if i == 0:
            start.append(time.perf_counter())

    def sample(i):
        tracer.counter("memory", rss_mib=proc.memory_info().rss / 2**20,
                       kv_mib=model.n_past * per_tok_kv / 2**20)
        tracer.counter("bytes read", bytes=model.load_io["bytes"])
        tracer.counter("kv cache", **model.kv.histogram(model.n_past))  # positions per type, bits in use
        st = model.stats  # the runtime's flash reads (streamed FFN, neuron or expert cache), cumulative
        tracer.counter("flash reads", mib=st.bytes_read / 2**20, io_wait_ms=st.io_wait_s * 1e3)
        if model.cfg.moe:
            tracer.counter("experts", hits=st.hits, misses=st.misses, predicted=st.predicted,
                           predicted_right=st.predicted_right)
    t = decode_fixed(model, ids, n, before=mark, after=sample if tracer is not None else None)
    return start[0], float(t.sum())


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    import psutil

    from edgert.errors import EdgertError
    from edgert.settings import peak_rss
    from edgert.trace import Tracer
    if args.n_predict < 1 or args.repetitions < 1:
        raise EdgertError("-n and -r must be at least 1")
    tracer = args.tracer = Tracer()
    model, tok = load(args)  # the load's I/O requests are traced
    ids = tok.encode(args.prompt, add_special=True)
    n = args.n_predict
    if len(ids) + n > model.n_ctx:
        raise EdgertError(f"prompt ({len(ids)} tokens) + -n {n} exceed the context of {model.n_ctx}")
    rss = [("loaded", psutil.Process().memory_info().rss)]
    model.attach_tracer(None)
    decode_run(model, ids, min(4, n))  # warm-up: kernels come from Numba's cache
    model.attach_tracer(tracer)
    t_dec, sec = decode_run(model, ids, n, tracer)  # the traced run: tables and trace
    model.attach_tracer(None)
    rss.append(("traced run", psutil.Process().memory_info().rss))
    t_plain, t_traced = tracer_cost(model, ids, n, args.repetitions)
    cost = t_traced / t_plain - 1
    spans = [s for s in tracer.spans if s[3] >= t_dec and s[1] in ("op", "layer")]  # last run's decode
    _print_tables(tracer, spans, n, sec / n, model, len(ids) + n // 2)
    io = model.load_io
    err(f"\nI/O (loading weights, {io['mode']}): {io['requests']} requests, {io['bytes'] / 2**20:.1f} MiB in "
        f"{io['wall_s'] * 1e3:.0f} ms ({io['bytes'] / max(io['wall_s'], 1e-9) / 1e9:.2f} GB/s), "
        f"max latency {io['max_latency_s'] * 1e3:.2f} ms")
    st, pl = model.stats.as_dict(), model.placement
    if pl.ffn == "dense" and pl.embd == "resident" and pl.output == "resident":
        err("decode: every weight resident, no flash reads; caches: none in this configuration")
    else:  # the runtime's reads over every run above (warm-up, untraced and traced)
        err(f"decode (ffn {pl.ffn}, token embedding {pl.embd}, LM head {pl.output}): "
            f"{model.stats.bytes_read / 2**20:.1f} MiB read from flash, I/O wait {st['io_wait_s'] * 1e3:.0f} ms")
        if model.cfg.moe and pl.ffn == "cached":
            err(f"caches: expert cache {pl.expert_slots} experts ({pl.cache_bytes / 2**20:.1f} MiB): hit rate "
                f"{pct(st['expert_hit_rate'])}, prefetch recall {pct(st['prefetch_recall'])} precision "
                f"{pct(st['prefetch_precision'])}")
        elif pl.ffn == "sparse":
            err(f"caches: neuron cache {pl.cache_bytes / 2**20:.1f} MiB: hit rate {pct(st['neuron_hit_rate'])}")
    err("RSS: " + "  ->  ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in rss)
        + f"   (peak {peak_rss() / 2**20:.0f} MiB; a sample per token in the trace)")
    err(f"decode: {1 / t_plain:.2f} tok/s untraced, {1 / t_traced:.2f} tok/s traced: tracer cost "
        f"{cost * 100:+.1f}% ({args.repetitions} x {n} tokens, traced and untraced alternating token by "
        f"token, trimmed means; {len(spans) / n:.0f} spans per token)")
    if args.trace:
        tracer.write(args.trace)
        err(f"trace: {args.trace} ({len(tracer.spans)} spans, {len(tracer.counters)} counter samples)")
    return 0


def tracer_cost(model, ids, n, reps):
    """-> (seconds per untraced token, per traced token). Tokens alternate between the two
    (attaching the tracer between tokens, untimed), so that both see the same moments of a
    shared machine; the 10% slowest of each are dropped (preemptions)."""
    import numpy as np

    from edgert.simulate import decode_fixed
    from edgert.trace import Tracer
    times = {False: [], True: []}
    for r in range(reps):
        tr = Tracer()
        on = [(i + r) % 2 == 1 for i in range(n)]
        t = decode_fixed(model, ids, n, before=lambda i: model.attach_tracer(tr if on[i] else None),
                         after=lambda i: tr.counter("memory", kv_mib=0.0) if on[i] else None)
        for i in range(n):
            times[on[i]].append(t[i])
    model.attach_tracer(None)

    def trimmed(v):
        v = np.sort(v)
        return float(v[:max(1, int(len(v) * 0.9))].mean())
    return trimmed(times[False]), trimmed(times[True])


def _print_tables(tracer, spans, n, t_tok, model, pos):
    """Per-op and per-layer tables of the decode spans; bytes per op from the cost model's
    accounting at the middle position (what each op reads and writes)."""
    from edgert.costmodel import decode_ops
    nbytes: dict[str, int] = {}
    for op in decode_ops(model, pos):
        nbytes[op.name] = nbytes.get(op.name, 0) + op.nbytes
    ops = tracer.op_table(spans)
    layers = tracer.layer_table(spans)
    total = sum(r[2] for r in ops)
    print(f"decode (last traced run), {n} tokens, per token: {t_tok * 1e3:.2f} ms; ops account for {total / n * 1e3:.2f} ms "
          f"(the rest is Python between ops)")
    print(f"\n| {'op':<15} | {'calls/tok':>9} | {'ms/tok':>8} | {'%':>5} | {'MB/tok':>8} | {'GB/s':>6} |")
    print(f"|{'-' * 17}|{'-' * 10}:|{'-' * 9}:|{'-' * 6}:|{'-' * 9}:|{'-' * 7}:|")
    for name, calls, sec, _ in ops:
        b = nbytes.get(name, 0)
        print(f"| {name:<15} | {calls / n:>9.0f} | {sec / n * 1e3:>8.3f} | {sec / total * 100:>5.1f} | "
              f"{b / 1e6:>8.2f} | {b / max(sec / n, 1e-12) / 1e9:>6.1f} |")
    print(f"\n| {'layer':>5} | {'attention ms':>12} | {'ffn ms':>8} | {'total ms':>8} | {'%':>5} |")
    print(f"|{'-' * 6}:|{'-' * 13}:|{'-' * 9}:|{'-' * 9}:|{'-' * 6}:|")
    lt = sum(sum(v.values()) for v in layers.values()) / n * 1e3
    for il in sorted(layers):
        a, f = layers[il]["attention"] / n * 1e3, layers[il]["ffn"] / n * 1e3
        print(f"| {il:>5} | {a:>12.3f} | {f:>8.3f} | {a + f:>8.3f} | {(a + f) / lt * 100:>5.1f} |")
