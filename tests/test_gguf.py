"""GGUF parsing against gguf-py's reader, and clear errors for bad files."""
import os
import shutil

import numpy as np
import pytest

from edgert.config import config_from_gguf
from edgert.errors import EdgertError
from edgert.gguf_file import GGUFFile


def test_parser_matches_gguf_reader(tiny_models):
    from gguf import GGUFReader
    for path in tiny_models.values():
        g = GGUFFile(path)
        r = GGUFReader(path)
        for key, field in r.fields.items():
            if key.startswith("GGUF."):
                continue
            want = field.contents()
            got = g.metadata[key]
            if isinstance(want, float):
                assert got == pytest.approx(want)
            else:
                assert got == want, key
        assert len(r.tensors) == len(g.tensors)
        for t in r.tensors:
            info = g.tensors[t.name]
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            assert np.array_equal(g.raw(t.name), np.asarray(t.data).view(np.uint8).reshape(-1))
        g.close()


def test_config_from_gguf(tiny_models):
    c = config_from_gguf(GGUFFile(tiny_models["gemma3"]))
    assert c.arch == "gemma3" and c.qk_norm and c.post_norms and c.ffn_act == "gelu"
    assert c.swa_layers == (True,) * 5 + (False,) and c.swa_window == 8
    assert c.rope_base_for(0) == 10000.0 and c.rope_base_for(5) == 1e6
    q = config_from_gguf(GGUFFile(tiny_models["qwen2"]))
    assert q.rope_neox and not q.qk_norm and q.swa_window == 0


def _copy(src, dst_dir, name):
    dst = os.path.join(dst_dir, name)
    shutil.copy(src, dst)
    return dst


def test_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(EdgertError, match=r"model\.gguf: not a GGUF file"):
        GGUFFile(str(p))


def test_truncated(tiny_models, tmp_path):
    src = tiny_models["llama"]
    size = os.path.getsize(src)
    for cut in (20, 4000, size - 100):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(open(src, "rb").read()[:cut])
        with pytest.raises(EdgertError, match=rf"cut{cut}\.gguf: truncated GGUF"):
            GGUFFile(str(p))


def _rewrite(src, dst, mutate):
    """Rewrite a GGUF with gguf's writer after `mutate(meta: dict, tensors: list)`."""
    import gguf
    r = gguf.GGUFReader(src)
    meta = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, np.asarray(t.data), t.tensor_type) for t in r.tensors]
    arch = meta["general.architecture"].contents()
    arch = mutate(meta, tensors) or arch
    w = gguf.GGUFWriter(dst, arch)
    for k, f in meta.items():
        if k == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(k, f.contents(), vt)
    for name, data, qt in tensors:
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_unknown_architecture(tiny_models, tmp_path):
    p = _rewrite(tiny_models["llama"], str(tmp_path / "m.gguf"), lambda meta, t: "mamba")
    with pytest.raises(EdgertError, match=r"m\.gguf: unknown architecture 'mamba'"):
        config_from_gguf(GGUFFile(p))


def test_unsupported_quant_type(tiny_models, tmp_path):
    import gguf

    def mutate(meta, tensors):
        for i, (name, data, qt) in enumerate(tensors):
            if name == "blk.0.attn_q.weight":  # declared IQ4_NL (18 bytes / 32): unsupported
                rows = data.shape[0]
                tensors[i] = (name, np.zeros((rows, 8 * 18), np.uint8), gguf.GGMLQuantizationType.IQ4_NL)
    p = _rewrite(tiny_models["llama"], str(tmp_path / "q.gguf"), mutate)
    from edgert.model import Model
    with pytest.raises(EdgertError, match=r"q\.gguf: tensor 'blk\.0\.attn_q\.weight' has unsupported quant type IQ4_NL"):
        Model(p)


def test_long_arrays_stay_in_the_file_until_asked_for(tiny_models, monkeypatch, tmp_path):
    """Arrays longer than LAZY_ITEMS (vocabularies, merges) are validated at parse time but read
    only when looked up; the values equal gguf-py's, and a file cut inside one still fails at open."""
    import edgert.gguf_file as gf
    from gguf import GGUFReader
    monkeypatch.setattr(gf, "LAZY_ITEMS", 8)
    path = tiny_models["llama"]
    g = GGUFFile(path)
    raw = dict.__getitem__(g.metadata, "tokenizer.ggml.tokens")
    assert isinstance(raw, gf.LazyArray)
    r = GGUFReader(path)
    want = r.fields["tokenizer.ggml.tokens"].contents()
    assert g.metadata.length("tokenizer.ggml.tokens") == len(want) > 8
    assert g.metadata["tokenizer.ggml.tokens"] == want == g.get("tokenizer.ggml.tokens")
    assert g.metadata.length("no.such.key") is None
    # cut the file in the middle of the token strings
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(path, "rb").read()[:raw.pos + 40])
    with pytest.raises(EdgertError, match="truncated"):
        GGUFFile(str(cut))
