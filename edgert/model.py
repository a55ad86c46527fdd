"""The transformer forward pass: weights, KV cache, `prefill` and `decode_one_token`.

One readable module for every supported architecture; the differences are ModelConfig data.
Buffers are allocated once (for up to n_batch tokens); the decode loop allocates nothing large.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from edgert import residency
from edgert.budget import MemoryBudget, kv_bytes, measured, rss, scratch_bytes
from edgert.config import ModelConfig, config_from_gguf
from edgert.errors import EdgertError
from edgert.experts import router_logits
from edgert.ffn import DenseFFN, FFNScratch, StoreStats, StreamFFN
from edgert.kv_cache import KVCache, KVFormat
from edgert.streamed import FlashMatrix, FlashRows, Streamer
from edgert.flash import FlashReader
from edgert.package import cluster_layout, is_package, open_package, verify_once
from edgert.placement import FFN_NAMES, _role, plan_placement
from edgert.settings import env
from edgert.gguf_file import GGUFFile
from edgert.kernels.activation import geglu, swiglu
from edgert.kernels.matmul import _THREADS, ActBuffers, matmul, matmuls
from edgert.kernels.norm import rmsnorm
from edgert.kernels.quant import QMatrix, dequantize_row
from edgert.kernels.rope import rope, theta_scale

log = logging.getLogger(__name__)
_JIT_SETTLED = []  # non-empty once a forward pass has run in this process


@dataclass
class Layer:
    attn_norm: np.ndarray        # [n_embd]
    wq: QMatrix                  # [n_head * head_dim, n_embd]
    wk: QMatrix                  # [n_head_kv * head_dim, n_embd]
    wv: QMatrix                  # [n_head_kv * head_dim, n_embd]
    wo: QMatrix                  # [n_embd, n_head * head_dim]
    bq: np.ndarray | None        # [n_head * head_dim] (qwen2)
    bk: np.ndarray | None
    bv: np.ndarray | None
    q_norm: np.ndarray | None    # [head_dim] (gemma3, qwen3)
    k_norm: np.ndarray | None
    post_attn_norm: np.ndarray | None  # [n_embd] (gemma3)
    ffn_norm: np.ndarray         # [n_embd]
    w_gate: QMatrix | None       # [n_ff, n_embd] (None: not resident, see Model.ffn)
    w_up: QMatrix | None         # [n_ff, n_embd]
    w_down: QMatrix | None       # [n_embd, n_ff]
    post_ffn_norm: np.ndarray | None


def embed_rows(w, tokens, x):
    """x[t] = row tokens[t] of the embedding table w (a QMatrix, or FlashRows), dequantised."""
    for t, tok in enumerate(tokens):
        if isinstance(w, FlashRows):
            dequantize_row(w.row(int(tok)), 0, x[t])
        else:
            dequantize_row(w, int(tok), x[t])


@contextlib.contextmanager
def _small_pages():
    """Allocate without NumPy's madvise(MADV_HUGEPAGE) (weights keep it: they are streamed whole)."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # another NumPy: nothing to switch
        yield
        return
    prev = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(prev)


def make_ops(c: ModelConfig) -> SimpleNamespace:
    """The kernel behind every step of the forward pass, by step name. The model calls its kernels
    only through this table, so a tracer can swap in timed wrappers (and nothing when off)."""
    return SimpleNamespace(
        embed=embed_rows, attn_norm=rmsnorm, qkv=matmuls, qk_norm=rmsnorm, rope=rope,
        store_kv=KVCache.store, attention=KVCache.attend, attn_out=matmul, post_attn_norm=rmsnorm,
        ffn_norm=rmsnorm, router=router_logits, gate_up=matmuls, act=geglu if c.ffn_act == "gelu" else swiglu,
        ffn_down=matmul, post_ffn_norm=rmsnorm, out_norm=rmsnorm, output=matmul)


def load_weights(g: GGUFFile, c: ModelConfig, ffn: int | None = None, gate: bool = False, embd: bool = True,
                 output: bool = True, reader=None, stats=None):
    """-> (token_embd, output_norm, output, layers), every shape checked against the config; the
    FFN matrices of the first `ffn` layers (default all; the gate alone with gate), the embedding table and the output
    matrix left on flash (FlashRows / FlashMatrix through reader) unless embd / output."""
    E, Dq, Dkv = c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    n_ffn = 0 if c.moe else c.n_layer if ffn is None else ffn  # MoE: the expert store loads its own

    def opt_vec(name, n):
        return g.load_vector(name, n) if name in g.tensors else None

    def opt_ffn(name, rows, cols, keep):
        if c.moe:
            return None
        t = g.tensor(name)
        if (rows, cols) != (t.rows, t.cols):
            raise EdgertError(f"{g.path}: tensor '{name}' has shape {list(t.shape)}, expected [{cols}, {rows}]")
        return g.load(name, rows, cols) if keep else None

    # the vocabulary-sized matrices first: their load's transient buffers then add to little
    # (loaded last, they put the process's peak ~7 MiB above its steady state)
    if embd or c.tied_embeddings:
        tok_embd = g.load("token_embd.weight", c.n_vocab, E)
    else:
        g.tensor("token_embd.weight")
        tok_embd = FlashRows(reader, g.tensors["token_embd.weight"], stats)
    if c.tied_embeddings:
        output = tok_embd
    elif output:
        output = g.load("output.weight", c.n_vocab, E)
    else:
        g.check_type("output.weight")
        output = FlashMatrix(reader, g.tensors["output.weight"], stats)
    layers = []
    for il in range(c.n_layer):
        p = f"blk.{il}."
        layers.append(Layer(
            attn_norm=g.load_vector(p + "attn_norm.weight", E),
            wq=g.load(p + "attn_q.weight", Dq, E),
            wk=g.load(p + "attn_k.weight", Dkv, E),
            wv=g.load(p + "attn_v.weight", Dkv, E),
            wo=g.load(p + "attn_output.weight", E, Dq),
            bq=opt_vec(p + "attn_q.bias", Dq),
            bk=opt_vec(p + "attn_k.bias", Dkv),
            bv=opt_vec(p + "attn_v.bias", Dkv),
            q_norm=g.load_vector(p + "attn_q_norm.weight", Dq if c.qk_norm_full else c.head_dim) if c.qk_norm else None,
            k_norm=g.load_vector(p + "attn_k_norm.weight", Dkv if c.qk_norm_full else c.head_dim) if c.qk_norm else None,
            post_attn_norm=g.load_vector(p + "post_attention_norm.weight", E) if c.post_norms else None,
            ffn_norm=g.load_vector(p + "ffn_norm.weight", E),
            w_gate=opt_ffn(p + "ffn_gate.weight", c.n_ff, E, il < n_ffn or gate),
            w_up=opt_ffn(p + "ffn_up.weight", c.n_ff, E, il < n_ffn),
            w_down=opt_ffn(p + "ffn_down.weight", E, c.n_ff, il < n_ffn),
            post_ffn_norm=g.load_vector(p + "post_ffw_norm.weight", E) if c.post_norms else None,
        ))
    output_norm = g.load_vector("output_norm.weight", E)
    return tok_embd, output_norm, output, layers


def load_norms(g: GGUFFile, c: ModelConfig) -> list:
    """The layers' FFN norms alone (the exported blocks hold everything else): Layer records with
    no matrices."""
    E = c.n_embd
    return [Layer(attn_norm=None, wq=None, wk=None, wv=None, wo=None, bq=None, bk=None, bv=None, q_norm=None,
                  k_norm=None, post_attn_norm=None, ffn_norm=g.load_vector(f"blk.{il}.ffn_norm.weight", E),
                  w_gate=None, w_up=None, w_down=None,
                  post_ffn_norm=g.load_vector(f"blk.{il}.post_ffw_norm.weight", E) if c.post_norms else None)
            for il in range(c.n_layer)]


class Model:
    """A loaded model with its KV cache. Positions are absolute; `n_past` tokens are cached."""

    def __init__(self, path: str, n_ctx: int = 0, n_batch: int = 512, budget: MemoryBudget | None = None,
                 direct_io: bool = False, throttle=None, tracer=None, expand_q5: bool | None = None,
                 before_weights=None, ffn: str = "auto", sparsity: float | None = None,
                 selector: str = "auto", hot_fraction: float = 0.5, verify: bool = True,
                 measure_recall: bool = False, cache_slots: int | None = None, cached_candidates: bool = True,
                 kv: KVFormat | None = None, prefetch: bool = True, backend: str = "numba"):
        """Load `path` (a GGUF file or an edgert package). Matrices are read through a FlashReader
        (O_DIRECT with direct_io, else buffered; `throttle` a FlashCurve imposing a device's
        flash); `tracer` records the load's reads and, attached, every op; expand_q5 holds Q5_0
        matrices as 8-bit (faster, 1.5x their memory; default: EDGERT_EXPAND_Q5).
        before_weights(gguf_file) runs before the plan (the app builds its tokenizer there, so
        its memory is part of the measured fixed cost). ffn: auto | dense | stream | sparse
        (edgert/placement.py); sparsity / selector / hot_fraction: the NeuronStore's (packages);
        verify: check every tensor's sha256 of a package before its first use; measure_recall: hold the
        gate matrices too and count how many of the exactly active neurons the selector finds;
        cache_slots: neuron-cache clusters (MoE: cached experts) per layer (default: what the budget leaves);
        cached_candidates: with the predictor, every neuron of a cached cluster is a candidate;
        kv: the KV cache's format (edgert/kv_cache.py; default f16); prefetch: a mixture-of-experts
        model's expert cache prefetches the next layer's predicted experts; backend: what runs the
        embedding, attention blocks and LM head (edgert/backends.py: numba, or onnx with `path` an
        export directory or the GGUF file it came from)."""
        t0 = time.perf_counter()
        self.backend, self.blocks = backend, None
        self.export_dir = None
        if backend != "numba":
            path = self._open_export(path, backend, kv, ffn)
            if backend == "tflite" and n_ctx <= 0:  # static shapes: the export's context
                n_ctx = self.manifest["n_ctx"]
        self.path = str(path)
        g, meta_bytes = measured(lambda: GGUFFile(self.path))  # metadata incl. vocabulary arrays
        g.reader = FlashReader(self.path, direct=direct_io, io_threads=2, throttle=throttle, tracer=tracer)
        g.expand_q5 = env("EDGERT_EXPAND_Q5") == "1" if expand_q5 is None else expand_q5
        self.gguf = g
        self.cfg = c = config_from_gguf(g)
        if self.export_dir is not None:
            from edgert.converters.onnx_export import check_against
            check_against(self.manifest, c, self.export_dir)
        self.package = open_package(g) if is_package(g) else None   # any kind: its checksums verified
        self.pkg = self.package if self.package is not None and self.package.kind == "neurons" else None
        self.kv_fmt = kv or KVFormat()
        if residency.enabled():  # the kernels it needs first, then the compiler's pages out, then the weights
            qtypes = {t.qtype for n, t in g.tensors.items() if len(t.shape) > 1 and not _role(n) == "package"}
            residency.preload_kernels(residency.unneeded_kernels(qtypes, c.ffn_act, sparse=self.pkg is not None,
                                                                kv_exact=self.kv_fmt.type_k == self.kv_fmt.type_v == "f16"))
            residency.release_compiler_pages()
        self.prefetch = prefetch
        self.n_ctx = min(n_ctx or 4096, c.n_ctx_train) if n_ctx <= 0 else n_ctx
        self.n_batch_asked = n_batch
        self.n_batch = max(1, min(n_batch, self.kv_fmt.max_batch(self.n_ctx)))
        self.budget = budget
        if before_weights is not None:
            before_weights(g)
            residency.trim_heap()
        limit = budget.limit if budget is not None else 1 << 62
        self.placement = pl = plan_placement(g, c, self.n_ctx, self.n_batch, limit, rss(),
                                             "dense" if self.export_dir and not c.moe else ffn, self.pkg,
                                             selector, sparsity, budget.source if budget is not None else "",
                                             gate_resident=measure_recall, kv_fmt=self.kv_fmt)
        self.n_batch = pl.n_batch
        self.plan = {"metadata": meta_bytes, **pl.plan}
        if budget is not None:  # refused above before loading anything; the rest is charged as allocated
            budget.fixed = pl.fixed
            budget.charge("load staging", pl.plan["load staging"], "load staging")
        for line in pl.lines():
            log.info("%s", line)
        self.reader = None  # the runtime's FlashReader (O_DIRECT): streamed / cached FFN, embedding rows
        if pl.ffn != "dense" or pl.embd == "flash" or pl.output == "flash":
            self.reader = FlashReader(self.path, direct=True, io_threads=8, throttle=throttle, tracer=tracer)
        if self.package is not None and verify:
            verify_once(g, reader=g.reader)
        self.stats = StoreStats()
        t_read = time.perf_counter()
        try:
            if self.export_dir is None:
                self.tok_embd, self.output_norm, self.output, self.layers = load_weights(
                    g, c, ffn=c.n_layer if pl.ffn == "dense" else pl.dense_layers,
                    gate=pl.ffn == "sparse" and (pl.selector == "gate" or measure_recall),
                    embd=pl.embd == "resident", output=pl.output == "resident", reader=self.reader, stats=self.stats)
            else:  # the blocks' weights live in the graphs: only the norms edgert applies itself
                self.tok_embd = self.output = self.output_norm = None
                self.layers = load_norms(g, c)
        finally:
            g.reader.close()
        self.load_io = {"mode": g.reader.mode, "wall_s": time.perf_counter() - t_read, **g.reader.stats.as_dict()}
        if tracer is not None:
            tracer.span("load weights", "load", t_read, time.perf_counter(), g.reader.stats.bytes)
        if self.export_dir is not None:  # the sessions' memory as measured (ONNX Runtime repacks weights)
            from edgert.backends import OnnxBlocks, TFLiteBlocks
            r0 = rss()
            make = TFLiteBlocks if self.backend == "tflite" else OnnxBlocks
            self.blocks = make(self.export_dir, self.manifest, c, self.n_ctx, _THREADS[0])
            self.weight_bytes = max(0, rss() - r0)
            self.blocks.alloc_kv()
        else:
            self.weight_bytes = sum(w.nbytes for w in self._matrices())
        vec_bytes = sum(t.nbytes for n, t in g.tensors.items() if len(t.shape) == 1 and _role(n) != "package")
        self._charge("weights", self.weight_bytes + vec_bytes)
        if isinstance(self.output, FlashMatrix):
            self._charge("lm head staging", self.output.nbytes)
        if budget is not None:
            budget.release("load staging")
        self._charge("kv cache", self.blocks.kv.nbytes if self.blocks else kv_bytes(c, self.n_ctx, self.kv_fmt))
        self._charge("scratch", scratch_bytes(c, self.n_batch))
        # KV cache and scratch in small pages: NumPy asks for transparent huge pages on large
        # arrays, and a decode step touching a few positions of each layer's cache would then make
        # 2 MiB per touch resident (measured: +86 MiB for SmolLM2 at -c 4096 on the first token)
        with _small_pages():
            self.kv = self.blocks.kv if self.blocks else KVCache(c.n_layer, c.n_head_kv, c.head_dim, self.n_ctx, self.kv_fmt)
            log.info("%s", self.kv.describe())
            self.n_past = 0
            B, E, F = self.n_batch, c.n_embd, c.n_ff
            Dq, Dkv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
            self.x = np.empty((B, E), np.float32)      # [B, n_embd] residual stream
            self.xn = np.empty((B, E), np.float32)     # [B, n_embd] normed input
            self.q = np.empty((B, Dq), np.float32)     # [B, n_head * head_dim]
            self.k = np.empty((B, Dkv), np.float32)    # [B, n_head_kv * head_dim]
            self.v = np.empty((B, Dkv), np.float32)    # [B, n_head_kv * head_dim]
            self.att = np.empty((B, Dq), np.float32)   # [B, n_head * head_dim]
            self.o = np.empty((B, E), np.float32)      # [B, n_embd]
            self.gate = np.empty((B, F), np.float32)   # [B, n_ff]
            self.up = np.empty((B, F), np.float32)     # [B, n_ff]
            self.act_e = ActBuffers(B, E)              # quantised activations of width n_embd
            self.act_q = ActBuffers(B, max(Dq, F))     # ... of width n_head * head_dim or n_ff
        self.ops = make_ops(c)
        if cache_slots is not None and pl.ffn == "cached":  # experts a layer (mixture of experts)
            pl.expert_slots = cache_slots * c.n_layer
        if cache_slots is not None and pl.ffn == "sparse":
            pl.cache_bytes = cache_slots * c.n_layer * cluster_layout(
                g.tensors["blk.0.ffn_gate.weight"].qtype, g.tensors["blk.0.ffn_up.weight"].qtype, c.n_embd,
                self.pkg.C, self.pkg.down_type).nbytes
        self.ffn_tensors = None if c.moe else [tuple(g.tensors[f"blk.{il}.{k}"] for k in FFN_NAMES)
                                               for il in range(c.n_layer)]
        self.ffn = build_ffn(self, g, pl, hot_fraction, measure_recall, cached_candidates)
        g.close()
        # per layer: (attention window, rope theta scale, rope frequency scale), the last two
        # float32 as ggml computes them
        self.layer_args = [(c.swa_window if c.is_swa(il) else 0,
                            theta_scale(c.rope_base_for(il), c.n_rot), np.float32(c.rope_scale_for(il)))
                           for il in range(c.n_layer)]
        self.kq_scale = np.float32(c.kq_scale)
        self._view_cache = {}
        self.tracer = None
        if tracer is not None:
            self.attach_tracer(tracer)
        self.t_load_ms = (time.perf_counter() - t0) * 1e3

    def attach_tracer(self, tracer):
        """Time every op and layer block into `tracer` (edgert.trace.Tracer); None detaches."""
        self.ops = make_ops(self.cfg)
        for k in ("_attention_block", "_ffn_block"):
            self.__dict__.pop(k, None)
        self.tracer = tracer
        if tracer is None:
            return
        self.ops = SimpleNamespace(**{k: tracer.wrap(f, k, "op") for k, f in vars(self.ops).items()})
        self._attention_block = tracer.wrap_block(self._attention_block, "attention")
        self._ffn_block = tracer.wrap_block(self._ffn_block, "ffn")

    def _open_export(self, path, backend, kv, ffn) -> str:
        """-> the source GGUF of the export `path` is (or of the one written for it); sets
        self.export_dir and self.manifest. Options the exported blocks cannot honour are refused."""
        from edgert.backends import BACKENDS, export_dir_for
        from edgert.converters.onnx_export import read_manifest
        if backend not in BACKENDS:
            raise EdgertError(f"--backend {backend}: one of {', '.join(BACKENDS)}")
        if kv is not None and (kv.type_k, kv.type_v) != ("f16", "f16"):
            raise EdgertError(f"--backend {backend}: the exported attention keeps its KV cache in ONNX Runtime's "
                              f"float32 layout; -ctk / -ctv {kv.type_k} / {kv.type_v} need --backend numba")
        if ffn not in ("auto", "dense", None):
            raise EdgertError(f"--backend {backend} runs the exported dense FFN graphs (or a mixture of experts' "
                              f"expert store); --ffn {ffn} needs --backend numba")
        self.export_dir = export_dir_for(str(path), backend)
        self.manifest = read_manifest(self.export_dir)
        from edgert.backends import FORMATS
        if self.manifest["format"] != FORMATS[backend]:
            raise EdgertError(f"{self.export_dir}: a {self.manifest['format']} export, not one for --backend {backend}")
        return self.manifest["source"]

    def _charge(self, name, nbytes):
        if self.budget is not None:
            self.budget.charge(name, nbytes, name)

    def _matrices(self):
        yield self.tok_embd
        if self.output is not self.tok_embd and not isinstance(self.output, FlashMatrix):
            yield self.output
        for L in self.layers:
            yield from (w for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down) if w is not None)

    @property
    def kv_bytes(self) -> int:
        return self.kv.nbytes

    def reset(self):
        self.n_past = 0
        self.kv.reset()

    def rewind(self, n: int) -> int:
        """Keep the first min(n, n_past) cached positions (the next forward continues there);
        returns how many were kept (0 when the KV format cannot drop a suffix: kv_cache.rewind)."""
        self.n_past = self.kv.rewind(min(n, self.n_past))
        return self.n_past

    def set_kv(self, fmt: KVFormat):
        """Replace the KV cache by an empty one in format fmt (same context; re-charged to the budget)."""
        c = self.cfg
        self.kv = None
        with _small_pages():
            self.kv = KVCache(c.n_layer, c.n_head_kv, c.head_dim, self.n_ctx, fmt)
        self.kv_fmt = fmt
        self._charge("kv cache", self.kv.nbytes)
        self.n_batch = max(1, min(self.n_batch_asked, self.placement.n_batch, self.kv.max_batch()))
        self.n_past = 0
        log.info("%s", self.kv.describe())

    # ---------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------

    def forward(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions n_past.. ; returns logits [T, n_vocab] or [1, n_vocab] (last)."""
        tokens = np.asarray(tokens, np.int64)
        T = len(tokens)
        if T == 0:
            raise EdgertError("no tokens to evaluate")
        if self.n_past + T > self.n_ctx:
            raise EdgertError(f"{self.n_past + T} tokens do not fit the context of {self.n_ctx} "
                              f"(raise -c / n_ctx)")
        if tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab:
            raise EdgertError(f"token id out of range [0, {self.cfg.n_vocab})")
        if all_logits:
            self._charge("logits", T * self.cfg.n_vocab * 4)
        outs = []
        for s in range(0, T, self.n_batch):
            chunk = tokens[s:s + self.n_batch]
            x = self._hidden(chunk)
            last = s + self.n_batch >= T
            if all_logits:
                outs.append(self._logits(x))
            elif last:
                outs.append(self._logits(x[-1:]))
        if not _JIT_SETTLED and residency.enabled():
            # the process's first pass may have compiled kernels the cache lacked (a fresh machine)
            _JIT_SETTLED.append(True)
            residency.release_compiler_pages()
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def prefill(self, tokens) -> np.ndarray:
        """Evaluate a prompt; returns the logits of its last token [n_vocab]."""
        return self.forward(tokens)[-1]

    def decode_one_token(self, token: int) -> np.ndarray:
        """Evaluate one token at position n_past; returns its logits [n_vocab]."""
        return self.forward([token])[-1]

    def _views(self, T: int) -> SimpleNamespace:
        """The buffers' views for a batch of T tokens and the per-layer argument lists, built once
        per T (decode always uses T = 1): the layer loop then does no slicing or reshaping."""
        v = self._view_cache.get(T)
        if v is not None:
            return v
        c = self.cfg
        q, k, vv = self.q[:T], self.k[:T], self.v[:T]
        gate, up = self.gate[:T], self.up[:T]
        v = SimpleNamespace(
            x=self.x[:T], xn=self.xn[:T], q=q, k=k, v=vv, att=self.att[:T], o=self.o[:T], gate=gate, up=up,
            q3=q.reshape(T, c.n_head, c.head_dim),       # [T, n_head, head_dim]
            k3=k.reshape(T, c.n_head_kv, c.head_dim),    # [T, n_head_kv, head_dim]
            v3=vv.reshape(T, c.n_head_kv, c.head_dim),
            qf=q.reshape(T * c.n_head, c.head_dim),      # [T * n_head, head_dim] (q/k norms)
            kf=k.reshape(T * c.n_head_kv, c.head_dim),
            qkv=[[(L.wq, q), (L.wk, k), (L.wv, vv)] for L in self.layers])
        self._view_cache[T] = v
        return v

    def _hidden(self, tokens) -> np.ndarray:
        c = self.cfg
        T = len(tokens)
        pos0 = self.n_past
        vw = self._views(T)
        x = vw.x
        if self.blocks is not None:
            self.blocks.embed(tokens, x)
        else:
            self.ops.embed(self.tok_embd, tokens, x)
            if c.embed_scale != 1.0:
                x *= np.float32(c.embed_scale)  # float32(sqrt(640)) == sqrtf(640), as ggml
        for il, L in enumerate(self.layers):
            self._attention_block(il, L, vw, pos0)
            self._ffn_block(il, L, vw)
        self.n_past += T
        self.stats.tokens += T
        return x

    def _attention_block(self, il, L: Layer, vw, pos0):
        if self.blocks is not None:
            self.blocks.attention(il, vw.x, vw.o, pos0)
            vw.x += vw.o
            return
        c, ops = self.cfg, self.ops
        x, xn, q, att, o, q3, k3 = vw.x, vw.xn, vw.q, vw.att, vw.o, vw.q3, vw.k3
        ops.attn_norm(x, L.attn_norm, c.rms_eps, xn)
        ops.qkv(xn, vw.qkv[il], self.act_e)
        if L.bq is not None:
            q += L.bq
            vw.k += L.bk
            vw.v += L.bv
        if c.qk_norm:  # per head, or (olmoe) over the whole q / k vector
            qn, kn = (q, vw.k) if c.qk_norm_full else (vw.qf, vw.kf)
            ops.qk_norm(qn, L.q_norm, c.rms_eps, qn)
            ops.qk_norm(kn, L.k_norm, c.rms_eps, kn)
        window, tscale, fscale = self.layer_args[il]
        ops.rope(q3, pos0, c.n_rot, tscale, fscale, c.rope_neox)
        ops.rope(k3, pos0, c.n_rot, tscale, fscale, c.rope_neox)
        if c.q_scale != 1.0:
            q *= np.float32(c.q_scale)
        ops.store_kv(self.kv, il, k3, vw.v3, pos0)
        ops.attention(self.kv, il, q3, pos0, window, self.kq_scale, att)
        ops.attn_out(L.wo, att, o, self.act_q)
        if L.post_attn_norm is not None:
            ops.post_attn_norm(o, L.post_attn_norm, c.rms_eps, o)
        x += o

    def _ffn_block(self, il, L: Layer, vw):
        c, ops = self.cfg, self.ops
        x, xn, o = vw.x, vw.xn, vw.o
        ops.ffn_norm(x, L.ffn_norm, c.rms_eps, xn)
        self.ffn[il](xn, o)  # the layer's store: dense, stream or sparse (edgert/ffn.py)
        if L.post_ffn_norm is not None:
            ops.post_ffn_norm(o, L.post_ffn_norm, c.rms_eps, o)
        x += o

    def _logits(self, x) -> np.ndarray:
        c = self.cfg
        T = x.shape[0]
        out = np.empty((T, c.n_vocab), np.float32)  # [T, n_vocab]
        if self.blocks is not None:
            self.blocks.logits(x, out)
            return out
        xn = self.xn[:T]
        self.ops.out_norm(x, self.output_norm, c.rms_eps, xn)
        if isinstance(self.output, FlashMatrix):
            self.output.matmul(xn, out, self.act_e)
        else:
            self.ops.output(self.output, xn, out, self.act_e)
        return out


def build_ffn(m: Model, g: GGUFFile, pl, hot_fraction: float, measure_recall: bool = False,
              cached_candidates: bool = True) -> list:
    """The FFN store of every layer, as the placement plan says (charged to the budget)."""
    c = m.cfg
    scratch = FFNScratch(m)
    if c.moe:
        return build_experts(m, g, pl, scratch)
    if m.blocks is not None:  # the exported FFN graphs (dense; checked by _open_export)
        return m.blocks.ffn
    if pl.ffn == "dense":
        return [DenseFFN(L.w_gate, L.w_up, L.w_down, scratch) for L in m.layers]
    tensors = [tuple(g.tensors[f"blk.{il}.{k}"] for k in FFN_NAMES) for il in range(c.n_layer)]
    streams = [None] * c.n_layer  # no staging planned: a sparse store runs prompts token by token
    if "ffn staging" in pl.plan:
        streamer = Streamer(m.reader, tensors, m.stats)
        m._charge("ffn staging", pl.plan["ffn staging"])
        streams = [StreamFFN(il, streamer, scratch) for il in range(c.n_layer)]
    if pl.ffn == "stream":  # the first dense_layers resident all the same
        return [DenseFFN(L.w_gate, L.w_up, L.w_down, scratch) if il < pl.dense_layers else streams[il]
                for il, L in enumerate(m.layers)]
    from edgert.kernels.matmul import _THREADS
    from edgert.neuron_store import NeuronStore
    level = m.pkg.level_index(pl.sparsity)
    L0 = cluster_layout(tensors[0][0].qtype, tensors[0][1].qtype, c.n_embd, m.pkg.C, m.pkg.down_type)
    n_slots = pl.cache_bytes // (c.n_layer * L0.nbytes)
    stores = []
    for il in range(c.n_layer):
        tg, tu = tensors[il][0], tensors[il][1]
        if (tg.qtype, tu.qtype) != (L0.gate_type, L0.up_type):
            raise EdgertError(f"{g.path}: layer {il}'s gate / up types differ from layer 0's")
        s = NeuronStore(g, il, c, L0, n_slots, int(n_slots * hot_fraction), m.reader, level, pl.selector,
                        scratch, streams[il], m.stats, gate=m.layers[il].w_gate, nthreads=_THREADS[0],
                        measure_recall=measure_recall, cached_candidates=cached_candidates)
        s.pin_hottest()
        stores.append(s)
    m._charge("predictors", sum(s.a_q.nbytes + s.b_q.nbytes for s in stores))
    m._charge("neuron cache", sum(s.slots.nbytes for s in stores))
    return stores


def build_experts(m: Model, g: GGUFFile, pl, scratch) -> list:
    """A mixture-of-experts model's stores (edgert/experts.py): routers and any shared expert
    resident, the experts as the plan says (charged to the budget)."""
    from edgert.experts import ExpertCache, ExpertStore, ResidentExperts, expert_matrices, load_router, moe_buffers
    c = m.cfg
    E = c.n_embd
    g.reader = None  # loading's reader is closed: routers and resident experts come from the mapping
    layers = [expert_matrices(g, c, il) for il in range(c.n_layer)]
    if pl.ffn == "dense":
        experts = ResidentExperts(g, layers)
        m._charge("experts", experts.nbytes)
    else:
        experts = ExpertCache(m.reader, layers, pl.expert_slots if pl.ffn == "cached" else 0, m.stats,
                              prefetch=m.prefetch, k=c.n_expert_used)
        m._charge("expert cache", experts.nbytes)
    stores, bufs = [], moe_buffers(c, m.n_batch)
    for il, L in enumerate(m.layers):
        p = f"blk.{il}."
        shared = None
        if c.n_ff_shexp:
            F = c.n_ff_shexp
            shared = (load_router(g, p + "ffn_gate_inp_shexp.weight", 1, E), g.load(p + "ffn_gate_shexp.weight", F, E),
                      g.load(p + "ffn_up_shexp.weight", F, E), g.load(p + "ffn_down_shexp.weight", E, F))
        s = ExpertStore(il, c, load_router(g, p + "ffn_gate_inp.weight", c.n_expert, E), experts, scratch, m.stats, m.x,
                        bufs, shared=shared)
        s.norm_w = L.ffn_norm
        stores.append(s)
    for a, b in zip(stores, stores[1:]):
        a.next = b
    # the shared expert's router is a vector, already in "weights"
    m._charge("routers", sum(s.router.nbytes + (sum(w.nbytes for w in s.shared[1:]) if s.shared else 0) for s in stores))
    return stores
