"""convert --to tflite (litert-torch, in its own environment) and --backend tflite (ai-edge-litert)."""
import os

import numpy as np
import pytest

from conftest import require

pytest.importorskip("ai_edge_litert")

from edgert.errors import EdgertError  # noqa: E402


def _converter_available():
    from edgert.converters.tflite_export import converter_python
    try:
        converter_python()
        return True
    except EdgertError:
        return False


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    require(_converter_available(), "litert-torch environment missing (make litert)")
    from edgert.converters.tflite_export import export
    d = tmp_path_factory.mktemp("tflite")
    out = {}
    for arch in ("qwen2", "gemma3"):
        out[arch] = str(d / f"{arch}.tflite")
        export(tiny_models[arch], out[arch], n_ctx=48, prefill_batch=8)
    return out


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_tflite_backend_agrees_with_numba(arch, tiny_models, exports):
    """A prompt of 11 tokens (a whole prefill batch, a padded one), then decoding past gemma3's
    sliding window (8): int8 re-quantised weights against the GGUF's own."""
    from edgert.model import Model
    a = Model(tiny_models[arch], n_ctx=48)
    b = Model(exports[arch], backend="tflite")
    assert b.n_ctx == 48 and b.layers[0].wq is None
    toks = np.random.default_rng(3).integers(0, a.cfg.n_vocab, 24)
    la = np.concatenate([a.forward(toks[:11], all_logits=True)] + [a.forward([t]) for t in toks[11:]])
    lb = np.concatenate([b.forward(toks[:11], all_logits=True)] + [b.forward([t]) for t in toks[11:]])
    rel = np.abs(la - lb).max() / np.abs(la).max()
    assert rel < 0.05, rel
    assert (la.argmax(-1) == lb.argmax(-1)).mean() >= 0.9


def test_tflite_context_is_the_exports(exports):
    from edgert.model import Model
    with pytest.raises(EdgertError, match="exported for a context of 48 positions"):
        Model(exports["qwen2"], n_ctx=64, backend="tflite")
    with pytest.raises(EdgertError, match="not one for --backend onnx"):
        Model(exports["qwen2"], backend="onnx")


def test_failed_conversion_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    from edgert.converters.tflite_export import export
    monkeypatch.setenv("EDGERT_LITERT_PYTHON", "/bin/false")
    monkeypatch.setattr("edgert.converters.tflite_export.converter_python", lambda: "/bin/false")
    with pytest.raises(EdgertError, match="the TFLite conversion failed"):
        export(tiny_models["llama"], str(tmp_path / "x.tflite"))
    assert os.listdir(tmp_path) == []


def test_mixture_of_experts_is_refused_in_one_line(tiny_models, tmp_path):
    require(_converter_available(), "litert-torch environment missing (make litert)")
    from edgert.converters.tflite_export import export
    with pytest.raises(EdgertError, match="dense models only"):
        export(tiny_models["qwen2moe"], str(tmp_path / "m.tflite"))
    assert os.listdir(tmp_path) == []


def test_tflite_embedding_is_the_ggufs_rows_exactly(tiny_models, exports):
    """The embedding graph gathers the GGUF's own codes and scales (converters/nbits.py) and
    dequantises after the gather: the rows equal edgert's dequantisation bit for bit."""
    from ai_edge_litert.interpreter import Interpreter
    from edgert.gguf_file import GGUFFile
    from edgert.kernels.quant import dequantize
    g = GGUFFile(tiny_models["qwen2"])
    w = dequantize(g.load("token_embd.weight"))
    g.close()
    it = Interpreter(model_path=os.path.join(exports["qwen2"], "embed.tflite"))
    ids = (np.arange(8, dtype=np.int32) * 37) % w.shape[0]
    x = it.get_signature_runner("prefill")(ids=ids)["output_0"]
    np.testing.assert_array_equal(x.view(np.uint32), w[ids].view(np.uint32))
