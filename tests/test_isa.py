"""The ISA table (kernels/isa.py): detection, the EDGERT_ISA / EDGERT_MODE overrides and their
errors, and every ISA and mode this CPU runs checked against the naive references of
test_quant.py (each in its own process: the choice is made when the kernels are imported)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgert.errors import EdgertError
from edgert.kernels import isa

ROOT = Path(__file__).resolve().parent.parent


def test_detect_picks_the_best_built_isa_this_cpu_runs():
    best = isa.detect()
    assert best.built and isa.supported(best)
    ahead = isa.ISAS[:isa.ISAS.index(best)]
    assert not any(i.built and isa.supported(i) for i in ahead)


def test_supported_follows_machine_and_features():
    vnni, avx2 = isa.BY_NAME["avx512vnni"], isa.BY_NAME["avx2"]
    zen4 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}
    if isa.supported(isa.BY_NAME["portable"]) and not isa.cpu_features():
        pytest.skip("no LLVM host features")
    assert isa.supported(vnni, "x86_64", zen4) and isa.supported(avx2, "x86_64", zen4)
    assert not isa.supported(vnni, "x86_64", {"avx2", "fma"}) and isa.supported(avx2, "x86_64", {"avx2", "fma"})
    assert not isa.supported(avx2, "aarch64", zen4)
    neon = isa.BY_NAME["neon-dotprod"]
    assert neon.built and isa.supported(neon, "aarch64", {"neon", "dotprod"})
    assert not isa.supported(neon, "aarch64", {"neon"}) and not isa.supported(neon, "x86_64", zen4)
    assert isa.supported(isa.BY_NAME["portable"], "riscv64", set())


OTHER_ARCH = "avx2" if isa.platform.machine() in isa.ARM else "neon-dotprod"


@pytest.mark.parametrize("want,msg", [("sse9", "unknown"), (OTHER_ARCH, "lacks")])
def test_a_bad_isa_is_a_clear_error(want, msg):
    with pytest.raises(EdgertError, match=msg):
        isa.resolve(want)
    with pytest.raises(EdgertError, match="unknown"):
        isa.resolve("auto", "turbo")


def test_cli_names_a_bad_isa_without_a_traceback():
    env = {**os.environ, "EDGERT_ISA": "sse9"}
    r = subprocess.run([sys.executable, "-m", "edgert", "devices", "show", "host"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "instruction set sse9: unknown" in r.stderr and "Traceback" not in r.stderr


def _others():
    """Every (ISA, mode) this CPU runs besides the default one."""
    out = [(i.name, m) for i in isa.ISAS if i.built and isa.supported(i)
           for m in (isa.MODES if i.layout == "rows" else ("exact",))]  # fast: row kernels only
    return [c for c in out if c != (isa.current().name, isa.mode())]


@pytest.mark.parametrize("name,mode", _others(), ids=lambda v: str(v))
def test_every_isa_and_mode_against_the_naive_references(name, mode):
    """test_quant.py's kernel tests (matmul against dequantised NumPy, rows8 = rows bit for bit)
    under another ISA or mode, in a fresh process."""
    env = {**os.environ, "EDGERT_ISA": name, "EDGERT_MODE": mode}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_quant.py"), "-k", "matmul or rows8 or layouts_agree"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_numba_is_given_the_features_llvm_does_not_see(monkeypatch):
    """Under qemu-user LLVM sees a generic CPU: the kernels' features are added to Numba's
    feature string (the host's own kept); nothing is forced when LLVM already has them, or when
    NUMBA_CPU_FEATURES is the user's."""
    from llvmlite import binding as llb
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    have = llb.get_host_cpu_features().flatten()
    fake = isa.ISA("fake", (), ("sse2", "nosuchfeature"), "rows", True, "")
    got = isa.numba_features(fake)
    assert got.endswith(",+nosuchfeature") and got.startswith(have) and "+sse2" not in got[len(have):]
    assert isa.numba_features(isa.BY_NAME["portable"]) is None
    assert isa.numba_features(isa.ISA("all", (), (), "rows", True, "")) is None
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+neon")
    assert isa.numba_features(fake) is None


def test_neon_kernels_compile_to_sdot_for_aarch64():
    """Every NEON routine of kernels/simd.py is valid IR that LLVM's AArch64 back end compiles
    (here, on any host) with its integer stage in sdot and no x86 intrinsic; running them is
    `make arm64-check`'s job (qemu-user)."""
    from llvmlite import binding as llb
    from edgert.kernels import quant as q, simd
    llb.initialize_all_targets()
    llb.initialize_all_asmprinters()
    try:
        target = llb.Target.from_triple("aarch64-unknown-linux-gnu")
    except RuntimeError:
        pytest.skip("this llvmlite has no AArch64 back end")
    tm = target.create_target_machine(cpu="generic", features="+neon,+dotprod", opt=2)
    neon = isa.BY_NAME["neon-dotprod"]
    texts = [simd.ir_text(t, nt, 0, neon) for t in q.ROW_TYPES for nt in (1, 4)]
    texts += [simd.ir_text(t, nt, 1, neon) for t in q.KQUANTS for nt in (1, 4) if not (t == q.Q4_K and nt == 1)]
    texts += [simd.q4k_gemv8_ir(neon), simd.q4k_gemm8_ir(neon)]
    for text in texts:
        assert "llvm.x86" not in text
        mod = llb.parse_assembly(text)
        mod.verify()
        mod.triple = "aarch64-unknown-linux-gnu"
        asm = tm.emit_assembly(mod)
        assert "sdot\tv" in asm or "sdot v" in asm, text[:200]
