"""Speed measurement in llama-bench's terms: pp (prompt processing), tg (text generation), pg
(both), at a context depth d, for edgert and for llama.cpp (llama-cpp-python) on the same GGUF.

Each (model, backend) runs in its own worker process, so that its peak RSS is its own and
neither backend's memory or threads disturb the other; the parent interleaves the backends'
repetitions. Tokenisation and sampling are not timed: tokens are random ids, generation feeds
back a fixed token, as llama-bench does; or (text_ids) consecutive tokens of a real text from a
random offset, prompt and generation alike: what a mixture of experts needs, whose routing (and
so its expert cache) depends on the tokens.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Test:
    n_prompt: int
    n_gen: int
    n_depth: int = 0

    @property
    def name(self) -> str:
        if self.n_prompt and self.n_gen:
            s = f"pp{self.n_prompt}+tg{self.n_gen}"
        elif self.n_prompt:
            s = f"pp{self.n_prompt}"
        else:
            s = f"tg{self.n_gen}"
        return s + (f" @ d{self.n_depth}" if self.n_depth else "")


@dataclass
class Result:
    model: str
    backend: str
    threads: int
    test: Test
    samples_ns: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    peak_rss_bytes: int = 0
    mem_budget_bytes: int = 0      # the budget (and, capped, the cgroup limit) of the run; 0 = none
    capped: bool = False
    killed: str = ""               # why the worker died (e.g. killed by the memory cap)
    stats: dict = field(default_factory=dict)   # FFN store counters of the last repetition
    cap_peak_bytes: int = 0        # the cgroup's peak usage (RSS + page cache)

    @property
    def n_tokens(self) -> int:
        return self.test.n_prompt + self.test.n_gen

    @property
    def samples_ts(self) -> list:
        return [self.n_tokens * 1e9 / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return statistics.mean(self.samples_ts) if self.samples_ns else 0.0

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ns) > 1 else 0.0


# ============================================================================================
# Workers (one process per model and backend)
# ============================================================================================

class EdgertRunner:
    def __init__(self, path, threads, n_ctx, opts):
        from edgert.kernels.matmul import set_threads
        set_threads(threads)
        from edgert.budget import MemoryBudget
        from edgert.model import Model
        from edgert.tokenizer import Tokenizer
        budget = MemoryBudget(opts["mem_budget"], "bench") if opts.get("mem_budget") else None
        # the tokenizer is built as `edgert run` builds it: its memory is part of the fixed cost
        self.m = Model(path, n_ctx=n_ctx, n_batch=512, budget=budget, ffn=opts.get("ffn", "auto"),
                       sparsity=opts.get("sparsity"), selector=opts.get("selector") or "auto",
                       before_weights=lambda g: setattr(self, "tok", Tokenizer(g.metadata, path)), kv=opts.get("kv"),
                       prefetch=opts.get("prefetch", True), backend=opts.get("backend", "numba"))
        self.n_vocab = self.m.cfg.n_vocab

    def reset(self):
        self.m.reset()

    def stats(self) -> dict:
        d = self.m.stats.as_dict()
        d["ffn"] = self.m.placement.ffn
        d["selector"] = self.m.placement.selector
        d["prefetch"] = self.m.prefetch
        if self.m.cfg.moe:
            c = self.m.cfg
            d["expert_slots"], d["experts_total"] = self.m.placement.expert_slots, c.n_expert * c.n_layer
        from edgert.kv_cache import f16_nbytes
        kv = self.m.kv
        d["kv"] = kv.fmt.label()
        d["kv_bytes"] = kv.nbytes
        d["kv_vs_f16"] = kv.nbytes / f16_nbytes(kv.n_layer, kv.n_kv, kv.D, kv.n_ctx)
        d["kv_hist"] = kv.histogram(self.m.n_past)  # positions per type and the bits in use at the end
        from edgert.placement import memory_report
        from edgert.settings import peak_rss
        d["memory_mib"] = memory_report(self.m.placement, peak_rss(), self.m.budget.source if self.m.budget else "")
        return d

    def reset_stats(self):
        self.m.stats.reset()

    def prompt(self, toks):
        self.m.forward(toks)

    def token(self, t):
        self.m.decode_one_token(t)


class LlamaCppRunner:
    def __init__(self, path, threads, n_ctx, opts):
        import llama_cpp.llama_cpp as lc
        from llama_cpp import Llama
        if opts.get("no_repack"):  # weights stay in the mmap'd file (llama-bench --repack 0)
            default = lc.llama_model_default_params

            def no_repack():
                p = default()
                p.use_extra_bufts = False
                return p
            lc.llama_model_default_params = no_repack
        from edgert.kv_eval import LLAMA_TYPES
        tk, tv = opts.get("type_k", "f16"), opts.get("type_v", "f16")
        kw = {} if tk == tv == "f16" else dict(type_k=LLAMA_TYPES[tk], type_v=LLAMA_TYPES[tv], flash_attn=True)
        self.kv = f"K {tk} V {tv}"
        self.ll = Llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                        n_threads_batch=threads, verbose=False, **kw)
        self.n_vocab = self.ll.n_vocab()

    def stats(self) -> dict:
        return {"kv": self.kv}

    def reset_stats(self):
        pass

    def reset(self):
        self.ll.reset()

    def prompt(self, toks):
        self.ll.eval(list(map(int, toks)))

    def token(self, t):
        self.ll.eval([int(t)])


RUNNERS = {"edgert": EdgertRunner, "llama.cpp": LlamaCppRunner}


def _time_test(r, test: Test, rng, ids=None) -> int:
    """One repetition: depth (untimed), then the timed prompt and/or generation."""
    r.reset()
    lo = min(100, r.n_vocab - 1)
    d, p, n = test.n_depth, test.n_prompt, test.n_gen
    if ids is not None:  # a window of the text: depth, prompt, then the generated tokens
        o = int(rng.integers(0, max(1, len(ids) - (d + p + n))))
        seq = ids[o:o + d + p + n]
        depth, prompt, gen = seq[:d], seq[d:d + p], [int(t) for t in seq[d + p:]]
    else:
        depth = rng.integers(lo, r.n_vocab, d) if d else None
        prompt = rng.integers(lo, r.n_vocab, p) if p else None
        gen = [int(rng.integers(lo, r.n_vocab))] * n
    if d:
        r.prompt(depth)
    t0 = time.perf_counter_ns()
    if p:
        r.prompt(prompt)
    for tok in gen:
        r.token(tok)
    return time.perf_counter_ns() - t0


def _worker(conn, backend, path, threads, n_ctx, opts, cap_path):
    if cap_path:  # into the memory cap before anything large is imported or read
        with open(os.path.join(cap_path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    import numpy as np

    from edgert.settings import peak_rss
    try:
        r = RUNNERS[backend](path, threads, n_ctx, opts)
        conn.send(("ready", None))
        rng = np.random.default_rng(0)
        while True:
            msg = conn.recv()
            if msg is None:
                break
            test, warm = msg
            ids = opts.get("text_ids")
            if warm:  # llama-bench's warm-up: one short run of the same kind
                _time_test(r, Test(min(test.n_prompt, 32), min(test.n_gen, 1), 0), rng, ids)
            r.reset_stats()
            ns = _time_test(r, test, rng, ids)
            # VmHWM, not ru_maxrss: a spawned worker's ru_maxrss starts at its parent's RSS at the fork
            rss = peak_rss()
            conn.send(("ok", (ns, rss, r.stats())))
    except Exception as e:  # reported to the parent as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))


class WorkerDied(Exception):
    pass


class Worker:
    def __init__(self, backend, path, threads, n_ctx, opts=None, cap_path=None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.p = ctx.Process(target=_worker, args=(child, backend, path, threads, n_ctx, opts or {}, cap_path),
                             daemon=True)
        env = {"EDGERT_ISA": (opts or {}).get("isa"), "EDGERT_MODE": (opts or {}).get("mode")}
        saved = {k: os.environ.get(k) for k in env}
        try:  # the kernels' choice is made when they are imported: the worker inherits it at spawn
            os.environ.update({k: v for k, v in env.items() if v})
            self.p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self._expect("ready")

    def _expect(self, kind):
        try:
            tag, val = self.conn.recv()
        except (EOFError, ConnectionResetError):
            self.p.join(timeout=10)
            raise WorkerDied(f"worker died (exit code {self.p.exitcode})") from None
        if tag == "error":
            from edgert.errors import EdgertError
            raise EdgertError(f"benchmark worker failed: {val}")
        return val

    def run(self, test, warm):
        self.conn.send((test, warm))
        return self._expect("ok")

    def close(self):
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.p.join(timeout=10)


@dataclass(frozen=True)
class Variant:
    """One engine configuration: backend, the file it runs, options (edgert: ffn, sparsity,
    selector; llama.cpp: no_repack)."""
    backend: str
    path: str
    opts: tuple = ()

    @property
    def label(self) -> str:
        o = dict(self.opts)
        extra = [f"{k}={v}" for k, v in o.items() if k in ("ffn", "sparsity", "selector") and v not in (None, "auto")]
        if o.get("backend", "numba") != "numba":  # the exported blocks through another runtime
            return f"{self.backend} ({o['backend']}" + "".join(f", {e}" for e in extra) + ")"
        if "isa" in o:  # the kernels it ran
            extra = [f"{o['isa']}/{o['mode']}"] + extra
        return self.backend + (f" ({', '.join(extra)})" if extra else "")


def run_bench(models, tests, threads_list, reps, backends, n_ctx=0, warmup=True, progress=None,
              variants=None, budgets=(0,), cap=False, text_ids=None):
    """-> list of Result, the variants interleaved repetition by repetition. variants(path) gives
    the Variants of a model (default: one per backend on the same file); budgets: memory budgets
    in bytes (0 = none), each applied to edgert and, with cap, as a cgroup v1 memory limit to
    every worker, the page cache of the files dropped first; text_ids: {model path: token ids} of
    a text whose windows the tests feed (see _time_test)."""
    from edgert.cgroup import MemoryCap, drop_file_cache
    results = []
    for path in models:
        info = model_info(path)
        vs = variants(path) if variants else [Variant(b, path) for b in backends]
        for threads in threads_list:
            need = max(t.n_depth + t.n_prompt + t.n_gen for t in tests) + 8
            ctx = max(n_ctx, need)
            for budget in budgets:
                workers, caps, res = {}, {}, {}
                try:
                    for v in vs:
                        opts = dict(v.opts)
                        if text_ids and path in text_ids:
                            opts["text_ids"] = text_ids[path]
                        if budget:
                            opts["mem_budget"] = budget
                            opts["no_repack"] = True
                        for test in tests:
                            res[v, test] = Result(info["model_filename"], v.label, threads, test, info=info,
                                                  mem_budget_bytes=budget, capped=cap and bool(budget))
                        cap_path = None
                        if cap and budget:
                            caps[v] = MemoryCap(f"edgert-bench-{os.getpid()}-{len(caps)}", budget)
                            cap_path = caps[v].path
                            drop_file_cache(v.path, path)
                        try:
                            workers[v] = Worker(v.backend, v.path, threads, ctx, opts, cap_path)
                        except (WorkerDied, Exception) as e:
                            for test in tests:
                                res[v, test].killed = _why(e, caps.get(v))
                    for test in tests:
                        for rep in range(reps):
                            for v, w in list(workers.items()):
                                r = res[v, test]
                                try:
                                    ns, rss, stats = w.run(test, warm=warmup and rep == 0)
                                except WorkerDied as e:
                                    for t2 in tests:
                                        if not res[v, t2].samples_ns:
                                            res[v, t2].killed = _why(e, caps.get(v))
                                    del workers[v]
                                    continue
                                r.samples_ns.append(ns)
                                r.peak_rss_bytes = max(r.peak_rss_bytes, rss)
                                r.stats = stats
                                if v in caps:
                                    r.cap_peak_bytes = caps[v].peak
                                if progress:
                                    progress(f"{Path(path).name} {v.label} t={threads} {test.name} rep {rep + 1}/{reps}")
                    results.extend(res.values())
                finally:
                    for w in workers.values():
                        w.close()
                    for c in caps.values():
                        c.remove()
    return results


def _why(e, cap) -> str:
    if cap is not None and cap.oom_kills:
        return f"killed by the memory cap ({cap.limit / 2**20:.0f} MiB)"
    return str(e)


# ============================================================================================
# Model facts and machine facts
# ============================================================================================

def model_info(path) -> dict:
    from edgert.config import config_from_gguf
    from edgert.gguf_file import GGUFFile, type_name
    from edgert.placement import _role
    g = GGUFFile(path)
    c = config_from_gguf(g)
    extra = {n for n in g.tensors if _role(n) == "package"}  # an edgert package's own tensors
    for n in extra:
        del g.tensors[n]
    n_params = g.n_params
    # bytes of weights read per generated token: every matrix but the embedding table (one row),
    # plus the embedding again when it doubles as the output matrix
    per_token = sum(t.nbytes for n, t in g.tensors.items() if n != "token_embd.weight")
    if c.tied_embeddings:
        per_token += g.tensors["token_embd.weight"].nbytes
    ftype = max(({t.qtype for t in g.tensors.values()}), key=lambda q: sum(
        t.nbytes for t in g.tensors.values() if t.qtype == q))
    label = g.get("general.size_label") or f"{n_params / 1e6:.0f}M"
    g.close()
    size = sum(t.nbytes for t in g.tensors.values()) if extra else os.path.getsize(path)
    return {"model_filename": str(path), "model_type": f"{c.arch} {label} {type_name(ftype)}" + (" pkg" if extra else ""),
            "model_size": size, "model_n_params": n_params,
            "bytes_per_token": per_token}


def build_commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"
