"""Quantise a whole GGUF to one ggml file type with llama.cpp's quantiser (llama-cpp-python's
`llama_model_quantize`): the maintained quantiser DESIGN.md asks for, never hand-written code.

    quantize(src, dst, "Q8_0")      # also Q4_0, Q4_1, Q5_0, Q4_K_M, Q6_K, ... (llama.cpp's names)

The output is written to a temporary file beside dst, then renamed.
"""
from __future__ import annotations

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
