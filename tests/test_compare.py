"""edgert compare: llama.cpp's intermediate tensors against edgert's, op by op."""
import numpy as np
import pytest

from test_cli import run_cli
from edgert.converters.tiny import write_tiny_gguf


def _model(tmp_path, mtype):
    types = {k: mtype for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")}
    return write_tiny_gguf(str(tmp_path / f"t{mtype}.gguf"), "llama", n_layer=2, types={**types, "token_embd": 8})


@pytest.mark.llama
def test_every_tensor_identical_where_the_kernels_are_llama_cpps(llama_cpp, tmp_path):
    from edgert.compare import compare
    from edgert.kernels.isa import row_kernels as available
    if not available():
        pytest.skip("needs the AVX2 row-layout kernels")
    rows = compare(_model(tmp_path, 3), np.arange(3, 19), n_ctx=64)
    names = {r.name for r in rows}
    assert {"attn_norm-0", "Qcur-0", "Kcur-0", "Vcur-0", "kqv_out-0", "attn_out-0", "ffn_inp-0",
            "ffn_norm-0", "ffn_swiglu-0", "ffn_out-0", "l_out-0", "attn_norm-1"} <= names
    assert all(r.exact == 1.0 and r.max_abs == 0.0 and r.first_token == -1 for r in rows)


@pytest.mark.llama
def test_it_finds_the_first_difference(llama_cpp, tmp_path):
    """Q4_0: llama.cpp repacks it (q4_0_8x8) and sums in another order, so the Q projection is
    the first tensor to differ (attn_norm before it is exact)."""
    from edgert.compare import compare
    rows = compare(_model(tmp_path, 2), np.arange(3, 19), n_ctx=64)
    first_bad = next(r for r in rows if r.exact < 1.0)
    assert rows[0].name == "attn_norm-0" and rows[0].exact == 1.0
    assert first_bad.name in ("Qcur-0", "Kcur-0", "Vcur-0") and first_bad.max_abs > 0


@pytest.mark.llama
def test_cli(llama_cpp, tmp_path):
    r = run_cli("compare", "-m", _model(tmp_path, 3), "-n", "8", "--all")
    assert r.returncode == 0, r.stderr
    assert "| l_out-0 | 100.0000% | 0.000e+00 | - |" in r.stdout
    assert "tensors bit-identical" in r.stdout and "llama_" not in r.stderr  # llama.cpp's log silenced
