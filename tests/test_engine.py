"""The engine against llama.cpp (llama-cpp-python) on the same GGUF files.

Tiny random-weight models check the wiring of each architecture (logits, relative error below);
the real models check what users see: teacher-forced top-1 agreement, perplexity with
llama-perplexity's method, greedy generation.
"""
import numpy as np
import pytest

from conftest import english_text, real_model
from edgert.generate import generate
from edgert.model import Model
from edgert.perplexity import log_softmax_at
from edgert.sampling import SamplingParams
from edgert.tokenizer import Tokenizer

# max |edgert - llama.cpp| / max |llama.cpp| over all logits of 20 tokens. llama and qwen2 agree to
# float32 rounding; gemma3's GeLU goes through fp16 (ggml's table) where a value that lands on an
# fp16 rounding boundary can round the other way, and six layers amplify that.
TINY_TOLERANCE = {"llama": 1e-5, "qwen2": 1e-5, "gemma3": 5e-3}


def llama_logits(ll, tokens):
    ll.reset()
    ll.eval(list(map(int, tokens)))
    return np.array(ll.scores[: len(tokens)], np.float32)


@pytest.mark.llama
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tiny_model_logits_match_llama_cpp(arch, tiny_models, llama_cpp):
    path = tiny_models[arch]
    toks = np.random.default_rng(1).integers(3, 320, 20)
    m = Model(path, n_ctx=64, n_batch=7)  # batches of 7: prefill crosses batch boundaries
    got = m.forward(toks, all_logits=True)
    ll = llama_cpp.Llama(path, n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    ref = llama_logits(ll, toks)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < TINY_TOLERANCE[arch], rel
    assert (got.argmax(1) == ref.argmax(1)).mean() == 1.0
    # decode one token at a time gives the same logits as the batch
    m.reset()
    step = np.stack([m.decode_one_token(int(t)) for t in toks])
    assert np.abs(step - got).max() / np.abs(got).max() < TINY_TOLERANCE[arch]


@pytest.mark.llama
@pytest.mark.parametrize("arch,mtype", [("llama", 3), ("qwen2", 6), ("llama", 8), ("qwen2", 12), ("gemma3", 14),
                                        ("llama", 10), ("qwen2", 11), ("gemma3", 13), ("qwen2", 7)],
                         ids=["llama-Q4_1", "qwen2-Q5_0", "llama-Q8_0", "qwen2-Q4_K", "gemma3-Q6_K",
                              "llama-Q2_K", "qwen2-Q3_K", "gemma3-Q5_K", "qwen2-Q5_1"])
def test_bit_identical_logits_with_llama_cpp(arch, mtype, llama_cpp, tmp_path):
    """Every float operation of a forward pass is llama.cpp's (its AVX2 kernels, the path it picks
    for the batch size: vec_dot / tinyBLAS / repacked gemv-gemm / tiled), so the logits are
    bit-identical over 6 layers: for two batches (6 tokens, then 16: below and above its size
    thresholds) and token by token."""
    from edgert.converters.tiny import write_tiny_gguf
    from edgert.kernels.isa import row_kernels as available
    if not available():
        pytest.skip("needs the AVX2 row-layout kernels")
    types = {k: mtype for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")}
    path = write_tiny_gguf(str(tmp_path / "t.gguf"), arch, n_layer=6, types={**types, "token_embd": 8})
    toks = np.random.default_rng(1).integers(3, 320, 22)
    m = Model(path, n_ctx=64, n_batch=64)
    got = np.concatenate([m.forward(toks[:6], all_logits=True), m.forward(toks[6:], all_logits=True)])
    m.reset()
    step = np.stack([m.decode_one_token(int(t)) for t in toks])
    ll = llama_cpp.Llama(path, n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    ll.reset()
    ll.eval(list(map(int, toks[:6])))
    ll.eval(list(map(int, toks[6:])))
    ref = np.array(ll.scores[:22], np.float32)
    ll.reset()
    ref_step = []
    for t in toks:
        ll.eval([int(t)])
        ref_step.append(np.array(ll.scores[ll.n_tokens - 1], np.float32))
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(step.view(np.uint32), np.stack(ref_step).view(np.uint32))


REAL = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
PROMPTS = ["The history of the printing press begins",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Q: What is the boiling point of water at sea level?\nA:",
           "Once upon a time, in a small village by the sea,",
           "The three laws of thermodynamics are",
           "import numpy as np\n\n# compute the mean of each column\n"]


@pytest.fixture(scope="module", params=REAL)
def real(request, llama_cpp):
    """edgert and two llama.cpp contexts on the same file: the reference (llama-cpp-python's default,
    no flash attention) and llama.cpp's flash-attention path, whose distance from the reference is
    llama.cpp's own numerical noise on this model."""
    path = real_model(request.param)
    model = Model(path, n_ctx=512)
    tok = Tokenizer(model.gguf.metadata, path)
    kw = dict(n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False)
    ref = llama_cpp.Llama(path, **kw)
    alt = llama_cpp.Llama(path, flash_attn=True, **kw)
    yield request.param, model, tok, ref, alt


@pytest.mark.llama
@pytest.mark.models
def test_teacher_forced_agreement_and_perplexity(real):
    """1,024 tokens of English prose in two 512-token chunks, BOS first where the model wants it;
    perplexity scored on the second half of each chunk (llama-perplexity's method)."""
    name, model, tok, ref_ll, alt_ll = real
    n_ctx = 512
    ids = tok.encode(english_text(), add_special=True)[: 2 * n_ctx]
    agree, agree_alt, err, err_alt, nll_e, nll_l = [], [], [], [], [], []
    for c in range(2):
        chunk = np.array(ids[c * n_ctx:(c + 1) * n_ctx])
        if tok.add_bos:
            chunk[0] = tok.bos_id
        model.reset()
        got = model.forward(chunk, all_logits=True)
        ref = llama_logits(ref_ll, chunk)
        alt = llama_logits(alt_ll, chunk)
        agree.append(got.argmax(1) == ref.argmax(1))
        agree_alt.append(alt.argmax(1) == ref.argmax(1))
        err.append(np.abs(got - ref).mean())
        err_alt.append(np.abs(alt - ref).mean())
        first = n_ctx // 2
        nll_e.append(-log_softmax_at(got[first:-1], chunk[first + 1:]))
        nll_l.append(-log_softmax_at(ref[first:-1], chunk[first + 1:]))
    top1, top1_alt = np.concatenate(agree).mean(), np.concatenate(agree_alt).mean()
    ppl_e = float(np.exp(np.concatenate(nll_e).mean()))
    ppl_l = float(np.exp(np.concatenate(nll_l).mean()))
    print(f"\n{name}: top-1 agreement edgert {top1:.4f} (llama.cpp FA vs non-FA {top1_alt:.4f}); "
          f"mean |logit diff| {np.mean(err):.4f} ({np.mean(err_alt):.4f}); "
          f"perplexity edgert {ppl_e:.4f} llama.cpp {ppl_l:.4f}")
    # the foundation issue's criteria; llama.cpp's own flash-attention path is printed beside them
    # for scale (it is below 99% against llama.cpp's default path on these models)
    assert abs(ppl_e / ppl_l - 1) <= 0.01
    assert top1 >= 0.99
    assert np.mean(err) <= np.mean(err_alt)


def llama_greedy(ll, ids, n):
    ll.reset()
    ll.eval(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(ll.scores[ll.n_tokens - 1]))
        out.append(t)
        ll.eval([t])
    return out


@pytest.mark.llama
@pytest.mark.models
def test_greedy_generation_matches(llama_cpp):
    """64 greedy tokens for six prompts on each real model: identical to llama.cpp's for at least
    2 of 3 prompts of every model (the foundation issue's criterion). llama.cpp's own
    flash-attention path is counted beside it for scale."""
    same = same_alt = 0
    per_model = {}
    for name in REAL:
        path = real_model(name)
        model = Model(path, n_ctx=512)
        tok = Tokenizer(model.gguf.metadata, path)
        kw = dict(n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False)
        ref_ll = llama_cpp.Llama(path, **kw)
        alt_ll = llama_cpp.Llama(path, flash_attn=True, **kw)
        for prompt in PROMPTS:
            ids = tok.encode(prompt, add_special=True)
            model.reset()
            ours = generate(model, ids, 64, SamplingParams(temp=0)).tokens
            ref = llama_greedy(ref_ll, ids, 64)
            alt = llama_greedy(alt_ll, ids, 64)
            same += ours == ref
            same_alt += alt == ref
            per_model[name] = per_model.get(name, 0) + (ours == ref)
            diff = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
            print(f"\n{name}: {prompt[:28]!r}: edgert identical={ours == ref} (first difference {diff}), "
                  f"llama.cpp FA identical={alt == ref}")
        del ref_ll, alt_ll, model
    print(f"identical generations over {len(REAL) * len(PROMPTS)}: edgert {same}, llama.cpp FA {same_alt}")
    for name in REAL:
        assert per_model[name] * 3 >= 2 * len(PROMPTS), (name, per_model[name])
