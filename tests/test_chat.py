"""chat: the conversation's KV cache kept between turns (only the new message prefilled, the
reply identical to a full re-prefill), the oldest turns dropped when the context is full,
a reply stopped mid-way (Ctrl-C) leaving the conversation usable; Model.rewind per KV format."""
import numpy as np
import pytest

from edgert.chat import PLAIN_TEMPLATE, Conversation
from edgert.kv_cache import KVFormat
from edgert.model import Model
from edgert.sampling import SamplingParams
from edgert.tokenizer import Tokenizer

GREEDY = SamplingParams(temp=0.0)
MESSAGES = ["hello there", "what is a cat", "and a dog", "tell me more", "why", "ok then", "a b c d",
            "the end is near", "one more", "last one"]


def _conv(path, n_ctx=512, system=None, kv=None, reserve=16):
    m = Model(path, n_ctx=n_ctx, n_batch=64, **({"kv": kv} if kv else {}))
    tok = Tokenizer(m.gguf.metadata, path)
    return Conversation(m, tok, PLAIN_TEMPLATE, GREEDY, system=system, reserve=reserve)


@pytest.mark.parametrize("kv", [None, KVFormat("q8_0", "q8_0"), KVFormat("auto", "auto", 6.0)])
def test_kv_kept_between_turns_gives_the_same_replies(tiny_models, kv):
    """Ten turns with the cache kept == each turn re-prefilled from nothing (greedy replies
    equal), and a later turn prefills about as much as turn 2, not the whole conversation."""
    path = tiny_models["llama"]
    c = _conv(path, kv=kv)
    fresh = _conv(path, kv=kv)
    prefills = []
    for text in MESSAGES if kv is None else MESSAGES[:5]:
        reply, tm = c.turn(text, 8)
        prefills.append(c.last_prefill)
        fresh.messages = [dict(m) for m in c.messages[:-2]]     # the same history, nothing cached
        fresh.model.reset()
        fresh.cached = []
        again, _ = fresh.turn(text, 8)
        assert again == reply
        assert tm.n_prompt == c.last_prefill
    rendered = len(c._render(c.messages))
    if kv is None or not kv.adaptive:
        assert max(prefills[1:]) < rendered / 2 and prefills[-1] <= 2 * max(prefills[1], 8)
    else:  # the token-adaptive cache cannot drop a suffix: each turn prefills it all (kv_cache.rewind)
        assert prefills[-1] > prefills[1]


def test_full_context_drops_the_oldest_turns(tiny_models):
    notices = []
    c = _conv(tiny_models["llama"], n_ctx=96, system="be brief", reserve=16)
    for i, text in enumerate(MESSAGES * 2):
        c.turn(text, 12, on_notice=notices.append)
        assert c.messages[0] == {"role": "system", "content": "be brief"}           # kept
        assert c.messages[-2] == {"role": "user", "content": text}                  # never dropped
        assert c.model.n_past <= c.model.n_ctx
    assert any("oldest" in n for n in notices)


def test_stopped_reply_leaves_the_conversation_usable(tiny_models):
    c = _conv(tiny_models["llama"])
    n = [0]

    def stop():
        n[0] += 1
        return n[0] >= 3
    reply, tm = c.turn("hello there", 50, stop=stop)
    assert len(tm.tokens) == 3 and c.messages[-1]["content"] == reply
    reply2, tm2 = c.turn("and again", 5)
    assert len(tm2.tokens) <= 5 and c.messages[-2]["content"] == "and again"


@pytest.mark.parametrize("kv", [None, KVFormat("q8_0", "q8_0"), KVFormat("q4", "q2")])
def test_rewind_equals_a_fresh_prefill(tiny_models, kv):
    m = Model(tiny_models["llama"], n_ctx=128, n_batch=64, **({"kv": kv} if kv else {}))
    a, b, c = np.arange(3, 40), np.arange(50, 70), np.arange(80, 95)
    m.prefill(np.concatenate([a, b]))
    assert m.rewind(len(a)) == len(a)
    got = m.prefill(c)
    m.reset()
    want = m.prefill(np.concatenate([a, c]))
    np.testing.assert_array_equal(got, want)


def test_rewind_adaptive_starts_over(tiny_models):
    m = Model(tiny_models["llama"], n_ctx=512, n_batch=64, kv=KVFormat("auto", "auto", 6.0))
    m.prefill(np.arange(3, 40))
    assert m.rewind(20) == 0 and m.n_past == 0
