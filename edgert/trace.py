"""Tracer: spans (layer, op, I/O) and counters (RSS, bytes read, KV bytes), summarised as tables
and written as Chrome Trace Event Format JSON (opens in Perfetto / chrome://tracing).

It costs nothing when off: the model calls its kernels through a table of functions
(`Model.ops`) and `Model.attach_tracer` swaps that table for timed wrappers, so an untraced
model runs exactly the code it runs without this module.
"""
from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path



class Tracer:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.pid = os.getpid()
        self.spans = []      # (name, cat, tid, t_start, t_end, layer, nbytes), perf_counter seconds
        self.counters = []   # (name, t, {series: value})
        self._layer = [-1]   # layer of the block being traced (ops record it)
        self.threads = {threading.get_ident(): "main"}

    # ---------------------------------------------------------------------------------------
    # recording
    # ---------------------------------------------------------------------------------------

    def wrap(self, fn, name: str, cat: str):
        """fn, timed as a span `name`. A traced call costs two clock reads, a tuple of numbers and
        an append (about 0.4 us); spans hold no arrays, so the garbage collector does not walk
        the trace. Bytes per op come from the cost model's accounting (edgert.costmodel)."""
        spans, clock, layer = self.spans, time.perf_counter, self._layer
        tid = threading.get_ident()

        def traced(*args):
            t = clock()
            r = fn(*args)
            spans.append((name, cat, tid, t, clock(), layer[0], 0))
            return r
        return traced

    def wrap_block(self, fn, name: str):
        """A layer block method fn(il, ...): sets the current layer for the ops inside it."""
        spans, clock, layer = self.spans, time.perf_counter, self._layer
        tid = threading.get_ident()

        def traced(il, *args):
            layer[0] = il
            t = clock()
            r = fn(il, *args)
            spans.append((name, "layer", tid, t, clock(), il, 0))
            layer[0] = -1
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
        """A counter sample (the decode loop takes one per token). It also moves every object
        alive so far, the spans included, out of the garbage collector's generations
        (gc.freeze): a growing trace otherwise makes each collection walk all of it (measured:
        6% of SmolLM2's decode speed, against 2% for the spans themselves)."""
        self.counters.append((name, time.perf_counter(), values))
        gc.freeze()

    # ---------------------------------------------------------------------------------------
    # output
    # ---------------------------------------------------------------------------------------

    def _us(self, t: float) -> float:
        return round((t - self.t0) * 1e6, 3)

    def chrome_events(self) -> list[dict]:
        """Trace Event Format: ph X spans, ph C counters, ph M thread / process names."""
        from edgert.kernels import isa
        ev = [{"ph": "M", "name": "process_name", "pid": self.pid, "tid": 0, "ts": 0,
               "args": {"name": "edgert"}},
              {"ph": "M", "name": "process_labels", "pid": self.pid, "tid": 0, "ts": 0,
               "args": {"labels": f"kernels {isa.describe()}"}}]
        ev += [{"ph": "M", "name": "thread_name", "pid": self.pid, "tid": tid, "ts": 0,
                "args": {"name": nm}} for tid, nm in self.threads.items()]
        for sp in self.spans:
            name, cat, tid, a, b, layer, _ = sp
            args = {}
            nbytes = sp[6]
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
                r[2] += sp[6]
        return sorted(((k, *v) for k, v in agg.items()), key=lambda r: -r[2])

    def layer_table(self, spans=None) -> dict[int, dict[str, float]]:
        """{layer: {block name: seconds}} of the 'layer' spans (default: all)."""
        out: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for name, cat, _, a, b, layer, _ in self.spans if spans is None else spans:
            if cat == "layer":
                out[layer][name] += b - a
        return out
