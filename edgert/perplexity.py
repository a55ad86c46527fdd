"""Perplexity as llama-perplexity computes it: non-overlapping chunks of n_ctx tokens, BOS in the
first slot of every chunk when the model wants one, only the second half of each chunk scored."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgert.errors import EdgertError


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    n_scored: int
    chunk_ppl: list = field(default_factory=list)
    nll: np.ndarray | None = None   # [n_scored] per-token negative log-likelihood


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits [N, V], targets [N] -> log p(target) [N] in float64."""
    z = logits.astype(np.float64)
    mx = z.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(z - mx).sum(axis=1))
    return z[np.arange(len(targets)), targets] - lse


def chunk_logits(model, chunk, per_token: bool) -> np.ndarray:
    """Logits [len(chunk), n_vocab] of a chunk from position 0: one batch, or (per_token) one
    decode step per token, as generation runs (the sparse FFN is a decode path)."""
    model.reset()
    if not per_token:
        return model.forward(chunk, all_logits=True)
    out = np.empty((len(chunk), model.cfg.n_vocab), np.float32)
    for i, t in enumerate(chunk):
        out[i] = model.forward([t])[-1]
    return out


def perplexity(model, tokens, n_ctx: int, n_chunks: int = -1, bos_id=None, on_chunk=None,
               per_token: bool = False) -> PerplexityResult:
    """tokens: the whole text's ids (BOS included if the model adds one)."""
    tokens = np.asarray(tokens, np.int64)
    if n_ctx < 4:
        raise EdgertError(f"perplexity context {n_ctx} is too small")
    avail = len(tokens) // n_ctx
    if avail == 0:
        raise EdgertError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx} (lower -c)")
    n = avail if n_chunks is None or n_chunks < 0 else min(n_chunks, avail)
    if n_ctx > model.n_ctx:
        raise EdgertError(f"perplexity context {n_ctx} exceeds the model context {model.n_ctx}")
    first = n_ctx // 2
    nlls = []
    chunk_ppl = []
    for i in range(n):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos_id is not None:
            chunk[0] = bos_id
        logits = chunk_logits(model, chunk, per_token)  # [n_ctx, n_vocab]
        lp = log_softmax_at(logits[first:n_ctx - 1], chunk[first + 1:])
        nlls.append(-lp)
        chunk_ppl.append(float(np.exp(np.concatenate(nlls).mean())))
        if on_chunk is not None:
            on_chunk(i, chunk_ppl[-1])
    nll = np.concatenate(nlls)
    mean = nll.mean()
    ppl = math.exp(mean)
    var = (nll ** 2).mean() - mean * mean
    err = ppl * math.sqrt(var / (len(nll) - 1)) if var > 0 and len(nll) > 1 else 0.0
    return PerplexityResult(ppl, err, len(nll), chunk_ppl, nll)
