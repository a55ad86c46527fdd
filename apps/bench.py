"""edgert bench: llama-bench-style speed table, optionally with llama.cpp measured side by side.

  edgert bench -m smollm2-135m,qwen2.5-coder-0.5b -t 2 --baseline llama.cpp
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time

from edgert.apps.common import err, is_tty


def _ints(s):
    return [int(x) for x in str(s).split(",") if x != ""]


def build_parser():
    p = argparse.ArgumentParser(prog="edgert bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", action="append", help="model name or path; repeat or comma-separate")
    p.add_argument("-p", "--n-prompt", default="512", help="prompt sizes, comma-separated (0 = none)")
    p.add_argument("-n", "--n-gen", default="128", help="generation lengths, comma-separated (0 = none)")
    p.add_argument("-pg", action="append", default=[], help="pp,tg pairs (e.g. 512,128)")
    p.add_argument("-d", "--n-depth", default="0", help="context depths, comma-separated")
    p.add_argument("-t", "--threads", default=None, help="thread counts, comma-separated")
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("-o", "--output", choices=["md", "csv", "json", "jsonl"], default="md")
    p.add_argument("--baseline", choices=["llama.cpp"], default=None, help="also measure llama.cpp")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--device", default="host", help="device profile name recorded in the output")
    return p


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    from edgert.apps.common import model_path
    from edgert.bench import Test, build_commit, run_bench
    from edgert.probes import cpu_info, memory_bandwidth
    from edgert.errors import EdgertError
    from edgert.settings import default_threads
    names = [x for m in (args.model or [None]) for x in (m.split(",") if m else [None])]
    paths = [model_path(n) for n in names]
    threads = _ints(args.threads) if args.threads else [default_threads()]
    tests = []
    for d in _ints(args.n_depth):
        tests += [Test(n, 0, d) for n in _ints(args.n_prompt) if n > 0]
        tests += [Test(0, n, d) for n in _ints(args.n_gen) if n > 0]
        for pg in args.pg:
            pp, tg = _ints(pg)
            tests.append(Test(pp, tg, d))
    if not tests:
        raise EdgertError("nothing to run: all of -p, -n and -pg are empty")
    if args.repetitions < 1:
        raise EdgertError("-r must be at least 1")
    backends = ["edgert"] + ([args.baseline] if args.baseline else [])
    tty = is_tty()
    results = run_bench(paths, tests, threads, args.repetitions, backends, warmup=not args.no_warmup,
                        progress=(lambda s: err(f"\r{s:<78}") if tty else None))
    if tty:
        err("")
    bw = {t: memory_bandwidth(t) for t in threads}
    meta = {"cpu_info": cpu_info(), "build_commit": build_commit(), "device": args.device}
    out = sys.stdout
    if args.output == "md":
        out.write(markdown(results, bw))
        out.write(f"\nmachine: {meta['cpu_info']}, measured memory read bandwidth "
                  + ", ".join(f"{bw[t] / 1e9:.1f} GB/s ({t} thr)" for t in threads)
                  + f"; build {meta['build_commit']}\n")
    else:
        rows = [record(r, bw, meta) for r in results]
        if args.output == "json":
            json.dump(rows, out, indent=2)
            out.write("\n")
        elif args.output == "jsonl":
            for row in rows:
                out.write(json.dumps(row) + "\n")
        else:
            buf = io.StringIO()
            flat = [{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items()} for row in rows]
            w = csv.DictWriter(buf, fieldnames=list(flat[0]))
            w.writeheader()
            w.writerows(flat)
            out.write(buf.getvalue())
    return 0


def _gbs(r, bw):
    """Achieved weight bandwidth of a pure generation test: bytes per token x tokens per second."""
    if r.test.n_prompt or not r.test.n_gen:
        return None
    return r.info["bytes_per_token"] * r.avg_ts


def record(r, bw, meta) -> dict:
    import statistics
    gbs = _gbs(r, bw)
    return {
        "build_commit": meta["build_commit"], "cpu_info": meta["cpu_info"], "backend": r.backend,
        "device": meta["device"], "model_filename": r.model, "model_type": r.info["model_type"],
        "model_size": r.info["model_size"], "model_n_params": r.info["model_n_params"],
        "n_threads": r.threads, "n_prompt": r.test.n_prompt, "n_gen": r.test.n_gen,
        "n_depth": r.test.n_depth, "test_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "avg_ns": int(statistics.mean(r.samples_ns)),
        "stddev_ns": int(statistics.stdev(r.samples_ns)) if len(r.samples_ns) > 1 else 0,
        "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts, "samples_ns": r.samples_ns, "samples_ts": r.samples_ts,
        "peak_rss_bytes": r.peak_rss_bytes, "achieved_bytes_per_s": gbs, "memory_bandwidth_bytes_per_s": bw[r.threads],
    }


def markdown(results, bw) -> str:
    base = {(r.model, r.threads, r.test): r for r in results if r.backend == "llama.cpp"}
    has_base = bool(base)
    head = ["model", "size", "params", "backend", "threads", "test", "t/s", "GB/s", "peak RSS"]
    if has_base:
        head.append("vs llama.cpp")
    rows = []
    for r in results:
        gbs = _gbs(r, bw)
        row = [r.info["model_type"], f"{r.info['model_size'] / 2**20:.2f} MiB",
               f"{r.info['model_n_params'] / 1e6:.2f} M", r.backend, str(r.threads), r.test.name,
               f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}",
               f"{gbs / 1e9:.1f} / {bw[r.threads] / 1e9:.1f}" if gbs else "",
               f"{r.peak_rss_bytes / 2**20:.0f} MiB"]
        if has_base:
            b = base.get((r.model, r.threads, r.test))
            row.append(f"{r.avg_ts / b.avg_ts:.2f}" if b is not None and r.backend != "llama.cpp" else "")
        rows.append(row)
    w = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    right = {2, 4, 6, 7, 8, 9}
    line = lambda cells: "| " + " | ".join(c.rjust(w[i]) if i in right else c.ljust(w[i]) for i, c in enumerate(cells)) + " |"
    sep = "| " + " | ".join(("-" * (w[i] - 1) + ":") if i in right else "-" * w[i] for i in range(len(head))) + " |"
    return "\n".join([line(head), sep] + [line(r) for r in rows]) + "\n"
