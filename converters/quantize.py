"""llama.cpp's quantiser (through llama-cpp-python): the maintained quantiser DESIGN.md asks
for, never hand-written code.

    quantize(src, dst, "Q8_0")      # a whole GGUF to one llama.cpp file type (Q4_0, Q4_K_M, ...)
    quantize_rows(Q4_K, w)          # a float32 [R, C] matrix to GGUF blocks (ggml_quantize_chunk)

quantize writes to a temporary file beside dst, then renames it.
"""
from __future__ import annotations

import functools
import os
import tempfile

from edgert.errors import EdgertError


def quantize(src: str, dst: str, ftype: str = "Q8_0", pure: bool = False, threads: int = 0,
             requantize: bool = False) -> str:
    """src (GGUF) -> dst at llama.cpp file type `ftype` (LLAMA_FTYPE_MOSTLY_<ftype>); pure: every
    matrix at that type (no K-quant mix, embedding and output included); requantize: the source
    may itself be quantised (llama.cpp dequantises it first: a real model at another type, its
    quality below a quantisation from the float weights)."""
    try:
        import llama_cpp
    except ImportError:
        raise EdgertError("quantising needs llama-cpp-python (the llama extra: make setup)") from None
    from edgert.compare import quiet_llama
    quiet_llama(llama_cpp)   # its per-tensor lines would go to stderr
    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}", None)
    if code is None:
        raise EdgertError(f"unknown llama.cpp file type '{ftype}'")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.pure, p.allow_requantize = code, threads, pure, requantize
    d = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dst) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), p)
        if rc != 0:
            raise EdgertError(f"{src}: llama.cpp's quantiser failed ({ftype}, code {rc})")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


@functools.lru_cache(maxsize=None)
def _ggml():
    """libggml-base of llama-cpp-python, with ggml_quantize_chunk / ggml_row_size declared."""
    import ctypes
    try:
        import llama_cpp
    except ImportError:
        raise EdgertError("quantising needs llama-cpp-python (the llama extra: make setup)") from None
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def quantize_rows(qtype: int, w) -> "np.ndarray":
    """float32 [R, C] -> GGUF blocks (uint8, R * row bytes) at ggml type qtype: llama.cpp's own
    quantiser (ggml_quantize_chunk, no importance matrix), as llama-quantize calls it per tensor."""
    import numpy as np
    lib = _ggml()
    w = np.ascontiguousarray(w, np.float32)
    R, C = w.shape
    out = np.zeros(R * lib.ggml_row_size(qtype, C), np.uint8)
    n = lib.ggml_quantize_chunk(qtype, w.ctypes.data, out.ctypes.data, 0, R, C, None)
    if n != out.size:
        raise EdgertError(f"llama.cpp's quantiser wrote {n} bytes for a [{R}, {C}] matrix of type {qtype}, "
                          f"expected {out.size}")
    return out
