"""FFN stores: what the forward pass calls for a layer's feed-forward block.

Every store is a callable `store(xn, out)`: xn [T, n_embd] normed input, out [T, n_embd] the FFN's
output. The forward pass does not know which kind it calls:

- DenseFFN: the layer's three matrices resident (a plain GGUF, or a package with room to spare);
- StreamFFN: the three matrices read from flash on every call (a Streamer, edgert/streamed.py:
  the next layer's read in flight); what a model bigger than memory costs without sparsity, and
  prefill's path for a sparse FFN when the plan has room for its staging;
- NeuronStore (edgert/neuron_store.py): decode reads and computes only the candidate neurons.
"""
from __future__ import annotations

from edgert.kernels.quant import QMatrix
from edgert.streamed import Streamer


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

    def __init__(self, w_gate: QMatrix, w_up: QMatrix, w_down: QMatrix, scratch: FFNScratch):
        self.w_gate, self.w_up, self.w_down, self.s = w_gate, w_up, w_down, scratch

    def __call__(self, xn, out):
        dense_ffn(self.w_gate, self.w_up, self.w_down, xn, out, self.s)


class StreamFFN:
    """The layer's three matrices read from flash (a Streamer) on every call, repacked (lossless)
    and multiplied: dense results, no resident FFN weights."""

    def __init__(self, il: int, streamer: "Streamer", scratch: FFNScratch):
        self.il, self.streamer, self.s = il, streamer, scratch

    def __call__(self, xn, out):
        g, u, d = self.streamer.matrices(self.il)
        dense_ffn(g, u, d, xn, out, self.s)


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
        self.hits = self.misses = 0                 # routed experts found cached / read on demand
        self.predicted = self.predicted_right = 0   # experts prefetched / of those, routed next
        self.routed_predicted = 0                    # routed experts of the layers that had a prediction

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
            "expert_hit_rate": self.hits / (self.hits + self.misses) if self.hits + self.misses else None,
            "expert_hits": self.hits, "expert_misses": self.misses,
            "prefetch_recall": self.predicted_right / self.routed_predicted if self.routed_predicted else None,
            "prefetch_precision": self.predicted_right / self.predicted if self.predicted else None,
        }
