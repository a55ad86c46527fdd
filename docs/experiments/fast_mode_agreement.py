"""Teacher-forced agreement with llama.cpp of the kernel mode in EDGERT_MODE (docs/kernels.md).

    EDGERT_MODE=fast .venv/bin/python docs/experiments/fast_mode_agreement.py qwen2.5-coder-1.5b /tmp/text/tutorial.txt

Two 512-token chunks of the text (BOS first where the model wants it), all logits of each from
edgert and from llama.cpp (llama-cpp-python, 2 threads, no flash attention) on the same file;
prints one JSON line: top-1 agreement, the share of logit rows bit-identical, the mean and max
|logit difference|.
"""
import json
import sys

import numpy as np


def main(name: str, text_path: str, n_ctx: int = 512, chunks: int = 2):
    import llama_cpp

    from edgert.kernels import isa
    from edgert.model import Model
    from edgert.registry import resolve
    from edgert.tokenizer import Tokenizer
    path = resolve(name)
    model = Model(path, n_ctx=n_ctx)
    tok = Tokenizer(model.gguf.metadata, path)
    ll = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True, verbose=False)
    ids = tok.encode(open(text_path, encoding="utf-8").read(), add_special=True)[: chunks * n_ctx]
    agree, same, err = [], [], []
    for c in range(chunks):
        chunk = np.array(ids[c * n_ctx:(c + 1) * n_ctx])
        if tok.add_bos:
            chunk[0] = tok.bos_id
        model.reset()
        got = model.forward(chunk, all_logits=True)
        ll.reset()
        ll.eval(list(map(int, chunk)))
        ref = np.array(ll.scores[:len(chunk)], np.float32)
        agree.append(got.argmax(1) == ref.argmax(1))
        same.append((got.view(np.uint32) == ref.view(np.uint32)).all(1))
        err.append(np.abs(got - ref))
    e = np.concatenate([x.ravel() for x in err])
    print(json.dumps({"model": name, "kernels": isa.describe(), "tokens": int(sum(len(a) for a in agree)),
                      "top1_agreement": round(float(np.concatenate(agree).mean()), 4),
                      "rows_bit_identical": round(float(np.concatenate(same).mean()), 4),
                      "mean_abs_logit_diff": float(e.mean()), "max_abs_logit_diff": float(e.max())}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
