"""edgert convert --to tflite: a GGUF model's dense blocks as TFLite graphs, through litert-torch.

Each block is a small PyTorch module built from the GGUF's weights (dequantised to float32 by
gguf-py), converted with litert-torch with two signatures, `decode` (1 token) and `prefill`
(`prefill_batch` tokens, padded by the caller), and quantised by litert-torch's dynamic int8
recipe (int8 channel-wise weights, activations quantised at run time): TFLite has no GGUF block
types, so unlike the ONNX export this one re-quantises (its cost is measured, docs/backends.md).

TFLite graphs have static shapes: the KV cache is the caller's, [1, n_head_kv, n_ctx, head_dim]
float32 per layer, fixed at export (`n_ctx`); an attention block reads all of it with the caller's
additive mask [1, 1, T, n_ctx + T] (cached positions, then the T new ones) and returns the new
positions' K and V for the caller to store. The same files as the ONNX export (manifest.json,
embed / attn.L / ffn.L / head), `.tflite`.

litert-torch needs torch 2.13.0 and brings SciPy, JAX and transformers; Numba imports SciPy when it
is installed, which grows every edgert process's fixed cost, so the converter runs in its own
environment (`make litert`: EDGERT_CACHE/litert-venv) and `edgert convert --to tflite` calls it
there. The runtime side needs only ai-edge-litert.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from edgert.errors import EdgertError

FORMAT = "edgert-tflite"
VERSION = 2  # 2: KV cache [1, n_head_kv, n_ctx, head_dim]


def _dequant(g, name):
    import gguf
    t = g.tensor(name)
    raw = g.raw(name)
    if t.qtype == 0:
        return raw.view(np.float32).reshape(t.rows, t.cols).copy()
    if t.qtype == 1:
        return raw.view(np.float16).reshape(t.rows, t.cols).astype(np.float32)
    return gguf.quants.dequantize(raw.reshape(t.rows, -1), t.qtype).reshape(t.rows, t.cols).astype(np.float32)


def _modules(g, c):
    import torch

    def P(a):
        return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(a)), requires_grad=False)

    def lin(name):
        return P(_dequant(g, name))

    def vec(name):
        return P(g.load_vector(name, g.tensor(name).cols))

    def rms(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + c.rms_eps) * w

    E, H, Hkv, D, R = c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_rot

    def rope(t, cos, sin):  # t [1, T, h, D]; cos / sin [T, R / 2]
        T = t.shape[1]
        cs, sn = cos.view(1, T, 1, R // 2), sin.view(1, T, 1, R // 2)
        r, rest = t[..., :R], t[..., R:]
        if c.rope_neox:
            a, b = r[..., :R // 2], r[..., R // 2:]
            r = torch.cat([a * cs - b * sn, b * cs + a * sn], -1)
        else:  # pairs (2i, 2i + 1)
            a, b = r[..., 0::2], r[..., 1::2]
            r = torch.stack([a * cs - b * sn, b * cs + a * sn], -1).reshape(r.shape)
        return torch.cat([r, rest], -1) if R < D else r

    class Attention(torch.nn.Module):
        def __init__(self, il):
            super().__init__()
            p = f"blk.{il}."
            self.norm = vec(p + "attn_norm.weight")
            self.wq, self.wk, self.wv, self.wo = (lin(p + f"attn_{k}.weight") for k in ("q", "k", "v", "output"))
            self.bias = (p + "attn_q.bias") in g.tensors
            if self.bias:
                self.bq, self.bk, self.bv = (vec(p + f"attn_{k}.bias") for k in ("q", "k", "v"))
            if c.qk_norm:
                self.qn, self.kn = vec(p + "attn_q_norm.weight"), vec(p + "attn_k_norm.weight")
            if c.post_norms:
                self.pn = vec(p + "post_attention_norm.weight")
            self.scale = float(np.float32(c.kq_scale) * np.float32(c.q_scale))

        def forward(self, x, kc, vc, cos, sin, mask):
            T = x.shape[1]
            xn = rms(x, self.norm)
            q, k, v = xn @ self.wq.T, xn @ self.wk.T, xn @ self.wv.T
            if self.bias:
                q, k, v = q + self.bq, k + self.bk, v + self.bv
            if c.qk_norm and c.qk_norm_full:
                q, k = rms(q, self.qn), rms(k, self.kn)
            q, k, v = q.view(1, T, H, D), k.view(1, T, Hkv, D), v.view(1, T, Hkv, D)
            if c.qk_norm and not c.qk_norm_full:
                q, k = rms(q, self.qn), rms(k, self.kn)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            # grouped heads as batched matrix products over the [1, n_head_kv, n_ctx, head_dim]
            # cache (no repeat of K / V, no einsum: both lowered to slow gathers / transposes)
            G = H // Hkv
            qg = q.view(1, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(1, Hkv, G * T, D)
            kt, vt = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)            # [1, n_head_kv, T, D]
            s = torch.cat([qg @ kc.transpose(-1, -2), qg @ kt.transpose(-1, -2)], -1) * self.scale
            s = s.view(1, Hkv, G, T, -1) + mask.view(1, 1, 1, T, -1)
            p = torch.softmax(s, -1).view(1, Hkv, G * T, -1)
            N = kc.shape[2]
            og = p[..., :N] @ vc + p[..., N:] @ vt                              # [1, n_head_kv, G * T, D]
            o = og.view(1, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(1, T, H * D) @ self.wo.T
            if c.post_norms:
                o = rms(o, self.pn)
            return o, k, v

    class FFN(torch.nn.Module):
        def __init__(self, il):
            super().__init__()
            p = f"blk.{il}."
            self.wg, self.wu, self.wd = (lin(p + f"ffn_{k}.weight") for k in ("gate", "up", "down"))

        def forward(self, xn):
            gt = xn @ self.wg.T
            a = torch.nn.functional.gelu(gt, approximate="tanh") if c.ffn_act == "gelu" else torch.nn.functional.silu(gt)
            return (a * (xn @ self.wu.T)) @ self.wd.T

    class Embed(torch.nn.Module):
        """Rows gathered as the GGUF holds them (converters/nbits.py: codes, block scales, mins),
        dequantised after the gather: the table stays ~1 byte a value and exact."""

        def __init__(self):
            super().__init__()
            from edgert.converters.nbits import BLOCK_VALUES, to_nbits
            t = g.tensor("token_embd.weight")
            self.q = None
            if t.qtype in BLOCK_VALUES:
                self.q = to_nbits(t.qtype, g.raw("token_embd.weight"), t.rows, t.cols, "token_embd.weight")
                # int8 (code - 128): the lowering takes no unsigned constants
                self.register_buffer("codes", torch.from_numpy((self.q.codes.astype(np.int16) - 128).astype(np.int8)))
                self.register_buffer("scales", torch.from_numpy(self.q.scales))
                if self.q.mins is not None:
                    self.register_buffer("mins", torch.from_numpy(self.q.mins))
            else:
                self.w = lin("token_embd.weight")

        def forward(self, ids):
            if self.q is None:
                return self.w[ids] * float(c.embed_scale)
            T, B = ids.shape[0], self.q.block
            x = (self.codes[ids].to(torch.float32) - float(self.q.zp - 128)).view(T, -1, B) * self.scales[ids].view(T, -1, 1)
            if self.q.mins is not None:
                x = x + self.mins[ids].view(T, -1, 1)
            return x.reshape(T, -1) * float(c.embed_scale)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = vec("output_norm.weight")
            self.w = lin("token_embd.weight" if c.tied_embeddings else "output.weight")

        def forward(self, x):
            return rms(x, self.norm) @ self.w.T

    return Attention, FFN, Embed, Head


# litert-torch's recipes (its supported_schemes): weights int8 per channel with int8 activations
# at run time (default), int8 weights only (float activations), int4 in blocks of 32 (int8
# activations), fp16 weights, or float32 as they are
QUANT = {"int8": "int8 channel-wise weights, dynamic int8 activations",
         "int8-weights": "int8 channel-wise weights, float32 activations",
         "int4": "int4 weights in blocks of 32, dynamic int8 activations",
         "fp16": "fp16 weights", "none": "float32 weights"}


def _recipe(quant: str):
    if quant == "none":
        return None
    from litert_torch.generative.quantize import quant_attrs as qa, quant_recipes as qr
    if quant == "int8":
        return qr.full_dynamic_recipe()
    if quant == "int8-weights":
        return qr.full_weight_only_recipe()
    if quant == "int4":
        return qr.full_dynamic_recipe(weight_dtype=qa.Dtype.INT4, granularity=qa.Granularity.BLOCKWISE_32)
    return qr.full_fp16_recipe()


def _convert(module, samples: dict, quant: str, path: str):
    """module with one signature per {name: kwargs} -> path (.tflite)."""
    import litert_torch
    conv = None
    for name, kw in samples.items():
        conv = (litert_torch.signature if conv is None else conv.signature)(name, module.eval(), sample_kwargs=kw)
    conv.convert(quant_config=_recipe(quant)).export(path)


def export_here(src: str, out_dir: str, n_ctx: int, prefill_batch: int, quant: str, progress=None) -> dict:
    """The conversion itself (in an environment with litert-torch): into out_dir (a fresh directory)."""
    import torch

    from edgert.config import config_from_gguf
    from edgert.fileio import sha256_file
    from edgert.gguf_file import GGUFFile
    g = GGUFFile(src)
    c = config_from_gguf(g)
    if c.moe:
        raise EdgertError(f"{src}: --to tflite exports dense models only (a mixture of experts: --to onnx)")
    Attention, FFN, Embed, Head = _modules(g, c)
    E, Hkv, D, R = c.n_embd, c.n_head_kv, c.head_dim, c.n_rot
    f32 = torch.float32

    def attn_kw(T):
        return dict(x=torch.zeros(1, T, E, dtype=f32), kc=torch.zeros(1, Hkv, n_ctx, D, dtype=f32),
                    vc=torch.zeros(1, Hkv, n_ctx, D, dtype=f32), cos=torch.zeros(T, R // 2, dtype=f32),
                    sin=torch.zeros(T, R // 2, dtype=f32), mask=torch.zeros(1, 1, T, n_ctx + T, dtype=f32))
    sigs = {"decode": 1, "prefill": prefill_batch}
    jobs = [("embed.tflite", Embed, {k: dict(ids=torch.zeros(T, dtype=torch.int32)) for k, T in sigs.items()})]
    layers = []
    for il in range(c.n_layer):
        jobs.append((f"attn.{il}.tflite", lambda il=il: Attention(il), {k: attn_kw(T) for k, T in sigs.items()}))
        jobs.append((f"ffn.{il}.tflite", lambda il=il: FFN(il), {k: dict(xn=torch.zeros(1, T, E, dtype=f32))
                                                                  for k, T in sigs.items()}))
        layers.append({"attention": f"attn.{il}.tflite", "ffn": f"ffn.{il}.tflite",
                       "window": c.swa_window if c.is_swa(il) else 0,
                       "rope_base": c.rope_base_for(il), "rope_freq_scale": c.rope_scale_for(il)})
    jobs.append(("head.tflite", Head, {k: dict(x=torch.zeros(1, T, E, dtype=f32)) for k, T in sigs.items()}))
    for i, (fname, make, samples) in enumerate(jobs):
        _convert(make(), samples, quant, os.path.join(out_dir, fname))
        if progress:
            progress(i + 1, len(jobs))
    manifest = {"format": FORMAT, "version": VERSION, "arch": c.arch, "name": c.name,
                "source": os.path.abspath(src), "source_size": os.path.getsize(src), "source_sha256": sha256_file(src),
                "quantization": f"{quant}: {QUANT[quant]} (litert-torch); the embedding: the GGUF's own blocks",
                "n_ctx": n_ctx, "prefill_batch": prefill_batch, "n_layer": c.n_layer,
                "embed": "embed.tflite", "head": "head.tflite", "layers": layers,
                "kv": {"layout": "[1, n_head_kv, n_ctx, head_dim]", "dtype": "float32",
                       "owner": "caller: passes the cache in, stores the returned new K / V"},
                "signatures": sigs}
    g.close()
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def converter_python() -> str:
    """The interpreter that has litert-torch: this one, EDGERT_LITERT_PYTHON, or `make litert`'s venv."""
    try:
        import litert_torch  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    from edgert.settings import env
    py = os.environ.get("EDGERT_LITERT_PYTHON") or os.path.join(
        os.path.expanduser(env("EDGERT_CACHE")), "litert-venv", "bin", "python")
    if not os.path.isfile(py):
        raise EdgertError("--to tflite needs litert-torch (with torch 2.13.0) in its own environment: run "
                          "`make litert` (or set EDGERT_LITERT_PYTHON to a Python that has it)")
    return py


def export(src: str, out_dir: str, n_ctx: int = 1024, prefill_batch: int = 32, quant: str = "int8") -> dict:
    """Write src's blocks as TFLite graphs into out_dir (temp directory + rename; an earlier
    export there is replaced only once the new one is complete)."""
    from edgert.converters.onnx_export import _replace_dir
    if quant not in QUANT:
        raise EdgertError(f"--tflite-quant {quant}: one of {', '.join(QUANT)}")
    if n_ctx < 1 or prefill_batch < 1:
        raise EdgertError("--ctx-size and --prefill-batch must be at least 1")
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    if not os.path.isdir(parent):
        raise EdgertError(f"{out_dir}: directory {parent} does not exist")
    if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, "manifest.json")) and os.listdir(out_dir):
        raise EdgertError(f"{out_dir}: exists and is not an edgert export (no manifest.json): not replaced")
    py = converter_python()
    tmp = tempfile.mkdtemp(prefix=".edgert-export-", dir=parent)
    try:
        # the converter's environment first (torch, litert-torch), then this one's packages, edgert
        # included (an editable install's finder is a .pth: site.addsitedir runs it)
        import sysconfig
        boot = ("import site, sys, runpy; site.addsitedir(sys.argv.pop(1)); "
                "runpy.run_module('edgert.converters.tflite_export', run_name='__main__')")
        r = subprocess.run([py, "-c", boot, sysconfig.get_paths()["purelib"], src, tmp, str(n_ctx), str(prefill_batch),
                            quant], capture_output=True, text=True)
        if r.returncode != 0:
            last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or ["(no message)"]
            raise EdgertError(f"{src}: the TFLite conversion failed: {last[0][:400]}")
        with open(os.path.join(tmp, "manifest.json")) as f:
            manifest = json.load(f)
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


if __name__ == "__main__":  # the converter's own process (see export)
    a = sys.argv[1:]
    try:
        export_here(a[0], a[1], int(a[2]), int(a[3]), a[4])
    except EdgertError as e:
        print(f"edgert: {e}", file=sys.stderr)
        sys.exit(1)
