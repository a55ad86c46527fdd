import numpy as np

from edgert.sampling import Sampler, SamplingParams


def test_greedy_is_argmax(rng):
    logits = rng.standard_normal(1000).astype(np.float32)
    assert Sampler(SamplingParams(temp=0))(logits) == int(np.argmax(logits))


def test_top_k_top_p_and_seed(rng):
    logits = rng.standard_normal(500).astype(np.float32)
    top5 = set(np.argsort(-logits)[:5].tolist())
    s = Sampler(SamplingParams(temp=1.0, top_k=5, top_p=1.0, seed=7))
    draws = [s(logits) for _ in range(300)]
    assert set(draws) <= top5 and len(set(draws)) > 1
    again = Sampler(SamplingParams(temp=1.0, top_k=5, top_p=1.0, seed=7))
    assert [again(logits) for _ in range(300)] == draws
    # top-p: one dominant token with p > top_p is the only candidate
    peaked = np.zeros(100, np.float32)
    peaked[42] = 20.0
    s = Sampler(SamplingParams(temp=1.0, top_k=0, top_p=0.9, seed=1))
    assert all(s(peaked) == 42 for _ in range(50))


def test_temperature_matches_softmax(rng):
    logits = np.array([0.0, 1.0, 2.0], np.float32)
    s = Sampler(SamplingParams(temp=0.5, top_k=0, top_p=1.0, seed=3))
    n = 20000
    counts = np.bincount([s(logits) for _ in range(n)], minlength=3) / n
    p = np.exp(logits / 0.5)
    p /= p.sum()
    assert np.abs(counts - p).max() < 0.02
