"""edgert show NAME|PATH: architecture, parameters, quant types, size, context."""
from __future__ import annotations

import collections
import os


def main(argv) -> int:
    from edgert.apps.common import model_path, parser
    p = parser("show", __doc__)
    p.add_argument("model", help="pulled model name or .gguf path")
    args = p.parse_args(argv)
    from edgert.config import config_from_gguf
    from edgert.gguf_file import GGUFFile, type_name
    path = model_path(args.model)
    g = GGUFFile(path)
    c = config_from_gguf(g)
    types = collections.Counter(type_name(t.qtype) for t in g.tensors.values())
    rows = [
        ("file", path), ("name", c.name), ("architecture", c.arch),
        ("parameters", f"{g.n_params / 1e6:.1f}M"),
        ("size", f"{os.path.getsize(path) / 1e6:.1f} MB"),
        ("quant types", ", ".join(f"{k} x{v}" for k, v in types.most_common())),
        ("context (trained)", c.n_ctx_train), ("layers", c.n_layer), ("embedding", c.n_embd),
        ("feed-forward", f"{c.n_ff} ({'GeGLU' if c.ffn_act == 'gelu' else 'SwiGLU'})"),
        ("heads (q / kv)", f"{c.n_head} / {c.n_head_kv}, head dim {c.head_dim}"),
        ("rope", f"{'neox' if c.rope_neox else 'normal'}, base {c.rope_base:g}"
                 + (f", local base {c.rope_base_swa:g}" if c.swa_window else "")),
        ("sliding window", f"{c.swa_window} on {sum(c.swa_layers)} of {c.n_layer} layers" if c.swa_window else "none"),
        ("vocabulary", f"{c.n_vocab} ({g.get('tokenizer.ggml.model')}, pre '{g.get('tokenizer.ggml.pre', 'default')}')"),
        ("tied embeddings", c.tied_embeddings),
        ("chat template", "yes" if g.get("tokenizer.chat_template") else "no"),
    ]
    for k, v in rows:
        print(f"{k:<20} {v}")
    return 0
