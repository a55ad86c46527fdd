"""edgert tradeoff: perplexity of a package's sparse FFN at each calibrated sparsity and selector,
against its dense FFN on the same text (held-out: not the calibration text).

  edgert tradeoff -m model.edgert.gguf -f text.txt -c 512 --chunks 2 --png docs/sparsity.png
"""
from __future__ import annotations


from edgert.apps.common import err, parser, pyplot, read_text, save_json, save_png, setup_threads


def build_parser():
    p = parser("tradeoff", __doc__)
    p.add_argument("-m", "--model", required=True, help="edgert package")
    p.add_argument("-f", "--file", required=True, help="held-out text")
    p.add_argument("-c", "--ctx-size", type=int, default=512)
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--levels", default=None, help="sparsities (default: all the package's levels)")
    p.add_argument("--selectors", default="gate,predictor,predictor-only",
                   help="gate: exact gate; predictor: the predictor plus every neuron of a cached cluster "
                        "(here every cluster is cached: in memory); predictor-only: the predictor alone "
                        "decides (what a token whose clusters are all on flash gets)")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--png", default=None, help="write the curve as a PNG (needs the plot extra)")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    return p


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.png:
        pyplot()  # before the run: a missing matplotlib is a one-line error, not lost work
    from edgert.errors import EdgertError
    from edgert.model import Model
    from edgert.perplexity import perplexity
    from edgert.tokenizer import Tokenizer
    setup_threads(args.threads)
    text = read_text(args.file)
    made = {}
    dense = Model(args.model, n_ctx=args.ctx_size, ffn="dense",
                  before_weights=lambda g: made.setdefault("tok", Tokenizer(g.metadata, args.model)))
    if dense.pkg is None:
        raise EdgertError(f"{args.model}: not an edgert package (make one with edgert convert)")
    tok = made["tok"]
    ids = tok.encode(text, add_special=True)
    bos = tok.bos_id if tok.add_bos else None
    base = perplexity(dense, ids, args.ctx_size, args.chunks, bos).ppl
    pkg_levels = [float(x) for x in args.levels.split(",")] if args.levels else dense.pkg.levels
    del dense
    rows = [{"selector": "dense", "level": 0.0, "ppl": base, "delta": 0.0, "sparsity": 0.0,
             "recall": None, "selected": 1.0}]
    err(f"dense: PPL {base:.4f}")
    for sel in [s.strip() for s in args.selectors.split(",") if s.strip()]:
        for lv in pkg_levels:
            m = Model(args.model, n_ctx=args.ctx_size, ffn="sparse", sparsity=lv, selector=sel.split("-")[0],
                      measure_recall=sel.startswith("predictor"), cached_candidates=sel != "predictor-only")
            r = perplexity(m, ids, args.ctx_size, args.chunks, bos, per_token=True)
            st = m.stats.as_dict()
            rows.append({"selector": sel, "level": lv, "ppl": r.ppl, "delta": r.ppl / base - 1,
                         "sparsity": st["sparsity"], "recall": st["predictor_recall"], "selected": st["selected"]})
            err(f"{sel} {lv:g}: PPL {r.ppl:.4f} ({r.ppl / base - 1:+.2%}), sparsity {st['sparsity']:.3f}")
            del m
    print("| selector | target sparsity | measured sparsity | selected (read) | predictor recall | perplexity | vs dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rec = "" if r["recall"] is None else f"{r['recall']:.3f}"
        print(f"| {r['selector']} | {r['level']:.2f} | {r['sparsity']:.3f} | {r['selected']:.3f} | {rec} | "
              f"{r['ppl']:.4f} | {r['delta']:+.2%} |")
    if args.json:
        save_json(args.json, rows)
    if args.png:
        plot(rows, base, f"{dense_name(args.model)}: sparsity vs perplexity", args.png)
    return 0


def dense_name(path):
    import os
    return os.path.basename(path).replace(".edgert.gguf", "")


def plot(rows, base, title, path):
    """Perplexity against measured sparsity, a line per selector (rows as main() makes them)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for sel in sorted({r["selector"] for r in rows} - {"dense"}):
        pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["selector"] == sel)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{sel} selector")
    ax.axhline(base, color="gray", ls="--", label="dense")
    ax.axhline(base * 1.03, color="gray", ls=":", label="dense + 3%")
    ax.set_xlabel("measured FFN sparsity (decode)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
