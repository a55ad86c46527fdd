"""The memory budget: sizes, refusal before loading, the plan equal to what the model allocates,
and peak RSS of a long decode (the whole process) within the budget."""
import re

import numpy as np
import pytest

from conftest import real_model
from edgert.budget import MemoryBudget, parse_size
from edgert.errors import EdgertError
from edgert.model import Model
from test_cli import one_line_error, run_cli


@pytest.mark.parametrize("text,n", [("700MB", 700 * 10**6), ("1.5GB", 1_500_000_000), ("512MiB", 512 * 2**20),
                                    ("2g", 2 * 10**9), ("1024", 1024), (" 64 KiB ", 65536)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "abc", "7xx", "-5MB", "0GB", "1.2.3MB"])
def test_parse_size_rejects(text):
    with pytest.raises(EdgertError, match="not a size|more than 0"):
        parse_size(text)


def test_budget_charges_and_refuses():
    b = MemoryBudget(1000, "test")
    b.charge("a", 600, "weights")
    b.charge("a", 700, "weights")  # re-charging a name replaces its charge
    with pytest.raises(EdgertError, match="'b' needs"):
        b.charge("b", 400, "kv cache")
    b.release("a")
    b.charge("b", 400, "kv cache")
    assert b.used == 400 and b.peak == 700
    with pytest.raises(EdgertError, match=r"x.gguf: needs .* resident \(weights .*\) but the memory budget"):
        b.require({"weights": 2000}, "x.gguf")


@pytest.mark.parametrize("expand_q5", [False, True])
def test_plan_equals_allocations(tiny_models, expand_q5):
    for arch, path in tiny_models.items():
        b = MemoryBudget(2**40, "test")
        m = Model(path, n_ctx=64, n_batch=16, budget=b, expand_q5=expand_q5)
        got = b.by_category()
        if m.cfg.moe:  # routers and shared experts are in the plan's weights; the experts are their own
            assert got["weights"] + got["routers"] == m.plan["weights"] + m.plan["embedding"], arch
            assert got["experts"] == m.plan["experts"], arch
        else:
            assert got["weights"] == m.plan["weights"] + m.plan["embedding"] + m.plan["ffn"], arch
        assert b.fixed > 50 * 2**20  # the process's measured RSS when it planned
        assert got["kv cache"] == m.plan["kv cache"] == m.kv.nbytes
        bufs = [m.x, m.xn, m.q, m.k, m.v, m.att, m.o, m.gate, m.up]
        acts = [a for ab in (m.act_e, m.act_q) for a in (ab.xq, ab.x8, ab.xd, ab.xs)]
        if m.cfg.moe:  # one set of the expert stores' buffers, shared by the layers
            s0 = m.ffn[0]
            bufs += [s0.logits, s0.idx, s0.w, s0.y, s0.xg, s0.yg, s0.h, s0.pidx]
            assert all(s.y is s0.y for s in m.ffn)
        logits_row = m.cfg.n_vocab * 4
        assert got["scratch"] == sum(a.nbytes for a in bufs + acts) + logits_row, arch
        assert "load staging" not in got  # released after loading
        m.forward(np.arange(10), all_logits=True)
        assert b.by_category()["logits"] == 10 * m.cfg.n_vocab * 4


def test_refused_before_loading(tiny_models):
    r = run_cli("run", "-m", tiny_models["llama"], "-p", "a", "-n", "1", "--mem-budget", "100KB")
    one_line_error(r, ".gguf", "the memory budget 0.1 MiB (--mem-budget 100KB) is below this process's fixed cost")
    # a budget well above the fixed cost (~120 MiB), far below a 200,000-position KV cache
    r = run_cli("run", "-m", tiny_models["llama"], "-p", "a", "-n", "1", "--mem-budget", "200MB", "-c", "200000")
    one_line_error(r, ".gguf", "needs", "kv cache", "on top of the process's fixed cost", "memory budget is 190.7 MiB")
    r = run_cli("run", "-m", tiny_models["llama"], "-p", "a", "--mem-budget", "lots")
    one_line_error(r, "--mem-budget 'lots': not a size")
    r = run_cli("run", "-m", tiny_models["llama"], "-p", "a", "--device", "nokia-3310")
    one_line_error(r, "unknown device 'nokia-3310'")


@pytest.mark.models
def test_peak_rss_of_1000_tokens_within_budget():
    """SmolLM2 decodes 1,000 tokens under a budget just above its plan; peak RSS (VmHWM) of the
    whole process stays within the budget."""
    path = real_model("smollm2-135m")
    budget = "310MiB"  # plan at -c 1100: fixed ~110 MiB measured + weights 106, KV 24, scratch 18, staging 11, slack 24
    # the same run once, short: any kernel signature the Numba cache lacks is compiled here, not
    # in the measured run (the JIT's first-ever compile is not what the budget is about: README, warmup)
    warm = run_cli("run", "-m", path, "-p", "Write a long story.", "-n", "4", "--temp", "0", "-c", "1100", "-t", "2")
    assert warm.returncode == 0, warm.stderr
    r = run_cli("run", "-m", path, "-p", "Write a long story about a robot.", "-n", "1000", "--ignore-eos",
                "--temp", "0", "-c", "1100", "-t", "2", "--mem-budget", budget, "--no-display-prompt")
    assert r.returncode == 0, r.stderr
    n_eval = int(re.search(r"eval time = .* / +(\d+) runs", r.stderr).group(1))
    assert n_eval >= 999
    peak = float(re.search(r"peak RSS = +([\d.]+) MiB", r.stderr).group(1)) * 2**20
    assert peak <= parse_size(budget), r.stderr[-600:]


def test_measuring_a_step_keeps_the_run_peak():
    """budget.measured resets the kernel's high-water mark; peak_rss() must still report the peak
    of the whole run, including what came before the reset (Linux syncs RSS counters lazily, so
    readings may differ by some pages)."""
    from edgert.budget import measured, rss
    from edgert.settings import peak_rss
    base = rss()
    big = np.ones(256 * 2**20 // 8)  # 256 MiB touched, then freed
    before = peak_rss()
    del big
    _, grown = measured(lambda: np.ones(1000).sum())
    assert grown < 16 * 2**20                      # the step itself, not the earlier peak
    assert peak_rss() >= max(before - 4 * 2**20, base + 200 * 2**20)
