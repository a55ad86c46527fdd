"""The f16 attention kernel with its float32 scratch allocated per call (as before this change:
`attention`) and reused (`attention_buf`, what KVCache does), one decode step of one layer at
2,048 cached positions, SmolLM2-135M's shapes (9 heads, 3 KV heads, head 64); both give the same
bits. Run alone (2 cores):

  NUMBA_CACHE_DIR=~/.cache/edgert/numba .venv/bin/python docs/experiments/f16_attention_scratch.py
"""
import time

import numpy as np

from edgert.kernels.attention import attention, attention_buf, store_kv


def main():
    rng = np.random.default_rng(0)
    n_ctx, H, Hkv, D, P = 4096, 9, 3, 64, 2048
    kc = np.zeros((n_ctx, Hkv, D), np.uint16)
    vc = np.zeros((n_ctx, Hkv, D), np.uint16)
    k = rng.standard_normal((P, Hkv, D)).astype(np.float32)
    store_kv(k, k, kc, vc, 0)
    q = rng.standard_normal((1, H, D)).astype(np.float32)
    a, b = np.empty((1, H * D), np.float32), np.empty((1, H * D), np.float32)
    kf, vf = np.empty((n_ctx, Hkv, D), np.float32), np.empty((n_ctx, Hkv, D), np.float32)
    attention(q, kc, vc, P - 1, 0, np.float32(0.125), a)
    attention_buf(q, kc, vc, P - 1, 0, np.float32(0.125), b, kf, vf)
    assert np.array_equal(a, b)
    for name, f in (("per call", lambda: attention(q, kc, vc, P - 1, 0, np.float32(0.125), a)),
                    ("reused", lambda: attention_buf(q, kc, vc, P - 1, 0, np.float32(0.125), b, kf, vf))):
        ts = []
        for _ in range(200):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        print(f"scratch {name}: median {np.median(ts) * 1e6:.0f} us per layer and token")


if __name__ == "__main__":
    main()
