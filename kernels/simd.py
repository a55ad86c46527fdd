"""Integer dot products of GGUF weight rows (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants) with 8-bit
activations, written as LLVM IR for x86 (AVX2; AVX-512 VNNI) and Arm (NEON with sdot), and
called from Numba kernels.

Why IR: Numba does not emit vpmaddubsw / vpmaddwd / vpdpbusd from Python loops (an int8 row dot
product stays scalar). Each routine is llama.cpp's AVX2 `ggml_vec_dot_*` (or its repacked
gemv / gemm, where llama.cpp takes that path) transcribed, in two stages (kernels/isa.py):

- the integer stage: a block's 32 weights as bytes, multiplied with the activation's bytes and
  summed in groups of four into eight int32 lanes (AVX2: vpmaddubsw then vpmaddwd; VNNI: one
  vpdpbusd; NEON: sdot on each 16-byte half, the signed weights as they are, without AVX2's
  sign trick). The sums are exact every way (no pair can saturate 16 bits: |w| <= 128,
  |x| <= 127), so every ISA gives the same integers and, the float stage being the same IR,
  the same floats: the NEON kernels give the x86 `exact` kernels' results bit for bit;
- the float stage: the lanes converted, scaled by the block scales, accumulated and summed in
  llama.cpp's order (`exact`), so a row's result equals llama.cpp's bit for bit; `fast` mode
  takes a cheaper order where one exists (K-quants: one accumulation per super-block for every
  batch size).

One call takes one weight row against NT activation rows (NT = 1 for decode, 4 for prefill: the
weights of a block are unpacked once for four tokens). Every routine has the signature

    void fn(qs, qh, sc, d, m, x, xd, xs, nb, xstride, xdstride, xsstride, out, ostride)

(addresses and sizes as i64): out[t * ostride] = row . activation row t, for t < NT, where the
activation row t is x + t * xstride (int8 quants), xd + t * xdstride (float32 scales, one per
32 or 256) and xs + t * xsstride (float32: Q4_1 d * sum(q) per 32; K-quants the integer sums
per 16 or 32).

Row layout ("rows"; matmul.py's tiles are the other one), per weight row r with nb blocks:
    qs : uint8   [R, nb * 16]  nibbles as in GGUF (Q4_0, Q4_1, Q5_0); Q8_0: [R, nb * 32] int8
                 bits; Q4_K: [R, nb * 128]; Q6_K: low bits [R, nb * 128]
    qh : uint8   [R, nb * 4]   Q5_0 high bits as in GGUF; Q6_K [R, nb * 64]; else [R, 0]
    sc : uint8   [R, nb * 16]  Q4_K 8 scales then 8 mins (unpacked); Q6_K int8 scales; else [R, 0]
    d  : float32 [R, nb]       block scales
    m  : float32 [R, nb]       Q4_1 minimums, Q4_K dmin; else [R, 0]

The routine is chosen when this module is imported, from kernels/isa.py (ISA and mode); the
Numba cache directory is named by both (kernels/__init__.py), so a cached kernel is never
reused under another choice.
"""
from __future__ import annotations

import functools

import numba as nb
from llvmlite import binding as llb
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from edgert.kernels import isa as _isa
from edgert.kernels.quant import G8, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, QTYPE

LLVM_MIN = (19,)  # splat constants and opaque pointers in the IR below
if tuple(llb.llvm_version_info) < LLVM_MIN and _isa.current().layout == "rows":
    from edgert.errors import EdgertError
    raise EdgertError(f"the row-layout kernels need LLVM {LLVM_MIN[0]} or newer (numba >= 0.68); this llvmlite has "
                      f"LLVM {'.'.join(map(str, llb.llvm_version_info))}: upgrade numba, or EDGERT_ISA=portable")
ISA = _isa.current() if _isa.current().layout == "rows" else _isa.BY_NAME["avx2"]  # IR for rows
FAST = _isa.mode() == "fast"

GENERIC_DECLS = """
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare <4 x float> @llvm.fma.v4f32(<4 x float>, <4 x float>, <4 x float>)
declare float @llvm.fma.f32(float, float, float)
declare i32 @llvm.vector.reduce.add.v8i32(<8 x i32>)
"""
X86_DECLS = """
declare <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8>, <32 x i8>)
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
"""
NEON_DECLS = """
declare <4 x i32> @llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32>, <16 x i8>, <16 x i8>)
"""


def neon(isa) -> bool:
    return isa.name == "neon-dotprod"


def decls(isa) -> str:
    """The intrinsics a routine for isa may call."""
    if neon(isa):
        return GENERIC_DECLS + NEON_DECLS
    return GENERIC_DECLS + X86_DECLS + (vnni_decl() if isa.name == "avx512vnni" else "")


SEQ32 = "<" + ", ".join(f"i32 {i}" for i in range(32)) + ">"
HEADER = """
define void @{name}(i64 %qs_a, i64 %qh_a, i64 %sc_a, i64 %d_a, i64 %m_a, i64 %x_a, i64 %xd_a, i64 %xs_a,
    i64 %nb, i64 %xstride, i64 %xdstride, i64 %xsstride, i64 %out_a, i64 %ostride) alwaysinline {{
entry:
  %qs = inttoptr i64 %qs_a to ptr
  %qh = inttoptr i64 %qh_a to ptr
  %sc = inttoptr i64 %sc_a to ptr
  %d = inttoptr i64 %d_a to ptr
  %m = inttoptr i64 %m_a to ptr
  %x = inttoptr i64 %x_a to ptr
  %xd = inttoptr i64 %xd_a to ptr
  %xs = inttoptr i64 %xs_a to ptr
  %out = inttoptr i64 %out_a to ptr
"""


# ---------------------------------------------------------------------------------------------
# The integer stage
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _vnni_bytes() -> bool:
    """Whether this LLVM declares vpdpbusd on byte vectors (newer LLVM) or on i32 ones (older):
    the verifier rejects the wrong one."""
    try:
        llb.parse_assembly("declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, <32 x i8>, <32 x i8>)\n").verify()
        return True
    except RuntimeError:
        return False


def vnni_decl() -> str:
    t = "<32 x i8>" if _vnni_bytes() else "<8 x i32>"
    return f"declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, {t}, {t})\n"


def idot(isa, out: str, u: str, s: str, scale16: str = "splat (i16 1)") -> str:
    """IR defining %out (<8 x i32>): lane i = sum over j < 4 of u[4i + j] * s[4i + j], u unsigned
    and s signed bytes (<32 x i8> values %u, %s); with scale16 (a <16 x i16> holding one scale
    per pair of 16-bit lanes) each lane times its scale. Exact in every ISA (NEON: u < 128, which
    every caller's unsigned quants are, so sdot's signed bytes read them unchanged)."""
    if neon(isa):
        return _sdot(out, u, s, scale16)
    if isa.name == "avx512vnni" and scale16 == "splat (i16 1)":
        if _vnni_bytes():
            return f"  %{out} = call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> zeroinitializer, <32 x i8> %{u}, <32 x i8> %{s})\n"
        return (f"  %{out}_u = bitcast <32 x i8> %{u} to <8 x i32>\n"
                f"  %{out}_s = bitcast <32 x i8> %{s} to <8 x i32>\n"
                f"  %{out} = call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> zeroinitializer, <8 x i32> %{out}_u, <8 x i32> %{out}_s)\n")
    return (f"  %{out}_p = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %{u}, <32 x i8> %{s})\n"
            f"  %{out} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %{out}_p, <16 x i16> {scale16})\n")


_HALF = ("<16 x i32> <" + ", ".join(f"i32 {i}" for i in range(16)) + ">",
         "<16 x i32> <" + ", ".join(f"i32 {i}" for i in range(16, 32)) + ">")
_EVEN8 = "<8 x i32> <" + ", ".join(f"i32 {2 * i}" for i in range(8)) + ">"


def _sdot(out: str, a: str, b: str, scale16: str = "splat (i16 1)") -> str:
    """NEON: %out (<8 x i32>) = lane i the sum of a[4i + j] * b[4i + j] (signed bytes), two sdot
    on the halves of the <32 x i8> values; with scale16 each lane times the scale of its pair of
    16-bit lanes (x86's pmaddwd on the pair sums gives the same integers)."""
    r = ""
    for h in range(2):
        r += (f"  %{out}_a{h} = shufflevector <32 x i8> %{a}, <32 x i8> poison, {_HALF[h]}\n"
              f"  %{out}_b{h} = shufflevector <32 x i8> %{b}, <32 x i8> poison, {_HALF[h]}\n"
              f"  %{out}_d{h} = call <4 x i32> @llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32> zeroinitializer, "
              f"<16 x i8> %{out}_a{h}, <16 x i8> %{out}_b{h})\n")
    cat = "<8 x i32> <" + ", ".join(f"i32 {i}" for i in range(8)) + ">"
    if scale16 == "splat (i16 1)":
        return r + f"  %{out} = shufflevector <4 x i32> %{out}_d0, <4 x i32> %{out}_d1, {cat}\n"
    return r + (f"  %{out}_c = shufflevector <4 x i32> %{out}_d0, <4 x i32> %{out}_d1, {cat}\n"
                + _scale_lanes(f"{out}_c", scale16, out))


def _scale_lanes(v: str, scale16: str, out: str) -> str:
    """IR: %out = <8 x i32> %v, lane i times lane 2i of the <16 x i16> scale16 (a value or constant)."""
    return (f"  %{out}_s16 = shufflevector <16 x i16> {scale16}, <16 x i16> poison, {_EVEN8}\n"
            f"  %{out}_s32 = sext <8 x i16> %{out}_s16 to <8 x i32>\n"
            f"  %{out} = mul <8 x i32> %{v}, %{out}_s32\n")


def pmaddwd(isa, out: str, a: str, b: str) -> str:
    """IR: %out (<8 x i32>) = lane i: a[2i] * b[2i] + a[2i + 1] * b[2i + 1] of <16 x i16> values
    (x86's pmaddwd; elsewhere widened products and a pairwise sum: the same integers)."""
    if not neon(isa):
        return f"  %{out} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %{a}, <16 x i16> %{b})\n"
    return (f"  %{out}_a = sext <16 x i16> %{a} to <16 x i32>\n"
            f"  %{out}_b = sext <16 x i16> %{b} to <16 x i32>\n"
            f"  %{out}_p = mul <16 x i32> %{out}_a, %{out}_b\n"
            + _pairsum(f"{out}_p", f"{out}_p", f"{out}_q", 16)
            + f"  %{out} = shufflevector <16 x i32> %{out}_q, <16 x i32> poison, "
            "<8 x i32> <i32 0, i32 1, i32 2, i32 3, i32 4, i32 5, i32 6, i32 7>\n")


def hsum8(v: str, out: str) -> str:
    """IR: float %out = llama.cpp's hsum_float_8 of <8 x float> %v (high half + low half, then
    (0 + 2) + (1 + 3))."""
    return f"""  %{out}a = shufflevector <8 x float> %{v}, <8 x float> poison, <4 x i32> <i32 4, i32 5, i32 6, i32 7>
  %{out}b = shufflevector <8 x float> %{v}, <8 x float> poison, <4 x i32> <i32 0, i32 1, i32 2, i32 3>
  %{out}c = fadd <4 x float> %{out}a, %{out}b
  %{out}d = shufflevector <4 x float> %{out}c, <4 x float> poison, <4 x i32> <i32 2, i32 3, i32 2, i32 3>
  %{out}e = fadd <4 x float> %{out}c, %{out}d
  %{out}f = extractelement <4 x float> %{out}e, i64 0
  %{out}g = extractelement <4 x float> %{out}e, i64 1
  %{out} = fadd float %{out}f, %{out}g
"""


def splat(ty: str, n: int, v: str, out: str) -> str:
    """IR: %out = <n x ty> with every lane the scalar %v."""
    return (f"  %{out}_i = insertelement <{n} x {ty}> poison, {ty} %{v}, i64 0\n"
            f"  %{out} = shufflevector <{n} x {ty}> %{out}_i, <{n} x {ty}> poison, <{n} x i32> zeroinitializer\n")


def token_ptrs(t: int, b_x: str, b_d: str, b_s: str) -> str:
    """IR: %xb{t}, %xdp{t}, %xsp{t}: activation row t's quants at byte b_x, its scale at float
    b_d, its sums at float b_s (names of i64 values)."""
    return f"""  %xo{t} = mul i64 %xstride, {t}
  %xo{t}b = add i64 %xo{t}, %{b_x}
  %xb{t} = getelementptr inbounds i8, ptr %x, i64 %xo{t}b
  %xdo{t} = mul i64 %xdstride, {t}
  %xdo{t}b = add i64 %xdo{t}, %{b_d}
  %xdp{t} = getelementptr inbounds float, ptr %xd, i64 %xdo{t}b
  %dx{t} = load float, ptr %xdp{t}, align 4
  %xso{t} = mul i64 %xsstride, {t}
  %xso{t}b = add i64 %xso{t}, %{b_s}
  %xsp{t} = getelementptr inbounds float, ptr %xs, i64 %xso{t}b
"""


def store(t: int, v: str) -> str:
    return f"""  %oo{t} = mul i64 %ostride, {t}
  %op{t} = getelementptr inbounds float, ptr %out, i64 %oo{t}
  store float %{v}, ptr %op{t}, align 4
"""


def _loop(phis: list[str], body: str, exit_: str) -> str:
    return ("  br label %loop\nloop:\n  %b = phi i64 [0, %entry], [%b1, %loop]\n" + "\n".join(phis) + "\n"
            + body + "  %b1 = add i64 %b, 1\n  %more = icmp ult i64 %b1, %nb\n"
            "  br i1 %more, label %loop, label %exit\nexit:\n" + exit_ + "  ret void\n}\n")


# ---------------------------------------------------------------------------------------------
# Q4_0, Q4_1, Q5_0, Q8_0 (blocks of 32; llama.cpp's ggml_vec_dot_q*_q8_0 / q4_1_q8_1, AVX2)
# ---------------------------------------------------------------------------------------------

_UNPACK = {
    # -> %wx <32 x i8>: the block's 32 weights, element j at byte j (Q4_1: unsigned nibbles)
    Q4_0: """  %qp = getelementptr inbounds i8, ptr %qs, i64 %b16
  %q16 = load <16 x i8>, ptr %qp, align 1
  %lo = and <16 x i8> %q16, splat (i8 15)
  %hi = lshr <16 x i8> %q16, splat (i8 4)
  %cat = shufflevector <16 x i8> %lo, <16 x i8> %hi, <32 x i32> {seq32}
  %wx = sub <32 x i8> %cat, splat (i8 8)
""",
    Q4_1: """  %qp = getelementptr inbounds i8, ptr %qs, i64 %b16
  %q16 = load <16 x i8>, ptr %qp, align 1
  %lo = and <16 x i8> %q16, splat (i8 15)
  %hi = lshr <16 x i8> %q16, splat (i8 4)
  %wx = shufflevector <16 x i8> %lo, <16 x i8> %hi, <32 x i32> {seq32}
""",
    Q5_0: """  %qp = getelementptr inbounds i8, ptr %qs, i64 %b16
  %q16 = load <16 x i8>, ptr %qp, align 1
  %lo = and <16 x i8> %q16, splat (i8 15)
  %hi = lshr <16 x i8> %q16, splat (i8 4)
  %cat = shufflevector <16 x i8> %lo, <16 x i8> %hi, <32 x i32> {seq32}
  %hp = getelementptr inbounds i8, ptr %qh, i64 %b4
  %h = load i32, ptr %hp, align 1
  %hm = bitcast i32 %h to <32 x i1>
  %neg = or <32 x i8> %cat, splat (i8 -16)
  %wx = select <32 x i1> %hm, <32 x i8> %cat, <32 x i8> %neg
""",
    Q5_1: """  %qp = getelementptr inbounds i8, ptr %qs, i64 %b16
  %q16 = load <16 x i8>, ptr %qp, align 1
  %lo = and <16 x i8> %q16, splat (i8 15)
  %hi = lshr <16 x i8> %q16, splat (i8 4)
  %cat = shufflevector <16 x i8> %lo, <16 x i8> %hi, <32 x i32> {seq32}
  %hp = getelementptr inbounds i8, ptr %qh, i64 %b4
  %h = load i32, ptr %hp, align 1
  %hm = bitcast i32 %h to <32 x i1>
  %pos = or <32 x i8> %cat, splat (i8 16)
  %wx = select <32 x i1> %hm, <32 x i8> %pos, <32 x i8> %cat
""",
    Q8_0: """  %qp = getelementptr inbounds i8, ptr %qs, i64 %b32
  %wx = load <32 x i8>, ptr %qp, align 1
""",
}


def legacy_ir(qtype: int, nt: int, isa) -> str:
    """Per block b and token t: lanes = idot(|w|, sign(x, w)) (Q4_1, Q5_1: idot(w, x)), then
    acc_t = fma(d_w * dx_t, float(lanes), acc_t) on eight lanes; Q4_1 and Q5_1 also
    sm_t = fma(m_w, s_t, sm_t). At the end out_t = hsum_float_8(acc_t) (+ sm_t), as llama.cpp."""
    signed = qtype not in (Q4_1, Q5_1)
    phis, body, exit_ = [], [], []
    body.append("  %b4 = shl i64 %b, 2\n  %b16 = shl i64 %b, 4\n  %b32 = shl i64 %b, 5\n")
    body.append(_UNPACK[qtype].format(seq32=SEQ32))
    psign = signed and not neon(isa)  # NEON: sdot multiplies signed bytes as they are
    body.append("  %ax = call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> %wx, <32 x i8> %wx)\n" if psign else
                "  %ax = or <32 x i8> %wx, zeroinitializer\n")
    body.append("  %dwp = getelementptr inbounds float, ptr %d, i64 %b\n  %dw = load float, ptr %dwp, align 4\n")
    if not signed:
        body.append("  %mwp = getelementptr inbounds float, ptr %m, i64 %b\n  %mw = load float, ptr %mwp, align 4\n")
    for t in range(nt):
        phis.append(f"  %acc{t} = phi <8 x float> [zeroinitializer, %entry], [%acc{t}n, %loop]")
        body.append(token_ptrs(t, "b32", "b", "b"))
        body.append(f"  %xv{t} = load <32 x i8>, ptr %xb{t}, align 1\n")
        body.append(f"  %sy{t} = call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> %xv{t}, <32 x i8> %wx)\n" if psign else
                    f"  %sy{t} = or <32 x i8> %xv{t}, zeroinitializer\n")
        body.append(idot(isa, f"p{t}", "ax", f"sy{t}"))
        body.append(f"  %qf{t} = sitofp <8 x i32> %p{t} to <8 x float>\n  %dd{t} = fmul float %dw, %dx{t}\n")
        body.append(splat("float", 8, f"dd{t}", f"ddv{t}"))
        body.append(f"  %acc{t}n = call <8 x float> @llvm.fma.v8f32(<8 x float> %ddv{t}, <8 x float> %qf{t}, <8 x float> %acc{t})\n")
        exit_.append(hsum8(f"acc{t}n", f"h{t}"))
        if signed:
            exit_.append(f"  %r{t} = fadd float %h{t}, -0.0\n")
        else:  # llama.cpp's `summs`: the minimums' terms summed apart, added after the hsum
            phis.append(f"  %sm{t} = phi float [0.0, %entry], [%sm{t}n, %loop]")
            body.append(f"  %xsv{t} = load float, ptr %xsp{t}, align 4\n"
                        f"  %sm{t}n = call float @llvm.fma.f32(float %mw, float %xsv{t}, float %sm{t})\n")
            exit_.append(f"  %r{t} = fadd float %h{t}, %sm{t}n\n")
        exit_.append(store(t, f"r{t}"))
    return (decls(isa) + HEADER.format(name=f"edgert_q{qtype}_nt{nt}_{isa.name}")
            + _loop(phis, "".join(body), "".join(exit_)))


# ---------------------------------------------------------------------------------------------
# K-quants (super-blocks of 256; the activation is Q8_K: int8, a float scale per 256, and its
# integer sums per 32 (Q4_K) or 16 (Q6_K) held as float32)
# ---------------------------------------------------------------------------------------------

def _pairsum(a: str, b: str, out: str, n: int = 8) -> str:
    """IR: %out = <n x i32> whose first half holds the sums of adjacent lanes of %a and second
    half those of %b (integer adds: exact in any order)."""
    ev = "<" + ", ".join(f"i32 {2 * i}" for i in range(n)) + ">"
    od = "<" + ", ".join(f"i32 {2 * i + 1}" for i in range(n)) + ">"
    return (f"  %{out}e = shufflevector <{n} x i32> %{a}, <{n} x i32> %{b}, <{n} x i32> {ev}\n"
            f"  %{out}o = shufflevector <{n} x i32> %{a}, <{n} x i32> %{b}, <{n} x i32> {od}\n"
            f"  %{out} = add <{n} x i32> %{out}e, %{out}o\n")


def _gemm4() -> str:
    """IR of the gemm float stage for 4 tokens: per 64 elements j, <4 x i32> over the tokens of
    I_j (the lane totals of %vI{t}{j}) and M_j (%mv{t} lanes 2j + 2j + 1), then acc = fma(I_j,
    ds, acc) and accm = fma(M_j, dm, accm) for j = 0..3 in order, lane t being token t."""
    s = ""
    for t in range(4):  # per token: [j0: 4 partials, j1: 4], [j2, j3] -> [j0 j0 j1 j1 j2 j2 j3 j3]
        s += _pairsum(f"vI{t}0", f"vI{t}1", f"A{t}a") + _pairsum(f"vI{t}2", f"vI{t}3", f"A{t}b")
        s += _pairsum(f"A{t}a", f"A{t}b", f"B{t}")
    s += _pairsum("B0", "B1", "C01") + _pairsum("B2", "B3", "C23")  # [t0: j0..j3, t1: j0..j3]
    s += _pairsum("mv0", "mv1", "N01") + _pairsum("mv2", "mv3", "N23")
    for t in range(4):
        s += f"  %dxi{t} = insertelement <4 x float> {'poison' if t == 0 else f'%dxi{t - 1}'}, float %dx{t}, i64 {t}\n"
    s += splat("float", 4, "dw", "dwv") + splat("float", 4, "dmin", "dmv")
    s += "  %ds4 = fmul <4 x float> %dwv, %dxi3\n  %dm4 = fmul <4 x float> %dmv, %dxi3\n"
    prev_a, prev_m = "acc", "accm"
    for j in range(4):
        mask = f"<4 x i32> <i32 {j}, i32 {4 + j}, i32 {8 + j}, i32 {12 + j}>"
        s += (f"  %Ij{j} = shufflevector <8 x i32> %C01, <8 x i32> %C23, {mask}\n"
              f"  %Mj{j} = shufflevector <8 x i32> %N01, <8 x i32> %N23, {mask}\n"
              f"  %Ijf{j} = sitofp <4 x i32> %Ij{j} to <4 x float>\n"
              f"  %Mjf{j} = sitofp <4 x i32> %Mj{j} to <4 x float>\n"
              f"  %ga{j} = call <4 x float> @llvm.fma.v4f32(<4 x float> %Ijf{j}, <4 x float> %ds4, <4 x float> %{prev_a})\n"
              f"  %gm{j} = call <4 x float> @llvm.fma.v4f32(<4 x float> %Mjf{j}, <4 x float> %dm4, <4 x float> %{prev_m})\n")
        prev_a, prev_m = f"ga{j}", f"gm{j}"
    return s + "  %accn = fadd <4 x float> %ga3, splat (float -0.0)\n  %accmn = fadd <4 x float> %gm3, splat (float -0.0)\n"


def q4k_ir(nt: int, gemm: bool, isa) -> str:
    """llama.cpp's repacked Q4_K kernels (ggml_gemv / ggml_gemm_q4_K_8x8_q8_K, AVX2), per row
    and token. Per 64 elements j the exact integers I_j = sc_lo * (q_lo . x_lo) + sc_hi *
    (q_hi . x_hi) and M_j = min_lo * sum(x_lo) + min_hi * sum(x_hi); gemm (its path for whole
    groups of 4 tokens): acc = fma(I_j, d * dx, acc) and accm = fma(M_j, dmin * dx, accm) for
    each j; gemv: the same once per super-block on the summed integers; out = acc - accm."""
    phis, body, exit_ = [], [], []
    body.append(f"""  %qo = mul i64 %b, 128
  %qb = getelementptr inbounds i8, ptr %qs, i64 %qo
  %b8 = shl i64 %b, 3
  %so = shl i64 %b, 4
  %b256 = shl i64 %b, 8
  %scp = getelementptr inbounds i8, ptr %sc, i64 %so
  %sc8 = load <16 x i8>, ptr %scp, align 1
  %sc16 = zext <16 x i8> %sc8 to <16 x i16>
  %mn8 = shufflevector <16 x i8> %sc8, <16 x i8> poison, <8 x i32> <i32 8, i32 9, i32 10, i32 11, i32 12, i32 13, i32 14, i32 15>
  %mn = zext <8 x i8> %mn8 to <8 x i32>
  %dwp = getelementptr inbounds float, ptr %d, i64 %b
  %dw = load float, ptr %dwp, align 4
  %dmp = getelementptr inbounds float, ptr %m, i64 %b
  %dmin = load float, ptr %dmp, align 4
""")
    for j in range(4):
        body.append(f"""  %qp{j} = getelementptr inbounds i8, ptr %qb, i64 {32 * j}
  %q{j} = load <32 x i8>, ptr %qp{j}, align 1
  %lo{j} = and <32 x i8> %q{j}, splat (i8 15)
  %hi{j} = lshr <32 x i8> %q{j}, splat (i8 4)
  %sl{j} = shufflevector <16 x i16> %sc16, <16 x i16> poison, {_bcast16(2 * j)}
  %sh{j} = shufflevector <16 x i16> %sc16, <16 x i16> poison, {_bcast16(2 * j + 1)}
""")
    for t in range(nt):
        body.append(token_ptrs(t, "b256", "b", "b8"))
        for j in range(4):
            body.append(f"""  %xlp{t}{j} = getelementptr inbounds i8, ptr %xb{t}, i64 {64 * j}
  %xl{t}{j} = load <32 x i8>, ptr %xlp{t}{j}, align 1
  %xhp{t}{j} = getelementptr inbounds i8, ptr %xb{t}, i64 {64 * j + 32}
  %xh{t}{j} = load <32 x i8>, ptr %xhp{t}{j}, align 1
""")
            body.append(idot(isa, f"wl{t}{j}", f"lo{j}", f"xl{t}{j}", f"%sl{j}"))
            body.append(idot(isa, f"wh{t}{j}", f"hi{j}", f"xh{t}{j}", f"%sh{j}"))
            body.append(f"  %vI{t}{j} = add <8 x i32> %wl{t}{j}, %wh{t}{j}\n")
        body.append(f"""  %bsf{t} = load <8 x float>, ptr %xsp{t}, align 4
  %bs{t} = fptosi <8 x float> %bsf{t} to <8 x i32>
  %mv{t} = mul <8 x i32> %mn, %bs{t}
""")
        if not gemm:
            phis.append(f"  %acc{t} = phi float [0.0, %entry], [%acc{t}n, %loop]\n"
                        f"  %accm{t} = phi float [0.0, %entry], [%accm{t}n, %loop]")
            body.append(f"""  %ds{t} = fmul float %dw, %dx{t}
  %dm{t} = fmul float %dmin, %dx{t}
  %vIa{t} = add <8 x i32> %vI{t}0, %vI{t}1
  %vIb{t} = add <8 x i32> %vI{t}2, %vI{t}3
  %vIt{t} = add <8 x i32> %vIa{t}, %vIb{t}
  %It{t} = call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> %vIt{t})
  %Mt{t} = call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> %mv{t})
  %Itf{t} = sitofp i32 %It{t} to float
  %Mtf{t} = sitofp i32 %Mt{t} to float
  %acc{t}n = call float @llvm.fma.f32(float %Itf{t}, float %ds{t}, float %acc{t})
  %accm{t}n = call float @llvm.fma.f32(float %Mtf{t}, float %dm{t}, float %accm{t})
""")
            exit_.append(f"  %r{t} = fsub float %acc{t}n, %accm{t}n\n" + store(t, f"r{t}"))
    if gemm:  # the 4 tokens' accumulators as lanes of one vector: every lane is the scalar chain
        phis.append("  %acc = phi <4 x float> [zeroinitializer, %entry], [%accn, %loop]\n"
                    "  %accm = phi <4 x float> [zeroinitializer, %entry], [%accmn, %loop]")
        body.append(_gemm4())
        exit_.append("  %rv = fsub <4 x float> %accn, %accmn\n")
        for t in range(nt):
            exit_.append(f"  %r{t} = extractelement <4 x float> %rv, i64 {t}\n" + store(t, f"r{t}"))
    return (decls(isa) + HEADER.format(name=f"edgert_q4k_nt{nt}_{'gemm' if gemm else 'gemv'}_{isa.name}")
            + _loop(phis, "".join(body), "".join(exit_)))


def _bcast16(k: int) -> str:
    """A <16 x i32> shuffle mask taking lane k into every lane."""
    return "<16 x i32> <" + ", ".join([f"i32 {k}"] * 16) + ">"


def _rows8_nibbles(r: int, j: int) -> str:
    """IR for row r, 64 elements j of a rows8 super-block (after _rows8_superblock): %lo{r}{j} /
    %hi{r}{j} its low / high nibbles, %sl{r}{j} / %sh{r}{j} their scales as <16 x i16>."""
    return f"""  %q{r}{j}p = getelementptr inbounds i8, ptr %qb, i64 {128 * r + 32 * j}
  %q{r}{j} = load <32 x i8>, ptr %q{r}{j}p, align 1
  %lo{r}{j} = and <32 x i8> %q{r}{j}, splat (i8 15)
  %hi{r}{j} = lshr <32 x i8> %q{r}{j}, splat (i8 4)
  %sl{r}{j} = shufflevector <16 x i16> %sc16{r}, <16 x i16> poison, {_bcast16(2 * j)}
  %sh{r}{j} = shufflevector <16 x i16> %sc16{r}, <16 x i16> poison, {_bcast16(2 * j + 1)}
"""


def _rows8_superblock() -> str:
    """IR for super-block b of a rows8 group: %qb (its 8 rows' quants, 128 bytes each), %dw8 /
    %dmin8 (the rows' scales), and per row r %sc16{r} (its 8 scales, 8 mins as i16) and %mn{r}
    (the mins as <8 x i32>)."""
    return """  %b8 = shl i64 %b, 3
  %b256 = shl i64 %b, 8
  %qo = shl i64 %b, 10
  %qb = getelementptr inbounds i8, ptr %qs, i64 %qo
  %so = shl i64 %b, 7
  %scb = getelementptr inbounds i8, ptr %sc, i64 %so
  %dwp = getelementptr inbounds float, ptr %d, i64 %b8
  %dw8 = load <8 x float>, ptr %dwp, align 4
  %dmp = getelementptr inbounds float, ptr %m, i64 %b8
  %dmin8 = load <8 x float>, ptr %dmp, align 4
""" + "".join(f"""  %scp{r} = getelementptr inbounds i8, ptr %scb, i64 {16 * r}
  %sc8{r} = load <16 x i8>, ptr %scp{r}, align 1
  %sc16{r} = zext <16 x i8> %sc8{r} to <16 x i16>
  %mn8{r} = shufflevector <16 x i8> %sc8{r}, <16 x i8> poison, <8 x i32> <i32 8, i32 9, i32 10, i32 11, i32 12, i32 13, i32 14, i32 15>
  %mn{r} = zext <8 x i8> %mn8{r} to <8 x i32>
""" for r in range(G8))


def q4k_gemv8_ir(isa) -> str:
    """q4k_ir's gemv for one token and one group of 8 rows of the rows8 layout (decode): each
    step reads the group's super-block b, 8 rows one after another (one stream, which the
    hardware prefetchers follow), loads the activation once for the 8, and takes the rows' 16
    integer totals (I and M of each) out of one tree of pairwise sums instead of 16 horizontal
    reductions. Row r's float chain is the gemv one, in lane r of 8-lane vectors."""
    phis = ["  %acc = phi <8 x float> [zeroinitializer, %entry], [%accn, %loop]",
            "  %accm = phi <8 x float> [zeroinitializer, %entry], [%accmn, %loop]"]
    body = [_rows8_superblock(), token_ptrs(0, "b256", "b", "b8"), """  %bsf = load <8 x float>, ptr %xsp0, align 4
  %bs = fptosi <8 x float> %bsf to <8 x i32>
"""]
    body += [f"  %xlp{j} = getelementptr inbounds i8, ptr %xb0, i64 {64 * j}\n  %xl{j} = load <32 x i8>, ptr %xlp{j}, align 1\n"
             f"  %xhp{j} = getelementptr inbounds i8, ptr %xb0, i64 {64 * j + 32}\n  %xh{j} = load <32 x i8>, ptr %xhp{j}, align 1\n"
             for j in range(4)]
    for r in range(G8):
        body.append(f"  %mv{r} = mul <8 x i32> %mn{r}, %bs\n")
        for j in range(4):
            body.append(_rows8_nibbles(r, j))
            body.append(idot(isa, f"wl{r}{j}", f"lo{r}{j}", f"xl{j}", f"%sl{r}{j}"))
            body.append(idot(isa, f"wh{r}{j}", f"hi{r}{j}", f"xh{j}", f"%sh{r}{j}"))
            body.append(f"  %vI{r}{j} = add <8 x i32> %wl{r}{j}, %wh{r}{j}\n")
        body.append(f"""  %vIa{r} = add <8 x i32> %vI{r}0, %vI{r}1
  %vIb{r} = add <8 x i32> %vI{r}2, %vI{r}3
  %vIt{r} = add <8 x i32> %vIa{r}, %vIb{r}
""")
    for v, o in (("vIt", "I8"), ("mv", "M8")):  # 8 vectors -> [r0 .. r7] lane totals
        body.append(_tree8([f"{v}{r}" for r in range(G8)], o))
    body.append(splat("float", 8, "dx0", "dxv") + """  %If = sitofp <8 x i32> %I8 to <8 x float>
  %Mf = sitofp <8 x i32> %M8 to <8 x float>
  %ds8 = fmul <8 x float> %dw8, %dxv
  %dm8 = fmul <8 x float> %dmin8, %dxv
  %accn = call <8 x float> @llvm.fma.v8f32(<8 x float> %If, <8 x float> %ds8, <8 x float> %acc)
  %accmn = call <8 x float> @llvm.fma.v8f32(<8 x float> %Mf, <8 x float> %dm8, <8 x float> %accm)
""")
    exit_ = "  %rv = fsub <8 x float> %accn, %accmn\n  store <8 x float> %rv, ptr %out, align 4\n"
    return (decls(isa) + HEADER.format(name=f"edgert_q4k_gemv8_{isa.name}")
            + _loop(phis, "".join(body), exit_))


def _tree8(v: list[str], out: str) -> str:
    """IR: %out = <8 x i32> whose lane r is the lane total of the <8 x i32> value v[r]."""
    return ("".join(_pairsum(v[2 * k], v[2 * k + 1], f"{out}a{k}") for k in range(4))
            + _pairsum(f"{out}a0", f"{out}a1", f"{out}b0") + _pairsum(f"{out}a2", f"{out}a3", f"{out}b1")
            + _pairsum(f"{out}b0", f"{out}b1", out))


def q4k_gemm8_ir(isa) -> str:
    """q4k_ir's gemm (llama.cpp's path for whole groups of 4 tokens) for one group of 8 rows of
    the rows8 layout and 4 tokens: per 64 elements j and token t, the 8 rows' I_j and M_j as the
    lanes of one vector (a tree of pairwise sums over the rows), then acc_t = fma(I_j, d * dx_t,
    acc_t) and accm_t = fma(M_j, dmin * dx_t, accm_t) for j = 0..3 in order: each (row, token)
    lane runs q4k_ir's gemm chain."""
    T = range(4)
    phis = [f"  %acc{t} = phi <8 x float> [zeroinitializer, %entry], [%acc{t}j3, %loop]\n"
            f"  %accm{t} = phi <8 x float> [zeroinitializer, %entry], [%accm{t}j3, %loop]" for t in T]
    body = [_rows8_superblock()]
    for t in T:
        body.append(token_ptrs(t, "b256", "b", "b8") + f"""  %bsf{t} = load <8 x float>, ptr %xsp{t}, align 4
  %bs{t} = fptosi <8 x float> %bsf{t} to <8 x i32>
""" + splat("float", 8, f"dx{t}", f"dxv{t}") + f"""  %ds{t} = fmul <8 x float> %dw8, %dxv{t}
  %dm{t} = fmul <8 x float> %dmin8, %dxv{t}
""")
        for r in range(G8):
            body.append(f"  %mv{r}t{t} = mul <8 x i32> %mn{r}, %bs{t}\n")
        # [r0: M0..M3, r1: M0..M3] for the row pairs, then per j the 8 rows' M_j
        body.append("".join(_pairsum(f"mv{2 * k}t{t}", f"mv{2 * k + 1}t{t}", f"Pm{t}{k}") for k in range(4)))
        for j in range(4):
            pick = f"<8 x i32> <i32 {j}, i32 {4 + j}, i32 {8 + j}, i32 {12 + j}, i32 poison, i32 poison, i32 poison, i32 poison>"
            body.append(f"""  %Mlo{t}{j} = shufflevector <8 x i32> %Pm{t}0, <8 x i32> %Pm{t}1, {pick}
  %Mhi{t}{j} = shufflevector <8 x i32> %Pm{t}2, <8 x i32> %Pm{t}3, {pick}
  %M{t}j{j} = shufflevector <8 x i32> %Mlo{t}{j}, <8 x i32> %Mhi{t}{j}, <8 x i32> <i32 0, i32 1, i32 2, i32 3, i32 8, i32 9, i32 10, i32 11>
""")
    for j in range(4):
        for r in range(G8):
            body.append(_rows8_nibbles(r, j))
        for t in T:
            body.append(f"""  %xlp{t}{j} = getelementptr inbounds i8, ptr %xb{t}, i64 {64 * j}
  %xl{t}{j} = load <32 x i8>, ptr %xlp{t}{j}, align 1
  %xhp{t}{j} = getelementptr inbounds i8, ptr %xb{t}, i64 {64 * j + 32}
  %xh{t}{j} = load <32 x i8>, ptr %xhp{t}{j}, align 1
""")
            for r in range(G8):
                body.append(idot(isa, f"wl{r}t{t}j{j}", f"lo{r}{j}", f"xl{t}{j}", f"%sl{r}{j}"))
                body.append(idot(isa, f"wh{r}t{t}j{j}", f"hi{r}{j}", f"xh{t}{j}", f"%sh{r}{j}"))
                body.append(f"  %vI{r}t{t}j{j} = add <8 x i32> %wl{r}t{t}j{j}, %wh{r}t{t}j{j}\n")
            body.append(_tree8([f"vI{r}t{t}j{j}" for r in range(G8)], f"I{t}j{j}"))
            prev_a = f"acc{t}" if j == 0 else f"acc{t}j{j - 1}"
            prev_m = f"accm{t}" if j == 0 else f"accm{t}j{j - 1}"
            body.append(f"""  %If{t}j{j} = sitofp <8 x i32> %I{t}j{j} to <8 x float>
  %Mf{t}j{j} = sitofp <8 x i32> %M{t}j{j} to <8 x float>
  %acc{t}j{j} = call <8 x float> @llvm.fma.v8f32(<8 x float> %If{t}j{j}, <8 x float> %ds{t}, <8 x float> %{prev_a})
  %accm{t}j{j} = call <8 x float> @llvm.fma.v8f32(<8 x float> %Mf{t}j{j}, <8 x float> %dm{t}, <8 x float> %{prev_m})
""")
    exit_ = "".join(f"""  %rv{t} = fsub <8 x float> %acc{t}j3, %accm{t}j3
  %oo{t} = mul i64 %ostride, {t}
  %op{t} = getelementptr inbounds float, ptr %out, i64 %oo{t}
  store <8 x float> %rv{t}, ptr %op{t}, align 4
""" for t in T)
    return (decls(isa) + HEADER.format(name=f"edgert_q4k_gemm8_{isa.name}")
            + _loop(phis, "".join(body), exit_))


def q6k_ir(nt: int, tiled: bool, isa) -> str:
    """llama.cpp's ggml_vec_dot_q6_K_q8_K (AVX2) per super-block: 6-bit values q (0..63) times
    the activation, scaled per 16 by the int8 scales, minus 32 * scale * sum(x) per 16 (from the
    activation's sums); vec_dot accumulates eight float lanes, fma(d * dx, float(lanes), acc), and
    ends with hsum_float_8; the tiled kernel (llama.cpp's path from 8 tokens on) sums the
    super-block's integers S first, acc = fma(d * S, dx, acc)."""
    def rep(i):
        return "<16 x i32> <" + ", ".join([f"i32 {2 * i}"] * 8 + [f"i32 {2 * i + 1}"] * 8) + ">"
    phis, body, exit_ = [], [], []
    body.append("""  %qlo = shl i64 %b, 7
  %qlb = getelementptr inbounds i8, ptr %qs, i64 %qlo
  %qho = shl i64 %b, 6
  %qhb = getelementptr inbounds i8, ptr %qh, i64 %qho
  %b16 = shl i64 %b, 4
  %b256 = shl i64 %b, 8
  %scp = getelementptr inbounds i8, ptr %sc, i64 %b16
  %sc8 = load <16 x i8>, ptr %scp, align 1
  %sc16 = sext <16 x i8> %sc8 to <16 x i16>
  %dwp = getelementptr inbounds float, ptr %d, i64 %b
  %dw = load float, ptr %dwp, align 4
""")
    for j in range(2):  # each half of 128: ql[64 j .. + 64], qh[32 j .. + 32] -> q0..q3 (32 values each)
        body.append(f"""  %qa{j}p = getelementptr inbounds i8, ptr %qlb, i64 {64 * j}
  %qa{j} = load <32 x i8>, ptr %qa{j}p, align 1
  %qb{j}p = getelementptr inbounds i8, ptr %qlb, i64 {64 * j + 32}
  %qb{j} = load <32 x i8>, ptr %qb{j}p, align 1
  %H{j}p = getelementptr inbounds i8, ptr %qhb, i64 {32 * j}
  %H{j} = load <32 x i8>, ptr %H{j}p, align 1
  %hA{j} = and <32 x i8> %H{j}, splat (i8 3)
  %h0{j} = shl <32 x i8> %hA{j}, splat (i8 4)
  %hB{j} = and <32 x i8> %H{j}, splat (i8 12)
  %h1{j} = shl <32 x i8> %hB{j}, splat (i8 2)
  %h2{j} = and <32 x i8> %H{j}, splat (i8 48)
  %hD{j} = and <32 x i8> %H{j}, splat (i8 -64)
  %h3{j} = lshr <32 x i8> %hD{j}, splat (i8 2)
  %la{j} = and <32 x i8> %qa{j}, splat (i8 15)
  %lb{j} = and <32 x i8> %qb{j}, splat (i8 15)
  %ua{j} = lshr <32 x i8> %qa{j}, splat (i8 4)
  %ub{j} = lshr <32 x i8> %qb{j}, splat (i8 4)
  %w{j}0 = or <32 x i8> %la{j}, %h0{j}
  %w{j}1 = or <32 x i8> %lb{j}, %h1{j}
  %w{j}2 = or <32 x i8> %ua{j}, %h2{j}
  %w{j}3 = or <32 x i8> %ub{j}, %h3{j}
""")
        for k in range(4):
            body.append(f"  %s{j}{k} = shufflevector <16 x i16> %sc16, <16 x i16> poison, {rep(4 * j + k)}\n")
    for t in range(nt):
        if tiled:
            phis.append(f"  %acs{t} = phi float [0.0, %entry], [%acs{t}n, %loop]")
        else:
            phis.append(f"  %acc{t} = phi <8 x float> [zeroinitializer, %entry], [%acc{t}n, %loop]")
        body.append(token_ptrs(t, "b256", "b", "b16"))
        body.append(f"""  %bsf{t} = load <16 x float>, ptr %xsp{t}, align 4
  %bs16{t} = fptosi <16 x float> %bsf{t} to <16 x i16>
""" + pmaddwd(isa, f"subm{t}", f"bs16{t}", "sc16") + f"""  %sub{t} = shl <8 x i32> %subm{t}, splat (i32 5)
""")
        for j in range(2):
            for k in range(4):
                body.append(f"  %xp{t}{j}{k} = getelementptr inbounds i8, ptr %xb{t}, i64 {128 * j + 32 * k}\n"
                            f"  %x{t}{j}{k} = load <32 x i8>, ptr %xp{t}{j}{k}, align 1\n")
                body.append(idot(isa, f"m{t}{j}{k}", f"w{j}{k}", f"x{t}{j}{k}", f"%s{j}{k}"))
        body.append(f"""  %ta{t} = add <8 x i32> %m{t}00, %m{t}01
  %tb{t} = add <8 x i32> %m{t}02, %m{t}03
  %tc{t} = add <8 x i32> %m{t}10, %m{t}11
  %td{t} = add <8 x i32> %m{t}12, %m{t}13
  %v0{t} = add <8 x i32> %ta{t}, %tb{t}
  %v1{t} = add <8 x i32> %tc{t}, %td{t}
  %v2{t} = add <8 x i32> %v0{t}, %v1{t}
  %sumi{t} = sub <8 x i32> %v2{t}, %sub{t}
""")
        if tiled:
            body.append(f"""  %S{t} = call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> %sumi{t})
  %Sf{t} = sitofp i32 %S{t} to float
  %dS{t} = fmul float %dw, %Sf{t}
  %acs{t}n = call float @llvm.fma.f32(float %dS{t}, float %dx{t}, float %acs{t})
""")
            exit_.append(store(t, f"acs{t}n"))
        else:
            body.append(f"  %dd{t} = fmul float %dx{t}, %dw\n" + splat("float", 8, f"dd{t}", f"ddv{t}")
                        + f"  %sf{t} = sitofp <8 x i32> %sumi{t} to <8 x float>\n"
                        f"  %acc{t}n = call <8 x float> @llvm.fma.v8f32(<8 x float> %ddv{t}, <8 x float> %sf{t}, <8 x float> %acc{t})\n")
            exit_.append(hsum8(f"acc{t}n", f"h{t}") + store(t, f"h{t}"))
    return (decls(isa) + HEADER.format(name=f"edgert_q6k_nt{nt}_{'tiled' if tiled else 'vec'}_{isa.name}")
            + _loop(phis, "".join(body), "".join(exit_)))


def _rep16(i: int, j: int | None = None) -> str:
    """A <16 x i32> shuffle mask: 8 lanes of element i, then 8 of j (j = i: all 16)."""
    j = i if j is None else j
    return "<16 x i32> <" + ", ".join([f"i32 {i}"] * 8 + [f"i32 {j}"] * 8) + ">"


def lowk_ir(qtype: int, nt: int, tiled: bool, isa=None) -> str:
    """Q2_K, Q3_K and Q5_K per super-block as llama.cpp computes them on AVX2: vec_dot
    (ggml_vec_dot_q{2,3,5}_K_q8_K: eight int32 lanes, lane L over bytes 4L..4L+3 of each
    32-element group, times the sub-block's scale; Q2_K first fma(-dx * dmin, mins . bsums per lane
    pair) and then fma(dx * d, lanes) into eight float chains, hsum_float_8 at the end; Q3_K's
    values low - 4 (high bit clear) as two byte products subtracted in 16 bits; Q5_K's minimums a
    scalar chain fma(-dx * dmin, mins . bsums, summs) added after the hsum) or, from 8 tokens,
    its tiled kernel (S the super-block's integer total, M the minimums' one:
    res = fma(-dmin, M, d * S), acc = fma(res, dx, acc)). Row layout: quants and high bits as in
    GGUF, scales unpacked as kernels/quant.py's tiles (Q3_K unsigned, 32 too high)."""
    isa = isa or ISA
    has_min = qtype != Q3_K
    phis, body, exit_ = [], [], []
    body.append("""  %b256 = shl i64 %b, 8
  %b16 = shl i64 %b, 4
  %b8 = shl i64 %b, 3
  %dwp = getelementptr inbounds float, ptr %d, i64 %b
  %dw = load float, ptr %dwp, align 4
""")
    if has_min:
        body.append("  %dmp = getelementptr inbounds float, ptr %m, i64 %b\n  %dm = load float, ptr %dmp, align 4\n"
                    "  %ndm = fneg float %dm\n")
    w, scale = {}, {}  # (j, k) -> name of the 32 weights / their <16 x i16> scales
    if qtype in (Q2_K, Q3_K):
        body.append("""  %b64 = shl i64 %b, 6
  %qp = getelementptr inbounds i8, ptr %qs, i64 %b64
""")
        if qtype == Q2_K:
            body.append("""  %b32s = shl i64 %b, 5
  %scp = getelementptr inbounds i8, ptr %sc, i64 %b32s
  %sc8 = load <16 x i8>, ptr %scp, align 1
  %sc16 = zext <16 x i8> %sc8 to <16 x i16>
  %mnp = getelementptr inbounds i8, ptr %scp, i64 16
  %mn8 = load <16 x i8>, ptr %mnp, align 1
  %mn16 = zext <16 x i8> %mn8 to <16 x i16>
""")
        else:
            body.append("""  %scp = getelementptr inbounds i8, ptr %sc, i64 %b16
  %sc8 = load <16 x i8>, ptr %scp, align 1
  %scz = zext <16 x i8> %sc8 to <16 x i16>
  %sc16 = sub <16 x i16> %scz, splat (i16 32)
  %b32h = shl i64 %b, 5
  %Hp = getelementptr inbounds i8, ptr %qh, i64 %b32h
  %H = load <32 x i8>, ptr %Hp, align 1
""")
        for j in range(2):
            body.append(f"  %q{j}p = getelementptr inbounds i8, ptr %qp, i64 {32 * j}\n"
                        f"  %q{j} = load <32 x i8>, ptr %q{j}p, align 1\n")
            for k in range(4):
                body.append(f"  %q{j}{k}s = lshr <32 x i8> %q{j}, splat (i8 {2 * k})\n"
                            f"  %w{j}{k} = and <32 x i8> %q{j}{k}s, splat (i8 3)\n"
                            f"  %s{j}{k} = shufflevector <16 x i16> %sc16, <16 x i16> poison, "
                            f"{_rep16(8 * j + 2 * k, 8 * j + 2 * k + 1)}\n")
                if qtype == Q3_K:  # 4 where the high bit (4j + k of byte l) is clear
                    body.append(f"  %H{j}{k}s = lshr <32 x i8> %H, splat (i8 {4 * j + k})\n"
                                f"  %H{j}{k}b = and <32 x i8> %H{j}{k}s, splat (i8 1)\n"
                                f"  %H{j}{k}n = xor <32 x i8> %H{j}{k}b, splat (i8 1)\n"
                                f"  %h{j}{k} = shl <32 x i8> %H{j}{k}n, splat (i8 2)\n")
                w[j, k], scale[j, k] = f"w{j}{k}", f"%s{j}{k}"
        xoff = {(j, k): 128 * j + 32 * k for j in range(2) for k in range(4)}
    else:  # Q5_K: 4 chunks of 64, each the low and high nibbles of 32 bytes, a fifth bit from qh
        body.append("""  %b128 = shl i64 %b, 7
  %qp = getelementptr inbounds i8, ptr %qs, i64 %b128
  %b32h = shl i64 %b, 5
  %Hp = getelementptr inbounds i8, ptr %qh, i64 %b32h
  %H = load <32 x i8>, ptr %Hp, align 1
  %scp = getelementptr inbounds i8, ptr %sc, i64 %b16
  %sm8 = load <16 x i8>, ptr %scp, align 1
  %sm16 = zext <16 x i8> %sm8 to <16 x i16>
  %mn8 = shufflevector <16 x i8> %sm8, <16 x i8> poison, <8 x i32> <i32 8, i32 9, i32 10, i32 11, i32 12, i32 13, i32 14, i32 15>
  %mn32 = zext <8 x i8> %mn8 to <8 x i32>
""")
        for j in range(4):
            body.append(f"  %q{j}p = getelementptr inbounds i8, ptr %qp, i64 {32 * j}\n"
                        f"  %q{j} = load <32 x i8>, ptr %q{j}p, align 1\n"
                        f"  %l{j}0 = and <32 x i8> %q{j}, splat (i8 15)\n"
                        f"  %l{j}1 = lshr <32 x i8> %q{j}, splat (i8 4)\n")
            for h in range(2):
                body.append(f"  %H{j}{h}s = lshr <32 x i8> %H, splat (i8 {2 * j + h})\n"
                            f"  %H{j}{h}b = and <32 x i8> %H{j}{h}s, splat (i8 1)\n"
                            f"  %H{j}{h}v = shl <32 x i8> %H{j}{h}b, splat (i8 4)\n"
                            f"  %w{j}{h} = or <32 x i8> %l{j}{h}, %H{j}{h}v\n"
                            f"  %s{j}{h} = shufflevector <16 x i16> %sm16, <16 x i16> poison, {_rep16(2 * j + h)}\n")
                w[j, h], scale[j, h] = f"w{j}{h}", f"%s{j}{h}"
        xoff = {(j, h): 64 * j + 32 * h for j in range(4) for h in range(2)}
    for t in range(nt):
        if tiled:
            phis.append(f"  %acs{t} = phi float [0.0, %entry], [%acs{t}n, %loop]")
        else:
            phis.append(f"  %acc{t} = phi <8 x float> [zeroinitializer, %entry], [%acc{t}n, %loop]")
            if qtype == Q5_K:
                phis.append(f"  %sm{t} = phi float [0.0, %entry], [%sm{t}n, %loop]")
        body.append(token_ptrs(t, "b256", "b", "b8" if qtype == Q5_K else "b16"))
        if qtype == Q2_K:  # lane L: mins 2L, 2L + 1 times the activation's sums over 16
            body.append(f"""  %bsf{t} = load <16 x float>, ptr %xsp{t}, align 4
  %bs16{t} = fptosi <16 x float> %bsf{t} to <16 x i16>
""" + pmaddwd(isa, f"prod{t}", "mn16", f"bs16{t}"))
        elif qtype == Q5_K:  # M = mins . sums over 32
            body.append(f"""  %bsf{t} = load <8 x float>, ptr %xsp{t}, align 4
  %bs32{t} = fptosi <8 x float> %bsf{t} to <8 x i32>
  %mb{t} = mul <8 x i32> %bs32{t}, %mn32
  %M{t} = call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> %mb{t})
  %Mf{t} = sitofp i32 %M{t} to float
""")
        parts = []
        for key, off in xoff.items():
            n = f"{t}{key[0]}{key[1]}"
            body.append(f"  %xp{n} = getelementptr inbounds i8, ptr %xb{t}, i64 {off}\n"
                        f"  %x{n} = load <32 x i8>, ptr %xp{n}, align 1\n")
            if qtype == Q3_K and neon(isa):  # (w - h) . x as two sdot: the same integers
                body.append(_sdot(f"pa{n}", w[key], f"x{n}") + _sdot(f"pb{n}", f"h{key[0]}{key[1]}", f"x{n}")
                            + f"  %pd{n} = sub <8 x i32> %pa{n}, %pb{n}\n" + _scale_lanes(f"pd{n}", scale[key], f"m{n}"))
            elif qtype == Q3_K:
                body.append(f"  %pa{n} = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %{w[key]}, <32 x i8> %x{n})\n"
                            f"  %pb{n} = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %h{key[0]}{key[1]}, <32 x i8> %x{n})\n"
                            f"  %pd{n} = sub <16 x i16> %pa{n}, %pb{n}\n"
                            f"  %m{n} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %pd{n}, <16 x i16> {scale[key]})\n")
            else:
                body.append(idot(isa, f"m{n}", w[key], f"x{n}", scale[key]))
            parts.append(f"m{n}")
        while len(parts) > 1:  # exact integer sums: any order
            nxt = []
            for i in range(0, len(parts), 2):
                body.append(f"  %{parts[i]}_{parts[i + 1]} = add <8 x i32> %{parts[i]}, %{parts[i + 1]}\n")
                nxt.append(f"{parts[i]}_{parts[i + 1]}")
            parts = nxt
        sumi = parts[0]
        if tiled:
            body.append(f"""  %S{t} = call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> %{sumi})
  %Sf{t} = sitofp i32 %S{t} to float
  %dS{t} = fmul float %dw, %Sf{t}
""")
            res = f"dS{t}"
            if qtype == Q2_K:
                body.append(f"  %M{t} = call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> %prod{t})\n"
                            f"  %Mf{t} = sitofp i32 %M{t} to float\n")
            if has_min:
                body.append(f"  %rs{t} = call float @llvm.fma.f32(float %ndm, float %Mf{t}, float %dS{t})\n")
                res = f"rs{t}"
            body.append(f"  %acs{t}n = call float @llvm.fma.f32(float %{res}, float %dx{t}, float %acs{t})\n")
            exit_.append(store(t, f"acs{t}n"))
            continue
        body.append(f"  %dd{t} = fmul float %dx{t}, %dw\n" + splat("float", 8, f"dd{t}", f"ddv{t}")
                    + f"  %sf{t} = sitofp <8 x i32> %{sumi} to <8 x float>\n")
        acc = f"acc{t}"
        if has_min:
            body.append(f"  %dmn{t}a = fmul float %dx{t}, %dm\n  %dmn{t} = fneg float %dmn{t}a\n")
        if qtype == Q2_K:
            body.append(splat("float", 8, f"dmn{t}", f"dmv{t}")
                        + f"  %pf{t} = sitofp <8 x i32> %prod{t} to <8 x float>\n"
                        f"  %acm{t} = call <8 x float> @llvm.fma.v8f32(<8 x float> %dmv{t}, <8 x float> %pf{t}, <8 x float> %acc{t})\n")
            acc = f"acm{t}"
        body.append(f"  %acc{t}n = call <8 x float> @llvm.fma.v8f32(<8 x float> %ddv{t}, <8 x float> %sf{t}, <8 x float> %{acc})\n")
        if qtype == Q5_K:
            body.append(f"  %sm{t}n = call float @llvm.fma.f32(float %dmn{t}, float %Mf{t}, float %sm{t})\n")
            exit_.append(hsum8(f"acc{t}n", f"h{t}") + f"  %hs{t} = fadd float %h{t}, %sm{t}n\n" + store(t, f"hs{t}"))
        else:
            exit_.append(hsum8(f"acc{t}n", f"h{t}") + store(t, f"h{t}"))
    name = f"edgert_{QTYPE[qtype].name.lower()}_nt{nt}_{'tiled' if tiled else 'vec'}"
    return decls(isa) + HEADER.format(name=name) + _loop(phis, "".join(body), "".join(exit_))


# ---------------------------------------------------------------------------------------------
# Numba glue
# ---------------------------------------------------------------------------------------------

def ir_text(qtype: int, nt: int, kmode: int = 0, isa=None) -> str:
    """The IR of one routine: kmode 1 is Q4_K's gemm / Q6_K's tiled path."""
    isa = isa or ISA
    if qtype == Q4_K:
        return q4k_ir(nt, bool(kmode), isa)
    if qtype == Q6_K:
        return q6k_ir(nt, bool(kmode), isa)
    if qtype in (Q2_K, Q3_K, Q5_K):
        return lowk_ir(qtype, nt, bool(kmode), isa)
    return legacy_ir(qtype, nt, isa)


def _call_ir(context, builder, name: str, text: str, args):
    """Emit a call to the IR function `name` defined in `text` (every argument an i64): the
    text goes into a code library linked into, and inlined by, the calling kernel."""
    lib = context.codegen().create_library(name)
    mod = llb.parse_assembly(text)
    mod.verify()
    lib.add_llvm_module(mod)
    context.add_linking_libs([lib])
    fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64)] * len(args))
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _make(qtype: int, nt: int, kmode: int = 0, text: str = ""):
    text = text or ir_text(qtype, nt, kmode)
    name = text[text.index("define void @") + 13:text.index("(i64 %qs_a")]

    @intrinsic
    def vecdot(typingctx, qs, qh, sc, d, m, x, xd, xs, nblk, xstride, xdstride, xsstride, out, ostride):
        sig = types.void(*([types.int64] * 14))

        def codegen(context, builder, signature, args):
            _call_ir(context, builder, name, text, args)
            return context.get_dummy_value()
        return sig, codegen
    return vecdot


q4_0_1, q4_0_4 = _make(Q4_0, 1), _make(Q4_0, 4)
q4_1_1, q4_1_4 = _make(Q4_1, 1), _make(Q4_1, 4)
q5_0_1, q5_0_4 = _make(Q5_0, 1), _make(Q5_0, 4)
q5_1_1, q5_1_4 = _make(Q5_1, 1), _make(Q5_1, 4)
q8_0_1, q8_0_4 = _make(Q8_0, 1), _make(Q8_0, 4)
q4k_gemv_1, q4k_gemv_4, q4k_gemm_4 = _make(Q4_K, 1, 0), _make(Q4_K, 4, 0), _make(Q4_K, 4, 1)
q4k8_gemv8 = _make(Q4_K, 1, text=q4k_gemv8_ir(ISA))
q4k8_gemm8 = _make(Q4_K, 4, text=q4k_gemm8_ir(ISA))
q6k_vec_1, q6k_vec_4, q6k_tiled_1, q6k_tiled_4 = _make(Q6_K, 1, 0), _make(Q6_K, 4, 0), _make(Q6_K, 1, 1), _make(Q6_K, 4, 1)
q2k_vec_1, q2k_vec_4, q2k_tiled_1, q2k_tiled_4 = _make(Q2_K, 1, 0), _make(Q2_K, 4, 0), _make(Q2_K, 1, 1), _make(Q2_K, 4, 1)
q3k_vec_1, q3k_vec_4, q3k_tiled_1, q3k_tiled_4 = _make(Q3_K, 1, 0), _make(Q3_K, 4, 0), _make(Q3_K, 1, 1), _make(Q3_K, 4, 1)
q5k_vec_1, q5k_vec_4, q5k_tiled_1, q5k_tiled_4 = _make(Q5_K, 1, 0), _make(Q5_K, 4, 0), _make(Q5_K, 1, 1), _make(Q5_K, 4, 1)


@nb.njit(cache=True, nogil=True, inline="always")
def dot(qtype, nt, tiled, pq, ph, psc, pd, pm, px, pxd, pxs, nblk, xs, ds, ss, po, os_):
    """One weight row against nt (1 or 4) activation rows, by type. tiled: the batch is one
    llama.cpp takes its tiled K-quant path for (Q6_K: 8 tokens or more; Q4_K: its gemm for
    whole groups of 4, that is nt = 4). Fast mode takes the one-accumulation paths."""
    a = (pq, ph, psc, pd, pm, px, pxd, pxs, nblk, xs, ds, ss, po, os_)
    if qtype == Q4_K:
        if nt == 4 and not FAST:
            q4k_gemm_4(*a)
        elif nt == 4:
            q4k_gemv_4(*a)
        else:
            q4k_gemv_1(*a)
    elif qtype == Q6_K:
        if tiled and not FAST:
            if nt == 4:
                q6k_tiled_4(*a)
            else:
                q6k_tiled_1(*a)
        elif nt == 4:
            q6k_vec_4(*a)
        else:
            q6k_vec_1(*a)
    elif qtype == Q2_K:  # (fast mode: the same paths)
        if tiled:
            if nt == 4:
                q2k_tiled_4(*a)
            else:
                q2k_tiled_1(*a)
        elif nt == 4:
            q2k_vec_4(*a)
        else:
            q2k_vec_1(*a)
    elif qtype == Q3_K:
        if tiled:
            if nt == 4:
                q3k_tiled_4(*a)
            else:
                q3k_tiled_1(*a)
        elif nt == 4:
            q3k_vec_4(*a)
        else:
            q3k_vec_1(*a)
    elif qtype == Q5_K:
        if tiled:
            if nt == 4:
                q5k_tiled_4(*a)
            else:
                q5k_tiled_1(*a)
        elif nt == 4:
            q5k_vec_4(*a)
        else:
            q5k_vec_1(*a)
    elif nt == 4:
        if qtype == Q5_0:
            q5_0_4(*a)
        elif qtype == Q5_1:
            q5_1_4(*a)
        elif qtype == Q8_0:
            q8_0_4(*a)
        elif qtype == Q4_1:
            q4_1_4(*a)
        else:
            q4_0_4(*a)
    elif qtype == Q5_0:
        q5_0_1(*a)
    elif qtype == Q5_1:
        q5_1_1(*a)
    elif qtype == Q8_0:
        q8_0_1(*a)
    elif qtype == Q4_1:
        q4_1_1(*a)
    else:
        q4_0_1(*a)


@nb.njit(cache=True, parallel=True, nogil=True)
def matmul_rows(qtype, qs, qh, sc, d, m, x8, xd, xsum, out, nthreads):
    """out[T, R] = X @ W.T for a row-layout matrix W and its activation format: x8 [T, C] int8,
    xd [T, C / A] float32 scales, xsum [T, C / S] (Q4_1: d * sum(q); K-quants: integer sums).
    Each thread takes a contiguous run of rows; for prefill, rows are visited in groups of 16
    against 64 tokens at a time, so that the group's weights and the tokens' activations both
    stay in cache, and each call takes 4 tokens (a block's weights unpacked once for four)."""
    T = x8.shape[0]
    R, nblk = d.shape
    tiled = T >= 8
    xs = x8.strides[0]
    ds = xd.strides[0] // 4
    ss = xsum.strides[0] // 4
    os_ = out.strides[0] // 4
    pm0 = m.ctypes.data if m.shape[1] else d.ctypes.data  # no minimums: never read
    ph0 = qh.ctypes.data if qh.shape[1] else qs.ctypes.data
    psc0 = sc.ctypes.data if sc.shape[1] else qs.ctypes.data
    chunk = (R + nthreads - 1) // nthreads
    for c in nb.prange(nthreads):
        r_lo = c * chunk
        r_hi = min(R, r_lo + chunk)
        for g0 in range(r_lo, r_hi, 16):
            for t0 in range(0, T, 64):
                t_hi = min(T, t0 + 64)
                for r in range(g0, min(r_hi, g0 + 16)):
                    pq = qs.ctypes.data + r * qs.strides[0]
                    ph = ph0 + r * qh.strides[0]
                    psc = psc0 + r * sc.strides[0]
                    pd = d.ctypes.data + r * d.strides[0]
                    pm = pm0 + r * m.strides[0]
                    t = t0
                    while t < t_hi:
                        nt = 4 if t + 4 <= t_hi else 1
                        px, pxd, pxs = x8.ctypes.data + t * xs, xd.ctypes.data + t * ds * 4, xsum.ctypes.data + t * ss * 4
                        po = out.ctypes.data + (t * os_ + r) * 4
                        dot(qtype, nt, tiled, pq, ph, psc, pd, pm, px, pxd, pxs, nblk, xs, ds, ss, po, os_)
                        t += nt


@nb.njit(cache=True, parallel=True, nogil=True)
def matmul_rows8(qs, sc, d, m, x8, xd, xsum, out, nthreads):
    """out[T, R] = X @ W.T for a rows8 Q4_K matrix (activations as matmul_rows): each thread a
    contiguous run of 8-row groups; tokens in whole groups of 4 through the gemm (q4k_gemm8_ir:
    in exact mode llama.cpp's path for them), the rest (and decode) through the gemv
    (q4k_gemv8_ir); groups visited two at a time against 64 tokens, so that their weights stay
    in cache."""
    n_g = d.shape[0]
    nblk = d.shape[1] // G8
    T = x8.shape[0]
    n_gemm = T - T % 4
    os_ = out.strides[0] // 4
    chunk = (n_g + nthreads - 1) // nthreads
    for c in nb.prange(nthreads):
        g_lo = c * chunk
        g_hi = min(n_g, g_lo + chunk)
        for g0 in range(g_lo, g_hi, 2):
            for t0 in range(0, T, 64):
                for g in range(g0, min(g_hi, g0 + 2)):
                    pq = qs.ctypes.data + g * qs.strides[0]
                    psc = sc.ctypes.data + g * sc.strides[0]
                    pd = d.ctypes.data + g * d.strides[0]
                    pm = m.ctypes.data + g * m.strides[0]
                    for t in range(t0, min(T, t0 + 64), 4):
                        if t + 4 <= n_gemm and not FAST:
                            q4k8_gemm8(pq, pq, psc, pd, pm, x8.ctypes.data + t * x8.strides[0],
                                       xd.ctypes.data + t * xd.strides[0], xsum.ctypes.data + t * xsum.strides[0],
                                       nblk, x8.strides[0], xd.strides[0] // 4, xsum.strides[0] // 4,
                                       out.ctypes.data + (t * os_ + g * G8) * 4, os_)
                        else:
                            for u in range(t, min(T, t0 + 64, t + 4)):
                                q4k8_gemv8(pq, pq, psc, pd, pm, x8.ctypes.data + u * x8.strides[0],
                                           xd.ctypes.data + u * xd.strides[0], xsum.ctypes.data + u * xsum.strides[0],
                                           nblk, 0, 0, 0, out.ctypes.data + (u * os_ + g * G8) * 4, 0)
