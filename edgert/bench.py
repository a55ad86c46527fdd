"""Speed measurement in llama-bench's terms: pp (prompt processing), tg (text generation), pg
(both), at a context depth d, for edgert and for llama.cpp (llama-cpp-python) on the same GGUF.

Each (model, backend) runs in its own worker process, so that its peak RSS is its own and
neither backend's memory or threads disturb the other; the parent interleaves the backends'
repetitions. Tokenisation and sampling are not timed: tokens are random ids, generation feeds
back a fixed token, as llama-bench does.
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

    @property
    def n_tokens(self) -> int:
        return self.test.n_prompt + self.test.n_gen

    @property
    def samples_ts(self) -> list:
        return [self.n_tokens * 1e9 / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return statistics.mean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ns) > 1 else 0.0


# ============================================================================================
# Workers (one process per model and backend)
# ============================================================================================

class EdgertRunner:
    def __init__(self, path, threads, n_ctx):
        from edgert.kernels.matmul import set_threads
        set_threads(threads)
        from edgert.model import Model
        self.m = Model(path, n_ctx=n_ctx, n_batch=512)
        self.n_vocab = self.m.cfg.n_vocab

    def reset(self):
        self.m.reset()

    def prompt(self, toks):
        self.m.forward(toks)

    def token(self, t):
        self.m.decode_one_token(t)


class LlamaCppRunner:
    def __init__(self, path, threads, n_ctx):
        from llama_cpp import Llama
        self.ll = Llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                        n_threads_batch=threads, verbose=False)
        self.n_vocab = self.ll.n_vocab()

    def reset(self):
        self.ll.reset()

    def prompt(self, toks):
        self.ll.eval(list(map(int, toks)))

    def token(self, t):
        self.ll.eval([int(t)])


RUNNERS = {"edgert": EdgertRunner, "llama.cpp": LlamaCppRunner}


def _time_test(r, test: Test, rng) -> int:
    """One repetition: depth (untimed), then the timed prompt and/or generation."""
    r.reset()
    lo = min(100, r.n_vocab - 1)
    if test.n_depth:
        r.prompt(rng.integers(lo, r.n_vocab, test.n_depth))
    t0 = time.perf_counter_ns()
    if test.n_prompt:
        r.prompt(rng.integers(lo, r.n_vocab, test.n_prompt))
    tok = int(rng.integers(lo, r.n_vocab))
    for _ in range(test.n_gen):
        r.token(tok)
    return time.perf_counter_ns() - t0


def _worker(conn, backend, path, threads, n_ctx):
    import resource

    import numpy as np
    try:
        r = RUNNERS[backend](path, threads, n_ctx)
        conn.send(("ready", None))
        rng = np.random.default_rng(0)
        while True:
            msg = conn.recv()
            if msg is None:
                break
            test, warm = msg
            if warm:  # llama-bench's warm-up: one short run of the same kind
                _time_test(r, Test(min(test.n_prompt, 32), min(test.n_gen, 1), 0), rng)
            ns = _time_test(r, test, rng)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            conn.send(("ok", (ns, rss)))
    except Exception as e:  # reported to the parent as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))


class Worker:
    def __init__(self, backend, path, threads, n_ctx):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.p = ctx.Process(target=_worker, args=(child, backend, path, threads, n_ctx), daemon=True)
        self.p.start()
        self._expect("ready")

    def _expect(self, kind):
        tag, val = self.conn.recv()
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


def run_bench(models, tests, threads_list, reps, backends, n_ctx=0, warmup=True, progress=None):
    """-> list of Result, backends interleaved repetition by repetition."""
    results = []
    for path in models:
        info = model_info(path)
        for threads in threads_list:
            need = max(t.n_depth + t.n_prompt + t.n_gen for t in tests) + 8
            ctx = max(n_ctx, need)
            workers = {b: Worker(b, path, threads, ctx) for b in backends}
            try:
                for test in tests:
                    res = {b: Result(info["model_filename"], b, threads, test, info=info) for b in backends}
                    for rep in range(reps):
                        for b, w in workers.items():
                            ns, rss = w.run(test, warm=warmup and rep == 0)
                            res[b].samples_ns.append(ns)
                            res[b].peak_rss_bytes = max(res[b].peak_rss_bytes, rss)
                            if progress:
                                progress(f"{Path(path).name} {b} t={threads} {test.name} rep {rep + 1}/{reps}")
                    results.extend(res.values())
            finally:
                for w in workers.values():
                    w.close()
    return results


# ============================================================================================
# Model facts and machine facts
# ============================================================================================

def model_info(path) -> dict:
    from edgert.config import config_from_gguf
    from edgert.gguf_file import GGUFFile, type_name
    g = GGUFFile(path)
    c = config_from_gguf(g)
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
    return {"model_filename": str(path), "model_type": f"{c.arch} {label} {type_name(ftype)}",
            "model_size": os.path.getsize(path), "model_n_params": n_params,
            "bytes_per_token": per_token}


def build_commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"
