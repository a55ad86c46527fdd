"""Releasing the JIT compiler's pages: the kernels still give the same results afterwards, the
resident set shrinks, and mappings holding private (relocated) pages are never touched."""
import numpy as np
import pytest

from edgert import residency
from edgert.model import Model


def _rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


@pytest.mark.skipif(not residency.enabled(), reason="needs the JIT")
def test_release_keeps_results_and_drops_only_clean_pages(tiny_models):
    m = Model(tiny_models["qwen2"], n_ctx=32, n_batch=8)
    before = m.forward(np.arange(3, 12), all_logits=True).copy()
    maps = residency._mappings("libllvmlite")
    assert maps, "libllvmlite is not mapped"
    private = [mp for mp in maps if mp[2] > 0]
    # touch the library's pages again (loading a kernel runs LLVM), then release
    residency.preload_kernels()
    rss0 = _rss_kb()
    released = residency.release_compiler_pages()
    assert released == sum(hi - lo for lo, hi, p in maps if p == 0) > 0
    assert _rss_kb() <= rss0
    for lo, hi, p in private:  # relocated (copy-on-write) pages are still there
        assert any(mp[0] == lo and mp[2] == p for mp in residency._mappings("libllvmlite"))
    m.reset()
    after = m.forward(np.arange(3, 12), all_logits=True)
    assert np.array_equal(before, after)


def test_unneeded_kernels_follow_the_model():
    from edgert.kernels.isa import row_kernels
    silu_rows = residency.unneeded_kernels({3, 8}, "silu")          # SmolLM2: Q4_1 + Q8_0
    assert {"geglu", "_dequantize_row_rows_k"} <= silu_rows and "swiglu" not in silu_rows
    assert ("matmul_q" in silu_rows) == row_kernels()               # tiles only without an x86 ISA
    gelu_k = residency.unneeded_kernels({6, 8, 12, 14}, "gelu")     # Gemma3: Q5_0, Q8_0, K-quants
    assert "swiglu" in gelu_k and "geglu" not in gelu_k and "_dequantize_row_rows_k" not in gelu_k
    assert "matmul_q" not in residency.unneeded_kernels({1, 8}, "silu")  # F16 matrices use tiles
