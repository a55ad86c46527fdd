"""The generation loop and its timings (llama.cpp's llama_perf_context_print lines)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from edgert.errors import EdgertError
from edgert.sampling import Sampler, SamplingParams


@dataclass
class Timings:
    t_load_ms: float = 0.0
    t_prompt_ms: float = 0.0
    n_prompt: int = 0
    t_eval_ms: float = 0.0
    n_eval: int = 0
    t_sample_ms: float = 0.0
    n_sample: int = 0
    t_total_ms: float = 0.0
    tokens: list = field(default_factory=list)

    def lines(self) -> list[str]:
        def row(name, ms, n, unit):
            per = ms / n if n else 0.0
            rate = 1e3 * n / ms if ms > 0 else 0.0
            return (f"{name:>16} = {ms:10.2f} ms / {n:5d} {unit} ({per:8.2f} ms per token, "
                    f"{rate:8.2f} tokens per second)")
        return [
            f"{'load time':>16} = {self.t_load_ms:10.2f} ms",
            row("prompt eval time", self.t_prompt_ms, self.n_prompt, "tokens"),
            row("eval time", self.t_eval_ms, self.n_eval, "runs  "),
            row("sampling time", self.t_sample_ms, self.n_sample, "runs  "),
            f"{'total time':>16} = {self.t_total_ms:10.2f} ms / {self.n_prompt + self.n_eval:5d} tokens",
        ]


def generate(model, prompt_tokens, n_predict: int, params: SamplingParams, is_eog=None, on_token=None):
    """Prefill the prompt, then sample up to n_predict tokens. Returns Timings (with .tokens).

    on_token(token_id) is called for each new token as soon as it is sampled (for streaming).
    Generation stops at an end-of-generation token (is_eog) or when the context is full.
    """
    if len(prompt_tokens) == 0:
        raise EdgertError("the prompt is empty")
    if model.n_past + len(prompt_tokens) > model.n_ctx:
        raise EdgertError(f"the prompt has {len(prompt_tokens)} tokens, more than the context of "
                          f"{model.n_ctx} (raise -c)")
    tm = Timings(t_load_ms=getattr(model, "t_load_ms", 0.0))
    sampler = Sampler(params)
    t0 = time.perf_counter()
    logits = model.prefill(prompt_tokens)
    t1 = time.perf_counter()
    tm.t_prompt_ms, tm.n_prompt = (t1 - t0) * 1e3, len(prompt_tokens)
    for i in range(n_predict):
        ts = time.perf_counter()
        tok = sampler(logits)
        tm.t_sample_ms += (time.perf_counter() - ts) * 1e3
        tm.n_sample += 1
        tm.tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if (is_eog is not None and is_eog(tok)) or i == n_predict - 1 or model.n_past >= model.n_ctx:
            break
        te = time.perf_counter()
        logits = model.decode_one_token(tok)
        tm.t_eval_ms += (time.perf_counter() - te) * 1e3
        tm.n_eval += 1
    tm.t_total_ms = (time.perf_counter() - t0) * 1e3 + tm.t_load_ms
    return tm
