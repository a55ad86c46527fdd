"""edgert convert --to onnx: a GGUF model's dense blocks as ONNX graphs with their quantised weights.

One graph per block, each file small enough for protobuf's 2 GiB limit and loadable on its own:

| file             | inputs                                             | outputs                      |
|------------------|----------------------------------------------------|------------------------------|
| embed.onnx       | ids [T] int64                                      | x [T, n_embd]                |
| attn.L.onnx      | x [1, T, n_embd] (residual stream), past_key /     | o [1, T, n_embd] (to add to  |
|                  | past_value [1, n_head_kv, S, head_dim],            | x), present_key / _value     |
|                  | seqlens_k [1] int32 (= total - 1), total_sequence_ | (the past buffers, written   |
|                  | length [] int32, cos_cache / sin_cache [S, n_rot/2]| in place when bound to them) |
| ffn.L.onnx       | xn [1, T, n_embd] (after the layer's FFN norm)     | o [1, T, n_embd]             |
| head.onnx        | x [1, T, n_embd]                                   | logits [1, T, n_vocab]       |

Attention: the layer's norm, q/k/v (+ biases, + q/k norms), ONNX Runtime's GroupQueryAttention
(rotary inside, from the caller's cos / sin tables; a sliding window as `local_window_size`),
the output projection and any post-attention norm. Weights stay in their GGUF quantisation:
converters/nbits.py maps each ggml type onto MatMulNBits / GatherBlockQuantized losslessly. The
FFN's norms are the caller's (edgert applies them around any FFN store, dense or not);
mixture-of-experts layers export no FFN graph: their experts stay in edgert's expert store.

manifest.json says which blocks exist, how they connect, and what the caller provides (rope
tables, KV buffers, residual adds). The directory is written beside its target and renamed into
place: a killed convert leaves no export a run could pick up.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import numpy as np

from edgert.config import ModelConfig, config_from_gguf
from edgert.errors import EdgertError
from edgert.fileio import sha256_file
from edgert.gguf_file import GGUFFile, type_name

log = logging.getLogger(__name__)

FORMAT = "edgert-onnx"
VERSION = 2  # 2: sliding window as GroupQueryAttention counts it (the attended positions, self included)
OPSETS = (("", 21), ("com.microsoft", 1))
MS = "com.microsoft"
FLOAT_TYPES = (0, 1)  # F32, F16
# What a matrix product does to its activations (MatMulNBits accuracy_level): `f32` multiplies
# float32 activations by the exact weights (level 0); `int8` lets ONNX Runtime quantise
# activations to int8 per block first (level 4), as llama.cpp's CPU kernels do with their own
# rounding; `mixed` (the default) is f32 for 4-bit weights and int8 for 8-bit ones, whose float32
# path in ONNX Runtime 1.32 is slow (measured on SmolLM2's Q8_0 LM head: 133 ms a token at level 0,
# 1.5 ms at level 4; docs/backends.md).
ACTIVATIONS = ("mixed", "f32", "int8")


def accuracy_level(acts: str, bits: int) -> int:
    return 4 if acts == "int8" or (acts == "mixed" and bits == 8) else 0


class Builder:
    """Nodes and initializers of one graph, with fresh value names."""

    def __init__(self, name: str, acts: str = "mixed"):
        self.name, self.nodes, self.inits, self.n, self.acts = name, [], [], 0, acts

    def fresh(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def const(self, arr: np.ndarray, stem: str = "c") -> str:
        from onnx import numpy_helper
        name = self.fresh(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op: str, *inputs, n_out: int = 1, outputs=None, domain: str = "", **attrs):
        from onnx import helper
        outs = outputs or [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, [i or "" for i in inputs], outs, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def model(self, inputs, outputs):
        from onnx import helper
        g = helper.make_graph(self.nodes, self.name, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS],
                              producer_name="edgert")
        m.ir_version = 10
        return m


def _vi(name, elem, shape):
    from onnx import helper
    return helper.make_tensor_value_info(name, elem, shape)


def linear(b: Builder, x: str, g: GGUFFile, name: str, bias: str | None = None) -> str:
    """x [..., K] @ W^T for the GGUF matrix `name` [N, K], in its own quantisation."""
    from edgert.converters.nbits import to_nbits
    t = g.tensor(name)
    N, K = t.rows, t.cols
    if t.qtype in FLOAT_TYPES:
        w = g.raw(name).view(np.float32 if t.qtype == 0 else np.float16).reshape(N, K).astype(np.float32)
        y = b.op("MatMul", x, b.const(np.ascontiguousarray(w.T), "w"))
        return b.op("Add", y, bias) if bias else y
    q = to_nbits(t.qtype, g.raw(name), N, K, name)
    ins = [x, b.const(q.packed(), "w"), b.const(q.scales, "scales")]
    zp = q.packed_zero_points()
    ins.append(b.const(zp, "zp") if zp is not None else None)
    y = b.op("MatMulNBits", *ins, domain=MS, K=K, N=N, bits=q.bits, block_size=q.block,
             accuracy_level=accuracy_level(b.acts, q.bits))
    if q.mins is not None:  # + blocksum(x) @ mins^T: the per-block minimum, exactly as stored
        nb = K // q.block
        xs = b.op("Reshape", x, b.const(np.array([0, 0, nb, q.block], np.int64), "shape"))
        bs = b.op("ReduceSum", xs, b.const(np.array([-1], np.int64), "axes"), keepdims=0)
        y = b.op("Add", y, b.op("MatMul", bs, b.const(np.ascontiguousarray(q.mins.T), "mins")))
    return b.op("Add", y, bias) if bias else y


def rmsnorm(b: Builder, x: str, w: np.ndarray, eps: float) -> str:
    return b.op("SimplifiedLayerNormalization", x, b.const(w, "norm"), axis=-1, epsilon=float(eps))


def attention_graph(g: GGUFFile, c: ModelConfig, il: int, acts: str):
    from onnx import TensorProto as TP
    F = TP.FLOAT
    E, H, Hkv, D = c.n_embd, c.n_head, c.n_head_kv, c.head_dim
    p = f"blk.{il}."
    b = Builder(f"attention_{il}", acts)

    def vec(name, n):
        return g.load_vector(name, n)

    def bias(name, n):
        return b.const(vec(name, n), "bias") if name in g.tensors else None

    xn = rmsnorm(b, "x", vec(p + "attn_norm.weight", E), c.rms_eps)
    q = linear(b, xn, g, p + "attn_q.weight", bias(p + "attn_q.bias", H * D))
    k = linear(b, xn, g, p + "attn_k.weight", bias(p + "attn_k.bias", Hkv * D))
    v = linear(b, xn, g, p + "attn_v.weight", bias(p + "attn_v.bias", Hkv * D))
    if c.qk_norm:
        def qk(t, name, n_h):
            if c.qk_norm_full:
                return rmsnorm(b, t, vec(name, n_h * D), c.rms_eps)
            t4 = b.op("Reshape", t, b.const(np.array([0, 0, n_h, D], np.int64), "shape"))
            t4 = rmsnorm(b, t4, vec(name, D), c.rms_eps)
            return b.op("Reshape", t4, b.const(np.array([0, 0, n_h * D], np.int64), "shape"))
        q = qk(q, p + "attn_q_norm.weight", H)
        k = qk(k, p + "attn_k_norm.weight", Hkv)
    window = c.swa_window if c.is_swa(il) else 0
    att, _, _ = b.op("GroupQueryAttention", q, k, v, "past_key", "past_value", "seqlens_k",
                     "total_sequence_length", "cos_cache", "sin_cache",
                     outputs=[b.fresh("att"), "present_key", "present_value"], domain=MS,
                     num_heads=H, kv_num_heads=Hkv, scale=float(np.float32(c.kq_scale) * np.float32(c.q_scale)),
                     do_rotary=1, rotary_interleaved=0 if c.rope_neox else 1,
                     local_window_size=window if window > 0 else -1)
    o = linear(b, att, g, p + "attn_output.weight")
    if c.post_norms:
        o = rmsnorm(b, o, vec(p + "post_attention_norm.weight", E), c.rms_eps)
    b.op("Identity", o, outputs=["o"])
    kv = [1, Hkv, "max_seq", D]
    return b.model(
        [_vi("x", F, [1, "T", E]), _vi("past_key", F, kv), _vi("past_value", F, kv),
         _vi("seqlens_k", TP.INT32, [1]), _vi("total_sequence_length", TP.INT32, []),
         _vi("cos_cache", F, ["max_seq", c.n_rot // 2]), _vi("sin_cache", F, ["max_seq", c.n_rot // 2])],
        [_vi("o", F, [1, "T", E]), _vi("present_key", F, kv), _vi("present_value", F, kv)])


def ffn_graph(g: GGUFFile, c: ModelConfig, il: int, acts: str):
    from onnx import TensorProto as TP
    p = f"blk.{il}."
    b = Builder(f"ffn_{il}", acts)
    gate = linear(b, "xn", g, p + "ffn_gate.weight")
    up = linear(b, "xn", g, p + "ffn_up.weight")
    if c.ffn_act == "gelu":  # ggml's GELU is the tanh approximation
        act = b.op("Gelu", gate, approximate="tanh")
    else:
        act = b.op("Mul", gate, b.op("Sigmoid", gate))
    h = b.op("Mul", act, up)
    o = linear(b, h, g, p + "ffn_down.weight")
    b.op("Identity", o, outputs=["o"])
    return b.model([_vi("xn", TP.FLOAT, [1, "T", c.n_embd])], [_vi("o", TP.FLOAT, [1, "T", c.n_embd])])


def embed_graph(g: GGUFFile, c: ModelConfig):
    from onnx import TensorProto as TP
    from edgert.converters.nbits import to_nbits
    b = Builder("embed")
    name = "token_embd.weight"
    t = g.tensor(name)
    V, E = t.rows, t.cols
    if t.qtype in FLOAT_TYPES:
        w = g.raw(name).view(np.float32 if t.qtype == 0 else np.float16).reshape(V, E).astype(np.float32)
        x = b.op("Gather", b.const(w, "embd"), "ids", axis=0)
    else:
        q = to_nbits(t.qtype, g.raw(name), V, E, name)
        data = q.codes if q.bits == 8 else (q.codes[:, 0::2] | (q.codes[:, 1::2] << 4)).astype(np.uint8)
        zp = q.packed_zero_points()
        if zp is None:  # GatherBlockQuantized has no default zero point for uint8 data
            nb = E // q.block
            zp = np.full((V, nb), q.zp, np.uint8) if q.bits == 8 else np.full((V, (nb + 1) // 2), q.zp * 17, np.uint8)
        x = b.op("GatherBlockQuantized", b.const(data, "embd"), "ids", b.const(q.scales, "scales"), b.const(zp, "zp"),
                 domain=MS, gather_axis=0, quantize_axis=1, block_size=q.block, bits=q.bits)
        if q.mins is not None:
            m = b.op("Gather", b.const(q.mins, "mins"), "ids", axis=0)                      # [T, nb]
            x3 = b.op("Reshape", x, b.const(np.array([0, E // q.block, q.block], np.int64), "shape"))
            x3 = b.op("Add", x3, b.op("Unsqueeze", m, b.const(np.array([-1], np.int64), "axes")))
            x = b.op("Reshape", x3, b.const(np.array([0, E], np.int64), "shape"))
    if c.embed_scale != 1.0:
        x = b.op("Mul", x, b.const(np.array(c.embed_scale, np.float32), "scale"))
    b.op("Identity", x, outputs=["x"])
    return b.model([_vi("ids", TP.INT64, ["T"])], [_vi("x", TP.FLOAT, ["T", E])])


def head_graph(g: GGUFFile, c: ModelConfig, acts: str):
    from onnx import TensorProto as TP
    b = Builder("head", acts)
    xn = rmsnorm(b, "x", g.load_vector("output_norm.weight", c.n_embd), c.rms_eps)
    name = "token_embd.weight" if c.tied_embeddings else "output.weight"
    b.op("Identity", linear(b, xn, g, name), outputs=["logits"])
    return b.model([_vi("x", TP.FLOAT, [1, "T", c.n_embd])], [_vi("logits", TP.FLOAT, [1, "T", c.n_vocab])])


def check_supported(g: GGUFFile, c: ModelConfig):
    """A one-line error naming the first tensor type the export cannot map (before writing anything)."""
    from edgert.converters.nbits import BLOCK_VALUES
    for name, t in g.tensors.items():
        if len(t.shape) < 2 or "_exps" in name or name.startswith("edgert."):
            continue
        if t.qtype not in BLOCK_VALUES and t.qtype not in FLOAT_TYPES:
            raise EdgertError(f"{g.path}: tensor '{name}' is {type_name(t.qtype)}: no lossless ONNX mapping "
                              f"(types: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)")


def rope_tables(c: ModelConfig, il: int, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's cos / sin caches [n_pos, n_rot / 2] for layer il (ggml's frequencies:
    theta_i = p * freq_scale * base^(-2i / n_rot))."""
    base, scale = c.rope_base_for(il), c.rope_scale_for(il)
    inv = base ** (-np.arange(0, c.n_rot, 2, dtype=np.float64) / c.n_rot)
    ang = np.arange(n_pos, dtype=np.float64)[:, None] * scale * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def export(src: str, out_dir: str, acts: str = "mixed", progress=None) -> dict:
    """Write src's blocks as ONNX graphs into out_dir (replacing it whole); returns the manifest."""
    import onnx
    if acts not in ACTIVATIONS:
        raise EdgertError(f"--activations {acts}: one of {', '.join(ACTIVATIONS)}")
    g = GGUFFile(src)
    try:
        c = config_from_gguf(g)
        check_supported(g, c)
        parent = os.path.dirname(os.path.abspath(out_dir)) or "."
        if not os.path.isdir(parent):
            raise EdgertError(f"{out_dir}: directory {parent} does not exist")
        if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, "manifest.json")) \
                and os.listdir(out_dir):
            raise EdgertError(f"{out_dir}: exists and is not an edgert export (no manifest.json): not replaced")
        tmp = tempfile.mkdtemp(prefix=".edgert-export-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the export private
        try:
            layers = []
            jobs = [("embed.onnx", lambda: embed_graph(g, c))]
            for il in range(c.n_layer):
                jobs.append((f"attn.{il}.onnx", lambda il=il: attention_graph(g, c, il, acts)))
                if not c.moe:
                    jobs.append((f"ffn.{il}.onnx", lambda il=il: ffn_graph(g, c, il, acts)))
                layers.append({"attention": f"attn.{il}.onnx", "ffn": None if c.moe else f"ffn.{il}.onnx",
                               "window": c.swa_window if c.is_swa(il) else 0,
                               "rope_base": c.rope_base_for(il), "rope_freq_scale": c.rope_scale_for(il)})
            jobs.append(("head.onnx", lambda: head_graph(g, c, acts)))
            for i, (fname, make) in enumerate(jobs):
                onnx.save(make(), os.path.join(tmp, fname))
                if progress:
                    progress("export", i + 1, len(jobs))
            manifest = {
                "format": FORMAT, "version": VERSION, "arch": c.arch, "name": c.name,
                "source": os.path.abspath(src), "source_size": os.path.getsize(src),
                "source_sha256": sha256_file(src), "activations": acts,
                "opsets": dict(OPSETS), "n_layer": c.n_layer, "n_embd": c.n_embd, "n_vocab": c.n_vocab,
                "n_head": c.n_head, "n_head_kv": c.n_head_kv, "head_dim": c.head_dim, "n_rot": c.n_rot,
                "rope_interleaved": not c.rope_neox,
                "embed": "embed.onnx", "head": "head.onnx", "layers": layers,
                "kv": {"layout": "BNSH [1, n_head_kv, max_seq, head_dim]", "dtype": "float32",
                       "owner": "caller: binds one buffer as past and present (written in place)"},
                "caller": ["x += attention o; x += ffn o (residual adds)",
                           "ffn input: the layer's ffn_norm(x); post-FFN norm (gemma3) after it",
                           "cos_cache / sin_cache per layer: cos / sin(p * rope_freq_scale * rope_base^(-2i / n_rot))",
                           "mixture of experts: ffn null, the experts run in edgert's expert store"],
            }
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(manifest, f, indent=1)
            _replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        g.close()
    return manifest


def _replace_dir(tmp: str, out_dir: str):
    """Move the finished export into place; an older export there goes only after the new one is in."""
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str) -> dict:
    """An export directory's manifest (ONNX or TFLite), checked: a clear error naming the file otherwise."""
    from edgert.converters import tflite_export
    versions = {FORMAT: VERSION, tflite_export.FORMAT: tflite_export.VERSION}
    mf = os.path.join(path, "manifest.json")
    try:
        with open(mf) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise EdgertError(f"{path}: not an edgert export (no manifest.json; write one with "
                          f"`edgert convert MODEL --to onnx|tflite -o {path}`)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise EdgertError(f"{mf}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("format"), str) or m["format"] not in versions:
        raise EdgertError(f"{mf}: not an edgert export manifest")
    if m.get("version") != versions[m["format"]]:
        raise EdgertError(f"{mf}: export format version {m.get('version')!r}, this edgert reads "
                          f"{versions[m['format']]}: convert again")
    try:
        if not isinstance(m["layers"], list) or not all(isinstance(L, dict) for L in m["layers"]):
            raise TypeError("'layers'")
        files = [m["embed"], m["head"]] + [L["attention"] for L in m["layers"]] + \
            [L["ffn"] for L in m["layers"] if L["ffn"] is not None]
        src = m["source"]
        for L in m["layers"]:
            float(L["rope_base"]), float(L["rope_freq_scale"]), int(L["window"])
    except (KeyError, TypeError, ValueError) as e:
        raise EdgertError(f"{mf}: manifest lacks or garbles {e}") from None
    for f in files:
        if not isinstance(f, str) or os.path.basename(f) != f or not os.path.isfile(os.path.join(path, f)):
            raise EdgertError(f"{mf}: block file {f!r} is missing from {path}")
    if not isinstance(src, str) or not os.path.isfile(src):
        raise EdgertError(f"{mf}: its source model {src!r} is not there (the export runs with it: "
                          f"tokenizer, config, norms)")
    if not isinstance(m.get("source_size"), int) or os.path.getsize(src) != m["source_size"]:
        raise EdgertError(f"{mf}: its source {src} changed since the export (size differs): convert again")
    if m["format"] == tflite_export.FORMAT:
        for k in ("n_ctx", "prefill_batch"):
            if not isinstance(m.get(k), int) or m[k] < 1:
                raise EdgertError(f"{mf}: {k} {m.get(k)!r} is not a positive integer")
    return m


def check_against(m: dict, c: ModelConfig, path: str):
    """The manifest describes the model its source is: one block per layer, an FFN graph in each
    exactly when the model is dense."""
    mf = os.path.join(path, "manifest.json")
    if len(m["layers"]) != c.n_layer:
        raise EdgertError(f"{mf}: {len(m['layers'])} layers, its source model has {c.n_layer}")
    for il, L in enumerate(m["layers"]):
        if (L["ffn"] is None) != c.moe:
            raise EdgertError(f"{mf}: layer {il} " + ("has an FFN graph, but the model is a mixture of experts"
                              if c.moe else "has no FFN graph"))
