"""The edgert package and the FFN stores: lossless cluster layout, the sparse kernel against a
naive NumPy reference, stream == dense bit for bit, sparse at sparsity 0 close to dense, and every
kind of bad package refused with a message naming the file and the problem."""
import os
import shutil
import struct

import numpy as np
import pytest

from conftest import english_text
from edgert.errors import EdgertError
from edgert.model import Model
from test_cli import one_line_error, run_cli


@pytest.fixture(scope="module")
def package(tiny_models, tmp_path_factory):
    from edgert.converters.package import convert
    out = str(tmp_path_factory.mktemp("pkg") / "tiny.edgert.gguf")
    convert(tiny_models["llama"], out, english_text(), "pydoc topics", sparsity=0.5, levels=(0.0, 0.5),
            calib_tokens=256, window=128, cluster=64)
    return out


def naive_ffn(model, il, x, sel_neurons):
    """NumPy: sum over the given neurons of act(gate . x) * (up . x) * down[:, n], with the gate
    and up rows dequantised from the source model and x quantised as the kernels quantise it."""
    from edgert.kernels.matmul import ActBuffers, quantize_for
    from edgert.kernels.quant import dequantize
    L = model.layers[il]
    G, U, D = dequantize(L.w_gate), dequantize(L.w_up), dequantize(L.w_down)

    def qx(w):  # the activation as the integer kernels see it: integer values times block scales
        xq, xd, _ = quantize_for(w, x[None], ActBuffers(1, x.shape[0]))
        return np.repeat(xd[0], x.shape[0] // xd.shape[1]) * xq[0].astype(np.float32)
    g = G[sel_neurons] @ qx(L.w_gate)
    u = U[sel_neurons] @ qx(L.w_up)
    a = g / (1 + np.exp(-g)) * u
    return D[:, sel_neurons] @ a


def test_package_layout_is_lossless_for_gate_and_up(package, tiny_models):
    from edgert.gguf_file import GGUFFile
    from edgert.kernels.quant import repack
    from edgert.package import cluster_layout, open_package, verify_tensors
    src, g = GGUFFile(tiny_models["llama"]), GGUFFile(package)
    info = open_package(g)
    verify_tensors(g)
    assert g.get("general.alignment") == 4096
    assert all(t.offset % 4096 == 0 for t in g.tensors.values())
    for name, t in src.tensors.items():  # the source's tensors unchanged
        assert np.array_equal(src.raw(name), g.raw(name)), name
    perm = g.raw("blk.1.ffn_perm").view(np.int32)
    assert sorted(perm) == list(range(len(perm)))
    tg = src.tensors["blk.1.ffn_gate.weight"]
    L = cluster_layout(tg.qtype, src.tensors["blk.1.ffn_up.weight"].qtype, tg.cols, info.C, info.down_type)
    cl = g.raw("blk.1.ffn_clusters").reshape(-1, L.nbytes)
    rb = tg.nbytes // tg.rows
    want = repack(tg.qtype, src.raw(tg.name).reshape(tg.rows, rb)[perm].reshape(-1), tg.rows, tg.cols, "rows")
    for f, arr in enumerate(want.arrays()):
        off, w = int(L.lay[2 * f]), int(L.lay[2 * f + 1])
        if w:
            got = cl[:, off:off + info.C * w].reshape(-1, w)
            assert np.array_equal(got, np.ascontiguousarray(arr).view(np.uint8).reshape(-1, w)), f


@pytest.mark.parametrize("selector", ["gate", "predictor"])
def test_sparse_kernel_against_naive_reference(package, selector):
    dense = Model(package, n_ctx=16, ffn="dense")
    m = Model(package, n_ctx=16, ffn="sparse", sparsity=0.5, selector=selector)
    rng = np.random.default_rng(0)
    for il in range(m.cfg.n_layer):
        s = m.ffn[il]
        x = rng.standard_normal((1, m.cfg.n_embd)).astype(np.float32)
        out = np.zeros_like(x)
        s(x, out)
        # the neurons the store computed: its selection filtered by the exact gate threshold
        neurons = s.perm[s.last_computed]
        ref = naive_ffn(dense, il, x[0], np.sort(neurons))
        assert len(neurons) > 0.2 * m.cfg.n_ff
        np.testing.assert_allclose(out[0], ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_stream_is_dense_and_sparse_at_zero_is_close(package):
    ids = np.arange(3, 23)

    def logits(**kw):
        m = Model(package, n_ctx=32, **kw)
        first = m.forward(ids[:6])[-1]
        return m, np.array([first] + [m.forward([t])[-1] for t in ids[6:]])
    _, dense = logits(ffn="dense")
    ms, stream = logits(ffn="stream")
    assert np.array_equal(dense, stream)  # the same kernels on the same bytes, read from flash
    assert ms.stats.as_dict()["bytes_read_per_token"] > 0
    for selector in ("gate", "predictor"):
        m, sparse = logits(ffn="sparse", sparsity=0.0, selector=selector)
        st = m.stats.as_dict()
        assert st["sparsity"] < 0.01 and st["tokens"] == len(ids)
        # only the down columns differ (Q8_0 along n_embd instead of the source's rows)
        rel = np.abs(sparse - dense).max() / np.abs(dense).max()
        assert rel < 0.05, (selector, rel)
        assert (sparse.argmax(1) == dense.argmax(1)).mean() >= 0.9


def test_sparse_decode_reads_misses_from_flash_and_counts_them(package):
    from edgert.budget import MemoryBudget
    m = Model(package, n_ctx=32, ffn="sparse", sparsity=0.5, selector="gate", hot_fraction=0.0)
    # hot_fraction 0: every cluster comes through the LRU region
    for t in range(3, 13):
        m.forward([t])
    st = m.stats.as_dict()
    assert 0 < st["neuron_hit_rate"] < 1
    assert st["bytes_read_per_token"] > 0 and st["io_wait_s"] >= 0
    assert 0.3 < st["sparsity"] < 0.7
    assert m.reader.mode in ("O_DIRECT", "fadvise")


def _corrupt(src, dst, name_or_offset):
    shutil.copy(src, dst)
    from edgert.gguf_file import GGUFFile
    g = GGUFFile(dst)
    off = g.tensors[name_or_offset].offset + 7
    g.close()
    with open(dst, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x55]))


def test_corrupted_tensor_is_refused_naming_it(package, tmp_path):
    bad = str(tmp_path / "bad.edgert.gguf")
    _corrupt(package, bad, "blk.1.ffn_clusters")
    with pytest.raises(EdgertError, match="tensor 'blk.1.ffn_clusters' is corrupted"):
        Model(bad, n_ctx=16)
    r = run_cli("run", "-m", bad, "-p", "a", "-n", "1")
    one_line_error(r, "bad.edgert.gguf", "blk.1.ffn_clusters", "corrupted")


def _rewrite_metadata(src, dst, key, value):
    """A copy of the package with one metadata value replaced (through gguf-py)."""
    import gguf
    from edgert.converters.package import _copy_metadata
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    w.add_custom_alignment(4096)
    for field in r.fields.values():
        if field.name in ("general.architecture", "general.alignment") or field.name.startswith("GGUF."):
            continue
        vt = field.types[0]
        sub = field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        v = value if field.name == key else field.contents()
        if v is not None:
            w.add_key_value(field.name, v, vt, sub_type=sub)
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data)
    w.close()


def test_other_format_version_is_refused(package, tmp_path):
    bad = str(tmp_path / "v9.edgert.gguf")
    _rewrite_metadata(package, bad, "edgert.format_version", 9)
    with pytest.raises(EdgertError, match="package format version 9, this edgert reads version 1"):
        Model(bad, n_ctx=16)


def test_sparse_needs_a_package_and_a_calibrated_level(tiny_models, package):
    with pytest.raises(EdgertError, match="needs an edgert package"):
        Model(tiny_models["llama"], n_ctx=16, ffn="sparse")
    with pytest.raises(EdgertError, match="no thresholds for sparsity 0.9"):
        Model(package, n_ctx=16, ffn="sparse", sparsity=0.9)


def test_killed_convert_leaves_nothing(tiny_models, tmp_path):
    from edgert.converters.package import convert
    out = str(tmp_path / "killed.edgert.gguf")

    class Killed(BaseException):
        pass

    def progress(stage, n, total):
        if stage == "write" and n > total // 2:
            raise Killed()
    with pytest.raises(Killed):
        convert(tiny_models["llama"], out, english_text(), "t", levels=(0.5,), calib_tokens=128, window=128,
                progress=progress)
    assert os.listdir(tmp_path) == []


def test_budget_below_the_fixed_cost_is_refused_with_numbers(package):
    r = run_cli("run", "-m", package, "-p", "a", "-n", "1", "--mem-budget", "50MB")
    one_line_error(r, "tiny.edgert.gguf", "memory budget 47.7 MiB (--mem-budget 50MB) is below this process's "
                                          "fixed cost")


def test_convert_cli_errors(tiny_models, tmp_path):
    r = run_cli("convert", tiny_models["llama"], "-o", str(tmp_path / "nodir" / "x.edgert.gguf"))
    one_line_error(r, "does not exist")
    r = run_cli("convert", tiny_models["llama"], "-o", str(tmp_path / "x.edgert.gguf"), "--levels", "0.5,abc")
    one_line_error(r, "--levels '0.5,abc': not a list of numbers")
    r = run_cli("convert", tiny_models["llama"], "-o", str(tmp_path / "x.edgert.gguf"), "--calib", "/nonexistent")
    one_line_error(r, "/nonexistent: cannot read calibration text")


def test_fuzzed_package_metadata_never_crashes(package, tmp_path):
    """Random corruptions of the package's header region: every one is either read or refused
    with an EdgertError, never another exception."""
    data = bytearray(open(package, "rb").read())
    from edgert.gguf_file import GGUFFile
    g = GGUFFile(package)
    header_end = min(t.offset for t in g.tensors.values())
    g.close()
    rng = np.random.default_rng(7)
    p = str(tmp_path / "fuzz.edgert.gguf")
    for i in range(40):
        d = bytearray(data[:header_end])
        for _ in range(int(rng.integers(1, 8))):
            d[int(rng.integers(0, header_end))] = int(rng.integers(0, 256))
        with open(p, "wb") as f:
            f.write(d)
            f.write(data[header_end:])
        try:
            g = GGUFFile(p)
            from edgert.package import is_package, open_package
            if is_package(g):
                open_package(g)
            g.close()
        except EdgertError:
            pass


def test_q5_0_down_columns(tiny_models, tmp_path):
    """Down columns at Q5_0 (fewer bytes to read): the sparse path at sparsity 0 still follows
    the dense one, with the same kernel checks as Q8_0."""
    from edgert.converters.package import convert
    out = str(tmp_path / "q5.edgert.gguf")
    convert(tiny_models["qwen2"], out, english_text(), "t", levels=(0.0, 0.5), calib_tokens=256, window=128,
            down_type="Q5_0")
    dense = Model(out, n_ctx=16, ffn="dense")
    m = Model(out, n_ctx=16, ffn="sparse", sparsity=0.0, selector="gate")
    assert m.ffn[0].L.down_type == 6
    x = np.random.default_rng(1).standard_normal((1, m.cfg.n_embd)).astype(np.float32)
    for il in range(m.cfg.n_layer):
        got, ref = np.zeros_like(x), np.zeros_like(x)
        m.ffn[il](x, got)
        dense.ffn[il](x, ref)
        assert np.abs(got - ref).max() < 0.08 * np.abs(ref).max(), il
    with pytest.raises(EdgertError, match="--down-type Q2_K: must be one of Q8_0, Q5_0"):
        convert(tiny_models["qwen2"], out, english_text(), "t", down_type="Q2_K")


@pytest.mark.parametrize("slots,hot", [(3, 0.0), (1, 0.0), (5, 0.4)])
def test_more_misses_than_cache_slots(package, slots, hot):
    """A token needing more clusters than the cache holds reads them in rounds (half the LRU
    slots at a time, the next round in flight while one is computed): the same result as with a
    cache holding every cluster."""
    ids = [5, 9, 14, 3, 30]

    def run(**kw):
        m = Model(package, n_ctx=16, ffn="sparse", sparsity=0.0, selector="gate", **kw)
        return m, np.array([m.forward([t])[-1] for t in ids])
    _, full = run()
    m, small = run(cache_slots=slots, hot_fraction=hot)
    assert m.ffn[0].slots.shape[0] == slots
    np.testing.assert_allclose(small, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    st = m.stats.as_dict()
    assert st["neuron_hit_rate"] < 0.7 and st["sparsity"] < 0.01


def test_bench_rows_carry_the_store_metrics(package, tmp_path):
    """edgert bench on a package with a budget list: JSON rows with the sparse FFN's metrics, and
    under a cap too small for it a row saying why instead of a crash."""
    import json
    from edgert.cgroup import available
    args = ["bench", "-m", package, "-p", "0", "-n", "3", "-r", "1", "-t", "1", "--ffn", "sparse,stream",
            "--sparsity", "0.5", "--selector", "gate", "--mem-budget", "600MB", "-o", "json"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["ffn"] for row in rows} == {"sparse", "stream"}
    for row in rows:
        for k in ("sparsity", "predictor_recall", "neuron_hit_rate", "bytes_read_per_token", "io_wait_s",
                  "mem_budget_bytes"):
            assert k in row
        assert row["mem_budget_bytes"] == 600 * 10**6 and row["avg_ts"] > 0
    sparse = next(row for row in rows if row["ffn"] == "sparse")
    assert 0.3 < sparse["sparsity"] < 0.7 and sparse["neuron_hit_rate"] is not None
    if available():  # the same under a real cap: the worker joined the cgroup, its peak is the cgroup's
        r = run_cli(*args[:-2], "--cap", "-o", "json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert all(row["capped"] and 0 < row["cap_peak_bytes"] <= 600 * 10**6 for row in rows), rows
    for fmt in ("md", "json"):  # below the fixed cost: a row says why
        r = run_cli(*args[:-4], "--mem-budget", "1MB", "-o", fmt)
        assert r.returncode == 0 and "benchmark worker failed" in r.stdout and "fixed cost" in r.stdout, r.stderr


@pytest.mark.parametrize("cmd", [
    ["run", "-p", "ab", "-n", "4", "--temp", "0"],
    ["perplexity", "-f", "{text}", "-c", "64", "--chunks", "1", "--measure-recall", "--selector", "predictor"],
    ["simulate", "--device", "pixel-8-pro", "-n", "3", "-r", "1"],
    ["profile", "-n", "3"],
])
def test_commands_take_a_package(package, tmp_path, cmd):
    text = tmp_path / "t.txt"
    text.write_text(english_text(20000))
    args = [a.replace("{text}", str(text)) for a in cmd]
    r = run_cli(args[0], "-m", package, *args[1:], "-t", "1", "--ffn", "sparse", "--sparsity", "0.5")
    assert r.returncode == 0, r.stderr
    if cmd[0] == "run":
        assert "ffn = sparse: sparsity" in r.stderr and "placement: ffn sparse" in r.stderr
    if cmd[0] == "perplexity":
        assert "Final estimate: PPL" in r.stdout and "recall 0." in r.stdout


def test_bench_refuses_a_source_the_package_was_not_made_from(package, tiny_models):
    r = run_cli("bench", "-m", package, "--source", tiny_models["qwen2"], "--baseline", "llama.cpp", "-n", "1",
                "-p", "0", "-r", "1")
    one_line_error(r, "not the file", "was converted from", "source_sha256")


def test_a_package_is_verified_once_per_file(package, tmp_path, monkeypatch):
    """The sha256 check reads the whole package the first time a file is opened, not at every
    start; a copy (a new file) is checked again, so a corrupted copy is still refused."""
    monkeypatch.setenv("EDGERT_CACHE", str(tmp_path / "cache"))
    first = Model(package, n_ctx=16).load_io["bytes"]
    again = Model(package, n_ctx=16).load_io["bytes"]
    assert again < first and first - again >= os.path.getsize(package) // 2
    bad = str(tmp_path / "copy.edgert.gguf")
    _corrupt(package, bad, "blk.0.pred_b")
    with pytest.raises(EdgertError, match="tensor 'blk.0.pred_b' is corrupted"):
        Model(bad, n_ctx=16)
