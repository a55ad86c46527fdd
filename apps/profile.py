"""edgert profile: where decode time, bytes and memory go, per op and per layer.

Runs the prompt, then N decode tokens in pairs of runs without and with the tracer (the tables
come from the last traced run) and prints: the per-op table (time, %, calls, bytes, GB/s), the per-layer
table, the I/O counters of loading, the RSS timeline and the tracer's own cost. --trace writes
Chrome Trace Event JSON (ph X spans per layer / op / I/O request, ph C counters for RSS, bytes
read and KV bytes, ph M thread names) that opens in Perfetto (ui.perfetto.dev).
"""
from __future__ import annotations

import argparse
import time

from edgert.apps.common import add_model_args, err, load


def build_parser():
    p = argparse.ArgumentParser(prog="edgert profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("-p", "--prompt", default="The history of the transistor begins", help="prompt text")
    p.add_argument("-n", "--n-predict", type=int, default=64, help="decode tokens to profile")
    p.add_argument("-r", "--repetitions", type=int, default=7,
                   help="pairs of untraced / traced runs (the tracer's cost is their median ratio)")
    p.add_argument("--trace", metavar="FILE", help="write a Chrome trace (JSON) of the traced run")
    p.add_argument("--direct-io", action="store_true", help="load weights with O_DIRECT (no page cache)")
    return p


def decode_run(model, ids, n, tracer=None):
    """Prefill ids, then n decode steps feeding back a fixed token (as llama-bench: no sampling)
    -> (perf_counter time the decode started, seconds of decode). With a tracer, samples the
    RSS and KV-cache counters after every token."""
    import psutil
    proc = psutil.Process()
    model.reset()
    model.prefill(ids)
    per_tok_kv = model.kv_bytes // model.n_ctx
    t0 = time.perf_counter()
    for _ in range(n):
        model.decode_one_token(ids[-1])
        if tracer is not None:
            tracer.counter("memory", rss_mib=proc.memory_info().rss / 2**20,
                           kv_mib=model.n_past * per_tok_kv / 2**20)
            tracer.counter("bytes read", bytes=model.load_io["bytes"])
    return t0, time.perf_counter() - t0


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
    plain, traced = [], []
    for rep in range(args.repetitions):  # pairs: untraced, traced
        plain.append(decode_run(model, ids, n)[1])
        # the trace keeps the load's I/O and the last traced run only
        tracer.spans[:] = [sp for sp in tracer.spans if sp[1] in ("io", "load")]
        tracer.counters.clear()
        model.attach_tracer(tracer)
        t_dec, sec = decode_run(model, ids, n, tracer)
        traced.append(sec)
        model.attach_tracer(None)
        if rep in (0, args.repetitions - 1):
            rss.append((f"run {rep + 1}", psutil.Process().memory_info().rss))
    import numpy as np
    t_plain, t_traced = float(np.median(plain)) / n, float(np.median(traced)) / n
    cost = float(np.median(np.array(traced) / np.array(plain))) - 1
    spans = [s for s in tracer.spans if s[3] >= t_dec and s[1] in ("op", "layer")]  # last run's decode
    _print_tables(tracer, spans, n, traced[-1] / n, model, len(ids) + n // 2)  # the run traced
    io = model.load_io
    err(f"\nI/O (loading weights, {io['mode']}): {io['requests']} requests, {io['bytes'] / 2**20:.1f} MiB in "
        f"{io['wall_s'] * 1e3:.0f} ms ({io['bytes'] / max(io['wall_s'], 1e-9) / 1e9:.2f} GB/s), "
        f"max latency {io['max_latency_s'] * 1e3:.2f} ms; decode reads 0 bytes (every weight resident)")
    err("caches: none in this configuration (dense model, every weight resident)")
    err("RSS: " + "  ->  ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in rss)
        + f"   (peak {peak_rss() / 2**20:.0f} MiB; a sample per token in the trace)")
    err(f"decode: {1 / t_plain:.2f} tok/s untraced, {1 / t_traced:.2f} tok/s traced (medians): tracer cost "
        f"{cost * 100:+.1f}% (median of {args.repetitions} paired runs of {n} tokens; "
        f"{len(spans) / n:.0f} spans per token)")
    if args.trace:
        tracer.write(args.trace)
        err(f"trace: {args.trace} ({len(tracer.spans)} spans, {len(tracer.counters)} counter samples)")
    return 0


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
