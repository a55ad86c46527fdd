"""Op-by-op comparison with llama.cpp: its intermediate tensors (through its graph evaluation
callback, `cb_eval`) against edgert's for the same tokens in one batch, by llama.cpp's tensor
names. The first tensor that differs names the operation to look at; this is how edgert's
kernels were made bit-identical with llama.cpp (docs/correctness.md).

Needs the `llama` extra (llama-cpp-python). Flash attention is off on the llama.cpp side, as in
the engine tests.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from edgert.errors import EdgertError

# edgert's captures, in the order a layer computes them (llama.cpp's names)
ORDER = ["attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "ffn_inp", "ffn_norm", "ffn_swiglu",
         "ffn_geglu", "ffn_out", "l_out"]


@dataclass
class Row:
    name: str            # llama.cpp's tensor name, e.g. "kqv_out-3"
    exact: float         # fraction of elements bit-identical
    max_abs: float       # largest absolute difference
    first_token: int     # first token (row) with a difference, -1 if none


def llama_tensors(path: str, tokens, n_ctx: int = 512, threads: int = 2) -> dict:
    """{name: float32 array} of every contiguous F32 tensor llama.cpp computes for `tokens` as one
    batch (the last one of each name)."""
    try:
        import llama_cpp
    except ImportError:
        raise EdgertError("edgert compare needs llama-cpp-python (pip install 'edgert[llama]')") from None
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    for fn, res in (("ggml_get_name", ctypes.c_char_p), ("ggml_nbytes", ctypes.c_size_t),
                    ("ggml_is_contiguous", ctypes.c_bool), ("ggml_get_data", ctypes.c_void_p)):
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
    got = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def cb(t, ask, _):
        if ask:
            return True
        # struct ggml_tensor: enum ggml_type type (F32 = 0); a buffer pointer; int64_t ne[4]
        if ctypes.c_int32.from_address(t).value == 0 and lib.ggml_is_contiguous(t):
            ne = list((ctypes.c_int64 * 4).from_address(t + 16))
            n = lib.ggml_nbytes(t) // 4
            a = np.ctypeslib.as_array((ctypes.c_float * n).from_address(lib.ggml_get_data(t))).copy()
            got[lib.ggml_get_name(t).decode()] = a.reshape(ne[::-1]).squeeze()
        return True

    quiet_llama(llama_cpp)
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise EdgertError(f"{path}: llama.cpp could not load the model")
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = 0  # off
    cp.cb_eval = cb
    ctx = llama_cpp.llama_init_from_model(model, cp)
    try:
        ids = (llama_cpp.llama_token * len(tokens))(*map(int, tokens))
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, len(tokens))) != 0:
            raise EdgertError(f"{path}: llama.cpp failed to evaluate the tokens")
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return got


_SILENT = []


def quiet_llama(llama_cpp):
    """Route llama.cpp's log lines to nowhere (they would go to stderr)."""
    if not _SILENT:
        _SILENT.append(llama_cpp.llama_log_callback(lambda level, text, user: None))
        llama_cpp.llama_log_set(_SILENT[0], ctypes.c_void_p())


def edgert_tensors(path: str, tokens, n_ctx: int = 512) -> dict:
    """{name: array} of edgert's values at the points llama.cpp names, for `tokens` as one batch."""
    from edgert.model import Model
    m = Model(path, n_ctx=n_ctx, n_batch=n_ctx)
    got, count = {}, {}
    act = "ffn_geglu" if m.cfg.ffn_act == "gelu" else "ffn_swiglu"

    def capture(op, key, out_arg):
        f = getattr(m.ops, op)

        def g(*a):
            r = f(*a)
            i = count.get(op, 0)
            count[op] = i + 1
            got[key(i)] = np.array(a[out_arg], copy=True)
            return r
        setattr(m.ops, op, g)

    capture("attn_norm", lambda i: f"attn_norm-{i}", 3)
    capture("rope", lambda i: f"{'Qcur' if i % 2 == 0 else 'Kcur'}-{i // 2}", 0)
    capture("attention", lambda i: f"kqv_out-{i}", 6)
    capture("attn_out", lambda i: f"attn_out-{i}", 2)
    capture("ffn_norm", lambda i: f"ffn_norm-{i}", 3)
    capture("act", lambda i: f"{act}-{i}", 2)
    capture("ffn_down", lambda i: f"ffn_out-{i}", 2)
    qkv = m.ops.qkv

    def qkv_capture(x, pairs, buf):
        r = qkv(x, pairs, buf)
        got[f"Vcur-{count.get('qkv', 0)}"] = np.array(pairs[2][1], copy=True)
        count["qkv"] = count.get("qkv", 0) + 1
        return r
    m.ops.qkv = qkv_capture
    att, ffn = m._attention_block, m._ffn_block

    def att_capture(il, L, vw, *a):
        r = att(il, L, vw, *a)
        got[f"ffn_inp-{il}"] = vw.x.copy()
        return r

    def ffn_capture(il, L, vw, *a):
        r = ffn(il, L, vw, *a)
        got[f"l_out-{il}"] = vw.x.copy()
        return r
    m._attention_block, m._ffn_block = att_capture, ffn_capture
    m.forward(np.asarray(tokens), all_logits=True)
    return got


def compare(path: str, tokens, n_ctx: int = 512, threads: int = 2) -> list[Row]:
    """Rows for every tensor both sides have with the same number of elements, in layer order."""
    ref = llama_tensors(path, tokens, n_ctx, threads)
    ours = edgert_tensors(path, tokens, n_ctx)

    def order(k):
        name, il = k.rsplit("-", 1)
        return int(il), ORDER.index(name)
    rows = []
    for k in sorted(ours, key=order):
        if k not in ref or ref[k].size != ours[k].size:
            continue  # llama.cpp skips rows it does not need (the last layer keeps the last token)
        b = ref[k].reshape(len(tokens), -1) if ref[k].size % len(tokens) == 0 else ref[k].reshape(1, -1)
        a = ours[k].reshape(b.shape)
        diff = a != b
        bad = np.nonzero(diff.any(axis=1))[0]
        rows.append(Row(k, float(1.0 - diff.mean()), float(np.abs(a - b).max()), int(bad[0]) if len(bad) else -1))
    return rows
