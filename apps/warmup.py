"""edgert warmup: compile every kernel for this machine into Numba's on-disk cache."""
from __future__ import annotations

import argparse
import time


def main(argv) -> int:
    argparse.ArgumentParser(prog="edgert warmup", description=__doc__).parse_args(argv)
    from edgert.warmup import warmup
    t0 = time.perf_counter()
    n = warmup()
    print(f"compiled {n} kernel signatures in {time.perf_counter() - t0:.1f} s")
    return 0
