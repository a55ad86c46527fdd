"""The fuzz campaign (hypothesis): every input path a user or a file controls either works or
fails with one EdgertError naming the problem -- never another exception, a hang or a crash.

  targets: GGUF files (header, metadata, vocabulary arrays, tensor infos, truncation) through
           GGUFFile, the config, the tokenizer and Model loading; edgert packages (their recipe;
           neuron and expert packages);
           device profiles (parsed TOML values and raw text); tokenizer input; CLI arguments;
           ONNX exports (manifest values, block file bytes); run-model's .npy inputs; the block
           bytes of every quantised type through repack, dequantisation and the products;
           probe transcripts (tests/test_deploy.py).
  CI:      a fixed-seed smoke (derandomized, EDGERT_FUZZ_EXAMPLES per target, default 40).
  make fuzz: EDGERT_FUZZ_EXAMPLES=2000 over the eleven targets here = 22,000 cases, plus the probe's.
Cases that once failed are pinned with @example (the regression corpus)."""
from __future__ import annotations

import os
import random
import struct
import tomllib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from edgert.errors import EdgertError

N = int(os.environ.get("EDGERT_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=os.environ.get("EDGERT_FUZZ_RANDOM") != "1",
                suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def gguf_seed(tiny_models):
    from edgert.gguf_file import GGUFFile
    path = tiny_models["llama"]
    g = GGUFFile(path)
    data_start = min(t.offset for t in g.tensors.values())
    g.close()
    with open(path, "rb") as f:
        return Seed(f.read(), data_start)


class Seed(tuple):
    """(file bytes, where tensor data starts), shown short in hypothesis' failure reports."""
    def __new__(cls, blob, data_start):
        return super().__new__(cls, (blob, data_start))

    def __repr__(self):
        return f"Seed({len(self[0])} bytes, data at {self[1]})"


def _load_everything(path: str):
    """What `edgert run` does with a file before generating: parse, config, tokenizer, model."""
    from edgert.config import config_from_gguf
    from edgert.gguf_file import GGUFFile
    from edgert.model import Model
    from edgert.tokenizer import Tokenizer
    g = GGUFFile(path)
    try:
        config_from_gguf(g)
        tok = Tokenizer(g.metadata, path)
        tok.encode("fuzz me", add_special=True)
    finally:
        g.close()
    m = Model(path, n_ctx=16, n_batch=8)
    m.forward(np.array([1, 2, 3]))


def _mutate(blob: bytes, data_start: int, ops) -> bytes:
    b = bytearray(blob)
    for kind, pos, val in ops:
        if not b:
            break
        pos = pos % max(1, min(data_start, len(b)))   # the header, metadata and tensor infos
        if kind == "byte":
            b[pos] = val & 0xFF
        elif kind == "u64":                  # a length / count / offset field made extreme
            b[pos:pos + 8] = struct.pack("<Q", [0, 1, 2**31, 2**63 - 1, 2**64 - 1, val][val % 6])
        elif kind == "cut":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = bytes([val & 0xFF]) * (1 + val % 7)
    return bytes(b)


OPS = st.lists(st.tuples(st.sampled_from(["byte", "byte", "u64", "cut", "insert"]),
                         st.integers(0, 2**20), st.integers(0, 2**32)), min_size=1, max_size=4)


@FUZZ
@given(ops=OPS)
@example(ops=[("u64", 16, 3)])           # the tensor count 2**63 - 1
@example(ops=[("cut", 30, 0)])           # truncated inside the metadata
def test_fuzz_gguf(gguf_seed, tmp_path_factory, ops):
    blob, data_start = gguf_seed
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    path.write_bytes(_mutate(blob, data_start, ops))
    try:
        _load_everything(str(path))
    except EdgertError as e:
        assert str(e) and "\n" not in str(e)


@pytest.fixture(scope="module")
def package_seed(tiny_models, tmp_path_factory):
    from edgert.converters.package import convert
    out = str(tmp_path_factory.mktemp("pkg") / "tiny.edgert.gguf")
    convert(tiny_models["llama"], out, _calib_text(), "fuzz", levels=(0.5,), calib_tokens=128, window=128)
    return _seed_of(out)


def _calib_text() -> str:
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics))[:20000]


def _seed_of(path: str) -> Seed:
    from edgert.gguf_file import GGUFFile
    g = GGUFFile(path)
    data_start = min(t.offset for t in g.tensors.values())
    g.close()
    with open(path, "rb") as f:
        return Seed(f.read(), data_start)


@FUZZ
@given(ops=OPS)
def test_fuzz_package(package_seed, tmp_path_factory, ops):
    """A package's header, recipe and tensor index mutated: refused in one line or loaded (and
    its sparse FFN runs)."""
    from edgert.model import Model
    blob, data_start = package_seed
    path = tmp_path_factory.mktemp("pkg") / "p.edgert.gguf"
    path.write_bytes(_mutate(blob, data_start, ops))
    try:
        m = Model(str(path), n_ctx=16, n_batch=8, ffn="sparse")
        m.forward(np.array([1, 2, 3]))
        m.decode_one_token(4)
    except EdgertError as e:
        assert str(e) and "\n" not in str(e)


@pytest.fixture(scope="module")
def expert_package_seed(tmp_path_factory):
    """A tiny mixture of experts (F16) converted to an expert package of mixed per-expert types."""
    pytest.importorskip("llama_cpp")
    from edgert.converters.expert_bits import convert_experts
    from edgert.converters.tiny import write_tiny_gguf
    d = tmp_path_factory.mktemp("epkg")
    src = write_tiny_gguf(str(d / "moe.gguf"), "llama", n_layer=2, n_expert=4,
                          types={k: 1 for k in ("attn_q", "attn_k", "attn_v", "attn_output", "output")})
    out = str(d / "moe.edgert.gguf")
    convert_experts(src, out, _calib_text(), "fuzz", size=0.8, calib_tokens=256, window=128)
    return _seed_of(out)


@FUZZ
@given(ops=OPS)
def test_fuzz_expert_package(expert_package_seed, tmp_path_factory, ops):
    """An expert package's header, recipe and per-expert tensor index (types, shapes, offsets)
    mutated: refused in one line or loaded (and its experts run from flash through the cache)."""
    from edgert.model import Model
    blob, data_start = expert_package_seed
    path = tmp_path_factory.mktemp("epkg") / "p.edgert.gguf"
    path.write_bytes(_mutate(blob, data_start, ops))
    try:
        m = Model(str(path), n_ctx=16, n_batch=8, ffn="cached", cache_slots=2)
        m.forward(np.array([1, 2, 3]))
        m.decode_one_token(4)
    except EdgertError as e:
        assert str(e) and "\n" not in str(e)


# ---------------------------------------------------------------------------- device profiles

def _shipped_profile() -> dict:
    from edgert.device_profiles.loader import HERE
    return tomllib.loads((HERE / "pixel-8-pro.toml").read_text())


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(-5, 5), max_size=4),
                   st.lists(st.lists(st.floats(-10, 1e9), max_size=4), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@FUZZ
@given(data=st.data())
@example(data=None)
def test_fuzz_profile_values(data):
    """A shipped profile with fields removed, retyped or set to extreme values."""
    from edgert.device_profiles.loader import profile_from_dict
    d = _shipped_profile()
    if data is not None:
        for _ in range(data.draw(st.integers(1, 4))):
            table = data.draw(st.sampled_from(["", "cpu", "memory", "flash", "accelerators", "access"]))
            node = d if table == "" else d.get(table)
            if isinstance(node, list):
                node = node[0] if node else {}
            if not isinstance(node, dict) or not node:
                continue
            key = data.draw(st.sampled_from(sorted(node) + ["unknown_key"]))
            if data.draw(st.booleans()):
                node.pop(key, None)
            else:
                node[key] = data.draw(VALUES)
    try:
        profile_from_dict(d, "fuzz.toml")
    except EdgertError as e:
        assert str(e).startswith("fuzz.toml: ") and "\n" not in str(e)


@FUZZ
@given(cut=st.integers(0, 4000), junk=st.text(max_size=20), at=st.integers(0, 4000))
def test_fuzz_profile_text(tmp_path_factory, cut, junk, at):
    from edgert.device_profiles.loader import HERE, load_profile
    text = (HERE / "jetson-orin-nano-8gb.toml").read_text()
    text = text[:at] + junk + text[at:]
    p = tmp_path_factory.mktemp("prof") / "x.toml"
    p.write_text(text[:len(text) - cut % (len(text) + 1)], errors="surrogateescape")
    try:
        load_profile(str(p))
    except EdgertError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)


# ---------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tokenizers_(tiny_models):
    from edgert.gguf_file import GGUFFile
    from edgert.tokenizer import Tokenizer
    return [Tokenizer(GGUFFile(tiny_models[a]).metadata, tiny_models[a]) for a in ("llama", "gemma3")]


@FUZZ
@given(text=st.text(max_size=200), special=st.booleans(), ids=st.lists(st.integers(-5, 10**6), max_size=20))
@example(text="\udcff abc", special=False, ids=[])       # invalid UTF-8 from a command line
def test_fuzz_tokenizer(tokenizers_, text, special, ids):
    for tok in tokenizers_:
        try:
            out = tok.encode(text, add_special=True, special=special)
        except EdgertError as e:
            assert "not valid UTF-8" in str(e)
            continue
        assert all(0 <= t < tok.n_vocab for t in out)
        tok.decode([t for t in ids if 0 <= t < tok.n_vocab])


# ---------------------------------------------------------------------------- CLI arguments

OPTIONS = ["-m", "-p", "-n", "-t", "-c", "-b", "--temp", "--top-k", "--top-p", "-s", "--mem-budget", "--device",
           "--ffn", "-ctk", "-ctv", "--kv-bits", "--sparsity", "--json", "-f", "--help", "--ignore-eos", "--chat"]
WORDS = ["0", "-1", "-5", "1", "2", "nan", "inf", "1e9", "99999999999999999999", "", "x", "700MB", "-3GB", "150%",
         "f16", "q8_0", "auto", "host", "pixel-8-pro", "nope", "dense", "sparse", "\udcff", "/dev/null", "/proc"]


@FUZZ
@given(cmd=st.sampled_from(["run", "tokenize", "show", "devices", "list", "warmup", "nonsense"]),
       argv=st.lists(st.one_of(st.sampled_from(OPTIONS), st.sampled_from(WORDS)), max_size=8))
@example(cmd="run", argv=["-c", "-5"])
@example(cmd="run", argv=["-p", "\udcff"])
def test_fuzz_cli(tiny_models, capsys, monkeypatch, cmd, argv):
    """Random argument lists: a usage error (2), a one-line error (1) or success, never an
    internal error (70) or a traceback. -m is the tiny model unless the list names another."""
    from edgert.apps.cli import main
    monkeypatch.setenv("EDGERT_MODEL", tiny_models["llama"])
    args = [cmd] + list(argv)
    if cmd in ("run",) and "-n" not in argv:
        args += ["-n", "2"]
    if "-n" in argv:  # keep runs short: every -n value at most 4
        args = [a if not (i and args[i - 1] == "-n" and a.lstrip("-").isdigit()) else str(min(int(a), 4))
                for i, a in enumerate(args)]
    if "-c" in args or "--ctx-size" in args:
        args = [a if not (i and args[i - 1] == "-c" and a.isdigit()) else str(min(int(a), 256))
                for i, a in enumerate(args)]
    try:
        rc = main(args)
    except SystemExit as e:   # argparse: --help (0) or a usage error (2)
        rc = e.code
    out, err = capsys.readouterr()
    tb = err[err.find("Traceback"):][:3000] if "Traceback" in err else err[-1500:]
    assert rc in (0, 1, 2, None), (args, tb)
    assert "Traceback" not in err, (args, err[-2000:])


@pytest.mark.parametrize("value", [320, 63, 0])
def test_fuzz_found_rope_dimensions_beyond_a_head(gguf_seed, tmp_path, value):
    """The campaign's one crash (a segfault in the rope kernel): rope.dimension_count mutated past
    head_dim wrote beyond a head. Now refused in one line (odd or zero, too)."""
    blob, _ = gguf_seed
    key = b"llama.rope.dimension_count"
    at = blob.index(key) + len(key) + 4          # the value after its u32 type
    assert struct.unpack_from("<I", blob, at)[0] == 64
    p = tmp_path / "m.gguf"
    p.write_bytes(blob[:at] + struct.pack("<I", value) + blob[at + 4:])
    with pytest.raises(EdgertError, match="rope.dimension_count' = .* (out of range|odd)"):
        _load_everything(str(p))


@pytest.mark.parametrize("value", [2**31, 3, 1])
def test_fuzz_found_block_count_not_the_files(gguf_seed, tmp_path, value):
    """The campaign's one hang: block_count mutated to 2^31 looped over layers the file does not
    have. Now one line (a count above or below the file's layers)."""
    blob, _ = gguf_seed
    key = b"llama.block_count"
    at = blob.index(key) + len(key) + 4
    assert struct.unpack_from("<I", blob, at)[0] == 2
    p = tmp_path / "m.gguf"
    p.write_bytes(blob[:at] + struct.pack("<I", value) + blob[at + 4:])
    with pytest.raises(EdgertError, match="block_count' = .* does not match the file's layers"):
        _load_everything(str(p))


@pytest.fixture(scope="module")
def onnx_export_seed(tiny_models, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from edgert.converters.onnx_export import export
    d = str(tmp_path_factory.mktemp("export") / "e.onnx")
    export(tiny_models["llama"], d)
    return d


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats() | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=6)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 40), st.booleans(), JSON), min_size=1, max_size=3))
def test_fuzz_export_manifest(onnx_export_seed, tmp_path_factory, edits):
    """An export's manifest.json with values replaced or keys dropped (top level and per layer):
    the model loads and runs, or one EdgertError."""
    import json
    import shutil
    from edgert.model import Model
    d = str(tmp_path_factory.mktemp("m") / "e.onnx")
    shutil.copytree(onnx_export_seed, d)
    mf = os.path.join(d, "manifest.json")
    m = json.load(open(mf))
    for where, drop, value in edits:
        layers = m.get("layers")
        obj = m if where % 2 == 0 or not isinstance(layers, list) or not layers else layers[where % len(layers)]
        if not isinstance(obj, dict) or not obj:
            continue
        key = sorted(obj)[where % len(obj)]
        if drop:
            del obj[key]
        else:
            obj[key] = value
    json.dump(m, open(mf, "w"))
    try:
        Model(d, n_ctx=16, backend="onnx").forward([1, 2, 3])
    except EdgertError as e:
        assert str(e) and "\n" not in str(e)


@FUZZ
@given(ops=OPS, which=st.sampled_from(["head.onnx", "embed.onnx", "ffn.1.onnx"]))
def test_fuzz_export_block_file(onnx_export_seed, tmp_path_factory, ops, which):
    """A block file's bytes damaged (its first KiB: the protobuf's graph structure): loads and
    runs (a weight changed), or one EdgertError naming the file."""
    import shutil
    from edgert.model import Model
    d = str(tmp_path_factory.mktemp("b") / "e.onnx")
    shutil.copytree(onnx_export_seed, d)
    p = os.path.join(d, which)
    blob = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(_mutate(blob, 1024, ops))
    try:
        Model(d, n_ctx=16, backend="onnx").forward([1, 2, 3])
    except EdgertError as e:
        assert str(e) and "\n" not in str(e)


@FUZZ
@given(shape=st.lists(st.integers(0, 5), max_size=4), dtype=st.sampled_from(["int64", "int32", "float32", "float64",
                                                                            "bool", "uint8", "complex64"]),
       name=st.sampled_from(["", "input_ids=", "attention_mask=", "x="]))
def test_fuzz_run_model_inputs(tmp_path_factory, shape, dtype, name):
    """run-model's .npy inputs of any shape and type against the int8 MiniLM: runs or one EdgertError."""
    from edgert.run_model import run_model
    from test_run_model import MINILM as path
    if not os.path.isfile(path):
        pytest.skip("sample models not unpacked (make test fetches them)")
    pytest.importorskip("onnxruntime")
    f = str(tmp_path_factory.mktemp("i") / "x.npy")
    np.save(f, np.ones(shape, dtype))
    try:
        run_model(path, [name + f], 1, 1)
    except EdgertError as e:
        assert str(e) and "\n" not in str(e)


@FUZZ
@given(data=st.data())
def test_fuzz_block_bytes_of_every_type(data):
    """Arbitrary block bytes of every quantised type (scales NaN, infinite, subnormal; every quant
    and high-bit pattern) in every layout the type has: dequantisation equals gguf-py's bit for bit
    (NaN where it has NaN) and the product kernels read only the matrix (finite weights give finite
    outputs), never out of bounds."""
    import gguf
    from edgert.kernels.isa import row_kernels
    from edgert.kernels.matmul import ActBuffers, matmul
    from edgert.kernels.quant import BLOCK, QTYPES, ROW_TYPES, dequantize, repack
    qt = data.draw(st.sampled_from([q for q in QTYPES if q.block > 1]), label="type")
    rows, cols = data.draw(st.integers(1, 9), label="rows"), 256 * data.draw(st.integers(1, 2), label="blocks")
    epb, bpb = BLOCK[qt.id]
    raw = np.frombuffer(data.draw(st.binary(min_size=rows * cols // epb * bpb, max_size=rows * cols // epb * bpb),
                                  label="bytes"), np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType(qt.id)).astype(np.float32)
    layouts = ["tiles"] + (["rows"] if qt.id in ROW_TYPES and row_kernels() else [])
    x = np.ones((2, cols), np.float32)
    for layout in layouts:
        w = repack(qt.id, raw, rows, cols, layout)
        got = dequantize(w)
        same = (got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))
        assert same.all(), (qt.name, layout)
        out = np.empty((2, rows), np.float32)
        with np.errstate(all="ignore"):
            matmul(w, x, out, ActBuffers(2, cols))
        fine = np.isfinite(ref).all(1) & (np.abs(ref).max(1, initial=0) < 1e30)
        assert np.isfinite(out[:, fine]).all(), (qt.name, layout)
