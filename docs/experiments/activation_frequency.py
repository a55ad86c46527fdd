"""One-off measurement behind docs/neuron-cache.md (see its header for the command)."""
import sys, numpy as np
from edgert.model import Model
from edgert.tokenizer import Tokenizer
from edgert.gguf_file import GGUFFile
from edgert.apps.common import setup_threads
from edgert.apps.convert import default_calibration
from edgert.converters.package import calibrate, act_abs
setup_threads(2)
src = sys.argv[1]
m = Model(src, n_ctx=512, n_batch=512)
g = GGUFFile(src); tok = Tokenizer(g.metadata, src)
text,_ = default_calibration()
ids = np.array(tok.encode(text, add_special=False)[:2048])
recs = calibrate(m, ids, 512)
held = np.array(tok.encode(open(sys.argv[2]).read(), add_special=False)[:1024])
recs_h = calibrate(m, held, 512)
for S in (0.5, 0.7):
  for il in (2, len(recs)//2, len(recs)-2):
    X, G = recs[il]; Xh, Gh = recs_h[il]
    a = act_abs(m.cfg.ffn_act, G); ah = act_abs(m.cfg.ffn_act, Gh)
    tau = np.quantile(a, S)
    f = (a > tau).mean(0); perm = np.argsort(-f)
    ex = (ah > tau)[:, perm]
    fh = ex.mean(0)
    q = np.quantile(fh, [0.1, 0.25, 0.5, 0.75, 0.9])
    # fraction of active mass in hottest 25% / 50% neurons
    cum = np.cumsum(fh) / fh.sum()
    n = len(fh)
    s = f"S {S} layer {il}: freq quantiles {np.round(q,2)}; active share in hottest 25% {cum[n//4-1]:.2f}, 50% {cum[n//2-1]:.2f}"
    for C in (8, 32):
        touched = ex.reshape(ex.shape[0], -1, C).any(2).mean()
        s += f"; C={C} clusters touched {touched:.2f}"
    print(s, flush=True)
