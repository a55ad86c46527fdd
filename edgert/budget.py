"""The memory budget: the whole process's peak RSS.

The budget comes from `--mem-budget SIZE` or from a device profile's app share, and caps the
process, as a cgroup memory limit or Android's low-memory killer would. The model measures the
process's own fixed cost when it plans (RSS after the interpreter, NumPy, Numba, the loaded
kernels and the tokenizer: `fixed`), and the placement plan (edgert/placement.py) fits weights,
caches, KV cache and scratch into what is left; a plan that does not fit is refused with the
numbers before any weight is read. While loading, the model charges what it really allocates, so
fixed + the accountant's total is the process's memory.
"""
from __future__ import annotations

import logging
import re

from edgert.errors import EdgertError

log = logging.getLogger(__name__)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'700MB' -> 700e6, '1.5GB' -> 1.5e9, '512MiB' -> 512 * 2**20, '1024' -> 1024 bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise EdgertError(f"--mem-budget '{text}': not a size (e.g. 700MB, 1.5GB, 512MiB)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise EdgertError(f"--mem-budget '{text}': must be more than 0")
    return n


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class MemoryBudget:
    """Charges by name and category; refuses a charge that would exceed the limit."""

    def __init__(self, limit: int, source: str):
        self.limit = int(limit)
        self.source = source          # where the limit came from, for messages
        self.charges: dict[str, tuple[str, int]] = {}  # name -> (category, bytes)
        self.peak = 0
        self.fixed = 0                # the process's measured fixed cost (set by the model's plan)

    @property
    def used(self) -> int:
        return sum(n for _, n in self.charges.values())

    def by_category(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for cat, n in self.charges.values():
            out[cat] = out.get(cat, 0) + n
        return out

    def charge(self, name: str, nbytes: int, category: str):
        old = self.charges.get(name, (category, 0))[1]
        if self.fixed + self.used - old + nbytes > self.limit:
            raise EdgertError(f"memory budget exceeded: '{name}' needs {mib(nbytes)} with "
                              f"{mib(self.used - old)} already charged and a fixed cost of {mib(self.fixed)}, "
                              f"budget {mib(self.limit)} ({self.source})")
        self.charges[name] = (category, int(nbytes))
        self.peak = max(self.peak, self.used)

    def release(self, name: str):
        self.charges.pop(name, None)

    def require(self, plan: dict[str, int], what: str):
        """Refuse, before anything is loaded, a plan {category: bytes} that cannot fit."""
        need = sum(plan.values())
        if need > self.limit:
            parts = ", ".join(f"{k} {mib(v)}" for k, v in plan.items() if v)
            raise EdgertError(f"{what}: needs {mib(need)} resident ({parts}) but the memory budget is "
                              f"{mib(self.limit)} ({self.source}); lower -c / --ctx-size or use a "
                              f"smaller model")
        log.info("%s: plan %s of budget %s", what, mib(need), mib(self.limit))

    def summary(self) -> str:
        cats = ", ".join(f"{k} {mib(v)}" for k, v in self.by_category().items())
        return f"{mib(self.fixed + self.used)} of {mib(self.limit)} ({self.source}): fixed {mib(self.fixed)}, {cats}"


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def measured(fn):
    """-> (fn(), bytes): the process's peak RSS growth while fn ran (Linux: the high-water mark is
    reset first through /proc/self/clear_refs), else the growth of its RSS."""
    from edgert.settings import note_peak, peak_rss
    note_peak()  # the high-water mark so far is kept: peak_rss() still reports the whole run's
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    r0 = rss()
    out = fn()
    grown = (peak_rss(since_reset=True) if reset else rss()) - r0
    return out, max(0, grown)


def budget_from_args(mem_budget: str | None, device: str | None) -> MemoryBudget:
    """--mem-budget wins; else the device profile's app share; else what the OS has available."""
    if mem_budget:
        return MemoryBudget(parse_size(mem_budget), f"--mem-budget {mem_budget}")
    if device:
        from edgert.device_profiles.loader import load_profile
        prof = load_profile(device)
        return MemoryBudget(prof.app_budget, f"{prof.name}: {prof.app_share:.0%} of {mib(prof.ram_bytes)}")
    import psutil
    return MemoryBudget(psutil.virtual_memory().available, "available memory")


def kv_bytes(c, n_ctx: int, fmt=None) -> int:
    """The KV cache's bytes for n_ctx positions in format fmt (edgert.kv_cache.KVFormat; f16 default)."""
    from edgert.kv_cache import KVFormat, layout
    return layout(c.n_head_kv, c.head_dim, n_ctx, fmt or KVFormat()).nbytes(c.n_layer, c.n_head_kv, c.head_dim, n_ctx)


def scratch_bytes(c, B: int) -> int:
    """Activation buffers of Model for batches of B tokens (see Model.__init__) + one row of
    logits (all-token logits, for perplexity, are charged while they exist)."""
    E, F = c.n_embd, c.n_ff
    Dq, Dkv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    acts = B * (3 * E + 2 * Dq + 2 * Dkv + 2 * F) * 4
    if c.n_expert:  # the expert store's: router logits, routes, weighted outputs, gathered tokens
        k = c.n_expert_used
        acts += B * (c.n_expert + 2 * k + k * E + 2 * E) * 4 + (E + k) * 4  # + the prediction's row
    K = max(Dq, F)
    act_q = B * (K + K // 32 + K // 16) * 4 + B * (E + E // 32 + E // 16) * 4 + B * (K + E)  # + int8 copies
    return acts + act_q + c.n_vocab * 4
