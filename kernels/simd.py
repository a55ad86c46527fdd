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


def _library(context, qtype, nt):
    """A code library holding the IR function (linked into, and inlined by, each caller)."""
    lib = context.codegen().create_library(fn_name(qtype, nt))
    mod = llb.parse_assembly(ir_text(qtype, nt))
    mod.verify()
    lib.add_llvm_module(mod)
    return lib


def _make(qtype: int, nt: int):
    @intrinsic
    def vecdot(typingctx, qs, qh, d, m, x, xd, xs, nblk, xstride, xdstride, out, ostride):
        sig = types.void(*([types.int64] * 12))

        def codegen(context, builder, signature, args):
            context.add_linking_libs([_library(context, qtype, nt)])
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64)] * 12)
            fn = cgutils.get_or_insert_function(builder.module, fnty, fn_name(qtype, nt))
            builder.call(fn, args)
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
