"""One-off measurement behind docs/neuron-cache.md (see its header for the command)."""
import sys, numpy as np
from edgert.model import Model
from edgert.tokenizer import Tokenizer
from edgert.gguf_file import GGUFFile
from edgert.apps.common import setup_threads
from edgert.apps.convert import default_calibration
from edgert.converters.package import calibrate, act_abs, fit_predictor, quantize_rows_int8, predict
setup_threads(2)
src = sys.argv[1]
m = Model(src, n_ctx=512, n_batch=512)
g = GGUFFile(src); tok = Tokenizer(g.metadata, src)
text,_ = default_calibration()
ids = np.array(tok.encode(text, add_special=False)[:3072])
recs = calibrate(m, ids, 512)
held = np.array(tok.encode(open(sys.argv[2]).read(), add_special=False)[:1024])
recs_h = calibrate(m, held, 512)
for il in (2, len(recs)//2, len(recs)-2):
    X, G = recs[il]; Xh, Gh = recs_h[il]
    a = act_abs(m.cfg.ffn_act, G); ah = act_abs(m.cfg.ffn_act, Gh)
    tau = np.quantile(a, 0.5)
    ex = ah > tau
    for r in (32, 64, 128, 256):
        if r > X.shape[1]: continue
        A, B = fit_predictor(X, G, r)
        aq, as_ = quantize_rows_int8(A); bq, bs = quantize_rows_int8(B)
        p = act_abs(m.cfg.ffn_act, predict(Xh, aq, as_, bq, bs))
        res = []
        for rt in (0.9, 0.95, 0.99):
            t2 = np.quantile(p[ex], 1 - rt)
            res.append(f"recall {rt}: selects {np.mean(p > t2):.2f}")
        print(f"layer {il} rank {r}: " + "; ".join(res), flush=True)
