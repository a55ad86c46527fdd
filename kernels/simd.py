"""Integer dot products of Q4_0 / Q5_0 / Q8_0 weight rows with Q8_0 activations, written as LLVM IR
with the x86 AVX2 byte-multiply instructions, and called from Numba kernels.

Why IR: Numba does not emit vpmaddubsw / vpmaddwd from Python loops (an int8 row dot product stays
scalar), and the float path of matmul.py spends an instruction per weight on int -> float
conversion. This module is llama.cpp's AVX2 `ggml_vec_dot_q{4_0,5_0,8_0}_q8_0` transcribed to IR:
per block of 32, the weights become 32 signed bytes; |w| * sign(x, w) summed in pairs
(vpmaddubsw), pairs summed (vpmaddwd) into eight int32 lanes of four products each, converted to
float and fused-multiply-added with d_w * d_x into eight accumulators; one horizontal sum per row
at the end, in llama.cpp's order. Each block's lane sums are exact, the float steps are the same
operations in the same order, so a row's result equals llama.cpp's bit for bit.

A call handles one weight row against NT activation rows (NT = 1 for decode, 4 for prefill: the
weights of a block are unpacked once for four tokens).

Row layout ("rows"; matmul.py's tiles are the other one), per weight row r with nb blocks:
    qs : uint8   [R, nb * 16]  nibbles as in GGUF (Q4_0, Q5_0); Q8_0: [R, nb * 32] int8 bits
    qh : uint8   [R, nb * 4]   Q5_0 high bits as in GGUF (bit j: element j), else [R, 0]
    d  : float32 [R, nb]       block scales

Used only where the host CPU has AVX2 (`available()`); elsewhere, and with NUMBA_DISABLE_JIT,
matmul.py's portable float kernels run.
"""
from __future__ import annotations

import functools
import platform

import numba as nb
from llvmlite import binding as llb
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

Q4_0, Q4_1, Q5_0, Q8_0 = 2, 3, 6, 8
NT_MAX = 4  # activation rows per call

_UNPACK = {
    # -> %wx <32 x i8>: the block's 32 signed weights, element j at byte j
    Q4_0: """
  %qp = getelementptr inbounds i8, ptr %qs, i64 %b16
  %q16 = load <16 x i8>, ptr %qp, align 1
  %lo = and <16 x i8> %q16, splat (i8 15)
  %hi = lshr <16 x i8> %q16, splat (i8 4)
  %cat = shufflevector <16 x i8> %lo, <16 x i8> %hi, <32 x i32> {seq32}
  %wx = sub <32 x i8> %cat, splat (i8 8)
""",
    Q4_1: """
  %qp = getelementptr inbounds i8, ptr %qs, i64 %b16
  %q16 = load <16 x i8>, ptr %qp, align 1
  %lo = and <16 x i8> %q16, splat (i8 15)
  %hi = lshr <16 x i8> %q16, splat (i8 4)
  %wx = shufflevector <16 x i8> %lo, <16 x i8> %hi, <32 x i32> {seq32}
""",
    Q5_0: """
  %qp = getelementptr inbounds i8, ptr %qs, i64 %b16
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
    Q8_0: """
  %qp = getelementptr inbounds i8, ptr %qs, i64 %b32
  %wx = load <32 x i8>, ptr %qp, align 1
""",
}

_TOKEN = """
  %xp{t} = getelementptr inbounds i8, ptr %x, i64 %xo{t}
  %xv{t} = load <32 x i8>, ptr %xp{t}, align 1
{sign}  %p16{t} = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %ax, <32 x i8> %sy{t})
  %p32{t} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> splat (i16 1), <16 x i16> %p16{t})
  %qf{t} = sitofp <8 x i32> %p32{t} to <8 x float>
  %dxp{t} = getelementptr inbounds float, ptr %xd, i64 %dxo{t}
  %dx{t} = load float, ptr %dxp{t}, align 4
  %dd{t} = fmul float %dw, %dx{t}
  %ddi{t} = insertelement <8 x float> poison, float %dd{t}, i64 0
  %ddv{t} = shufflevector <8 x float> %ddi{t}, <8 x float> poison, <8 x i32> zeroinitializer
  %acc{t}n = call <8 x float> @llvm.fma.v8f32(<8 x float> %ddv{t}, <8 x float> %qf{t}, <8 x float> %acc{t})
{minterm}
  %xo{t}n = add i64 %xo{t}, 32
  %dxo{t}n = add i64 %dxo{t}, 1
"""
# signed weights: |w| * sign(x, w) (vpmaddubsw multiplies unsigned by signed bytes)
_SIGN = """  %sy{t} = call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> %xv{t}, <32 x i8> %wx)
"""
_UNSIGNED = """  %sy{t} = or <32 x i8> %xv{t}, zeroinitializer
"""
# Q4_1: the weights are unsigned nibbles; the block's minimum times the activation block's
# stored d * sum(q), summed apart (llama.cpp's `summs`) and added after the horizontal sum
_MIN = """  %xsp{t} = getelementptr inbounds float, ptr %xs, i64 %dxo{t}
  %xsv{t} = load float, ptr %xsp{t}, align 4
  %sm{t}n = call float @llvm.fma.f32(float %mw, float %xsv{t}, float %sm{t})
"""

_HSUM = """
  %h{t}a = shufflevector <8 x float> %acc{t}n, <8 x float> poison, <4 x i32> <i32 4, i32 5, i32 6, i32 7>
  %h{t}b = shufflevector <8 x float> %acc{t}n, <8 x float> poison, <4 x i32> <i32 0, i32 1, i32 2, i32 3>
  %h{t}c = fadd <4 x float> %h{t}a, %h{t}b
  %h{t}d = shufflevector <4 x float> %h{t}c, <4 x float> poison, <4 x i32> <i32 2, i32 3, i32 2, i32 3>
  %h{t}e = fadd <4 x float> %h{t}c, %h{t}d
  %h{t}f = extractelement <4 x float> %h{t}e, i64 0
  %h{t}g = extractelement <4 x float> %h{t}e, i64 1
  %h{t}s = fadd float %h{t}f, %h{t}g{addmin}
  %op{t} = getelementptr inbounds float, ptr %out, i64 {oofs}
  store float %h{t}r, ptr %op{t}, align 4
"""


def fn_name(qtype: int, nt: int) -> str:
    return f"edgert_vecdot_q{qtype}_nt{nt}"


def ir_text(qtype: int, nt: int) -> str:
    """IR of `void fn(qs, qh, d, m, x, xd, xs, nb, xstride, xdstride, out, ostride)` (addresses
    as i64): out[t * ostride] = sum over blocks b of d[b] * xd[t, b] * (w_b . x[t, 32 b:]) (+ m[b] *
    xs[t, b] for Q4_1), with x[t] at x + t * xstride and xd[t], xs[t] at t * xdstride floats."""
    signed = qtype != Q4_1
    seq32 = "<" + ", ".join(f"i32 {i}" for i in range(32)) + ">"
    ts = range(nt)
    phis = "\n".join(
        f"  %acc{t} = phi <8 x float> [zeroinitializer, %entry], [%acc{t}n, %loop]\n"
        f"  %xo{t} = phi i64 [%xo{t}0, %entry], [%xo{t}n, %loop]\n"
        f"  %dxo{t} = phi i64 [%dxo{t}0, %entry], [%dxo{t}n, %loop]"
        + ("" if signed else f"\n  %sm{t} = phi float [0.0, %entry], [%sm{t}n, %loop]") for t in ts)
    starts = "\n".join(f"  %xo{t}0 = mul i64 %xstride, {t}\n  %dxo{t}0 = mul i64 %xdstride, {t}" for t in ts)
    body = "".join(_TOKEN.format(t=t, sign=(_SIGN if signed else _UNSIGNED).format(t=t),
                                  minterm="" if signed else _MIN.format(t=t)) for t in ts)
    # the ostride multiple of the token index
    hsum = "".join(_HSUM.format(t=t, oofs=f"%oo{t}", addmin=(
        f"\n  %h{t}r = fadd float %h{t}s, %sm{t}n" if not signed else f"\n  %h{t}r = fadd float %h{t}s, -0.0")) for t in ts)
    oofs = "\n".join(f"  %oo{t} = mul i64 %ostride, {t}" for t in ts)
    absw = ("  %ax = call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> %wx, <32 x i8> %wx)" if signed else
            "  %ax = or <32 x i8> %wx, zeroinitializer")
    loadm = "" if signed else "  %mw = load float, ptr %mwp, align 4"
    return f"""
declare <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8>, <32 x i8>)
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare float @llvm.fma.f32(float, float, float)

define void @{fn_name(qtype, nt)}(i64 %qs_a, i64 %qh_a, i64 %d_a, i64 %m_a, i64 %x_a, i64 %xd_a, i64 %xs_a, i64 %nb,
    i64 %xstride, i64 %xdstride, i64 %out_a, i64 %ostride) alwaysinline {{
entry:
  %qs = inttoptr i64 %qs_a to ptr
  %qh = inttoptr i64 %qh_a to ptr
  %d = inttoptr i64 %d_a to ptr
  %m = inttoptr i64 %m_a to ptr
  %x = inttoptr i64 %x_a to ptr
  %xd = inttoptr i64 %xd_a to ptr
  %xs = inttoptr i64 %xs_a to ptr
  %out = inttoptr i64 %out_a to ptr
{starts}
  br label %loop
loop:
  %b = phi i64 [0, %entry], [%b1, %loop]
{phis}
  %b4 = shl i64 %b, 2
  %b16 = shl i64 %b, 4
  %b32 = shl i64 %b, 5
{_UNPACK[qtype].format(seq32=seq32)}
{absw}
  %dwp = getelementptr inbounds float, ptr %d, i64 %b
  %dw = load float, ptr %dwp, align 4
  %mwp = getelementptr inbounds float, ptr %m, i64 %b
{loadm}
{body}
  %b1 = add i64 %b, 1
  %more = icmp ult i64 %b1, %nb
  br i1 %more, label %loop, label %exit
exit:
{oofs}
{hsum}
  ret void
}}
"""


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the row-layout kernels run here: JIT on, an x86-64 CPU with AVX2 (which Numba
    compiles for, as it targets the host), and not switched off with EDGERT_SIMD=0."""
    from edgert.settings import env
    if nb.config.DISABLE_JIT or env("EDGERT_SIMD") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return "+avx2" in llb.get_host_cpu_features().flatten().split(",")


def _call_ir(context, builder, name: str, text: str, restype, args):
    """Emit a call to the IR function `name` defined in `text` (every argument an i64): the
    text goes into a code library linked into, and inlined by, the calling kernel."""
    lib = context.codegen().create_library(name)
    mod = llb.parse_assembly(text)
    mod.verify()
    lib.add_llvm_module(mod)
    context.add_linking_libs([lib])
    fnty = ir.FunctionType(restype, [ir.IntType(64)] * len(args))
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _make(qtype: int, nt: int):
    @intrinsic
    def vecdot(typingctx, qs, qh, d, m, x, xd, xs, nblk, xstride, xdstride, out, ostride):
        sig = types.void(*([types.int64] * 12))

        def codegen(context, builder, signature, args):
            _call_ir(context, builder, fn_name(qtype, nt), ir_text(qtype, nt), ir.VoidType(), args)
            return context.get_dummy_value()
        return sig, codegen
    return vecdot


vecdot_q4_0_1, vecdot_q4_0_4 = _make(Q4_0, 1), _make(Q4_0, 4)
vecdot_q4_1_1, vecdot_q4_1_4 = _make(Q4_1, 1), _make(Q4_1, 4)
vecdot_q5_0_1, vecdot_q5_0_4 = _make(Q5_0, 1), _make(Q5_0, 4)
vecdot_q8_0_1, vecdot_q8_0_4 = _make(Q8_0, 1), _make(Q8_0, 4)


@nb.njit(cache=True, nogil=True, inline="always")
def _dot(qtype, nt, pq, ph, pd, pm, px, pxd, pxs, nblk, xs, ds, po, os_):
    """One weight row against nt (1 or 4) activation rows, by type."""
    a = (pq, ph, pd, pm, px, pxd, pxs, nblk, xs, ds, po, os_)
    if nt == 4:
        if qtype == 6:
            vecdot_q5_0_4(*a)
        elif qtype == 8:
            vecdot_q8_0_4(*a)
        elif qtype == 3:
            vecdot_q4_1_4(*a)
        else:
            vecdot_q4_0_4(*a)
    elif qtype == 6:
        vecdot_q5_0_1(*a)
    elif qtype == 8:
        vecdot_q8_0_1(*a)
    elif qtype == 3:
        vecdot_q4_1_1(*a)
    else:
        vecdot_q4_0_1(*a)


@nb.njit(cache=True, parallel=True, nogil=True)
def matmul_rows(qtype, qs, qh, d, m, x8, xd, xsum, out, nthreads):
    """out[T, R] = X @ W.T for a row-layout Q4_0 / Q4_1 / Q5_0 / Q8_0 matrix W and its activation
    format: x8 [T, C] int8, xd [T, C / 32] float32 scales (Q4_1: xsum [T, C / 32], d * sum(q)).
    Each thread takes a contiguous run of rows; for prefill, rows are visited in groups of 16
    against 64 tokens at a time, so that the group's weights and the tokens' activations both
    stay in cache, and each call takes 4 tokens (a block's weights unpacked once for four)."""
    R, nblk = d.shape
    T = x8.shape[0]
    xs = x8.strides[0]
    ds = xd.strides[0] // 4
    os_ = out.strides[0] // 4
    pm0 = m.ctypes.data if m.shape[1] else d.ctypes.data  # no minimums: never read
    chunk = (R + nthreads - 1) // nthreads
    for c in nb.prange(nthreads):
        r_lo = c * chunk
        r_hi = min(R, r_lo + chunk)
        for g0 in range(r_lo, r_hi, 16):
            for t0 in range(0, T, 64):
                t_hi = min(T, t0 + 64)
                for r in range(g0, min(r_hi, g0 + 16)):
                    pq = qs.ctypes.data + r * qs.strides[0]
                    ph = qh.ctypes.data + r * qh.strides[0]
                    pd = d.ctypes.data + r * d.strides[0]
                    pm = pm0 + r * m.strides[0]
                    t = t0
                    while t < t_hi:
                        nt = 4 if t + 4 <= t_hi else 1
                        _dot(qtype, nt, pq, ph, pd, pm, x8.ctypes.data + t * xs, xd.ctypes.data + t * ds * 4,
                             xsum.ctypes.data + t * ds * 4, nblk, xs, ds, out.ctypes.data + (t * os_ + r) * 4, os_)
                        t += nt


# ============================================================================================
# K-quants (one weight row against one activation row; the activation is Q8_K: int8 quants,
# a float scale per 256 and its integer sums per 16 (Q6_K) or 32 (Q4_K), held as float32)
# ============================================================================================

Q4_K, Q6_K = 12, 14


def _q6k_ir() -> str:
    """llama.cpp's ggml_vec_dot_q6_K_q8_K (AVX2) per super-block; mode 0 ends as it does (eight
    float lanes, then hsum_float_8), mode 1 as its tiled kernel (the super-block's integer total
    S, then acc = fma(d * S, dx, acc)), which llama.cpp uses for batches of 8 tokens or more."""
    def sc16(is_):
        m = ", ".join([f"i32 {2 * is_}"] * 8 + [f"i32 {2 * is_ + 1}"] * 8)
        return f"<16 x i32> <{m}>"
    body = []
    for j in range(2):
        body.append(f"""
  %b1_{j} = load <32 x i8>, ptr %qlp{j}, align 1
  %b2_{j} = load <32 x i8>, ptr %qlq{j}, align 1
  %H_{j} = load <32 x i8>, ptr %qhp{j}, align 1
  %h0_{j} = shl <32 x i8> %hA_{j}, splat (i8 4)
  %hA_{j} = and <32 x i8> %H_{j}, splat (i8 3)
  %hB_{j} = and <32 x i8> %H_{j}, splat (i8 12)
  %h1_{j} = shl <32 x i8> %hB_{j}, splat (i8 2)
  %h2_{j} = and <32 x i8> %H_{j}, splat (i8 48)
  %hD_{j} = and <32 x i8> %H_{j}, splat (i8 -64)
  %h3_{j} = lshr <32 x i8> %hD_{j}, splat (i8 2)
  %l1_{j} = and <32 x i8> %b1_{j}, splat (i8 15)
  %l2_{j} = and <32 x i8> %b2_{j}, splat (i8 15)
  %u1_{j} = lshr <32 x i8> %b1_{j}, splat (i8 4)
  %u2_{j} = lshr <32 x i8> %b2_{j}, splat (i8 4)
  %q0_{j} = or <32 x i8> %l1_{j}, %h0_{j}
  %q1_{j} = or <32 x i8> %l2_{j}, %h1_{j}
  %q2_{j} = or <32 x i8> %u1_{j}, %h2_{j}
  %q3_{j} = or <32 x i8> %u2_{j}, %h3_{j}""")
        for k in range(4):
            body.append(f"""
  %xp{j}{k} = getelementptr inbounds i8, ptr %xb, i64 {128 * j + 32 * k}
  %x{j}{k} = load <32 x i8>, ptr %xp{j}{k}, align 1
  %p{j}{k} = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %q{k}_{j}, <32 x i8> %x{j}{k})
  %s{j}{k} = shufflevector <16 x i16> %sc16, <16 x i16> poison, {sc16(4 * j + k)}
  %m{j}{k} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %s{j}{k}, <16 x i16> %p{j}{k})""")
    # fix the order of the definitions of h0 (uses hA)
    text = "".join(body)
    for j in range(2):
        text = text.replace(f"  %h0_{j} = shl <32 x i8> %hA_{j}, splat (i8 4)\n  %hA_{j} = and <32 x i8> %H_{j}, splat (i8 3)\n",
                            f"  %hA_{j} = and <32 x i8> %H_{j}, splat (i8 3)\n  %h0_{j} = shl <32 x i8> %hA_{j}, splat (i8 4)\n")
    sums = "\n".join([f"  %t{j}{k} = add <8 x i32> %m{j}{2 * (k // 2)}, %m{j}{2 * (k // 2) + 1}" for j in range(2) for k in (0, 2)])
    return f"""
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare float @llvm.fma.f32(float, float, float)
declare i32 @llvm.vector.reduce.add.v8i32(<8 x i32>)

define float @edgert_q6k_dot(i64 %ql_a, i64 %qh_a, i64 %sc_a, i64 %d_a, i64 %x_a, i64 %xd_a, i64 %xs_a, i64 %nb, i64 %mode) alwaysinline {{
entry:
  %ql = inttoptr i64 %ql_a to ptr
  %qh = inttoptr i64 %qh_a to ptr
  %sc = inttoptr i64 %sc_a to ptr
  %d = inttoptr i64 %d_a to ptr
  %x = inttoptr i64 %x_a to ptr
  %xd = inttoptr i64 %xd_a to ptr
  %xs = inttoptr i64 %xs_a to ptr
  %tiled = icmp ne i64 %mode, 0
  br label %loop
loop:
  %b = phi i64 [0, %entry], [%b1, %loop]
  %acc = phi <8 x float> [zeroinitializer, %entry], [%accn, %loop]
  %acs = phi float [0.0, %entry], [%acsn, %loop]
  %qlo = mul i64 %b, 128
  %qlp0 = getelementptr inbounds i8, ptr %ql, i64 %qlo
  %qlq0 = getelementptr inbounds i8, ptr %qlp0, i64 32
  %qlp1 = getelementptr inbounds i8, ptr %qlp0, i64 64
  %qlq1 = getelementptr inbounds i8, ptr %qlp0, i64 96
  %qho = mul i64 %b, 64
  %qhp0 = getelementptr inbounds i8, ptr %qh, i64 %qho
  %qhp1 = getelementptr inbounds i8, ptr %qhp0, i64 32
  %xo = mul i64 %b, 256
  %xb = getelementptr inbounds i8, ptr %x, i64 %xo
  %so = mul i64 %b, 16
  %scp = getelementptr inbounds i8, ptr %sc, i64 %so
  %sc8 = load <16 x i8>, ptr %scp, align 1
  %sc16 = sext <16 x i8> %sc8 to <16 x i16>
  %xsp = getelementptr inbounds float, ptr %xs, i64 %so
  %bsf = load <16 x float>, ptr %xsp, align 4
  %bs16 = fptosi <16 x float> %bsf to <16 x i16>
  %subm = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %bs16, <16 x i16> %sc16)
  %sub = shl <8 x i32> %subm, splat (i32 5)
{text}
{sums}
  %v0 = add <8 x i32> %t00, %t02
  %v1 = add <8 x i32> %t10, %t12
  %v2 = add <8 x i32> %v0, %v1
  %sumi = sub <8 x i32> %v2, %sub
  %dwp = getelementptr inbounds float, ptr %d, i64 %b
  %dw = load float, ptr %dwp, align 4
  %dxp = getelementptr inbounds float, ptr %xd, i64 %b
  %dx = load float, ptr %dxp, align 4
  %dd = fmul float %dx, %dw
  %ddi = insertelement <8 x float> poison, float %dd, i64 0
  %ddv = shufflevector <8 x float> %ddi, <8 x float> poison, <8 x i32> zeroinitializer
  %sf = sitofp <8 x i32> %sumi to <8 x float>
  %accf = call <8 x float> @llvm.fma.v8f32(<8 x float> %ddv, <8 x float> %sf, <8 x float> %acc)
  %S = call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> %sumi)
  %Sf = sitofp i32 %S to float
  %dS = fmul float %dw, %Sf
  %acsf = call float @llvm.fma.f32(float %dS, float %dx, float %acs)
  %accn = select i1 %tiled, <8 x float> %acc, <8 x float> %accf
  %acsn = select i1 %tiled, float %acsf, float %acs
  %b1 = add i64 %b, 1
  %more = icmp ult i64 %b1, %nb
  br i1 %more, label %loop, label %exit
exit:
  %ha = shufflevector <8 x float> %accn, <8 x float> poison, <4 x i32> <i32 4, i32 5, i32 6, i32 7>
  %hb = shufflevector <8 x float> %accn, <8 x float> poison, <4 x i32> <i32 0, i32 1, i32 2, i32 3>
  %hc = fadd <4 x float> %ha, %hb
  %hd = shufflevector <4 x float> %hc, <4 x float> poison, <4 x i32> <i32 2, i32 3, i32 2, i32 3>
  %he = fadd <4 x float> %hc, %hd
  %hf = extractelement <4 x float> %he, i64 0
  %hg = extractelement <4 x float> %he, i64 1
  %hs = fadd float %hf, %hg
  %r = select i1 %tiled, float %acsn, float %hs
  ret float %r
}}
"""


def _kdot(name: str, ir_fn):
    @intrinsic
    def kdot(typingctx, a0, a1, a2, a3, a4, a5, a6, a7, a8):
        sig = types.float32(*([types.int64] * 9))

        def codegen(context, builder, signature, args):
            return _call_ir(context, builder, name, ir_fn(), ir.FloatType(), args)
        return sig, codegen
    return kdot


kdot_q6_K = _kdot("edgert_q6k_dot", _q6k_ir)


def _q4k_ir() -> str:
    """llama.cpp's repacked Q4_K kernels (ggml_gemv / ggml_gemm_q4_K_8x8_q8_K, AVX2) for one row
    and token: per 64 elements the exact integers I = sc_lo * (q_lo . x_lo) + sc_hi * (q_hi . x_hi)
    and M = min_lo * sum(x_lo) + min_hi * sum(x_hi); acc = fma(I, d * dx, acc) and
    accm = fma(M, dmin * dx, accm) per 64 elements (mode 1, its gemm) or per super-block on the
    summed integers (mode 0, its gemv); the result acc - accm."""
    pairs = []
    for j in range(4):
        pairs.append(f"""
  %qp{j} = getelementptr inbounds i8, ptr %qb, i64 {32 * j}
  %q{j} = load <32 x i8>, ptr %qp{j}, align 1
  %lo{j} = and <32 x i8> %q{j}, splat (i8 15)
  %hi{j} = lshr <32 x i8> %q{j}, splat (i8 4)
  %xlp{j} = getelementptr inbounds i8, ptr %xb, i64 {64 * j}
  %xl{j} = load <32 x i8>, ptr %xlp{j}, align 1
  %xhp{j} = getelementptr inbounds i8, ptr %xb, i64 {64 * j + 32}
  %xh{j} = load <32 x i8>, ptr %xhp{j}, align 1
  %pl{j} = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %lo{j}, <32 x i8> %xl{j})
  %ph{j} = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %hi{j}, <32 x i8> %xh{j})
  %wl{j} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %pl{j}, <16 x i16> splat (i16 1))
  %wh{j} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %ph{j}, <16 x i16> splat (i16 1))
  %scl{j} = extractelement <16 x i32> %sc32, i64 {2 * j}
  %sch{j} = extractelement <16 x i32> %sc32, i64 {2 * j + 1}
  %scli{j} = insertelement <8 x i32> poison, i32 %scl{j}, i64 0
  %sclv{j} = shufflevector <8 x i32> %scli{j}, <8 x i32> poison, <8 x i32> zeroinitializer
  %schi{j} = insertelement <8 x i32> poison, i32 %sch{j}, i64 0
  %schv{j} = shufflevector <8 x i32> %schi{j}, <8 x i32> poison, <8 x i32> zeroinitializer
  %vl{j} = mul <8 x i32> %wl{j}, %sclv{j}
  %vh{j} = mul <8 x i32> %wh{j}, %schv{j}
  %vI{j} = add <8 x i32> %vl{j}, %vh{j}
  %mnl{j} = extractelement <16 x i32> %sc32, i64 {8 + 2 * j}
  %mnh{j} = extractelement <16 x i32> %sc32, i64 {9 + 2 * j}
  %bl{j} = extractelement <8 x i32> %bs, i64 {2 * j}
  %bh{j} = extractelement <8 x i32> %bs, i64 {2 * j + 1}
  %I{j} = call i32 @llvm.vector.reduce.add.v8i32(<8 x i32> %vI{j})
  %ml{j} = mul i32 %mnl{j}, %bl{j}
  %mh{j} = mul i32 %mnh{j}, %bh{j}
  %M{j} = add i32 %ml{j}, %mh{j}
  %If{j} = sitofp i32 %I{j} to float
  %Mf{j} = sitofp i32 %M{j} to float
  %ga{j} = call float @llvm.fma.f32(float %If{j}, float %ds, float %ga{j - 1 if j else 'in'})
  %gm{j} = call float @llvm.fma.f32(float %Mf{j}, float %dm, float %gm{j - 1 if j else 'in'})""")
    text = "".join(pairs).replace("%gain", "%acc").replace("%gmin", "%accm")
    return f"""
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare float @llvm.fma.f32(float, float, float)
declare i32 @llvm.vector.reduce.add.v8i32(<8 x i32>)

define float @edgert_q4k_dot(i64 %qs_a, i64 %sc_a, i64 %d_a, i64 %m_a, i64 %x_a, i64 %xd_a, i64 %xs_a, i64 %nb, i64 %mode) alwaysinline {{
entry:
  %qs = inttoptr i64 %qs_a to ptr
  %sc = inttoptr i64 %sc_a to ptr
  %d = inttoptr i64 %d_a to ptr
  %m = inttoptr i64 %m_a to ptr
  %x = inttoptr i64 %x_a to ptr
  %xd = inttoptr i64 %xd_a to ptr
  %xs = inttoptr i64 %xs_a to ptr
  %gemm = icmp ne i64 %mode, 0
  br label %loop
loop:
  %b = phi i64 [0, %entry], [%b1, %loop]
  %acc = phi float [0.0, %entry], [%accn, %loop]
  %accm = phi float [0.0, %entry], [%accmn, %loop]
  %qo = mul i64 %b, 128
  %qb = getelementptr inbounds i8, ptr %qs, i64 %qo
  %xo = mul i64 %b, 256
  %xb = getelementptr inbounds i8, ptr %x, i64 %xo
  %so = mul i64 %b, 16
  %scp = getelementptr inbounds i8, ptr %sc, i64 %so
  %sc8 = load <16 x i8>, ptr %scp, align 1
  %sc32 = zext <16 x i8> %sc8 to <16 x i32>
  %bo = mul i64 %b, 8
  %xsp = getelementptr inbounds float, ptr %xs, i64 %bo
  %bsf = load <8 x float>, ptr %xsp, align 4
  %bs = fptosi <8 x float> %bsf to <8 x i32>
  %dwp = getelementptr inbounds float, ptr %d, i64 %b
  %dw = load float, ptr %dwp, align 4
  %dmp = getelementptr inbounds float, ptr %m, i64 %b
  %dmin = load float, ptr %dmp, align 4
  %dxp = getelementptr inbounds float, ptr %xd, i64 %b
  %dx = load float, ptr %dxp, align 4
  %ds = fmul float %dw, %dx
  %dm = fmul float %dmin, %dx
{text}
  %Ia = add i32 %I0, %I1
  %Ib = add i32 %I2, %I3
  %It = add i32 %Ia, %Ib
  %Ma = add i32 %M0, %M1
  %Mb = add i32 %M2, %M3
  %Mt = add i32 %Ma, %Mb
  %Itf = sitofp i32 %It to float
  %Mtf = sitofp i32 %Mt to float
  %va = call float @llvm.fma.f32(float %Itf, float %ds, float %acc)
  %vm = call float @llvm.fma.f32(float %Mtf, float %dm, float %accm)
  %accn = select i1 %gemm, float %ga3, float %va
  %accmn = select i1 %gemm, float %gm3, float %vm
  %b1 = add i64 %b, 1
  %more = icmp ult i64 %b1, %nb
  br i1 %more, label %loop, label %exit
exit:
  %r = fsub float %accn, %accmn
  ret float %r
}}
"""


kdot_q4_K = _kdot("edgert_q4k_dot", _q4k_ir)


@nb.njit(cache=True, parallel=True, nogil=True)
def matmul_rows_k(qtype, qs, qh, sc, d, m, x8, xd, xsum, out, nthreads):
    """out[T, R] = X @ W.T for a row-layout Q4_K / Q6_K matrix and Q8_K activations x8 [T, C]
    int8, xd [T, C / 256], xsum [T, C / S] integer sums as float32 (S = 32 / 16). The path per
    token is the one llama.cpp takes for this batch size: Q4_K its gemm for tokens in whole
    groups of 4 and its gemv for the rest; Q6_K its tiled kernel from 8 tokens, else vec_dot.
    Rows in groups of 16 against 64 tokens at a time, as matmul_rows."""
    R, nblk = d.shape
    T = x8.shape[0]
    n_gemm = T - T % 4
    tiled = 1 if T >= 8 else 0
    xs = x8.strides[0]
    ds = xd.strides[0]
    ss = xsum.strides[0]
    chunk = (R + nthreads - 1) // nthreads
    for c in nb.prange(nthreads):
        r_lo = c * chunk
        r_hi = min(R, r_lo + chunk)
        for g0 in range(r_lo, r_hi, 16):
            for t0 in range(0, T, 64):
                for r in range(g0, min(r_hi, g0 + 16)):
                    pq = qs.ctypes.data + r * qs.strides[0]
                    ph = qh.ctypes.data + r * qh.strides[0]
                    psc = sc.ctypes.data + r * sc.strides[0]
                    pd = d.ctypes.data + r * d.strides[0]
                    pm = (m.ctypes.data + r * m.strides[0]) if m.shape[1] else pd
                    for t in range(t0, min(T, t0 + 64)):
                        px = x8.ctypes.data + t * xs
                        pxd = xd.ctypes.data + t * ds
                        pxs = xsum.ctypes.data + t * ss
                        if qtype == 14:
                            out[t, r] = kdot_q6_K(pq, ph, psc, pd, px, pxd, pxs, nblk, tiled)
                        else:
                            out[t, r] = kdot_q4_K(pq, psc, pd, pm, px, pxd, pxs, nblk, 1 if t < n_gemm else 0)
