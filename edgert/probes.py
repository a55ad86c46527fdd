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
        from edgert.kernels.matmul import set_threads

        from edgert.kernels.probe import read_sum
        set_threads(threads)
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

def op_costs(threads: int, refresh: bool = False, stream_types=()) -> dict:
    """Calibration of the cost model on this machine, with `threads` threads: for each kernel,
    (a, b) of time = a + b * work, fitted through two sizes whose data sit in the cache (matmul
    work: weights; attention: heads x positions x head_dim; small ops: vector elements); and
    'python_per_op', the interpreter's time per op call, from a tiny random model's decode step
    less its modelled kernel time."""
    def measure():
        from edgert.kernels.matmul import set_threads
        set_threads(threads)
        cal = _kernel_fits()
        cal["membw"] = memory_bandwidth(threads)
        for q in stream_types:
            cal[f"stream:{q}"] = _stream_rate(q)
        cal["python_per_op"] = _python_per_op(cal)
        return cal
    from edgert.kernels import _digest  # the calibration belongs to these kernel sources
    key = ",".join(sorted(stream_types))
    return cached(f"opcosts5|{threads}|{key}|{_digest}", measure, refresh)


_STREAM = {}  # qtype name -> list of QMatrix slices (built once per process)


def _stream_rate(qname: str) -> float:
    """Seconds per weight of a GEMV whose matrix streams from DRAM (a 64 MiB matrix called in
    slices of 2048 rows, so nothing is in the cache): the kernel as decode runs it."""
    from edgert.converters.tiny import random_blocks
    from edgert.kernels.matmul import ActBuffers, matmul
    from edgert.kernels.quant import TYPE_NAMES, repack, repacked_nbytes
    q = next(k for k, v in TYPE_NAMES.items() if v == qname)
    cols, rows = 1024, 2048
    if qname not in _STREAM:
        n = max(2, (64 << 20) // repacked_nbytes(q, rows, cols))
        rng = np.random.default_rng(2)
        big = repack(q, np.ascontiguousarray(random_blocks(q, rows * n, cols, rng)).view(np.uint8).reshape(-1),
                     rows * n, cols)
        _STREAM[qname] = [big.row_slice(i * rows, (i + 1) * rows) for i in range(n)]
    mats = _STREAM[qname]
    x = np.random.default_rng(0).standard_normal((1, cols)).astype(np.float32)
    y = np.empty((1, rows), np.float32)
    act = ActBuffers(1, cols)
    for w in mats[:2]:
        matmul(w, x, y, act)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        for w in mats:
            matmul(w, x, y, act)
        ts.append((time.perf_counter() - t0) / len(mats))
    return float(np.median(ts)) / (rows * cols)


def _fit(t_small, w_small, t_big, w_big):
    b = max(0.0, (t_big - t_small) / (w_big - w_small))
    return [max(0.0, t_small - b * w_small), b]


def _kernel_fits() -> dict:
    from edgert.converters.tiny import random_matrix
    from edgert.gguf_file import type_name
    from edgert.kernels.activation import geglu, swiglu
    from edgert.kernels.attention import attention, store_kv
    from edgert.kernels.matmul import ActBuffers, matmul
    from edgert.kernels.norm import rmsnorm
    from edgert.kernels.quant import dequantize_row
    from edgert.kernels.rope import rope, theta_scale
    rng = np.random.default_rng(0)
    cal = {}
    # matmul: a = a call on a 64 x 256 matrix (its work is negligible), b = the slope between
    # 512 and 2048 rows of 1024 (0.3-8 MiB: in L2/L3, so the kernel's own rate, not DRAM's)
    cols = 1024
    x = rng.standard_normal((1, cols)).astype(np.float32)
    act = ActBuffers(1, cols)
    tiny, small, big = random_matrix(64, 256), random_matrix(512, cols), random_matrix(2048, cols, seed=1)

    def t_matmul(w):
        y = np.empty((1, w.rows), np.float32)
        xx = x[:, :w.cols].copy()
        return _best(lambda: matmul(w, xx, y, act), 200)
    for q in small:
        slope = _fit(t_matmul(small[q]), 512 * cols, t_matmul(big[q]), 2048 * cols)[1]
        cal[type_name(q)] = [t_matmul(tiny[q]), slope]
    w8 = big[8] if 8 in big else next(iter(big.values()))
    row = np.empty(cols, np.float32)
    t = [_best(lambda: dequantize_row(w8, 3, row), 300)] * 2
    cal["embed"] = [t[0], 0.0]

    def fit_vec(fn_of_n, n1, n2, reps=300):
        return _fit(_best(fn_of_n(n1), reps), n1, _best(fn_of_n(n2), reps), n2)

    def norm_n(n):
        v, g = rng.standard_normal((1, n)).astype(np.float32), np.ones(n, np.float32)
        return lambda: rmsnorm(v, g, 1e-6, v)
    cal["rmsnorm"] = fit_vec(norm_n, 512, 8192)
    ts = theta_scale(10000.0, 64)

    def rope_n(n):
        v = rng.standard_normal((1, n // 64, 64)).astype(np.float32)
        return lambda: rope(v, 17, 64, ts, np.float32(1.0), True)
    cal["rope"] = fit_vec(rope_n, 256, 4096)

    def kv_n(n):
        k = rng.standard_normal((1, n // 64, 64)).astype(np.float32)
        kc = np.zeros((8, n // 64, 64), np.uint16)
        return lambda: store_kv(k, k, kc, kc, 3)
    cal["store_kv"] = fit_vec(kv_n, 128, 2048)
    for name, fn in (("swiglu", swiglu), ("geglu", geglu)):
        def act_n(n, fn=fn):
            g, u = rng.standard_normal((1, n)).astype(np.float32), rng.standard_normal((1, n)).astype(np.float32)
            o = np.empty_like(g)
            return lambda: fn(g, u, o)
        cal[name] = fit_vec(act_n, 1024, 8192)
    H, KV, D = 8, 2, 64
    kc = rng.integers(0x3000, 0x3800, (1024, KV, D)).astype(np.uint16)
    q = rng.standard_normal((1, H, D)).astype(np.float32)
    out = np.empty((1, H * D), np.float32)

    def att_n(work):
        pos = work // (H * D) - 1
        return lambda: attention(q, kc, kc, pos, 0, np.float32(0.125), out)
    cal["attention"] = fit_vec(att_n, H * D * 64, H * D * 1024, 200)
    return cal


def _python_per_op(cal: dict) -> float:
    import shutil

    from edgert.converters.tiny import tiny_model_path
    from edgert.costmodel import Scale, decode_ops, op_time
    from edgert.model import Model
    path = tiny_model_path("llama", n_layer=12)
    try:
        m = Model(path, n_ctx=64, n_batch=8)
        m.forward(np.arange(3, 11))
        t = []
        for _ in range(3):
            m.n_past = 8
            t.append(_best(lambda: (m.decode_one_token(5), setattr(m, "n_past", 8)), 100))
        ops = decode_ops(m, 8)
        kernels = sum(op_time(op, {**cal, "python_per_op": 0.0}, Scale(1.0, 1.0, 1e18))["total"] for op in ops)
        return max(0.0, (min(t) - kernels) / len(ops))
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


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
    if simd == 512 and "AMD" in cpu_info():
        simd = 256  # Zen 4 executes AVX-512 on 256-bit data paths (two passes)
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
                 "(FMA pipes: 2 assumed; AMD Zen 4 AVX-512 counted as 256-bit)",
                 "memory": f"psutil total; bandwidth: streaming-read probe with {threads} threads; "
                           "app_share 0.8 (edgert assumption)",
                 "flash": f"random-read probe of a 256 MiB file, {st['mode']}, depths {PROBE_DEPTHS}",
                 "accelerators": "none used"},
        path="(measured)")
