"""Keeping the JIT compiler's code out of the resident set once the kernels are loaded.

Loading kernels from Numba's cache runs LLVM (target set-up, the runtime's helper module, object
linking), and the pages of libllvmlite.so that this touches stay mapped: about 50-70 MiB of the
process's RSS, more than a small model's weights. After the kernels are loaded nothing in the
decode loop runs LLVM, so edgert loads every kernel the cache holds for this machine *before* the
weights (`preload_kernels`), then tells the kernel it no longer needs those pages
(`release_compiler_pages`: madvise(MADV_DONTNEED) on the library's read-only file mappings that
hold no private copy-on-write pages, so nothing but clean, re-readable file pages is dropped).
The pages stay in the page cache, shared; if LLVM runs again (a kernel signature the cache did
not have), they fault back in.

Off with EDGERT_RELEASE_JIT=0.
"""
from __future__ import annotations

import ctypes
import importlib
import logging

from edgert.settings import env

log = logging.getLogger(__name__)

KERNEL_MODULES = ("quant", "simd", "matmul", "norm", "rope", "attention", "activation", "sparse")
MADV_DONTNEED = 4


def trim_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc malloc_trim): building a tokenizer frees
    tens of MiB of transient allocations that glibc otherwise keeps mapped (measured: Qwen2.5's
    152k-entry tokenizer 69 -> 51 MiB resident)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def enabled() -> bool:
    import numba
    return env("EDGERT_RELEASE_JIT") != "0" and not numba.config.DISABLE_JIT


def unneeded_kernels(qtypes, ffn_act: str, sparse: bool = False, kv_exact: bool = True) -> set:
    """Kernels a model with these matrix types and FFN activation never calls (not worth their
    memory: the tile-layout kernels alone are ~9 MiB loaded); the sparse-FFN kernels only for
    packages; the quantised-KV attention only for a quantised KV cache (kv_exact: f16)."""
    from edgert.kernels.isa import row_kernels
    from edgert.kernels.quant import KQUANTS, LOW_K, ROW_TYPES
    skip = {"geglu", "gelu_f32"} if ffn_act != "gelu" else {"swiglu"}
    if row_kernels() and all(q in ROW_TYPES for q in qtypes):
        skip |= {"matmul_q", "_tile", "_tile_k", "_hsum8_strict"}
        if not any(q in LOW_K for q in qtypes):  # (their row layout dequantises through the tiles')
            skip |= {"_dequantize_row_tiles"}
    if not any(q in KQUANTS for q in qtypes):
        skip |= {"_dequantize_row_rows_k"}
    if not sparse:
        skip |= {"sparse_ffn", "predict_gate", "select_above"}
    skip |= {"attention_kv", "_attend_item", "_row"} if kv_exact else {"attention", "attention_buf"}
    return skip


def preload_kernels(skip=()) -> int:
    """Load every kernel signature cached for this machine (never compiles), except the kernels
    named in `skip`. -> signatures loaded."""
    from numba.core.dispatcher import Dispatcher
    n = 0
    for name in KERNEL_MODULES:
        mod = importlib.import_module(f"edgert.kernels.{name}")
        for fname, obj in vars(mod).items():
            if fname in skip:
                continue
            cache = getattr(obj, "_cache", None)
            if not isinstance(obj, Dispatcher) or cache is None or not hasattr(cache, "_cache_file"):
                continue
            try:
                index = cache._cache_file._load_index()
            except Exception:  # no index yet, or an unreadable one: the first call compiles
                continue
            codegen = obj.targetctx.codegen()
            for key in index:
                sig = key[0]
                if key[1] != codegen.magic_tuple() or cache._index_key(sig, codegen) != key:
                    continue  # another CPU's, or stale source
                if sig not in obj.overloads and obj._cache.load_overload(sig, obj.targetctx) is not None:
                    obj.compile(sig)  # now a cache hit: loads, adds the overload
                    n += 1
    return n


def _mappings(name: str):
    """[(start, end, private_kb)] of this process's read-only mappings of files whose path holds
    `name`; private_kb counts pages copied on write (relocated data), which must never be dropped."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if not parts[0].endswith(":") and "-" in parts[0]:
                cur = None
                if len(parts) > 5 and name in parts[5] and "w" not in parts[1]:
                    lo, hi = (int(v, 16) for v in parts[0].split("-"))
                    cur = [lo, hi, 0]
                    out.append(cur)
            elif cur is not None and parts[0] in ("Anonymous:", "Private_Dirty:"):
                cur[2] += int(parts[1])
    return out


def release_compiler_pages(name: str = "libllvmlite") -> int:
    """Drop the clean pages of the compiler library from this process's resident set.
    -> bytes of mappings released (0 where /proc or madvise is unavailable)."""
    try:
        maps = _mappings(name)
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for lo, hi, private in maps:
        if private == 0 and madvise(lo, hi - lo, MADV_DONTNEED) == 0:
            done += hi - lo
    log.info("released %.1f MiB of %s mappings", done / 2**20, name)
    return done
