"""Quant blocks: repack + dequantise bit-exact against gguf-py; activation quantisation and the
matmul kernel against naive NumPy references."""
import gguf
import numba as nb
import numpy as np
import pytest

from edgert.converters.tiny import random_blocks
from edgert.kernels.matmul import ActBuffers, matmul, matmuls, quantize_for
from edgert.kernels.quant import (DOT, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, KQUANTS,
                                  ROW_TYPES, TYPE_NAMES,
                                  dequantize, mmap_chunks, repack, repack_chunked, repacked_nbytes, round_f16)
from edgert.kernels.isa import row_kernels as available

ALL = [F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K]
# (qtype, layout): every type tiled, and the row layout of kernels/simd.py where this CPU runs it
CASES = [(t, "tiles") for t in ALL] + [(t, "rows") for t in ROW_TYPES] + [(Q4_K, "rows8")]
CASE_IDS = [f"{TYPE_NAMES[t]}-{lay}" for t, lay in CASES]


@pytest.fixture(autouse=True)
def _needs_simd(request):
    if "layout" in request.fixturenames and request.getfixturevalue("layout") != "tiles" and not available():
        pytest.skip("row-layout kernels need an x86 CPU with AVX2 and the JIT")


def _raw(qtype, rows, cols, rng):
    data = random_blocks(qtype, rows, cols, rng)
    return data, np.ascontiguousarray(data).view(np.uint8).reshape(-1)


@pytest.mark.parametrize("qtype,layout", CASES, ids=CASE_IDS)
def test_dequantize_bit_exact_vs_gguf(qtype, layout, rng):
    rows, cols = (16 if layout == "rows8" else 7), 512
    data, raw = _raw(qtype, rows, cols, rng)
    ref = gguf.quants.dequantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType(qtype)).reshape(rows, cols)
    got = dequantize(repack(qtype, raw, rows, cols, layout))
    assert np.array_equal(got.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype,layout", CASES, ids=CASE_IDS)
def test_chunked_repack_equals_repack_and_planned_size(qtype, layout, rng):
    rows, cols = 296, 256  # chunks of 128 leave a partial last chunk and tile (whole groups of 8)
    _, raw = _raw(qtype, rows, cols, rng)
    released = []
    whole = repack(qtype, raw, rows, cols, layout)
    chunks = mmap_chunks(raw, qtype, rows, cols, chunk_rows=128, release=lambda lo, hi: released.append((lo, hi)))
    parts = repack_chunked(qtype, rows, cols, chunks, layout)
    assert parts.layout == whole.layout == layout
    for a, b in zip(whole.arrays(), parts.arrays()):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert released[0][0] == 0 and released[-1][1] == raw.size and len(released) == 3
    assert whole.nbytes == repacked_nbytes(qtype, rows, cols, layout)


def test_repack_rejects_bad_sizes(rng):
    _, raw = _raw(Q4_0, 2, 64, rng)
    with pytest.raises(ValueError):
        repack(Q4_0, raw[:-1], 2, 64)
    with pytest.raises(ValueError):
        repack(Q4_K, raw, 2, 64)  # 64 is not a multiple of 256


def test_round_f16_matches_numpy(rng):
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * s for s in (1e-7, 1e-4, 1, 1e3)])
    x = np.concatenate([x, np.float32([0.0, -0.0, 65504.0, 6e-8, 2.98e-8, -1e-30])])
    from numba import njit

    @njit
    def run(a, o):
        for i in range(a.size):
            o[i] = round_f16(a[i])
    out = np.empty_like(x)
    run(x, out)
    assert np.array_equal(out, x.astype(np.float16).astype(np.float32))


def naive_q8(x, block, signed_max=False):
    """llama.cpp quantize_row_q8_0 (AVX2) / q8_K (ref): -> ints, scales."""
    xb = x.reshape(-1, block).astype(np.float32)
    if signed_max:
        idx = np.abs(xb).argmax(1)
        mx = xb[np.arange(len(xb)), idx]
        iscale = np.where(mx != 0, np.float32(-127.0) / np.where(mx != 0, mx, 1), 0).astype(np.float32)
        q = np.minimum(127, np.rint(xb * iscale[:, None]))
        d = np.where(mx != 0, np.float32(1.0) / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
        return q.reshape(-1), d, d
    amax = np.abs(xb).max(1)
    d = (amax / np.float32(127)).astype(np.float32)
    idd = np.where(amax != 0, np.float32(127) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * idd[:, None])
    return q.reshape(-1), d.astype(np.float16).astype(np.float32), d


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q5_1, Q8_0, Q2_K, Q4_K, Q5_K, Q6_K], ids=lambda t: TYPE_NAMES[t])
def test_activation_quantisation_matches_llama_cpp_reference(qtype, rng):
    K = 512
    x = rng.standard_normal((2, K)).astype(np.float32)
    w = repack(qtype, _raw(qtype, 3, K, rng)[1], 3, K)
    xq, xd, xs = quantize_for(w, x, ActBuffers(2, K))
    act, S, A = DOT[qtype]
    for t in range(2):
        q, d, d_unrounded = naive_q8(x[t], A, signed_max=(A == 256))
        assert np.array_equal(xq[t], q)
        assert np.array_equal(xd[t], d)
        if qtype in (Q4_1, Q5_1):  # s = fp16(d * sum(q)) with the unrounded d, as llama.cpp stores it
            s = (d_unrounded * q.reshape(-1, 32).sum(1).astype(np.float32)).astype(np.float16).astype(np.float32)
            assert np.array_equal(xs[t], s)


@pytest.mark.parametrize("qtype,layout", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("T", [1, 3, 9, 70])
def test_matmul_vs_naive(qtype, layout, T, rng):
    """Kernel = dequantised weights @ dequantised activations (float64), up to float32 rounding.
    T = 70 crosses the row-layout kernel's 64-token groups and its 4-token calls (as plain Python,
    NUMBA_DISABLE_JIT, the tiled K-quants stop at 9: their 70-token case takes 15-20 s each)."""
    if T == 70 and layout == "tiles" and qtype in KQUANTS and nb.config.DISABLE_JIT:
        pytest.skip("T = 9 already takes the tiled path; 70 adds only Python time")
    R, C = (40 if layout == "rows8" else 37), 512
    w = repack(qtype, _raw(qtype, R, C, rng)[1], R, C, layout)
    x = rng.standard_normal((T, C)).astype(np.float32)
    buf = ActBuffers(T, C)
    out = np.empty((T, R), np.float32)
    matmul(w, x, out, buf)
    xq, xd, xs = quantize_for(w, x, buf)
    act, S, A = DOT[qtype]
    xdeq = (xq.reshape(T, -1, A) * xd[:, :, None]).reshape(T, C).astype(np.float64) if act >= 2 else xq.astype(np.float64)
    ref = xdeq @ dequantize(w).astype(np.float64).T
    if qtype in (Q4_1, Q5_1):  # the min term uses llama.cpp's stored s = fp16(d * sum(q)), not xd * sum(q)
        xsum = xdeq.reshape(T, -1, 32).sum(2)                    # [T, nb]
        m_rows = (w.m.T if layout != "tiles" else w.m.transpose(1, 0, 2).reshape(w.m.shape[1], -1)[:, :R])  # [nb, R]
        ref += (xs.astype(np.float64) - xsum) @ m_rows.astype(np.float64)
    assert np.allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # and the activation quantisation itself is close to the float product
    exact = x.astype(np.float64) @ dequantize(w).astype(np.float64).T
    assert np.abs(out - exact).max() <= 0.03 * np.abs(exact).max()


@pytest.mark.llama
@pytest.mark.parametrize("qtype", [Q2_K, Q3_K, Q5_K, Q5_1], ids=lambda t: TYPE_NAMES[t])
def test_new_types_equal_llama_cpps_vec_dot_bit_for_bit(qtype, rng, llama_cpp):
    """Weights from llama.cpp's quantiser, products below 8 tokens against its own vec_dot (AVX2
    here) bit for bit; 8 tokens and more take its tiled kernel, checked over whole models in
    test_engine.test_bit_identical_logits_with_llama_cpp."""
    from edgert.kernels.isa import current
    if current().name == "portable" and not nb.config.DISABLE_JIT:
        pytest.skip("llama.cpp's AVX2 float order")
    import ggml_ref
    R, C = 66, 512
    raw = ggml_ref.quantize(qtype, rng.standard_normal((R, C)).astype(np.float32))
    w = repack(qtype, raw, R, C)
    if w.layout == "tiles" and qtype not in KQUANTS:
        pytest.skip("the portable tile kernels keep llama.cpp's float order for the K-quants only")
    ref = gguf.quants.dequantize(raw.reshape(R, -1), gguf.GGMLQuantizationType(qtype))
    assert np.array_equal(dequantize(w).view(np.uint32), ref.astype(np.float32).view(np.uint32))
    for T in (1, 5):
        x = rng.standard_normal((T, C)).astype(np.float32)
        out = np.empty((T, R), np.float32)
        matmul(w, x, out, ActBuffers(T, C))
        assert np.array_equal(out.view(np.uint32), ggml_ref.vec_dots(qtype, raw, R, C, x).view(np.uint32))


def test_matmuls_shares_quantisation(rng):
    C = 256
    ws = [repack(t, _raw(t, 16, C, rng)[1], 16, C) for t in (Q4_0, Q8_0, Q4_K)]
    x = rng.standard_normal((2, C)).astype(np.float32)
    outs = [np.empty((2, 16), np.float32) for _ in ws]
    matmuls(x, list(zip(ws, outs)), ActBuffers(2, C))
    for w, o in zip(ws, outs):
        single = np.empty_like(o)
        matmul(w, x, single, ActBuffers(2, C))
        assert np.array_equal(o, single)


def test_f16_bits_every_half_and_halfway_cases(rng):
    """f16_bits / round_f16 against NumPy on every fp16 value, the midpoints between neighbours
    (ties to even), subnormals, overflow and random floats."""
    from numba import njit

    from edgert.kernels.quant import f16_bits
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)
    srt = np.sort(np.unique(finite))
    mids = ((srt[:-1].astype(np.float64) + srt[1:]) / 2).astype(np.float32)
    x = np.concatenate([finite, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                        rng.standard_normal(50000).astype(np.float32) * np.float32(1e-6),
                        np.float32([65519.0, 65520.0, 70000.0, -1e9, 1e-30, 2.9802322e-08, 2.9802326e-08])])

    @njit
    def run(a, bits, vals):
        for i in range(a.size):
            bits[i] = f16_bits(a[i])
            vals[i] = round_f16(a[i])
    bits, vals = np.empty(x.size, np.uint16), np.empty(x.size, np.float32)
    run(x, bits, vals)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    assert np.array_equal(bits, ref.view(np.uint16))
    assert np.array_equal(vals.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("layout", ["tiles", "rows"])
def test_q5_0_expanded_to_q8_0_gives_the_same_products(layout, rng):
    from edgert.kernels.quant import expand_q5_0
    rows, cols = 130, 512
    _, raw = _raw(Q5_0, rows, cols, rng)
    w5 = repack(Q5_0, raw, rows, cols, layout)
    w8 = expand_q5_0(w5)
    assert w8.qtype == Q8_0 and DOT[Q8_0] == DOT[Q5_0]
    assert np.array_equal(dequantize(w8), dequantize(w5))
    for T in (1, 7):
        x = rng.standard_normal((T, cols)).astype(np.float32)
        y5, y8 = np.empty((T, rows), np.float32), np.empty((T, rows), np.float32)
        matmul(w5, x, y5, ActBuffers(T, cols))
        matmul(w8, x, y8, ActBuffers(T, cols))
        # the integer block sums are equal; the two loops' float scaling may round differently
        # (fast-math lets LLVM fuse or reorder it per loop): at most an ulp or two
        assert np.max(np.abs(y5 - y8)) <= 4 * np.finfo(np.float32).eps * np.max(np.abs(y5))
        if layout == "rows":  # one IR routine for both: the same integer lanes, the same float steps
            assert np.array_equal(y5, y8)


def _products_in_layouts(qtype, R, C, T, layouts, rng):
    """X @ W.T for one random W [R, C] repacked in each layout, the same X [T, C]."""
    _, raw = _raw(qtype, R, C, rng)
    x = rng.standard_normal((T, C)).astype(np.float32)
    ys = []
    for layout in layouts:
        y = np.empty((T, R), np.float32)
        matmul(repack(qtype, raw, R, C, layout), x, y, ActBuffers(T, C))
        ys.append(y)
    return ys


@pytest.mark.parametrize("qtype", ROW_TYPES, ids=[TYPE_NAMES[t] for t in ROW_TYPES])
def test_row_and_tile_layouts_agree(qtype, rng):
    if not available():
        pytest.skip("row-layout kernels need an x86 CPU with AVX2 and the JIT")
    ys = _products_in_layouts(qtype, 100, 1024, 5, ("tiles", "rows"), rng)
    assert np.max(np.abs(ys[0] - ys[1])) <= 8 * np.finfo(np.float32).eps * np.max(np.abs(ys[0]))


@pytest.mark.parametrize("T", [1, 3, 4, 9, 70])
def test_rows8_gives_the_row_layouts_results_bit_for_bit(T, rng):
    """Q4_K in the rows8 layout (decode: 8 rows a step, lanes = rows; prefill: a gemm over 8 rows
    x 4 tokens, the rest by the gemv) runs each row's float chain unchanged."""
    if not available():
        pytest.skip("row-layout kernels need an x86 CPU with AVX2 and the JIT")
    ys = _products_in_layouts(Q4_K, 96, 1024, T, ("rows", "rows8"), rng)
    assert np.array_equal(ys[0].view(np.uint32), ys[1].view(np.uint32))
