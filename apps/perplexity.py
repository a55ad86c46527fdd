"""edgert perplexity: llama-perplexity's method (chunks of n_ctx, BOS first, second half scored)."""
from __future__ import annotations

import sys

from edgert.apps.common import add_model_args, err, load, parser, ranged, read_text


def main(argv) -> int:
    p = parser("perplexity", __doc__)
    add_model_args(p, ctx=False)
    p.add_argument("-f", "--file", required=True, help="text file")
    p.add_argument("-c", "--ctx-size", type=ranged(int, 2), default=512, help="chunk size in tokens")
    p.add_argument("--chunks", type=ranged(int, -1), default=-1, help="max chunks (-1 = all)")
    p.add_argument("-b", "--batch-size", type=ranged(int, 1), default=512, help="batch size in tokens")
    p.add_argument("--per-token", action="store_true",
                   help="evaluate one token at a time, as decoding does (default with --ffn sparse)")
    p.add_argument("--measure-recall", action="store_true",
                   help="sparse FFN: hold the gate matrices too and report the predictor's recall")
    args = p.parse_args(argv)
    from edgert.perplexity import perplexity
    text = read_text(args.file)
    model, tok = load(args)
    ids = tok.encode(text, add_special=True)
    bos = tok.bos_id if tok.add_bos else None
    n_avail = len(ids) // args.ctx_size
    n = n_avail if args.chunks < 0 else min(args.chunks, n_avail)
    err(f"perplexity: tokenized {len(ids)} tokens; calculating over {n} chunks of n_ctx={args.ctx_size}")
    per_token = args.per_token or model.placement.ffn == "sparse"
    res = perplexity(model, ids, args.ctx_size, args.chunks, bos, per_token=per_token,
                     on_chunk=lambda i, v: (sys.stdout.write(f"[{i + 1}]{v:.4f},"), sys.stdout.flush()))
    sys.stdout.write("\n")
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f}")
    if model.placement.ffn != "dense":
        st = model.stats.as_dict()
        rec = "-" if st["predictor_recall"] is None else f"{st['predictor_recall']:.4f}"
        print(f"ffn {model.placement.ffn}: selector {model.placement.selector}, sparsity {st['sparsity']:.4f}, "
              f"recall {rec}, cluster hit rate {st['neuron_hit_rate']}, "
              f"{st['bytes_read_per_token'] / 2**20:.2f} MiB read per token")
    return 0
