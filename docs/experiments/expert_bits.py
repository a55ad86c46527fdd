"""Per-expert bit widths on pydocs-moe (issue 12's criterion: >= 30% fewer expert bytes read at
<= 2% perplexity cost against uniform 4-bit experts).

For each setting, `edgert convert`'s expert path (converters/expert_bits.py) from the F16 export,
calibrated on pydocs-calib.txt (training files only), then on the held-out text:
- perplexity: 8 chunks of 512 tokens, the second half of each scored (llama-perplexity's method);
- expert bytes read per token, measured: 64 decode steps with every routed expert read from the
  file on each use (`--ffn stream`, O_DIRECT), bytes read / tokens.

    .venv/bin/python docs/experiments/expert_bits.py [--out docs/experiments/expert-bits.jsonl]
"""
import argparse
import json
import os

import numpy as np

from edgert.converters.expert_bits import convert_experts
from edgert.model import Model
from edgert.perplexity import log_softmax_at
from edgert.tokenizer import Tokenizer

M = os.path.expanduser("~/.cache/edgert/models")
ap = argparse.ArgumentParser()
ap.add_argument("--src", default=f"{M}/pydocs-moe.f16.gguf")
ap.add_argument("--calib", default=f"{M}/pydocs-calib.txt")
ap.add_argument("--text", default=f"{M}/pydocs-heldout.txt")
ap.add_argument("--work", default="/tmp/expert-bits")
ap.add_argument("--sizes", default="0.5,0.6,0.7")
ap.add_argument("--chunks", type=int, default=8)
ap.add_argument("--out", default=None)
a = ap.parse_args()
os.makedirs(a.work, exist_ok=True)
calib = open(a.calib, encoding="utf-8").read()
settings = [("uniform Q8_0", dict(uniform="Q8_0")), ("uniform Q4_K", dict(uniform="Q4_K")),
            ("uniform Q3_K", dict(uniform="Q3_K")), ("uniform Q2_K", dict(uniform="Q2_K"))]
settings += [(f"mixed {s}", dict(size=float(s))) for s in a.sizes.split(",")]


def evaluate(path):
    n_ctx = 512
    m = Model(path, n_ctx=n_ctx, n_batch=512)
    tok = Tokenizer(m.gguf.metadata, path)
    ids = tok.encode(open(a.text, encoding="utf-8").read(), add_special=False)
    nll = []
    for c in range(a.chunks):
        chunk = np.array([tok.bos_id] + ids[c * (n_ctx - 1):(c + 1) * (n_ctx - 1)])
        m.reset()
        got = m.forward(chunk, all_logits=True)
        nll.append(-log_softmax_at(got[n_ctx // 2:-1], chunk[n_ctx // 2 + 1:]))
    del m
    s = Model(path, n_ctx=128, ffn="stream", direct_io=True)
    s.prefill(np.array(ids[-200:-136]))
    before = s.stats.bytes_read
    for t in ids[-136:-72]:
        s.decode_one_token(int(t))
    per_token = (s.stats.bytes_read - before) / 64
    return float(np.exp(np.concatenate(nll).mean())), per_token, s.reader.mode


rows = []
for name, kw in settings:
    out = os.path.join(a.work, name.replace(" ", "-") + ".edgert.gguf")
    r = convert_experts(a.src, out, calib, os.path.basename(a.calib), **kw)
    ppl, per_token, mode = evaluate(out)
    rows.append(dict(setting=name, expert_types=r["expert_types"], ppl=ppl, bytes_read_per_token=per_token,
                     expected_bytes_read_per_token=r["expert_bytes_read_per_token"], reads=mode,
                     file_mib=os.path.getsize(out) / 2**20))
    print(json.dumps(rows[-1]), flush=True)
ref = next(r for r in rows if r["setting"] == "uniform Q4_K")
print(f"\n| setting | experts | perplexity | vs uniform Q4_K | expert bytes read per token (measured) | vs uniform Q4_K |")
print("|---|---|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['setting']} | {r['expert_types']} | {r['ppl']:.3f} | {r['ppl'] / ref['ppl'] - 1:+.2%} | "
          f"{r['bytes_read_per_token'] / 2**20:.3f} MiB | {r['bytes_read_per_token'] / ref['bytes_read_per_token'] - 1:+.1%} |")
if a.out:
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
