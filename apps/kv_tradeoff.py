"""edgert kv-tradeoff: KV cache formats on held-out text, against edgert's f16 KV on the same chunks:
perplexity, mean KL divergence, top-1 agreement and the bytes each format holds. Token-adaptive
(`auto`) at each --bits, uniform (every position below the top tier at one type; and plain per-row
types), and llama.cpp's own KV types on the same token ids.

  edgert kv-tradeoff -m qwen2.5-coder-0.5b -f text.txt -c 2048 --chunks 2 --png docs/kv-tradeoff.png
"""
from __future__ import annotations


from edgert.apps.common import err, model_path, parser, pyplot, read_text, save_json, save_png, setup_threads


def build_parser():
    p = parser("kv-tradeoff", __doc__)
    p.add_argument("-m", "--model", default=None, help="model name or GGUF path")
    p.add_argument("-f", "--file", required=True, help="held-out text")
    p.add_argument("-c", "--ctx-size", type=int, default=2048)
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--bits", default="3,3.5,4.5", help="auto's average bits per value, comma-separated")
    p.add_argument("--uniform", default="q3/q2,q4/q2,q4",
                   help="one type below the top tier (the same window and sinks), comma-separated")
    p.add_argument("--per-row", default="q8_0,q4_0,q4", help="plain per-row types (-ctk = -ctv), comma-separated")
    p.add_argument("--llama", default="q8_0,q4_0", help="llama.cpp KV types to run ('' for none)")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--png", default=None, help="write the curve as a PNG (needs the plot extra)")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    return p


def _list(s):
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.png:
        pyplot()  # before the run: a missing matplotlib is a one-line error, not lost work
    from edgert.kv_cache import KVFormat, layout
    from edgert.kv_eval import compare, uniform_bits
    from edgert.model import Model
    from edgert.tokenizer import Tokenizer
    threads = setup_threads(args.threads)
    text = read_text(args.file)
    path = model_path(args.model)
    made = {}
    model = Model(path, n_ctx=args.ctx_size, ffn="dense",
                  before_weights=lambda g: made.setdefault("tok", Tokenizer(g.metadata, path)))
    tok = made["tok"]
    ids = tok.encode(text, add_special=True)
    c, n = model.cfg, args.ctx_size
    formats = []
    for b in _list(args.bits):
        formats.append((f"auto {float(b):g}", "adaptive", KVFormat("auto", "auto", float(b))))
    for t in _list(args.uniform):
        fmt = KVFormat("auto", "auto", 16.0)
        formats.append((f"uniform {t}", "uniform", KVFormat("auto", "auto", uniform_bits(c, n, t, fmt),
                                                             ("f16/q8_0", t, t))))
    for t in _list(args.per_row):
        formats.append((f"per-row {t}", "per-row", KVFormat(t, t)))
    for _, _, f in formats:  # every format checked before the first chunk runs
        layout(c.n_head_kv, c.head_dim, n, f)
    rows = compare(model, ids, n, args.chunks, tok.bos_id if tok.add_bos else None, formats, _list(args.llama),
                   threads, on_row=lambda i, k: err(f"chunk {i + 1}/{k} done"))
    base = rows[0]["ppl"]
    print(f"{path}: {rows[0]['n_scored']} tokens scored, chunks of {n}")
    print("| KV cache | engine | bits per value | KV bytes vs f16 | perplexity | vs f16 | mean KL | top-1 agree |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['engine']} | {r['bits']:.2f} | {r['vs_f16_bytes']:.3f} | {r['ppl']:.4f} | "
              f"{r['ppl'] / base - 1:+.2%} | {r['kl']:.4f} | {r['top1']:.4f} |")
    if args.json:
        save_json(args.json, rows)
    if args.png:
        plot(rows, f"{path.rsplit('/', 1)[-1]}: KV bits vs quality ({n}-token chunks)", args.png)
    return 0


def plot(rows, title, path):
    """Perplexity and KL against bits per value, a line per kind (rows as compare() makes them)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    base = rows[0]["ppl"]
    for ax, key, lab in ((axes[0], "ppl", "perplexity"), (axes[1], "kl", "mean KL vs f16 KV")):
        for kind, mk in (("adaptive", "o-"), ("uniform", "s--"), ("per-row", "^:"), ("llama.cpp", "x")):
            pts = sorted((r["bits"], r[key]) for r in rows if r["kind"] == kind)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], mk, label=kind)
        if key == "ppl":
            ax.axhline(base, color="gray", ls="--", label="f16 KV")
            ax.axhline(base * 1.01, color="gray", ls=":", label="f16 + 1%")
            ax.set_ylim(base * 0.99, base * 1.15)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("bits per cached value (scales included)")
        ax.set_ylabel(lab)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)
