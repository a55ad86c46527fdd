"""Mixture-of-experts: every layout against llama.cpp on tiny random-weight GGUFs, the router
kernel against a NumPy reference, the expert cache (streamed == resident, bit for bit), bad input.
"""
import numpy as np
import pytest

from edgert.errors import EdgertError
from edgert.model import Model

ALL = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")
# max |edgert - llama.cpp| / max |llama.cpp| with the default mixed types, where the dense path
# is not bit-identical either (measured here: 5.8e-7 llama, 8.7e-7 qwen2moe, 6.6e-7 qwen3moe;
# olmoe 4.9e-4: a last-bit difference flips one router decision)
MIXED_TOLERANCE = {"llama": 1e-5, "qwen2moe": 1e-5, "qwen3moe": 1e-5, "olmoe": 2e-3}


def _write(tmp_path, arch, types=None, **kw):
    from edgert.converters.tiny import write_tiny_gguf
    return write_tiny_gguf(str(tmp_path / f"{arch}.gguf"), arch, n_layer=3, types=types,
                           n_expert=8 if arch == "llama" else 0, **kw)


def _llama_logits(llama_cpp, path, toks):
    ll = llama_cpp.Llama(path, n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    ll.eval(list(map(int, toks)))
    batch = np.array(ll.scores[:len(toks)], np.float32)
    ll.reset()
    step = []
    for t in toks:
        ll.eval([int(t)])
        step.append(np.array(ll.scores[ll.n_tokens - 1], np.float32))
    return batch, np.stack(step)


def _edgert_logits(path, toks, **kw):
    m = Model(path, n_ctx=64, n_batch=7, **kw)  # batches of 7: prefill crosses batch boundaries
    batch = m.forward(toks, all_logits=True)
    m.reset()
    return batch, np.stack([m.decode_one_token(int(t)) for t in toks]), m


@pytest.mark.llama
@pytest.mark.parametrize("arch,mtype", [("llama", 8), ("qwen2moe", 8), ("qwen3moe", 8), ("olmoe", 8), ("llama", 3),
                                        ("llama", 12), ("llama", 14)],
                         ids=["llama-Q8_0", "qwen2moe-Q8_0", "qwen3moe-Q8_0", "olmoe-Q8_0", "llama-Q4_1", "llama-Q4_K",
                              "llama-Q6_K"])
def test_moe_layouts_bit_identical_with_llama_cpp(arch, mtype, llama_cpp, tmp_path):
    """One type throughout (Q8_0 token embedding): the F32 router in llama.cpp's order for one
    token and for a batch, softmax, top-k, renormalisation, shared expert and the slot-ordered sum
    are llama.cpp's operations, so decode logits are its bits, and prefill's where the dense
    path's are (not the K-quants' batches)."""
    from edgert.kernels.quant import KQUANTS
    path = _write(tmp_path, arch, {k: mtype for k in ALL})
    toks = np.random.default_rng(1).integers(3, 320, 20)
    got, step, m = _edgert_logits(path, toks)
    ref, ref_step = _llama_logits(llama_cpp, path, toks)
    assert m.cfg.n_expert == 8 and m.cfg.n_expert_used == 2
    assert np.array_equal(step.view(np.uint32), ref_step.view(np.uint32))
    if mtype not in KQUANTS:
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.llama
@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "qwen3moe", "olmoe"])
def test_moe_layouts_mixed_types_match_llama_cpp(arch, llama_cpp, tmp_path):
    path = _write(tmp_path, arch)
    toks = np.random.default_rng(1).integers(3, 320, 20)
    got, step, _ = _edgert_logits(path, toks)
    ref, ref_step = _llama_logits(llama_cpp, path, toks)
    assert np.abs(got - ref).max() / np.abs(ref).max() < MIXED_TOLERANCE[arch]
    assert np.abs(step - ref_step).max() / np.abs(ref_step).max() < MIXED_TOLERANCE[arch]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95


def _route_reference(logits, k, norm_w):
    """softmax, top-k (stable: lower index first on ties), optional renormalisation, in float64."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, 1)
    if norm_w:
        w /= w.sum(1, keepdims=True)
    return idx, w


@pytest.mark.parametrize("n,k,norm_w", [(8, 2, True), (16, 2, False), (60, 4, False), (64, 8, True), (5, 1, True)])
def test_route_matches_reference(n, k, norm_w):
    from edgert.kernels.moe import route, top_k
    rng = np.random.default_rng(n * 10 + k)
    logits = (rng.standard_normal((33, n)) * 3).astype(np.float32)
    idx = np.empty((33, k), np.int32)
    w = np.empty((33, k), np.float32)
    route(logits, k, norm_w, idx, w)
    ridx, rw = _route_reference(logits, k, norm_w)
    assert np.array_equal(idx, ridx)
    assert np.allclose(w, rw, rtol=2e-6, atol=0)
    tk = np.empty((33, k), np.int32)
    top_k(logits, k, tk)  # the same order without the softmax
    assert np.array_equal(tk, ridx)


@pytest.mark.parametrize("T", [1, 5])
def test_router_f32_matches_reference(T):
    """Both of llama.cpp's F32 orders (one token: vec_dot; a batch: tinyBLAS) against float64."""
    from edgert.kernels.moe import router_f32
    rng = np.random.default_rng(T)
    w = rng.standard_normal((16, 512)).astype(np.float32)
    x = rng.standard_normal((T, 512)).astype(np.float32)
    out = np.empty((T, 16), np.float32)
    router_f32(w, x, out)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_route_ties_pick_lower_index():
    from edgert.kernels.moe import route
    logits = np.zeros((1, 8), np.float32)
    logits[0, [5, 2, 7]] = 1.0
    idx, w = np.empty((1, 2), np.int32), np.empty((1, 2), np.float32)
    route(logits, 2, True, idx, w)
    assert idx.tolist() == [[2, 5]] and np.allclose(w, 0.5)


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    from edgert.converters.tiny import write_tiny_gguf
    return write_tiny_gguf(str(tmp_path_factory.mktemp("moe") / "m.gguf"), "qwen2moe", n_layer=3)


def _run(path, toks, n_prompt=9, **kw):
    m = Model(path, n_ctx=64, n_batch=7, **kw)
    a = m.forward(toks[:n_prompt], all_logits=True)
    b = np.stack([m.decode_one_token(int(t)) for t in toks[n_prompt:]])
    return np.concatenate([a, b]), m


@pytest.mark.parametrize("kw", [dict(ffn="stream"), dict(ffn="cached", cache_slots=1), dict(ffn="cached", cache_slots=2),
                                dict(ffn="cached", cache_slots=3, prefetch=False), dict(ffn="cached", cache_slots=8)],
                         ids=["stream", "cache1-below-top-k", "cache2", "cache3-noprefetch", "cache-all"])
def test_streamed_experts_equal_resident_bit_for_bit(moe_path, kw):
    toks = np.random.default_rng(2).integers(3, 320, 24)
    ref, _ = _run(moe_path, toks, ffn="dense")
    got, m = _run(moe_path, toks, direct_io=True, **kw)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    st = m.stats.as_dict()
    assert m.reader.mode in ("O_DIRECT", "fadvise")
    per_expert = sum(x.nbytes for x in m.ffn[0].experts.layers[0][0])
    # decode: 2 experts a layer and token; prefill: each routed expert once per batch and layer
    assert 3 * 2 * 15 + 3 * 2 <= st["expert_hits"] + st["expert_misses"] <= 3 * 2 * 15 + 3 * 16
    if kw["ffn"] == "stream":  # every routed expert read on every use
        assert st["expert_hits"] == 0 and st["prefetch_recall"] is None
        assert m.stats.bytes_read == st["expert_misses"] * per_expert
    if kw.get("cache_slots") == 8:  # everything fits: each expert read once at most
        assert st["expert_misses"] <= 3 * 8
    if kw.get("prefetch", True) and kw["ffn"] == "cached":
        assert 0.0 <= st["prefetch_recall"] <= 1.0 and st["prefetch_precision"] is not None


def test_expert_cache_eviction_prefers_frequent_experts():
    """LRU with a frequency bias: an expert routed often survives a gap that evicts a one-off."""
    from edgert.experts import ExpertCache, ExpertMatrix
    from edgert.ffn import StoreStats

    class Reader:  # no file: reads complete at once with zeros
        def submit(self, offset, out):
            from concurrent.futures import Future
            out[:] = 0
            f = Future()
            f.set_result(None)
            return f

    mats = [[tuple(ExpertMatrix(f"e{e}", 8, 32, 32, 0, 32 * 34) for _ in range(3)) for e in range(6)]]
    st = StoreStats()
    c = ExpertCache(Reader(), mats, slots=3, stats=st, prefetch=False, k=1)

    def call(e):
        c.begin(0, np.array([e]))
        c.get(0, e, st)
    for e in (0, 0, 0, 0, 1, 2):   # 0 used four times, 1 and 2 once
        call(e)
    call(3)                        # evicts 1 (least recent of the rarely used), not 0
    assert set(c.cached[0]) == {0, 2, 3}
    assert (st.hits, st.misses) == (3, 4)


def test_moe_bad_input(tmp_path):
    from test_gguf import _rewrite
    from edgert.converters.tiny import write_tiny_gguf
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), "llama", n_layer=2, n_expert=4)

    def with_meta(name, key, value):
        class Field:  # what _rewrite reads of a gguf field
            types = None

            def contents(self):
                return value

        def mutate(meta, tensors):
            f = Field()
            f.types = meta[key].types
            meta[key] = f
        return _rewrite(path, str(tmp_path / name), mutate)

    def without(name, tensor):
        return _rewrite(path, str(tmp_path / name), lambda meta, tensors: tensors.remove(
            next(t for t in tensors if t[0] == tensor)))

    with pytest.raises(EdgertError, match=r"expert_used_count' = 5 is out of range \[1, 4\]"):
        Model(with_meta("k.gguf", "llama.expert_used_count", 5))
    with pytest.raises(EdgertError, match=r"expert_count' = 9999 is out of range"):
        Model(with_meta("n.gguf", "llama.expert_count", 9999))
    with pytest.raises(EdgertError, match=r"expert_used_count' = 0 is out of range"):
        Model(with_meta("z.gguf", "llama.expert_used_count", 0))
    with pytest.raises(EdgertError, match="missing tensor 'blk.1.ffn_up_exps.weight'"):
        Model(without("t.gguf", "blk.1.ffn_up_exps.weight"))
    with pytest.raises(EdgertError, match="missing tensor 'blk.0.ffn_gate_inp.weight'"):
        Model(without("r.gguf", "blk.0.ffn_gate_inp.weight"))


# ---------------------------------------------------------------------------------------------
# Per-expert bit widths (converters/expert_bits.py): the expert package
# ---------------------------------------------------------------------------------------------

CALIB = ("def f(x):\n    return x + 1\n\nThe quick brown fox jumps over the lazy dog. " * 200)


@pytest.fixture(scope="module")
def f16_moe(tmp_path_factory):
    """A tiny llama-layout MoE with every matrix F16: the float source a converter starts from."""
    from edgert.converters.tiny import write_tiny_gguf
    return write_tiny_gguf(str(tmp_path_factory.mktemp("f16moe") / "m.gguf"), "llama", n_layer=3,
                           types={k: 1 for k in ALL}, n_expert=8)


@pytest.mark.llama
def test_expert_package_at_one_type_gives_llama_quantisers_file_bit_for_bit(f16_moe, tmp_path):
    """Every expert at Q8_0 as its own tensors: the same blocks llama.cpp's quantiser writes in its
    stacked tensors (ggml_quantize_chunk either way), so the package's logits, prefill and decode,
    and streamed from flash, equal those of llama.cpp's own Q8_0 file bit for bit."""
    from edgert.converters.expert_bits import convert_experts
    from edgert.converters.quantize import quantize
    ref_path = quantize(f16_moe, str(tmp_path / "q8.gguf"), "Q8_0")
    pkg = str(tmp_path / "u8.edgert.gguf")
    recipe = convert_experts(f16_moe, pkg, CALIB, "calib", uniform="Q8_0", calib_tokens=512, window=256)
    assert recipe["expert_types"] == "Q8_0:24" and recipe["kind"] == "experts"
    toks = np.random.default_rng(4).integers(3, 320, 20)
    ref, _ = _run(ref_path, toks)
    got, m = _run(pkg, toks)
    assert m.package.kind == "experts" and m.pkg is None
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    streamed, _ = _run(pkg, toks, ffn="cached", cache_slots=2, direct_io=True)
    assert np.array_equal(streamed.view(np.uint32), ref.view(np.uint32))


@pytest.mark.llama
def test_mixed_expert_bits_meet_the_size_target_and_follow_the_costs(f16_moe, tmp_path):
    """--expert-size 0.65: the experts get several types, the expected bytes read per token stay
    within 65% of uniform Q4_K's, each per-expert tensor has the type the recipe counts, and the
    sensitivity cost is no higher than uniform Q2_K's (the cheapest start); the package runs."""
    from edgert.converters.expert_bits import convert_experts
    from edgert.gguf_file import GGUFFile
    from edgert.kernels.quant import TYPE_NAMES
    pkg = str(tmp_path / "mix.edgert.gguf")
    r = convert_experts(f16_moe, pkg, CALIB, "calib", size=0.65, calib_tokens=512, window=256)
    counts = dict(kv.split(":") for kv in r["expert_types"].split(","))
    assert sum(int(v) for v in counts.values()) == 24 and sum(int(v) > 0 for v in counts.values()) >= 2
    assert r["expert_bytes_read_per_token"] <= 0.65 * r["expert_bytes_read_per_token_reference"] * (1 + 1e-6)
    low = convert_experts(f16_moe, str(tmp_path / "q2.edgert.gguf"), CALIB, "calib", uniform="Q2_K",
                          calib_tokens=512, window=256)
    assert r["sensitivity_cost_total"] < low["sensitivity_cost_total"]
    g = GGUFFile(pkg)
    seen = {}
    for il in range(3):
        for e in range(8):
            types = {TYPE_NAMES[g.tensors[f"blk.{il}.{k}.{e}.weight"].qtype] for k in
                     ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
            assert len(types) == 1   # an expert's three matrices share its type
            name = types.pop()
            seen[name] = seen.get(name, 0) + 1
    g.close()
    assert {k: int(v) for k, v in counts.items() if int(v)} == seen
    toks = np.random.default_rng(5).integers(3, 320, 16)
    got, _ = _run(pkg, toks)
    assert np.all(np.isfinite(got))
    # the expert cache's shares are bytes: streamed through a small cache the logits are the
    # resident ones, and a share holds as many of the smaller experts as fit
    streamed, ms = _run(pkg, toks, ffn="cached", cache_slots=3, direct_io=True)
    assert np.array_equal(streamed.view(np.uint32), got.view(np.uint32))
    cache = ms.ffn[0].experts
    assert all(0 < u <= b for u, b in zip(cache.used, cache.share_bytes))
    sizes = [h for lay in cache.held_of for h in lay]
    assert all(sum(cache.held_of[il][e] for e in d) == cache.used[il] for il, d in enumerate(cache.cached))
    if max(sizes) >= 2 * min(sizes):
        assert any(len(d) > n for d, n in zip(cache.cached, cache.share))


def test_allocate_respects_the_target_and_buys_the_best_reductions():
    from edgert.converters.expert_bits import allocate
    rng = np.random.default_rng(0)
    cost = np.sort(rng.random((12, 4)), 1)[:, ::-1] * rng.random((12, 1)) * 10   # decreasing with bytes
    freq = rng.random(12)
    nbytes = np.array([84.0, 110.0, 144.0, 272.0])
    floor = float(np.sum(freq * nbytes[0]))
    assert np.all(allocate(cost, freq, nbytes, floor) == 0)
    assert np.all(allocate(cost, freq, nbytes, float(np.sum(freq * nbytes[-1]))) == 3)
    prev = np.inf
    for frac in (1.1, 1.4, 1.8, 2.5):
        ch = allocate(cost, freq, nbytes, frac * floor)
        assert np.sum(freq * nbytes[ch]) <= frac * floor * (1 + 1e-9)
        total = float(np.sum(cost[np.arange(12), ch]))
        assert total <= prev
        prev = total
    with pytest.raises(EdgertError, match="below every expert at the cheapest type"):
        allocate(cost, freq, nbytes, 0.5 * floor)


@pytest.mark.llama
def test_expert_package_bad_input(f16_moe, tmp_path):
    """A corrupted per-expert tensor is refused naming it; a missing one is named; a dense model,
    an unknown type and a target below the cheapest type are one-line errors."""
    from test_gguf import _rewrite
    from edgert.converters.expert_bits import convert_experts
    from edgert.gguf_file import GGUFFile
    pkg = str(tmp_path / "p.edgert.gguf")
    convert_experts(f16_moe, pkg, CALIB, "calib", uniform="Q4_K", calib_tokens=512, window=256)
    g = GGUFFile(pkg)
    t = g.tensors["blk.1.ffn_down_exps.5.weight"]
    off = t.offset   # from the start of the file
    g.close()
    bad = str(tmp_path / "bad.edgert.gguf")
    data = bytearray(open(pkg, "rb").read())
    data[off + 100] ^= 0xFF
    open(bad, "wb").write(data)
    with pytest.raises(EdgertError, match="tensor 'blk.1.ffn_down_exps.5.weight' is corrupted"):
        Model(bad, n_ctx=32)
    def drop(meta, tensors):
        meta.pop("general.alignment")   # (gguf's writer would not pad to it)
        tensors.remove(next(x for x in tensors if x[0] == "blk.2.ffn_up_exps.3.weight"))
    gone = _rewrite(pkg, str(tmp_path / "gone.edgert.gguf"), drop)
    with pytest.raises(EdgertError, match="blk.2.ffn_up_exps.3.weight"):
        Model(gone, n_ctx=32, verify=False)
    from edgert.converters.tiny import write_tiny_gguf
    dense = write_tiny_gguf(str(tmp_path / "dense.gguf"), "llama", n_layer=1)
    with pytest.raises(EdgertError, match="not a mixture of experts"):
        convert_experts(dense, str(tmp_path / "d.edgert.gguf"), CALIB, "calib")
    with pytest.raises(EdgertError, match="expert type 'Q9_X'"):
        convert_experts(f16_moe, str(tmp_path / "x.edgert.gguf"), CALIB, "calib", types=("Q9_X",))
    with pytest.raises(EdgertError, match="below every expert at the cheapest type"):
        convert_experts(f16_moe, str(tmp_path / "s.edgert.gguf"), CALIB, "calib", size=0.3, calib_tokens=512,
                        window=256)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edgert-")]   # no temp file left behind
