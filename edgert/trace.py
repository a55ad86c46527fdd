"""Tracer: spans (layer, op, I/O) and counters (RSS, bytes read, KV bytes), summarised as tables
and written as Chrome Trace Event Format JSON (opens in Perfetto / chrome://tracing).

It costs nothing when off: the model calls its kernels through a table of functions
(`Model.ops`) and `Model.attach_tracer` swaps that table for timed wrappers, so an untraced
model runs exactly the code it runs without this module.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


class Tracer:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.pid = os.getpid()
        self.spans = []      # (name, cat, tid, t_start, t_end, layer, nbytes), perf_counter seconds
        self.counters = []   # (name, t, {series: value})
        self.layer = -1      # layer of the block being traced (ops record it)
        self.threads = {threading.get_ident(): "main"}

    # ---------------------------------------------------------------------------------------
    # recording
    # ---------------------------------------------------------------------------------------

    def wrap(self, fn, name: str, cat: str, nbytes=None):
        """fn, timed as a span `name`; nbytes(*args) -> bytes the call moves (optional). Spans hold
        only numbers and strings, so Python's garbage collector stops examining them (spans
        holding the call's arrays made every collection walk the whole trace)."""
        spans, clock = self.spans, time.perf_counter
        tid = threading.get_ident()

        def traced(*args):
            t = clock()
            r = fn(*args)
            t1 = clock()
            spans.append((name, cat, tid, t, t1, self.layer, nbytes(*args) if nbytes else 0))
            return r
        return traced

    @staticmethod
    def nbytes(span) -> int:
        return span[6]

    def wrap_block(self, fn, name: str):
        """A layer block method fn(il, ...): sets the current layer for the ops inside it."""
        spans, clock = self.spans, time.perf_counter
        tid = threading.get_ident()

        def traced(il, *args):
            self.layer = il
            t = clock()
            r = fn(il, *args)
            spans.append((name, "layer", tid, t, clock(), il, 0))
            self.layer = -1
            return r
        return traced

    def io(self, t_start: float, t_end: float, offset: int, nbytes: int):
        """One storage read (called from I/O threads)."""
        tid = threading.get_ident()
        if tid not in self.threads:
            self.threads[tid] = threading.current_thread().name
        self.spans.append((f"read {nbytes >> 10} KiB", "io", tid, t_start, t_end, -1, nbytes))

    def span(self, name: str, cat: str, t_start: float, t_end: float, nbytes: int = 0):
        self.spans.append((name, cat, threading.get_ident(), t_start, t_end, -1, nbytes))

    def counter(self, name: str, **values):
        self.counters.append((name, time.perf_counter(), values))

    # ---------------------------------------------------------------------------------------
    # output
    # ---------------------------------------------------------------------------------------

    def _us(self, t: float) -> float:
        return round((t - self.t0) * 1e6, 3)

    def chrome_events(self) -> list[dict]:
        """Trace Event Format: ph X spans, ph C counters, ph M thread / process names."""
        ev = [{"ph": "M", "name": "process_name", "pid": self.pid, "tid": 0, "ts": 0,
               "args": {"name": "edgert"}}]
        ev += [{"ph": "M", "name": "thread_name", "pid": self.pid, "tid": tid, "ts": 0,
                "args": {"name": nm}} for tid, nm in self.threads.items()]
        for sp in self.spans:
            name, cat, tid, a, b, layer, _ = sp
            args = {}
            nbytes = self.nbytes(sp)
            if layer >= 0:
                args["layer"] = layer
            if nbytes:
                args["bytes"] = int(nbytes)
            ev.append({"ph": "X", "name": name, "cat": cat, "pid": self.pid, "tid": tid,
                       "ts": self._us(a), "dur": round((b - a) * 1e6, 3), "args": args})
        for name, t, values in self.counters:
            ev.append({"ph": "C", "name": name, "pid": self.pid, "tid": 0, "ts": self._us(t),
                       "args": {k: float(v) for k, v in values.items()}})
        return ev

    def write(self, path: str):
        """Write the JSON trace (temp file, then rename)."""
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps({"traceEvents": self.chrome_events(), "displayTimeUnit": "ms"}))
        os.replace(tmp, p)

    def op_table(self, spans=None) -> list[tuple]:
        """[(name, calls, seconds, bytes)] of the 'op' spans (default: all), slowest first."""
        agg = defaultdict(lambda: [0, 0.0, 0])
        for sp in self.spans if spans is None else spans:
            if sp[1] == "op":
                r = agg[sp[0]]
                r[0] += 1
                r[1] += sp[4] - sp[3]
                r[2] += self.nbytes(sp)
        return sorted(((k, *v) for k, v in agg.items()), key=lambda r: -r[2])

    def layer_table(self, spans=None) -> dict[int, dict[str, float]]:
        """{layer: {block name: seconds}} of the 'layer' spans (default: all)."""
        out: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for name, cat, _, a, b, layer, _ in self.spans if spans is None else spans:
            if cat == "layer":
                out[layer][name] += b - a
        return out


# byte counters of the ops (what each call moves through memory), for the op table and trace
def _nb(*arrays) -> int:
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


def bytes_matmul(w, x, out, buf):
    return w.nbytes + x.nbytes + out.nbytes


def bytes_matmuls(x, pairs, buf):
    return sum(w.nbytes + o.nbytes for w, o in pairs) + x.nbytes


def bytes_attention(q3, kc, vc, pos0, window, *rest):
    n = pos0 + q3.shape[0]
    n = min(n, window + q3.shape[0]) if window else n
    return 2 * n * kc.shape[1] * kc.shape[2] * kc.itemsize + 2 * q3.nbytes


def bytes_first_two(a, b, *rest):
    return _nb(a, b)
