"""pydocs-moe against llama.cpp on the held-out Python docs: perplexity (llama-perplexity's method:
512-token chunks, the second half of each scored), teacher-forced top-1 agreement, logit error,
and the routing facts every expert-cache number depends on (skew, reuse between tokens).

    .venv/bin/python docs/experiments/moe_quality.py [--chunks 8] [--model PATH] [--out FILE]
"""
import argparse
import json
import os

import numpy as np

from edgert.model import Model
from edgert.perplexity import log_softmax_at
from edgert.tokenizer import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.expanduser("~/.cache/edgert/models/pydocs-moe.gguf"))
ap.add_argument("--text", default=os.path.expanduser("~/.cache/edgert/models/pydocs-heldout.txt"))
ap.add_argument("--chunks", type=int, default=8)
ap.add_argument("--out", default=None)
a = ap.parse_args()
import llama_cpp
n_ctx = 512
m = Model(a.model, n_ctx=n_ctx, n_batch=512)
tok = Tokenizer(m.gguf.metadata, a.model)
ids = tok.encode(open(a.text, encoding="utf-8").read(), add_special=False)
ll = llama_cpp.Llama(a.model, n_ctx=n_ctx, n_batch=512, n_threads=2, logits_all=True, verbose=False)
nll_e, nll_l, agree, err = [], [], [], []
routes = []  # [chunk][layer] -> idx [T, k]
from edgert.experts import ExpertStore
orig = ExpertStore.__call__


def spy(self, xn, out):
    orig(self, xn, out)
    routes[-1][self.il] = self.idx[:xn.shape[0]].copy()


ExpertStore.__call__ = spy
for c in range(a.chunks):
    chunk = np.array([tok.bos_id] + ids[c * (n_ctx - 1):(c + 1) * (n_ctx - 1)])
    routes.append({})
    m.reset()
    got = m.forward(chunk, all_logits=True)
    ll.reset()
    ll.eval(list(map(int, chunk)))
    ref = np.array(ll.scores[:len(chunk)], np.float32)
    first = n_ctx // 2
    nll_e.append(-log_softmax_at(got[first:-1], chunk[first + 1:]))
    nll_l.append(-log_softmax_at(ref[first:-1], chunk[first + 1:]))
    agree.append(got.argmax(1) == ref.argmax(1))
    err.append(np.abs(got - ref).max() / np.abs(ref).max())
ppl_e = float(np.exp(np.concatenate(nll_e).mean()))
ppl_l = float(np.exp(np.concatenate(nll_l).mean()))
# routing: share of routed slots taken by the most used 25% of experts; chance that a token's
# expert was also routed for the previous token (what an LRU of recent experts can hit)
X = m.cfg.n_expert
counts = np.zeros((m.cfg.n_layer, X))
reuse = []
for r in routes:
    for il, idx in r.items():
        np.add.at(counts[il], idx.ravel(), 1)
        reuse.append(np.mean([len(set(idx[t]) & set(idx[t - 1])) / idx.shape[1] for t in range(1, len(idx))]))
top = np.sort(counts, 1)[:, ::-1]
res = {"model": os.path.basename(a.model), "tokens_scored": int(sum(len(x) for x in nll_e)),
       "ppl_edgert": ppl_e, "ppl_llama_cpp": ppl_l, "ppl_rel_diff": ppl_e / ppl_l - 1,
       "top1_agreement": float(np.concatenate(agree).mean()), "max_rel_logit_err": float(max(err)),
       "top25pct_expert_share": float((top[:, :X // 4].sum(1) / top.sum(1)).mean()),
       "expert_share_per_layer_min_max": [float(counts.min() / counts.sum() * m.cfg.n_layer),
                                          float(counts.max() / counts.sum() * m.cfg.n_layer)],
       "previous_token_reuse": float(np.mean(reuse))}
print(json.dumps(res, indent=1))
if a.out:
    with open(a.out, "a") as f:
        f.write(json.dumps(res) + "\n")
