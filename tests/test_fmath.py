"""ggml's float arithmetic reproduced (kernels/fmath.py): expf against ggml_v_expf compiled from
llama.cpp's own source (the llama-cpp-python sdist), the horizontal sums against NumPy in the
same order."""
import glob
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from numba import njit

from conftest import require
from edgert.kernels.fmath import fma32, ggml_expf, hsum8, reduce_4x8

MAIN = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "rb"), *o = fopen(argv[2], "wb");
    float b[8];
    while (fread(b, 4, 8, f) == 8) { _mm256_storeu_ps(b, ggml_v_expf(_mm256_loadu_ps(b))); fwrite(b, 4, 8, o); }
    fclose(f); fclose(o);
    return 0;
}
"""


def _ggml_v_expf_source() -> str:
    root = os.environ.get("EDGERT_FIXTURES", os.path.expanduser("~/.cache/edgert/fixtures"))
    hits = glob.glob(os.path.join(root, "*", "vendor", "llama.cpp", "ggml", "src", "ggml-cpu", "vec.h"))
    require(hits, f"llama.cpp sources not found under {root} (make test fetches them)")
    text = open(hits[0], encoding="utf-8").read()
    m = re.search(r"inline static __m256 ggml_v_expf\(__m256 x\) \{.*?\n\}\n", text, re.S)
    assert m, "ggml_v_expf (AVX2) not found in vec.h"
    return "#include <immintrin.h>\n" + m.group(0)


def test_expf_equals_ggml_v_expf(tmp_path, rng):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build llama.cpp's ggml_v_expf")
    src = tmp_path / "vexp.c"
    src.write_text(_ggml_v_expf_source() + MAIN)
    exe = tmp_path / "vexp"
    subprocess.run(["gcc", "-O2", "-mavx2", "-mfma", "-o", str(exe), str(src)], check=True)
    x = np.concatenate([rng.uniform(-110, 90, 100000), rng.standard_normal(100000) * 3,
                        [-np.inf, 0.0, -0.0, 88.7, 88.8, -103.9, -87.0, -126.5, 127.0, 200.0, -200.0, -1e30, 1e-30]])
    x = x.astype(np.float32)
    x = np.concatenate([x, np.zeros((-len(x)) % 8, np.float32)])
    x.tofile(tmp_path / "in.bin")
    subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    ref = np.fromfile(tmp_path / "out.bin", np.float32)

    @njit
    def run(a, o):
        for i in range(a.size):
            o[i] = ggml_expf(a[i])
    got = np.empty_like(x)
    run(x, got)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert (got != np.exp(x.astype(np.float64)).astype(np.float32)).any()  # it is not libm's expf


def test_fma_has_one_rounding():
    @njit
    def f(a, b, c):
        return fma32(a, b, c)
    a = np.float32(1.0) + np.float32(2.0 ** -12)  # a * a = 1 + 2^-11 + 2^-24: the 2^-24 survives only fused
    exact = np.float64(a) * np.float64(a) - 1.0
    assert f(a, a, np.float32(-1.0)) == np.float32(exact) != a * a - np.float32(1.0)


def test_horizontal_sums_in_llama_cpp_order(rng):
    f32 = np.float32
    h8, r48 = njit(lambda v: hsum8(v)), njit(lambda v: reduce_4x8(v))
    for _ in range(200):
        a = (rng.standard_normal(8) * 10.0 ** rng.integers(-3, 4, 8)).astype(np.float32)
        x = [f32(a[k + 4] + a[k]) for k in range(4)]
        assert h8(a) == f32(f32(x[0] + x[2]) + f32(x[1] + x[3]))
        b = (rng.standard_normal((4, 8)) * 10.0 ** rng.integers(-3, 4, (4, 8))).astype(np.float32)
        lanes = [f32(f32(b[0, k] + b[2, k]) + f32(b[1, k] + b[3, k])) for k in range(8)]
        t = [f32(lanes[k] + lanes[k + 4]) for k in range(4)]
        assert r48(b) == f32(f32(t[0] + t[1]) + f32(t[2] + t[3]))
