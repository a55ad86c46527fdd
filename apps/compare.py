"""edgert compare -m MODEL: edgert's intermediate tensors against llama.cpp's, op by op.

Evaluates the same random tokens as one batch in both engines (llama.cpp through
llama-cpp-python, flash attention off) and prints, per layer and per named tensor (llama.cpp's
names), the fraction of elements that are bit-identical, the largest difference and the first
token that differs. The first row that is not exact names the operation to look at.
"""
from __future__ import annotations


import numpy as np

from edgert.apps.common import model_path, parser


def main(argv) -> int:
    p = parser("compare", __doc__)
    p.add_argument("-m", "--model", default=None, help="model name or .gguf path")
    p.add_argument("-n", "--n-tokens", type=int, default=32, help="tokens in the batch")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-s", "--seed", type=int, default=1)
    p.add_argument("--all", action="store_true", help="print every tensor, not only the inexact ones")
    args = p.parse_args(argv)
    from edgert.compare import compare
    from edgert.errors import EdgertError
    from edgert.gguf_file import GGUFFile
    path = model_path(args.model)
    if args.n_tokens < 1:
        raise EdgertError(f"-n {args.n_tokens}: need at least one token")
    g = GGUFFile(path)
    n_vocab = g.tensor("token_embd.weight").rows
    g.close()
    n_ctx = max(64, -(-args.n_tokens // 64) * 64)
    tokens = np.random.default_rng(args.seed).integers(min(3, n_vocab - 1), n_vocab, args.n_tokens)
    rows = compare(path, tokens, n_ctx, args.threads)
    print("| tensor | exact | max abs diff | first token |")
    print("|---|---:|---:|---:|")
    shown = 0
    for r in rows:
        if args.all or r.exact < 1.0:
            print(f"| {r.name} | {r.exact:.4%} | {r.max_abs:.3e} | {r.first_token if r.first_token >= 0 else '-'} |")
            shown += 1
    n_exact = sum(r.exact == 1.0 for r in rows)
    print(f"\n{n_exact} of {len(rows)} tensors bit-identical ({args.n_tokens} tokens, {path})")
    return 0
