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
