"""Short measurements of this machine, cached per machine in EDGERT_CACHE/probes.json: memory
read bandwidth, the storage read curve (O_DIRECT), the matmul kernels' in-cache throughput and
the fixed cost of one kernel call. They build the live `host` device profile and calibrate the
cost model; none of them looks at a model's decode time.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def cpu_info() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_path() -> Path:
    from edgert.settings import env
    return Path(env("EDGERT_CACHE")).expanduser() / "probes.json"


def cached(name: str, compute, refresh: bool = False):
    """The cached value of probe `name` on this machine, measured by compute() when missing."""
    path = _cache_path()
    key = f"{platform.node()}|{cpu_info()}|{name}"
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
    if key in data and not refresh:
        return data[key]
    value = compute()
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return value


# ============================================================================================
# Memory
# ============================================================================================

def memory_bandwidth(threads: int, refresh: bool = False) -> float:
    """Read bandwidth in bytes/s with `threads` threads (a 512 MiB streaming sum, best of 5)."""
    def measure():
        import numba

        from edgert.kernels.probe import read_sum
        numba.set_num_threads(threads)
        a = np.ones(64 * 1024 * 1024, np.float64)  # 512 MiB, far beyond the caches
        read_sum(a, threads)
        best = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            read_sum(a, threads)
            best = max(best, a.nbytes / (time.perf_counter() - t0))
        return best
    return cached(f"membw2|{threads}", measure, refresh)


# ============================================================================================
# Storage
# ============================================================================================

PROBE_SIZES_KIB = (4, 64, 512, 4096)
PROBE_DEPTHS = (1, 8)


def storage_curve(directory: str, refresh: bool = False) -> dict:
    """{'points': [[KiB, depth, MB/s], ...], 'first_byte_us': .., 'mode': 'O_DIRECT'|...} for
    random reads of a 256 MiB file in `directory` (written once, kept for later probes)."""
    def measure():
        from edgert.flash import FlashReader, aligned_empty
        d = Path(directory).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        f = d / ".edgert-storage-probe"
        size = 256 << 20
        if not f.exists() or f.stat().st_size != size:
            tmp = f.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                block = np.random.default_rng(0).integers(0, 256, 1 << 20, np.uint8).tobytes()
                for _ in range(size >> 20):
                    fh.write(block)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, f)
        rng = np.random.default_rng(1)
        points, lat = [], []
        for depth in PROBE_DEPTHS:
            with FlashReader(str(f), direct=True, io_threads=depth) as r:
                mode = r.mode
                for kib in PROBE_SIZES_KIB:
                    n = kib << 10
                    count = max(depth * 4, min(2000, (64 << 20) // n))
                    offs = rng.integers(0, (size - n) // 4096, count) * 4096
                    bufs = [aligned_empty(n) for _ in range(depth)]
                    t0 = time.perf_counter()
                    futs = [r.submit(int(o), bufs[i % depth]) for i, o in enumerate(offs)]
                    for fu in futs:
                        fu.result()
                    dt = time.perf_counter() - t0
                    points.append([kib, depth, round(count * n / dt / 1e6, 1)])
                    if depth == 1 and kib == 4:
                        lat.append(dt / count)
        return {"points": points, "first_byte_us": round(lat[0] * 1e6, 1), "mode": mode}
    return cached(f"storage|{Path(directory).expanduser().resolve()}", measure, refresh)


# ============================================================================================
# Kernels (in-cache throughput and call overhead, for the cost model)
# ============================================================================================

def kernel_rates(threads: int, refresh: bool = False) -> dict:
    """{qtype name: weights/s of a GEMV whose matrix sits in the cache, 'call_s': seconds of one
    parallel kernel call on a tiny matrix (launch + Python), 'small_op_s': one small op}."""
    def measure():
        import numba

        from edgert.converters.tiny import random_matrix
        from edgert.gguf_file import type_name
        from edgert.kernels.matmul import ActBuffers, matmul
        from edgert.kernels.norm import rmsnorm
        numba.set_num_threads(threads)
        out = {}
        rows, cols = 512, 1024  # 0.1-2 MiB: in L2/L3, so compute-bound, not memory-bound
        x = np.random.default_rng(0).standard_normal((1, cols)).astype(np.float32)
        y = np.empty((1, rows), np.float32)
        act = ActBuffers(1, cols)
        for qtype, w in random_matrix(rows, cols).items():
            matmul(w, x, y, act)
            out[type_name(qtype)] = rows * cols / _best(lambda: matmul(w, x, y, act), 200)
        small = random_matrix(64, 256)
        w = next(iter(small.values()))
        xs, ys, acts = x[:, :256].copy(), np.empty((1, 64), np.float32), ActBuffers(1, 256)
        out["call_s"] = _best(lambda: matmul(w, xs, ys, acts), 500)
        g = np.ones(256, np.float32)
        out["small_op_s"] = _best(lambda: rmsnorm(xs, g, 1e-6, xs), 500)
        return out
    return cached(f"kernels2|{threads}", measure, refresh)


def _best(fn, n) -> float:
    """Median seconds of fn() over n calls (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


# ============================================================================================
# The host profile
# ============================================================================================

def host_profile(refresh: bool = False):
    """A DeviceProfile of this machine, measured: psutil for cores and RAM, /proc/cpuinfo for
    the vector width, the probes above for bandwidth and storage (in EDGERT_MODELS' file system)."""
    import psutil

    from edgert.device_profiles.loader import Cluster, DeviceProfile, FlashCurve
    from edgert.settings import default_threads, env
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    freq = psutil.cpu_freq()
    ghz = (freq.max or freq.current) / 1000 if freq else 0.0
    flags = ""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    simd = 512 if " avx512f" in flags else 256 if " avx2" in flags else 128
    threads = default_threads()
    bw = memory_bandwidth(threads, refresh)
    st = storage_curve(env("EDGERT_MODELS"), refresh)
    ram = psutil.virtual_memory().total
    measured = f"measured on this machine ({cpu_info()})"
    return DeviceProfile(
        name="host", description=f"this machine: {cpu_info()}, {cores} cores, {ram / 2**30:.1f} GiB",
        soc=cpu_info(), os=f"{platform.system()} {platform.release()}",
        clusters=(Cluster(cpu_info(), "big", cores, round(ghz, 2) or 1.0, simd, 2),),
        ram_bytes=ram, app_share=0.8, mem_bandwidth=bw,
        flash=FlashCurve(tuple(tuple(p) for p in st["points"]), st["first_byte_us"],
                         f"host storage ({st['mode']})"),
        accelerators=(), access="local", address="", temp_dir="/tmp/edgert",
        big_core_mask=hex((1 << cores) - 1),
        sources={"device": measured, "cpu": "psutil.cpu_count / cpu_freq, /proc/cpuinfo flags "
                 "(FMA pipes: 2 assumed)",
                 "memory": f"psutil total; bandwidth: streaming-read probe with {threads} threads; "
                           "app_share 0.8 (edgert assumption)",
                 "flash": f"random-read probe of a 256 MiB file, {st['mode']}, depths {PROBE_DEPTHS}",
                 "accelerators": "none used"},
        path="(measured)")
