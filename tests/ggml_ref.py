"""llama.cpp's own CPU kernels as a test oracle, through ctypes on the libggml that
llama-cpp-python ships: its quantiser (ggml_quantize_chunk) and, per weight type, the activation
quantisation (from_float of its vec_dot_type) and the dot product (vec_dot) it runs for batches
below its tiled / repacked paths. Only tests import this."""
import ctypes
import os

import numpy as np
import llama_cpp

from edgert.converters.quantize import quantize_rows

_LIB = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
_base = ctypes.CDLL(os.path.join(_LIB, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
_cpu = ctypes.CDLL(os.path.join(_LIB, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
_FROM = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _Traits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_Traits)
_cpu.ggml_cpu_init()
_base.ggml_row_size.restype = ctypes.c_size_t
_base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
quantize = quantize_rows  # float32 [R, C] -> GGUF blocks, llama.cpp's quantiser


def vec_dots(qtype: int, raw: np.ndarray, R: int, C: int, x: np.ndarray) -> np.ndarray:
    """[T, R]: llama.cpp's vec_dot of each weight row (GGUF blocks) with each activation row x[t]
    quantised by its from_float."""
    tr = _cpu.ggml_get_type_traits_cpu(qtype).contents
    vt = tr.vec_dot_type
    from_float = _FROM(_cpu.ggml_get_type_traits_cpu(vt).contents.from_float)
    vec_dot = _DOT(tr.vec_dot)
    rb, yb = _base.ggml_row_size(qtype, C), _base.ggml_row_size(vt, C)
    raw = np.ascontiguousarray(raw, np.uint8)
    y = np.zeros(yb, np.uint8)
    s = np.zeros(1, np.float32)
    out = np.zeros((x.shape[0], R), np.float32)
    for t in range(x.shape[0]):
        xr = np.ascontiguousarray(x[t], np.float32)
        from_float(xr.ctypes.data, y.ctypes.data, C)
        for r in range(R):
            vec_dot(C, s.ctypes.data, 0, raw.ctypes.data + r * rb, 0, y.ctypes.data, 0, 1)
            out[t, r] = s[0]
    return out
