"""edgert warmup [-m MODEL]: compile kernels for this machine into Numba's on-disk cache.

Without -m: every kernel of every architecture, KV format and FFN store (tiny models). With -m:
only what MODEL needs, by running one short prefill and decode of it (what a device needs before
its first timed run: on a slow or emulated CPU the full set takes long).
"""
from __future__ import annotations


from edgert.apps.common import parser
import time


def main(argv) -> int:
    p = parser("warmup", __doc__)
    p.add_argument("-m", "--model", default=None, help="compile only the kernels this model (name or path) uses")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.model:
        from edgert.warmup import warmup_model
        n = warmup_model(args.model)
    else:
        from edgert.warmup import warmup
        n = warmup()
    print(f"compiled {n} kernel signatures in {time.perf_counter() - t0:.1f} s")
    return 0
