"""The KV cache formats (edgert/kv_cache.py, kernels/kv_quant.py, kernels/attention.attention_kv)
against naive NumPy references, the adaptive policy's invariants, and the flags' errors."""
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgert.errors import EdgertError
from edgert.kernels.attention import attention_kv
from edgert.kernels.kv_quant import (dequantize_row, dequantize_row_ranged, hadamard, hadamard_matrix, page_range,
                                     quantize_row, quantize_row_ranged)
from edgert.kernels.quant import F16_TABLE
from edgert.kv_cache import KV_TYPES, PAGE, KVCache, KVFormat, _tier_counts, kv_type, layout

D = 64


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def roundtrip(x, t):
    codes = np.zeros(t.row_bytes(len(x)), np.uint8)
    sc = np.zeros(max(1, t.n_scales(len(x))), np.uint16)
    quantize_row(x, t.bits, t.group, t.asym, codes, sc)
    y = np.empty_like(x)
    dequantize_row(codes, sc, t.bits, t.group, t.asym, y)
    return y, codes, sc


def naive_asym(x, bits, G):
    """Asymmetric group quantisation as kv_quant documents it: fp16 minimum m and scale
    d = (max - m) / (2^bits - 1), codes round-half-away of (x - m) / d."""
    out = np.empty_like(x)
    for g in range(0, len(x), G):
        xg = x[g:g + G]
        m = f16(xg.min())
        d = f16((xg.max() - m) / np.float32(2 ** bits - 1))
        inv = np.float32(1) / d if d > 0 else np.float32(0)
        c = np.clip(np.floor(np.abs((xg - m) * inv) + 0.5) * np.sign((xg - m) * inv), 0, 2 ** bits - 1)
        out[g:g + G] = c.astype(np.float32) * d + m
    return out


@pytest.mark.parametrize("name,qt", [("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0)])
def test_llama_types_match_gguf_reference(name, qt, rng):
    x = (rng.standard_normal((20, D)) * 3).astype(np.float32)
    ref = dequantize(quantize(x, qt), qt).reshape(x.shape)
    got = np.stack([roundtrip(r, KV_TYPES[name])[0] for r in x])
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("name", ["q8", "q4", "q3", "q2"])
def test_asym_types_match_naive(name, rng):
    t = KV_TYPES[name]
    x = (rng.standard_normal((20, D)) * 2 + 0.5).astype(np.float32)
    for r in x:
        got = roundtrip(r, t)[0]
        assert np.allclose(got, naive_asym(r, t.bits, t.group), atol=1e-6)
        assert np.abs(got - r).max() <= (r.max() - r.min()) / (2 ** t.bits - 1) * 0.51 + 1e-2


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, D, elements=st.floats(-1e4, 1e4, width=32)), st.sampled_from(["q8", "q4", "q3", "q2", "q8_0", "q4_0"]))
@example(np.full(D, 1e-45, np.float32), "q8_0")  # found by hypothesis in CI: scale underflowed to 0
@example(np.full(D, -1e-45, np.float32), "q4_0")
def test_roundtrip_any_values(x, name):
    """Constant rows, zeros, large values: finite output within one step of the input."""
    t = KV_TYPES[name]
    y = roundtrip(x, t)[0]
    assert np.all(np.isfinite(y))
    for g in range(0, D, t.group):
        xg = x[g:g + t.group]
        step = ((xg.max() - xg.min()) / (2 ** t.bits - 1) if t.asym
                else np.abs(xg).max() / (127 if t.bits == 8 else 8))  # q4_0: codes -8..7 of max / -8
        assert np.abs(y[g:g + t.group] - xg).max() <= step + 1e-3 * np.abs(xg).max() + 1e-3


def test_three_bit_codes_roundtrip():
    """Every 3-bit code lands back where it was packed (the 2-bit plane + the high-bit plane)."""
    x = np.tile(np.arange(8, dtype=np.float32), D // 8)  # codes 0..7 exactly (min 0, step 1)
    y, codes, _ = roundtrip(x, KV_TYPES["q3"])
    assert np.array_equal(y, x) and len(codes) == D * 3 // 8


def test_ranged_matches_naive(rng):
    rows = (rng.standard_normal((PAGE, D)) * rng.uniform(0.1, 5, D) + rng.standard_normal(D) * 3).astype(np.float32)
    rg = np.zeros((2, D), np.uint16)
    page_range(rows, PAGE, rg)
    lo, hi = F16_TABLE[rg[0]], F16_TABLE[rg[1]]
    assert np.allclose(lo, f16(rows.min(0))) and np.allclose(hi, f16(rows.max(0)))
    for bits in (8, 4, 3, 2):
        q = 2 ** bits - 1
        for r in rows[:8]:
            codes = np.zeros(D * bits // 8, np.uint8)
            quantize_row_ranged(r, bits, rg, codes)
            y = np.empty(D, np.float32)
            dequantize_row_ranged(codes, bits, rg, y)
            c = np.clip(np.round((r - lo) / (hi - lo) * q), 0, q)
            assert np.allclose(y, lo + c * (hi - lo) / q, atol=1e-5)


def test_hadamard_matches_matrix(rng):
    for n in (64, 128, 256):
        x = rng.standard_normal(n).astype(np.float32)
        y = x.copy()
        hadamard(y)
        assert np.allclose(y, hadamard_matrix(n) @ x, atol=1e-5)
        hadamard(y)
        assert np.allclose(y, x, atol=1e-5)  # its own inverse


def cache_rows(kv, il, which):
    """Every cached position's rows as the cache holds them, dequantised: [n, n_kv, D] (rotated space)."""
    n = int(kv.hw[il])
    out = np.zeros((n, kv.n_kv, kv.D), np.float32)
    codes, scales, spec = (kv.kc, kv.ks, kv.kspec) if which == "k" else (kv.vc, kv.vs, kv.vspec)
    for pos in range(n):
        t, s = kv.tier[il, pos], kv.slot[il, pos]
        for h in range(kv.n_kv):
            if spec[t, 3]:
                dequantize_row_ranged(codes[t][il, s, h], spec[t, 0], kv.krange[il, pos // PAGE, h], out[pos, h])
            else:
                dequantize_row(codes[t][il, s, h], scales[t][il, s, h], *spec[t, :3], out[pos, h])
    return out


def naive_attention(q, k, v, pos0, window, scale):
    """float64 softmax attention; -> (out [T, H*D], probabilities summed per position [P])."""
    T, H, Dh = q.shape
    g = H // k.shape[1]
    out = np.zeros((T, H * Dh))
    imp = np.zeros(k.shape[0])
    for t in range(T):
        p = pos0 + t
        lo = 0 if window <= 0 else max(0, p - window + 1)
        for h in range(H):
            s = k[lo:p + 1, h // g].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            w = np.exp(s - s.max())
            w /= w.sum()
            imp[lo:p + 1] += w
            out[t, h * Dh:(h + 1) * Dh] = w @ v[lo:p + 1, h // g]
    return out, imp


def run_cache(fmt, n_ctx, batches, rng, n_kv=2, H=6, window=0):
    """Store and attend batch after batch (as the model does); -> (cache, last q, last out, pos0)."""
    kv = KVCache(1, n_kv, D, n_ctx, fmt)
    pos = 0
    for T in batches:
        k = (rng.standard_normal((T, n_kv, D)) + np.linspace(-2, 2, D)).astype(np.float32)
        v = rng.standard_normal((T, n_kv, D)).astype(np.float32)
        q = rng.standard_normal((T, H, D)).astype(np.float32)
        kv.store(0, k, v, pos)
        out = np.zeros((T, H * D), np.float32)
        kv.attend(0, q, pos, window, np.float32(0.125), out)
        pos += T
    return kv, q, out, pos - batches[-1]


def rotate(x):
    H = hadamard_matrix(x.shape[-1])
    return x @ H.T


@pytest.mark.parametrize("fmt", [KVFormat("q8_0", "q8_0"), KVFormat("q4", "q2"), KVFormat("q3", "f16"),
                                 KVFormat("q4_0", "q4_0", rotate=False),
                                 KVFormat("auto", "auto", 6.0, window=PAGE)])
@pytest.mark.parametrize("batches,window", [([40, 1], 0), ([200, 1, 1], 0), ([64, 64, 64, 20], 0), ([150, 1], 7)])
def test_attention_reads_each_format(fmt, batches, window, rng):
    """attention_kv (decode with position splits, batches in query tiles) = naive attention over
    the cache's own dequantised rows, and the importance it accumulates = the probabilities."""
    if fmt.adaptive and max(batches) > PAGE:
        batches = [b if b <= PAGE else PAGE for b in batches]
    kv, q, out, pos0 = run_cache(fmt, 256, batches, rng, window=window)
    k, v = cache_rows(kv, 0, "k"), cache_rows(kv, 0, "v")
    qr = rotate(q) if kv.rot_k else q
    ref, imp = naive_attention(qr, k, v, pos0, window, 0.125)
    if kv.rot_v:
        ref = rotate(ref.reshape(len(q), -1, D)).reshape(ref.shape)
    assert np.allclose(out, ref, atol=2e-4, rtol=1e-4)
    imp_before = kv.imp[0].copy()
    out2 = np.zeros_like(out)
    kv.attend(0, q, pos0, window, np.float32(0.125), out2)
    assert np.allclose(kv.imp[0][:len(imp)] - imp_before[:len(imp)], imp, atol=1e-4)


def test_adaptive_policy_invariants(rng):
    n_ctx, bits = 512, 4.5
    fmt = KVFormat("auto", "auto", bits)
    kv = KVCache(1, 2, D, n_ctx, fmt)
    assert kv.tiers_k[1].channel and not kv.tiers_v[1].channel and not kv.rot_k and kv.rot_v
    pos = 0
    kc0 = []
    for T in [64] * 7 + [1] * 40 + [24]:
        k = (rng.standard_normal((T, 2, D)) * 2).astype(np.float32)
        v = rng.standard_normal((T, 2, D)).astype(np.float32)
        q = rng.standard_normal((T, 6, D)).astype(np.float32)
        q[:, :, :] += 3 * k[:, :1, :] if T == 1 else 0  # some positions attended more than others
        kv.store(0, k, v, pos)
        if pos == 0:
            kc0 = k[:4].copy()
        kv.attend(0, q, pos, 0, np.float32(0.125), np.zeros((T, 6 * D), np.float32))
        pos += T
        t = kv.tier[0, :pos]
        assert (t >= 0).all()
        assert (t[:fmt.sinks] == 0).all() and (t[max(0, pos - fmt.window):] == 0).all()
        assert ((t == 0).sum() <= kv.n_slots[0] and (t == 1).sum() <= kv.n_slots[1]
                and (t == 2).sum() <= kv.n_slots[2])
        slots = [set(kv.slot[0, :pos][t == i]) for i in range(3)]
        assert sum(len(s) for s in slots) == pos  # no slot shared
        b0, _, b2 = kv.row_bits
        if pos >= kv.n_slots[0] * (b0 - b2) / (bits - b2):  # long enough to pay for the top tier
            assert kv.histogram(pos)["bits_in_use"] <= bits + 1e-6
    # the sinks' K is held at fp16 (the top tier): exact to fp16
    assert np.array_equal(cache_rows(kv, 0, "k")[:4], f16(kc0))
    # its bytes: what layout() says, and what the arrays hold
    held = sum(a[0, :n].nbytes for arrs in (kv.kc, kv.ks, kv.vc, kv.vs) for a, n in zip(arrs, kv.n_slots))
    held += kv.tier.nbytes + kv.slot.nbytes + kv.imp.nbytes + kv.free.nbytes + kv.krange.nbytes
    assert held == kv.nbytes == layout(2, D, n_ctx, fmt).nbytes(1, 2, D, n_ctx)
    assert kv.nbytes < 0.3 * KVCache(1, 2, D, n_ctx).nbytes


def test_exit_displaces_least_important(rng):
    """A position leaving the window with more attention than the middle tier's least important
    position takes its place; that one is demoted, requantised from its middle-tier row."""
    # 3.4 bits at 2,048 positions: the middle tier's share grows slower than the context, so by
    # 1,796 positions it is full to its share (exits compete for it)
    kv, *_ = run_cache(KVFormat("auto", "auto", 3.4), 2048, [64] * 28 + [1] * 4, rng)
    pos = int(kv.hw[0])
    while (kv.tier[0, :pos] == 1).sum() < _tier_counts(pos + 1, kv.n_slots[0], kv.row_bits, 3.4):
        k = rng.standard_normal((1, 2, D)).astype(np.float32)
        kv.store(0, k, k, pos)  # until the next step's share is taken
        pos += 1
    t = kv.tier[0, :pos]
    mid = np.flatnonzero(t == 1)
    assert len(mid) > 0
    age = pos - np.arange(pos)
    kv.imp[0, :pos] = 0.5 * age  # every position: mean attention 0.5 per query ...
    low = mid[len(mid) // 2]
    kv.imp[0, low] = 0.01 * age[low]  # ... but this middle-tier one
    leaving = pos - kv.fmt.window  # the next decode step's leaving position
    kv.imp[0, leaving] = 0.9 * age[leaving]
    before = cache_rows(kv, 0, "k")[low]
    n1 = (t == 1).sum()
    k = rng.standard_normal((1, 2, D)).astype(np.float32)
    kv.store(0, k, k, pos)
    assert kv.tier[0, leaving] == 1 and kv.tier[0, low] == 2 and (kv.tier[0, :pos] == 1).sum() == n1
    sl = kv.slot[0, low]
    want = np.empty(D, np.float32)
    for h in range(2):
        codes = np.zeros(D * kv.kspec[2, 0] // 8, np.uint8)
        quantize_row_ranged(before[h], int(kv.kspec[2, 0]), kv.krange[0, low // PAGE, h], codes)
        assert np.array_equal(codes, kv.kc[2][0, sl, h])
        dequantize_row_ranged(codes, int(kv.kspec[2, 0]), kv.krange[0, low // PAGE, h], want)


def test_rerun_frees_positions(rng):
    """A shorter run from an earlier position (n_past moved back) reuses the slots, none leaked."""
    kv, *_ = run_cache(KVFormat("auto", "auto", 4.5), 512, [64] * 5, rng)
    k = rng.standard_normal((10, 2, D)).astype(np.float32)
    kv.store(0, k, k, 100)
    assert (kv.tier[0, 110:320] == -1).all()
    assert int(kv.nfree[0].sum()) == sum(kv.n_slots) - 110
    kv.reset()
    assert int(kv.nfree[0].sum()) == sum(kv.n_slots) and (kv.tier == -1).all()


def test_format_errors():
    with pytest.raises(EdgertError, match="needs --kv-bits"):
        layout(2, D, 512, KVFormat("auto", "auto"))
    with pytest.raises(EdgertError, match="too few"):
        layout(2, D, 512, KVFormat("auto", "auto", 3.5))  # 68 top-tier positions of 512
    with pytest.raises(EdgertError, match="unknown KV cache type"):
        kv_type("q5_9", D, "-ctk")
    with pytest.raises(EdgertError, match="--kv-window"):
        layout(2, D, 512, KVFormat("auto", "auto", 6.0, window=16))


@pytest.mark.parametrize("flags,msg", [(["-ctk", "q9"], "-ctk q9: unknown KV cache type"),
                                       (["--kv-bits", "3.5"], "--kv-bits applies to -ctk / -ctv auto"),
                                       (["-ctk", "auto", "-ctv", "auto", "--kv-bits", "0.5"], "must be in"),
                                       (["-ctk", "auto", "-ctv", "auto"], "needs --kv-bits")])
def test_cli_errors_without_traceback(flags, msg):
    r = subprocess.run([sys.executable, "-m", "edgert", "run", "-m", "smollm2-135m", "-p", "hi", "-n", "1", *flags],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr


def test_model_auto_matches_f16_closely():
    """SmolLM2 over 300 tokens with the auto cache at 5 bits: token by token and in batches
    agree with each other, and the logits stay close to the f16 cache's."""
    from conftest import english_text, real_model
    from edgert.gguf_file import GGUFFile
    from edgert.model import Model
    from edgert.tokenizer import Tokenizer
    path = real_model("smollm2-135m")
    ids = Tokenizer(GGUFFile(path).metadata, path).encode(english_text(4000), add_special=True)[:300]
    m = Model(path, n_ctx=512, kv=KVFormat("auto", "auto", 6.0))
    assert m.n_batch == 64
    a = m.forward(ids, all_logits=True)
    m.set_kv(KVFormat())
    ref = m.forward(ids, all_logits=True)
    assert (a.argmax(1) == ref.argmax(1)).mean() > 0.9
    assert np.abs(a - ref).max() < 0.15 * np.abs(ref).max()
    m.set_kv(KVFormat("auto", "auto", 6.0))
    m.forward(ids[:200])
    last = [m.decode_one_token(int(t)) for t in ids[200:203]]
    assert np.allclose(last[-1], a[202], atol=0.05 * np.abs(a[202]).max())


def test_results_written_whole_or_not_at_all(tmp_path):
    """kv-tradeoff / tradeoff / bench write JSON and PNG through write_atomic: a writer that dies
    halfway leaves neither the file nor its temp file, and an old file stays as it was."""
    from edgert.apps.common import save_json, write_atomic
    target = tmp_path / "rows.json"

    def dies(f):
        f.write("[{")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(target), dies)
    assert list(tmp_path.iterdir()) == []
    save_json(str(target), [{"a": 1}])
    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(target), dies)
    assert target.read_text() == '[\n {\n  "a": 1\n }\n]' and len(list(tmp_path.iterdir())) == 1
