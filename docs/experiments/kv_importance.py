"""The adaptive cache's importance scores after one 2,048-token chunk of Qwen2.5-Coder-0.5B
(tiers q4/q2 + q3/q2 at 3.5 bits): positions per tier, score percentiles, the mean score of the
middle and bottom tiers (docs/kv-cache.md). Text: the python3.11-doc tutorial sources.

  NUMBA_CACHE_DIR=~/.cache/edgert/numba .venv/bin/python docs/experiments/kv_importance.py tutorial.txt
"""
import sys

import numpy as np

from edgert.gguf_file import GGUFFile
from edgert.kv_cache import KVFormat
from edgert.model import Model
from edgert.registry import local_path
from edgert.tokenizer import Tokenizer

path = str(local_path("qwen2.5-coder-0.5b"))
m = Model(path, n_ctx=2048, kv=KVFormat("auto", "auto", 3.5, ("f16/q8_0", "q4/q2", "q3/q2")))
tok = Tokenizer(GGUFFile(path).metadata, path)
m.forward(tok.encode(open(sys.argv[1]).read(), add_special=True)[:2048])
kv = m.kv
for il in (0, 5, 12, 23):
    sc = kv.imp[il] / (2048 - np.arange(2048))
    t = kv.tier[il]
    print(il, "positions per tier", np.bincount(t + 1)[1:], "score percentiles 10/50/90/99",
          np.percentile(sc[4:-64], [10, 50, 90, 99]).round(4),
          "mean score middle %.4f bottom %.4f" % (sc[t == 1].mean(), sc[t == 2].mean()))
print(kv.histogram(2048))
