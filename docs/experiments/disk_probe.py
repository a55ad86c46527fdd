"""Random O_DIRECT read throughput of FILE by request size and queue depth (Python threads).
One-off measurement behind docs/neuron-cache.md; usage: python disk_probe.py FILE (>= 1 GiB)."""
import mmap
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
size = os.fstat(fd).st_size


def run(bs, qd, n):
    bufs = [mmap.mmap(-1, bs) for _ in range(qd)]
    offs = [random.randrange(0, size // bs) * bs for _ in range(n)]

    def rd(i):
        os.preadv(fd, [bufs[i % qd]], offs[i])
    t = time.perf_counter()
    with ThreadPoolExecutor(qd) as ex:
        list(ex.map(rd, range(n)))
    dt = time.perf_counter() - t
    print(f"bs {bs // 1024:5d}K qd {qd:2d}: {n / dt:8.0f} IOPS {n * bs / dt / 1e6:8.1f} MB/s")


for bs in (4096, 8192, 16384, 65536, 262144, 1 << 20):
    for qd in (1, 8, 32):
        run(bs, qd, max(64, min(4000, (256 << 20) // bs)))
