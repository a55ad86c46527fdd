"""One-off measurement behind docs/neuron-cache.md (see its header for the command)."""
import sys, numpy as np
from edgert.model import Model
from edgert.tokenizer import Tokenizer
from edgert.perplexity import perplexity
from edgert.apps.common import setup_threads
from edgert.kernels.matmul import matmul
from edgert.converters.package import act_abs
setup_threads(2)
src = sys.argv[1]; S = float(sys.argv[3])
made = {}
m = Model(src, n_ctx=512, ffn="dense", before_weights=lambda g: made.setdefault("t", Tokenizer(g.metadata, src)))
tok = made["t"]
ids = tok.encode(open(sys.argv[2]).read(), add_special=True)
dense = list(m.ffn)
class Masked:
    def __init__(self, d, mode): self.d, self.mode = d, mode
    def __call__(self, xn, out):
        d = self.d; T = xn.shape[0]; s = d.s
        g = np.empty((T, d.w_gate.rows), np.float32); u = np.empty_like(g)
        matmul(d.w_gate, xn, g, s.act_e); matmul(d.w_up, xn, u, s.act_e)
        ag = np.sign(g) * act_abs(m.cfg.ffn_act, g)  # |act(g)| with sign of g ~ act(g) for silu mostly
        from edgert.kernels.activation import swiglu
        a = np.empty_like(g); swiglu(g, u, a)
        one = np.ones_like(g); actg = np.empty_like(g); swiglu(g, one, actg)
        if self.mode == "gate_topk": score = np.abs(actg)
        elif self.mode == "prod_topk": score = np.abs(a)
        k = int(round(S * g.shape[1]))
        thr = np.partition(score, k, axis=1)[:, k:k+1]
        a = np.where(score >= thr, a, 0).astype(np.float32)
        matmul(d.w_down, a, out, s.act_q)
for mode in sys.argv[4:]:
    m.ffn = [Masked(d, mode) for d in dense]
    r = perplexity(m, ids, 512, 2, tok.bos_id if tok.add_bos else None)
    print(mode, S, r.ppl, flush=True)
m.ffn = dense
print("dense", perplexity(m, ids, 512, 2, tok.bos_id if tok.add_bos else None).ppl)
