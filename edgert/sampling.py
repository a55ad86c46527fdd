"""Token sampling: greedy, temperature, top-k, top-p, with a seeded generator (llama.cpp's order:
top-k, top-p, then temperature and a draw)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.8      # 0 = greedy
    top_k: int = 40        # 0 = off
    top_p: float = 0.95    # 1 = off
    seed: int = -1         # -1 = random


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(None if params.seed < 0 else params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits: [n_vocab] -> token id."""
        p = self.p
        if p.temp <= 0:
            return int(np.argmax(logits))
        n = logits.shape[0]
        k = n if p.top_k <= 0 else min(p.top_k, n)
        idx = np.argpartition(-logits, k - 1)[:k] if k < n else np.arange(n)
        idx = idx[np.argsort(-logits[idx], kind="stable")]   # candidates, best first
        z = logits[idx].astype(np.float64)
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, z = idx[:keep], z[:keep]
        z = z / p.temp
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        return int(idx[self.rng.choice(len(idx), p=probs)])
