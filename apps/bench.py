"""edgert bench: llama-bench-style speed table, optionally with llama.cpp measured side by side.

  edgert bench -m smollm2-135m,qwen2.5-coder-0.5b -t 2 --baseline llama.cpp
"""
from __future__ import annotations

import csv
import io
import json
import sys
import time

from edgert.apps.common import add_kv_args, err, is_tty, kv_format, parser, pct, pyplot, save_json, save_png


def _ints(s):
    return [int(x) for x in str(s).split(",") if x != ""]


def build_parser():
    p = parser("bench", __doc__)
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
    p.add_argument("--mem-budget", default=None, metavar="LIST",
                   help="memory budgets, comma-separated: sizes (447MB) or shares of the source GGUF "
                        "file (40%%); edgert plans to each, and with --cap every worker runs in a cgroup "
                        "v1 memory cap of that size")
    p.add_argument("--cap", action="store_true",
                   help="enforce each budget as a cgroup v1 memory cap on every worker (root; the "
                        "files' page cache dropped before each start; llama.cpp without weight repacking)")
    p.add_argument("--ffn", default="auto", help="edgert FFN placements to run, comma-separated "
                                                 "(auto, dense, stream, sparse; mixture of experts: cached)")
    p.add_argument("--prefetch", default="on", help="expert prefetch (mixture of experts), comma-separated: on, off")
    p.add_argument("--sparsity", default=None, help="sparse FFN sparsities, comma-separated (package levels)")
    p.add_argument("--selector", default="predictor", help="sparse FFN selectors, comma-separated (predictor, gate)")
    p.add_argument("--backend", default="numba", help="edgert backends of the dense blocks, comma-separated "
                   "(numba, onnx: the graphs of `edgert convert --to onnx`, exported once into EDGERT_CACHE/exports)")
    p.add_argument("--isa", default="auto", help="edgert kernel instruction sets to run, comma-separated "
                   "(auto, avx512vnni, avx2, neon-dotprod, portable: kernels/isa.py); each row names the one it ran")
    p.add_argument("--mode", default="exact", help="edgert kernel modes, comma-separated (exact, fast)")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="feed windows of this text's tokens (prompt and generation) instead of random ids "
                        "and a fixed generated token: real routing for a mixture of experts")
    p.add_argument("--save-json", default=None, metavar="FILE", help="also write the JSON rows to FILE")
    p.add_argument("--png", default=None, metavar="FILE",
                   help="with several --mem-budget values: tok/s against the budget, per engine, as a PNG")
    add_kv_args(p)
    p.add_argument("--source", default=None,
                   help="the GGUF llama.cpp runs when -m is an edgert package (default: the package "
                        "recipe's source file, beside the package or among pulled models)")
    return p


def source_of(path: str, explicit: str | None) -> str:
    """The plain GGUF behind an edgert package (or the file itself)."""
    from edgert.errors import EdgertError
    from edgert.gguf_file import GGUFFile
    from edgert.package import is_package
    g = GGUFFile(path)
    try:
        if not is_package(g):
            return path
        name, want = g.get("edgert.recipe.source_name"), g.get("edgert.recipe.source_sha256")
    finally:
        g.close()
    if explicit:
        from edgert.converters.package import file_sha256
        if file_sha256(explicit) != want:
            raise EdgertError(f"{explicit}: not the file {path} was converted from (its sha256 differs from "
                              f"the package recipe's source_sha256)")
        return explicit
    from edgert.settings import env
    import os
    for d in (os.path.dirname(os.path.abspath(path)), os.path.expanduser(env("EDGERT_MODELS"))):
        c = os.path.join(d, name)
        if os.path.exists(c):
            return c
    raise EdgertError(f"{path}: its source {name} was not found beside it or among pulled models (--source)")


def text_tokens(path: str, text_file: str):
    """The text's token ids in the model's vocabulary (int32)."""
    import numpy as np
    from edgert.errors import EdgertError
    from edgert.gguf_file import GGUFFile
    from edgert.tokenizer import Tokenizer
    try:
        with open(text_file, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise EdgertError(f"--text {text_file}: cannot read ({e.strerror})") from None
    g = GGUFFile(path)
    try:
        ids = np.array(Tokenizer(g.metadata, path).encode(text, add_special=False), np.int32)
    finally:
        g.close()
    if len(ids) < 2:
        raise EdgertError(f"--text {text_file}: no text to feed")
    return ids


def parse_budgets(text: str | None, size: int) -> list:
    from edgert.budget import parse_size
    from edgert.errors import EdgertError
    if not text:
        return [0]
    out = []
    for part in text.split(","):
        part = part.strip()
        if part.endswith("%"):
            try:
                out.append(int(float(part[:-1]) / 100 * size))
            except ValueError:
                raise EdgertError(f"--mem-budget '{part}': not a percentage") from None
        else:
            out.append(parse_size(part))
    return out


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.png:
        pyplot()  # before the run: a missing matplotlib is a one-line error, not lost work
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
    import os

    from edgert.bench import Variant
    ffns = [x.strip() for x in args.ffn.split(",") if x.strip()]
    sps = [float(x) for x in args.sparsity.split(",")] if args.sparsity else [None]
    sels = [x.strip() for x in args.selector.split(",") if x.strip()]
    pfs = [x.strip() for x in args.prefetch.split(",") if x.strip()]
    if any(x not in ("on", "off") for x in pfs):
        raise EdgertError(f"--prefetch {args.prefetch}: must be on, off or both")
    sources = {p: source_of(p, args.source) for p in paths} if args.baseline else {}
    kv = kv_format(args)
    from edgert.kv_eval import LLAMA_TYPES  # llama.cpp runs the same KV types where it has them, else f16
    ll_kv = (("type_k", kv.type_k if kv.type_k in LLAMA_TYPES else "f16"),
             ("type_v", kv.type_v if kv.type_v in LLAMA_TYPES else "f16"))

    from edgert.kernels import isa as isa_mod
    kernel_choices = []
    for name in [x.strip() for x in args.isa.split(",") if x.strip()]:
        for mode in [x.strip() for x in args.mode.split(",") if x.strip()]:
            chosen = isa_mod.resolve(name, mode)  # checked here: a bad name fails before any worker starts
            kernel_choices.append((("isa", chosen.name), ("mode", mode)))

    backends_of_blocks = [x.strip() for x in args.backend.split(",") if x.strip()]
    from edgert.backends import BACKENDS
    for b in backends_of_blocks:
        if b not in BACKENDS:
            raise EdgertError(f"--backend {b}: one of {', '.join(BACKENDS)}")
    for b in backends_of_blocks:  # exported here once, before any worker (each would export its own)
        if b != "numba":
            from edgert.backends import export_dir_for
            for p in paths:
                export_dir_for(p, b)

    def variants(path):
        vs = []
        for kc in kernel_choices + [(("backend", b),) for b in backends_of_blocks if b != "numba"]:
            if "numba" not in backends_of_blocks and not dict(kc).get("backend"):
                continue
            for f in ffns:
                for sp in (sps if f == "sparse" else [None]):
                    for sel in (sels if f == "sparse" else [None]):
                        for pf in (pfs if f == "cached" else ["on"]):
                            vs.append(Variant("edgert", path, (("ffn", f), ("sparsity", sp), ("selector", sel),
                                                               ("kv", kv), ("prefetch", pf == "on")) + kc))
        if args.baseline:
            vs.append(Variant(args.baseline, sources[path], ll_kv))
        return vs
    if args.cap:
        from edgert.cgroup import available
        if not available():
            raise EdgertError("--cap needs root and the cgroup v1 memory controller (/sys/fs/cgroup/memory)")
    from edgert.bench import model_info  # a package's size: its source tensors' (= the source file's, near enough)
    budgets_of = {p: parse_budgets(args.mem_budget, os.path.getsize(sources[p]) if p in sources
                                   else model_info(p)["model_size"]) for p in paths}
    tty = is_tty()
    text_ids = {p: text_tokens(p, args.text) for p in paths} if args.text else None
    results = []
    for p in paths:  # budgets are relative to each model's source file
        results += run_bench([p], tests, threads, args.repetitions, backends, warmup=not args.no_warmup,
                             progress=(lambda s: err(f"\r{s:<78}") if tty else None), variants=variants,
                             budgets=budgets_of[p], cap=args.cap, text_ids=text_ids)
    if tty:
        err("")
    bw = {t: memory_bandwidth(t) for t in threads}
    meta = {"cpu_info": cpu_info(), "build_commit": build_commit(), "device": args.device}
    out = sys.stdout
    if args.save_json:
        save_json(args.save_json, [record(r, bw, meta) for r in results])
    if args.png:
        plot_budgets(results, args.png)
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


def plot_budgets(results, path):
    """tok/s against the memory budget (share of the model file), one line per engine and test."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r.backend, r.test.name) for r in results}):
        pts = sorted((r.mem_budget_bytes / r.info["model_size"] * 100, r.avg_ts) for r in results
                     if (r.backend, r.test.name) == key and r.mem_budget_bytes and r.samples_ns)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} {key[1]}")
    ax.set_xlabel("memory cap, % of the GGUF file")
    ax.set_ylabel("tokens / s")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(results[0].info["model_type"] if results else "")
    fig.tight_layout()
    save_png(fig, path)


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
        "avg_ns": int(statistics.mean(r.samples_ns)) if r.samples_ns else None,
        "stddev_ns": int(statistics.stdev(r.samples_ns)) if len(r.samples_ns) > 1 else 0,
        "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts, "samples_ns": r.samples_ns, "samples_ts": r.samples_ts,
        "peak_rss_bytes": r.peak_rss_bytes, "achieved_bytes_per_s": gbs, "memory_bandwidth_bytes_per_s": bw[r.threads],
        "mem_budget_bytes": r.mem_budget_bytes, "capped": r.capped, "cap_peak_bytes": r.cap_peak_bytes,
        "killed": r.killed, "sparsity": r.stats.get("sparsity"), "predictor_recall": r.stats.get("predictor_recall"),
        "neuron_hit_rate": r.stats.get("neuron_hit_rate"), "bytes_read_per_token": r.stats.get("bytes_read_per_token"),
        "io_wait_s": r.stats.get("io_wait_s"), "ffn": r.stats.get("ffn"), "kv": r.stats.get("kv"),
        "expert_hit_rate": r.stats.get("expert_hit_rate"), "prefetch_recall": r.stats.get("prefetch_recall"),
        "prefetch_precision": r.stats.get("prefetch_precision"), "prefetch": r.stats.get("prefetch"),
        "expert_slots": r.stats.get("expert_slots"), "experts_total": r.stats.get("experts_total"),
        "kv_bytes": r.stats.get("kv_bytes"), "kv_types": r.stats.get("kv_hist"),
        "memory_mib": r.stats.get("memory_mib"),
    }


def markdown(results, bw) -> str:
    base = {(r.model, r.threads, r.test, r.mem_budget_bytes): r for r in results if r.backend == "llama.cpp"}
    has_base = bool(base)
    budgets = any(r.mem_budget_bytes for r in results)
    is_moe = lambda r: bool(r.stats.get("expert_hits") or r.stats.get("expert_misses"))
    sparse = any(r.stats.get("ffn") in ("sparse", "stream") and not is_moe(r) for r in results)
    moe = any(is_moe(r) for r in results)
    kvcol = any(r.stats.get("kv", "K f16 V f16") != "K f16 V f16" for r in results)
    head = ["model", "size", "params", "backend", "threads", "test"] + (["budget"] if budgets else []) + \
        ["t/s", "GB/s", "peak RSS"] + (["ffn: sparsity / hit / MiB read per token / I/O wait"] if sparse else []) + \
        (["KV cache: type / bytes vs f16 / bits in use"] if kvcol else []) + \
        (["experts: placement / hit / prefetch recall, precision / MiB read per token / I/O wait"] if moe else [])
    if has_base:
        head.append("vs llama.cpp")
    rows = []
    for r in results:
        gbs = _gbs(r, bw)
        row = [r.info["model_type"], f"{r.info['model_size'] / 2**20:.2f} MiB",
               f"{r.info['model_n_params'] / 1e6:.2f} M", r.backend, str(r.threads), r.test.name]
        if budgets:
            row.append((f"{r.mem_budget_bytes / 2**20:.0f} MiB" + (" cap" if r.capped else "")) if r.mem_budget_bytes else "-")
        row += [r.killed or f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}",
                f"{gbs / 1e9:.1f} / {bw[r.threads] / 1e9:.1f}" if gbs and not budgets else "",
                f"{r.peak_rss_bytes / 2**20:.0f} MiB" if r.samples_ns else ""]
        if sparse:
            st = r.stats
            if st.get("ffn") in ("sparse", "stream") and not is_moe(r):
                hit = "-" if st.get("neuron_hit_rate") is None else f"{st['neuron_hit_rate']:.0%}"
                row.append(f"{st['sparsity']:.0%} / {hit} / {st['bytes_read_per_token'] / 2**20:.1f} / "
                           f"{st['io_wait_s'] / max(st['tokens'], 1) * 1e3:.0f} ms")
            else:
                row.append(st.get("ffn", "") or "")
        if kvcol:
            st = r.stats
            hist = st.get("kv_hist") or {}
            row.append(st.get("kv", "") + (f" / {st['kv_vs_f16']:.3f} / {hist.get('bits_in_use', 0):.2f}"
                                           if "kv_bytes" in st else ""))
        if moe:
            st = r.stats
            slots = f" {st.get('expert_slots')}/{st.get('experts_total')}" if st.get("ffn") == "cached" else ""
            row.append(f"{st.get('ffn', '')}{slots}{'' if st.get('prefetch', True) or st.get('ffn') != 'cached' else ' (no prefetch)'}"
                       f" / {pct(st.get('expert_hit_rate'))} / {pct(st.get('prefetch_recall'))}, "
                       f"{pct(st.get('prefetch_precision'))} / {st.get('bytes_read_per_token', 0) / 2**20:.2f} / "
                       f"{st.get('io_wait_s', 0) / max(st.get('tokens', 1), 1) * 1e3:.1f} ms" if st.get("ffn") else "")
        if has_base:
            b = base.get((r.model, r.threads, r.test, r.mem_budget_bytes))
            ok = b is not None and r.backend != "llama.cpp" and b.samples_ns and r.samples_ns
            row.append(f"{r.avg_ts / b.avg_ts:.2f}" if ok else "")
        rows.append(row)
    w = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    right = {2, 4} | {i for i, h in enumerate(head) if h in ("t/s", "GB/s", "peak RSS", "vs llama.cpp", "budget")}
    line = lambda cells: "| " + " | ".join(c.rjust(w[i]) if i in right else c.ljust(w[i]) for i, c in enumerate(cells)) + " |"
    sep = "| " + " | ".join(("-" * (w[i] - 1) + ":") if i in right else "-" * w[i] for i in range(len(head))) + " |"
    return "\n".join([line(head), sep] + [line(r) for r in rows]) + "\n"
