"""Teacher-forced agreement of the backends with the Numba engine (= llama.cpp's logits): top-1
agreement, perplexity and the largest logit difference over the first N tokens of a text.

    .venv/bin/python docs/experiments/backend_agreement.py MODEL TEXT [N] [EXPORT ...]

EXPORT: an export directory (its backend from its manifest); default: the model's cached onnx and
tflite exports (EDGERT_CACHE/exports, written on first use)."""
import json
import sys

import numpy as np

from edgert.apps.common import setup_threads
from edgert.gguf_file import GGUFFile
from edgert.model import Model
from edgert.registry import resolve
from edgert.tokenizer import Tokenizer


def nll(lg, ids):
    lg = lg[:-1].astype(np.float64)
    m = lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg - m).sum(-1)) + m[:, 0]
    return float(np.mean(lse - lg[np.arange(len(ids) - 1), ids[1:]]))


def main():
    setup_threads(2)
    path, text = resolve(sys.argv[1]), sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    exports = sys.argv[4:] or [None, None]
    g = GGUFFile(path)
    tok = Tokenizer(g.metadata, path)
    g.close()
    ids = tok.encode(open(text, encoding="utf-8").read())[:n]
    a = Model(path, n_ctx=n)
    la = a.forward(ids, all_logits=True)
    rows = [{"backend": "numba", "tokens": len(ids), "ppl": float(np.exp(nll(la, ids)))}]
    for e, be in zip(exports, ["onnx", "tflite"] if exports == [None, None] else [None] * len(exports)):
        if e is not None:
            be = "tflite" if json.load(open(f"{e}/manifest.json"))["format"] == "edgert-tflite" else "onnx"
        b = Model(e or path, n_ctx=n, backend=be)
        lb = b.forward(ids, all_logits=True)
        rows.append({"backend": be, "export": b.export_dir, "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).mean()),
                     "ppl": float(np.exp(nll(lb, ids))), "max_logit_diff_rel": float(np.abs(la - lb).max() / np.abs(la).max())})
        del b
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
