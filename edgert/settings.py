"""Every environment knob, in one place, with its default and what it does."""
from __future__ import annotations

import os

KNOBS = {
    "EDGERT_MODELS": ("~/.cache/edgert/models", "directory of pulled models"),
    "EDGERT_CACHE": ("~/.cache/edgert", "cache directory (probes, verified packages)"),
    "EDGERT_MODEL": ("", "default for -m/--model"),
    "EDGERT_ADB": ("", "the adb client edgert probe / deploy run (default: adb on PATH)"),
    "EDGERT_THREADS": ("", "default for -t/--threads (else the number of physical cores)"),
    "EDGERT_N_CTX": ("", "default for -c/--ctx-size"),
    "EDGERT_DEVICE": ("", "default for --device (a device profile name or .toml path)"),
    "EDGERT_MEM_BUDGET": ("", "default for --mem-budget (e.g. 700MB, 1.5GB)"),
    "EDGERT_EXPAND_Q5": ("0", "1: hold Q5_0 matrices as 8-bit (1.5x their memory; little faster since the AVX2 kernels)"),
    "EDGERT_ISA": ("auto", "instruction set of the kernels: auto, avx512vnni, avx2, neon-dotprod or portable (kernels/isa.py)"),
    "EDGERT_MODE": ("exact", "exact (llama.cpp's float order, bit-identical logits) or fast (kernels/isa.py)"),
    "EDGERT_SIMD": ("1", "0: the same as EDGERT_ISA=portable (the older switch)"),
    "EDGERT_RELEASE_JIT": ("1", "0: keep the JIT compiler's pages resident after the kernels are loaded (edgert/residency.py)"),
    "EDGERT_FFN": ("auto", "default for --ffn: auto, dense, stream or sparse (edgert/placement.py)"),
    "EDGERT_BACKEND": ("numba", "default for --backend: numba or onnx (edgert/backends.py)"),
    "EDGERT_CACHE_TYPE_K": ("f16", "default for -ctk/--cache-type-k (edgert/kv_cache.py)"),
    "EDGERT_CACHE_TYPE_V": ("f16", "default for -ctv/--cache-type-v"),
    "EDGERT_SPARSITY": ("", "default for --sparsity (sparse decode of packages)"),
    "EDGERT_SELECTOR": ("auto", "default for --selector: auto (gate when it fits), gate or predictor"),
    "EDGERT_LOG": ("WARNING", "log level of the library (DEBUG, INFO, WARNING)"),
    "NUMBA_CACHE_DIR": ("~/.cache/edgert/numba", "where Numba keeps compiled kernels (in a subdirectory per hash of the kernel sources)"),
}


def env(name: str) -> str:
    default, _ = KNOBS[name]
    return os.environ.get(name) or default


def default_threads() -> int:
    v = env("EDGERT_THREADS")
    if v:
        return int(v)
    try:
        import psutil
        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:
        return os.cpu_count() or 1


_PEAK_BEFORE_RESET = [0]  # VmHWM before budget.measured reset it (clear_refs)


def note_peak():
    """Remember the high-water mark before it is reset, so peak_rss() covers the whole run."""
    _PEAK_BEFORE_RESET[0] = max(_PEAK_BEFORE_RESET[0], peak_rss())


def peak_rss(since_reset: bool = False) -> int:
    """Peak resident set size of this process in bytes (Linux: VmHWM, and its value before any
    reset unless since_reset; else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
                    return hwm if since_reset else max(hwm, _PEAK_BEFORE_RESET[0])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
