"""FFN stores: what the forward pass calls for a layer's feed-forward block.

Every store is a callable `store(xn, out)`: xn [T, n_embd] normed input, out [T, n_embd] the FFN's
output. The forward pass does not know which kind it calls:

- DenseFFN: the layer's three matrices resident (a plain GGUF, or a package with room to spare);
- StreamFFN: the three matrices read from flash on every call into one staging area shared by
  all layers (what a model bigger than memory costs without sparsity; also prefill's path when a
  package's FFN is not resident);
- NeuronStore (edgert/neuron_store.py): decode reads and computes only the predicted-active
  neurons, prefill delegates to a StreamFFN.
"""
from __future__ import annotations

import time

import numpy as np

from edgert.flash import aligned_empty
from edgert.kernels.quant import QMatrix, repack_chunked


class FFNScratch:
    """Buffers the FFN stores share across layers: the model's own scratch."""

    def __init__(self, model):
        self.m = model
        self.gate, self.up = model.gate, model.up      # [B, n_ff] each
        self.act_e, self.act_q = model.act_e, model.act_q

    @property
    def ops(self):
        return self.m.ops  # the model's kernel table (timed wrappers when a tracer is attached)


def dense_ffn(w_gate: QMatrix, w_up: QMatrix, w_down: QMatrix, xn, out, s: FFNScratch):
    """out[T, E] = down(act(gate(xn)) * up(xn))."""
    T = xn.shape[0]
    gate, up = s.gate[:T], s.up[:T]
    s.ops.gate_up(xn, [(w_gate, gate), (w_up, up)], s.act_e)
    s.ops.act(gate, up, gate)
    s.ops.ffn_down(w_down, gate, out, s.act_q)


class DenseFFN:
    """The layer's gate, up and down matrices held in RAM."""
    kind = "dense"

    def __init__(self, w_gate: QMatrix, w_up: QMatrix, w_down: QMatrix, scratch: FFNScratch):
        self.w_gate, self.w_up, self.w_down, self.s = w_gate, w_up, w_down, scratch

    @property
    def nbytes(self) -> int:
        return self.w_gate.nbytes + self.w_up.nbytes + self.w_down.nbytes

    def __call__(self, xn, out):
        dense_ffn(self.w_gate, self.w_up, self.w_down, xn, out, self.s)


READ_PIECE = 1 << 20  # bytes per flash request when streaming (large: what flash serves fastest)


class Streamer:
    """Reads layers' FFN tensors from flash into two staging buffers: while layer i is computed
    from one, layer i + 1's tensors arrive in the other (each tensor in 1 MiB requests, all in
    flight at once on the FlashReader's pool)."""

    def __init__(self, reader, layers, stats):
        self.reader, self.layers, self.stats = reader, layers, stats   # layers: [(gate, up, down) TensorInfo]
        n = staging_bytes(layers)
        self.bufs = [aligned_empty(n), aligned_empty(n)]              # 2 x [largest layer's FFN bytes]
        self.pending = None                                           # (layer, buffer, futures)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.bufs)

    def _issue(self, il: int, bi: int):
        futs, o = [], 0
        for t in self.layers[il]:
            for p in range(0, t.nbytes, READ_PIECE):
                n = min(READ_PIECE, t.nbytes - p)
                futs.append(self.reader.submit(t.offset + p, self.bufs[bi][o + p:o + p + n]))
            o += -(-t.nbytes // 4096) * 4096
        self.stats.bytes_read += sum(t.nbytes for t in self.layers[il])
        return (il, bi, futs)

    def matrices(self, il: int):
        """Layer il's (gate, up, down) QMatrix, read from flash (prefetched if it was next)."""
        if self.pending is None or self.pending[0] != il:
            if self.pending is not None:
                for f in self.pending[2]:
                    f.result()
            self.pending = self._issue(il, 0)
        _, bi, futs = self.pending
        t0 = time.perf_counter()
        for f in futs:
            f.result()
        self.stats.io_wait_s += time.perf_counter() - t0
        self.pending = self._issue((il + 1) % len(self.layers), 1 - bi)
        out, o = [], 0
        for t in self.layers[il]:
            out.append(repack_chunked(t.qtype, t.rows, t.cols, [(0, t.rows, self.bufs[bi][o:o + t.nbytes])]))
            o += -(-t.nbytes // 4096) * 4096
        return out

    def drain(self):
        if self.pending is not None:
            for f in self.pending[2]:
                f.result()
            self.pending = None


class StreamFFN:
    """The layer's three matrices read from flash (a Streamer) on every call, repacked (lossless)
    and multiplied: dense results, no resident FFN weights."""
    kind = "stream"

    def __init__(self, il: int, streamer: Streamer, scratch: FFNScratch):
        self.il, self.streamer, self.s = il, streamer, scratch

    def __call__(self, xn, out):
        g, u, d = self.streamer.matrices(self.il)
        dense_ffn(g, u, d, xn, out, self.s)


def staging_bytes(tensor_sets) -> int:
    """Bytes of a StreamStaging for these (gate, up, down) TensorInfo triples."""
    return max(sum(-(-t.nbytes // 4096) * 4096 for t in ts) for ts in tensor_sets)


class StoreStats:
    """Counters every store adds to; the model reports them per token."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.bytes_read = 0
        self.io_wait_s = 0.0
        self.neurons_total = 0      # neurons of the layers the sparse path ran
        self.neurons_selected = 0   # ... selected (read if not cached)
        self.neurons_computed = 0   # ... computed (above the exact threshold)
        self.clusters_needed = 0
        self.clusters_hit = 0
        self.recall_hits = 0        # selected neurons that the exact gate also keeps (measured runs)
        self.recall_total = 0
        self.tokens = 0

    def as_dict(self) -> dict:
        n = max(self.tokens, 1)
        return {
            "sparsity": 1 - self.neurons_computed / self.neurons_total if self.neurons_total else 0.0,
            "selected": self.neurons_selected / self.neurons_total if self.neurons_total else 0.0,
            "neuron_hit_rate": self.clusters_hit / self.clusters_needed if self.clusters_needed else None,
            "predictor_recall": self.recall_hits / self.recall_total if self.recall_total else None,
            "bytes_read_per_token": self.bytes_read / n,
            "io_wait_s": self.io_wait_s,
            "tokens": self.tokens,
        }
