"""Compile every kernel signature the runtime uses, so later runs load them from Numba's cache.

A device must build its own cache (the compiled code targets the host CPU): `edgert warmup` runs
this once after installation. It evaluates tiny random models of each architecture, which
exercise every quant type, both rope modes, biases, q/k norms, GeGLU and SwiGLU, single-token
decode and batched prefill, the KV cache formats, and a package of one of them for the sparse FFN
kernels.
"""
from __future__ import annotations

import logging
import shutil
import os

log = logging.getLogger(__name__)

ARCH_SHAPES = {
    "llama": {},
    "qwen2": {},
    "gemma3": dict(n_layer=6, head_dim=128, n_head=4, n_head_kv=1),
    "qwen2moe": {},   # mixture of experts: router, shared expert, expert cache (edgert/experts.py)
}


def warmup() -> int:
    """Returns the number of compiled kernel signatures."""
    import numpy as np

    from pydoc_data.topics import topics

    from edgert.converters.package import convert
    from edgert.converters.tiny import tiny_model_path
    from edgert.model import Model
    for arch, kw in ARCH_SHAPES.items():
        path = tiny_model_path(arch, **kw)
        try:
            m = Model(path, n_ctx=32, n_batch=8)
            m.forward(np.arange(3, 13), all_logits=True)  # two batches: prefill
            m.decode_one_token(5)                          # decode
            if arch == "qwen2moe":  # experts from flash: cache and prefetch
                m = Model(path, n_ctx=32, n_batch=8, ffn="cached", cache_slots=3)
                m.forward(np.arange(3, 13))
                m.decode_one_token(5)
            if arch == "llama":  # the KV cache formats (per row, auto's tiers), then the sparse FFN
                from edgert.kv_cache import KVFormat
                for fmt in (KVFormat("q8_0", "q8_0"), KVFormat("auto", "auto", 6.0)):
                    m = Model(path, n_ctx=256, n_batch=64, kv=fmt)
                    m.forward(np.arange(3, 203) % 200)
                    m.decode_one_token(5)
                # the sparse FFN: a package, both selectors, both down types
                text = "\n".join(topics[k] for k in sorted(topics))[:20000]
                for dt in ("Q8_0", "Q5_0"):
                    pkg = os.path.join(os.path.dirname(path), f"w-{dt}.edgert.gguf")
                    convert(path, pkg, text, "warmup", levels=(0.5,), calib_tokens=128, window=128, down_type=dt)
                    for sel in ("predictor", "gate"):
                        m = Model(pkg, n_ctx=32, n_batch=8, ffn="sparse", selector=sel)
                        m.forward(np.arange(3, 7))
                        m.decode_one_token(5)
        finally:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return _count_signatures()


def warmup_model(name_or_path: str) -> int:
    """Compile only the kernels one model uses: a prefill of two batches and two decode steps
    with the model's default placement (under no budget) and KV format."""
    import numpy as np

    from edgert.model import Model
    from edgert.registry import resolve
    m = Model(resolve(name_or_path), n_ctx=64, n_batch=8)
    m.forward(np.arange(3, 13) % m.cfg.n_vocab, all_logits=True)
    m.decode_one_token(5)
    m.decode_one_token(6)
    return _count_signatures()


def _count_signatures() -> int:
    import importlib
    n = 0
    for mod in ("quant", "matmul", "norm", "rope", "attention", "activation", "sparse", "kv_quant", "moe"):
        m = importlib.import_module(f"edgert.kernels.{mod}")
        for obj in vars(m).values():
            n += len(getattr(obj, "signatures", []) or [])
    return n
