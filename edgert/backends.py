"""Backends for the dense blocks: what runs the embedding, each layer's attention block and the LM
head. The forward pass (edgert/model.py) calls a backend through three methods and keeps
everything else (the residual stream, the FFN stores, the KV cache's owner, the budget):

    embed(tokens, x)              x [T, n_embd] = the tokens' embedding rows (scaled)
    attention(il, x, o, pos0)     o [T, n_embd] = layer il's attention block of x at positions pos0..
    logits(x, out)                out [T, n_vocab] = LM head of the final norm of x

`numba` is the Model's own kernels (no object: the forward pass's methods). `onnx` runs the graphs
`edgert convert --to onnx` wrote (converters/onnx_export.py) through ONNX Runtime, one session per
block on one shared thread pool; its FFN graphs are a store (OnnxFFN) like any other. The KV
cache is one float32 buffer per layer, allocated and owned here and bound to the graph as both
past and present, so ONNX Runtime writes new positions in place.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from edgert.errors import EdgertError

log = logging.getLogger(__name__)

BACKENDS = ("numba", "onnx", "tflite")
FORMATS = {"onnx": "edgert-onnx", "tflite": "edgert-tflite"}
_POOL = []  # the process's ONNX Runtime thread pool size, once set


def ort_module():
    try:
        import onnxruntime
    except ImportError:
        raise EdgertError("--backend onnx needs onnxruntime: pip install 'edgert[onnx]'") from None
    return onnxruntime


def plain_options(threads: int):
    """Options for a session outside the backends (run-model, tests): on the process's global
    pool once a backend has set one (ONNX Runtime refuses per-session threads then), else
    `threads` of its own."""
    ort = ort_module()
    so = ort.SessionOptions()
    if _POOL:
        so.use_per_session_threads = False
        if _POOL[0] != threads:
            log.warning("ONNX Runtime's thread pool has %d threads in this process (asked %d)", _POOL[0], threads)
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def session_options(threads: int, profile: str | None = None):
    """Sessions that share the process's one thread pool (each session's own pool would put
    2 x sessions threads on the cores)."""
    ort = ort_module()
    if not _POOL:
        ort.set_global_thread_pool_sizes(threads, 1)
        _POOL.append(threads)
    elif _POOL[0] != threads:
        log.warning("ONNX Runtime's thread pool has %d threads already (asked %d)", _POOL[0], threads)
    so = ort.SessionOptions()
    so.use_per_session_threads = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no per-session arena: each of the many block sessions would keep its own peak of
    # activations (measured: 1.9 GB peak RSS for SmolLM2's perplexity at 512-token batches, with)
    so.enable_cpu_mem_arena = False
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return so


def open_session(path: str, so):
    ort = ort_module()
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        raise EdgertError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]})") from None


def export_dir_for(path: str, backend: str) -> str:
    """The export a model runs from: `path` itself when it is an export directory, else the
    cached export of the GGUF file (written on first use: EDGERT_CACHE/exports/NAME.onnx)."""
    if os.path.isdir(path):
        return path
    from edgert.settings import env
    stem = os.path.basename(path)
    stem = stem[:-5] if stem.endswith(".gguf") else stem
    out = os.path.join(os.path.expanduser(env("EDGERT_CACHE")), "exports", f"{stem}.{backend}")
    from edgert.converters.onnx_export import read_manifest
    if os.path.isdir(out):
        try:
            m = read_manifest(out)
            if os.path.realpath(m["source"]) == os.path.realpath(path) and m.get("activations", "mixed") == "mixed":
                return out
        except EdgertError as e:
            log.warning("%s: exporting again (%s)", out, e)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    log.warning("%s: no %s export yet; writing %s (once)", path, backend, out)
    if backend == "tflite":
        from edgert.converters.tflite_export import export as export_tflite
        export_tflite(path, out)
    else:
        from edgert.converters.onnx_export import export
        export(path, out)
    return out


class OnnxFFN:
    """A layer's exported FFN graph as a store: xn [T, n_embd] -> out [T, n_embd]."""

    def __init__(self, session):
        self.s = session

    def __call__(self, xn, out):
        T = xn.shape[0]
        b = self.s.io_binding()
        b.bind_cpu_input("xn", xn.reshape(1, T, -1))
        b.bind_ortvalue_output("o", _ov(out.reshape(1, T, -1)))
        self.s.run_with_iobinding(b)


def _ov(a: np.ndarray):
    return ort_module().OrtValue.ortvalue_from_numpy(a)


class GraphKV:
    """The KV cache of the exported attention graphs: per layer K and V [1, n_head_kv, n_ctx,
    head_dim] float32 (GroupQueryAttention's layout), bound as both past and present. Positions
    past the attended length are masked by the graph, so rewinding is only moving n_past."""

    def __init__(self, n_layer: int, n_kv: int, D: int, n_ctx: int):
        from edgert.kv_cache import KVFormat
        self.n_layer, self.n_kv, self.D, self.n_ctx = n_layer, n_kv, D, n_ctx
        self.fmt = KVFormat("f32", "f32")  # a label only: the kv_cache formats are the Numba kernels
        with _no_huge_pages():
            self.k = [np.zeros((1, n_kv, n_ctx, D), np.float32) for _ in range(n_layer)]
            self.v = [np.zeros((1, n_kv, n_ctx, D), np.float32) for _ in range(n_layer)]
        self.k_ov = [_ov(a) for a in self.k]
        self.v_ov = [_ov(a) for a in self.v]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def reset(self):
        pass

    def rewind(self, n: int) -> int:
        return n

    def max_batch(self) -> int:
        return self.n_ctx

    def histogram(self, n: int) -> dict:
        return {"f32": self.n_layer * n, "bits_in_use": 32.0}

    def describe(self) -> str:
        return f"KV cache f32 (ONNX Runtime GroupQueryAttention layout), {self.nbytes / 2**20:.1f} MiB"


class OnnxBlocks:
    """The exported blocks of `export_dir`, for contexts of up to n_ctx positions."""
    name = "onnx"

    def __init__(self, export_dir: str, manifest: dict, cfg, n_ctx: int, threads: int, profile: str | None = None):
        self.dir, self.m, self.c, self.n_ctx = export_dir, manifest, cfg, n_ctx
        so = session_options(threads, profile)

        def sess(f):
            return open_session(os.path.join(export_dir, f), so)
        self.embed_s = sess(manifest["embed"])
        self.attn = [sess(L["attention"]) for L in manifest["layers"]]
        self.ffn = [OnnxFFN(sess(L["ffn"])) if L["ffn"] else None for L in manifest["layers"]]
        self.head_s = sess(manifest["head"])
        self.kv = None  # alloc_kv: after the sessions, so that their memory can be measured alone
        from edgert.converters.onnx_export import rope_tables
        tables = {}
        self.rope = []  # per layer (cos, sin) [n_ctx, n_rot / 2], one pair per distinct (base, scale)
        for il, L in enumerate(manifest["layers"]):
            key = (L["rope_base"], L["rope_freq_scale"])
            if key not in tables:
                tables[key] = rope_tables(cfg, il, n_ctx)
            self.rope.append(tables[key])

    def alloc_kv(self) -> GraphKV:
        c = self.c
        self.kv = GraphKV(c.n_layer, c.n_head_kv, c.head_dim, self.n_ctx)
        return self.kv

    def embed(self, tokens, x):
        x[:] = self.embed_s.run(["x"], {"ids": np.asarray(tokens, np.int64)})[0]

    def attention(self, il: int, x, o, pos0: int):
        T = x.shape[0]
        kv = self.kv
        if pos0 + T > self.n_ctx:
            raise EdgertError(f"KV cache: positions up to {pos0 + T} do not fit its {self.n_ctx}")
        s = self.attn[il]
        cos, sin = self.rope[il]
        b = s.io_binding()
        b.bind_cpu_input("x", x.reshape(1, T, -1))
        b.bind_ortvalue_input("past_key", kv.k_ov[il])
        b.bind_ortvalue_input("past_value", kv.v_ov[il])
        b.bind_cpu_input("seqlens_k", np.array([pos0 + T - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(pos0 + T, np.int32))
        b.bind_cpu_input("cos_cache", cos)
        b.bind_cpu_input("sin_cache", sin)
        b.bind_ortvalue_output("o", _ov(o.reshape(1, T, -1)))
        b.bind_ortvalue_output("present_key", kv.k_ov[il])
        b.bind_ortvalue_output("present_value", kv.v_ov[il])
        s.run_with_iobinding(b)

    def logits(self, x, out):
        T = x.shape[0]
        b = self.head_s.io_binding()
        b.bind_cpu_input("x", np.ascontiguousarray(x).reshape(1, T, -1))
        b.bind_ortvalue_output("logits", _ov(out.reshape(1, T, -1)))
        self.head_s.run_with_iobinding(b)


def _no_huge_pages():
    from edgert.model import _small_pages
    return _small_pages()


# ---------------------------------------------------------------------------------------------
# TFLite (ai-edge-litert): graphs of static shape, `decode` (1 token) and `prefill` signatures
# ---------------------------------------------------------------------------------------------

class TFLiteKV(GraphKV):
    """Per layer K and V [1, n_head_kv, n_ctx, head_dim] float32: passed to the attention graph
    whole, the new positions' rows stored here from its outputs."""

    def __init__(self, n_layer: int, n_kv: int, D: int, n_ctx: int):
        from edgert.kv_cache import KVFormat
        self.n_layer, self.n_kv, self.D, self.n_ctx = n_layer, n_kv, D, n_ctx
        self.fmt = KVFormat("f32", "f32")
        with _no_huge_pages():
            self.k = [np.zeros((1, n_kv, n_ctx, D), np.float32) for _ in range(n_layer)]
            self.v = [np.zeros((1, n_kv, n_ctx, D), np.float32) for _ in range(n_layer)]

    def describe(self) -> str:
        return f"KV cache f32 (TFLite graphs' input layout), {self.nbytes / 2**20:.1f} MiB"


def _chunks(T: int, pb: int):
    """(start, end, signature, width) covering T tokens: whole prefill batches, single tokens alone."""
    s = 0
    while s < T:
        n = min(pb, T - s)
        yield (s, s + n, "decode", 1) if n == 1 else (s, s + n, "prefill", pb)
        s += n


class TFLiteFFN:
    """A layer's exported FFN graph (LiteRT) as a store: xn [T, n_embd] -> out [T, n_embd]."""

    def __init__(self, runners, pb):
        self.r, self.pb = runners, pb

    def __call__(self, xn, out):
        for s, e, sig, w in _chunks(xn.shape[0], self.pb):
            buf = np.zeros((1, w, xn.shape[1]), np.float32)
            buf[0, :e - s] = xn[s:e]
            out[s:e] = self.r[sig](xn=buf)["output_0"][0, :e - s]


class TFLiteBlocks:
    """The blocks of a `convert --to tflite` export through ai-edge-litert's signature runners."""
    name = "tflite"

    def __init__(self, export_dir: str, manifest: dict, cfg, n_ctx: int, threads: int):
        from edgert.run_model import litert_interpreter
        Interpreter, _ = litert_interpreter()
        self.c, self.m = cfg, manifest
        self.N, self.pb = manifest["n_ctx"], manifest["prefill_batch"]
        if n_ctx > self.N:
            raise EdgertError(f"{export_dir}: exported for a context of {self.N} positions (TFLite shapes are "
                              f"static); -c {n_ctx} needs `edgert convert --to tflite --ctx-size {n_ctx}`")
        self.n_ctx = n_ctx
        self._keep = []

        def runners(f):
            path = os.path.join(export_dir, f)
            try:
                it = Interpreter(model_path=path, num_threads=threads)
                r = {s: it.get_signature_runner(s) for s in ("decode", "prefill")}
            except (ValueError, RuntimeError) as e:
                raise EdgertError(f"{path}: LiteRT cannot load it ({str(e).splitlines()[0][:300]})") from None
            self._keep.append(it)
            return r
        self.embed_r = runners(manifest["embed"])
        self.attn = [runners(L["attention"]) for L in manifest["layers"]]
        self.ffn = [TFLiteFFN(runners(L["ffn"]), self.pb) for L in manifest["layers"]]
        self.head_r = runners(manifest["head"])
        self.window = [int(L["window"]) for L in manifest["layers"]]
        from edgert.converters.onnx_export import rope_tables
        tables = {}
        self.rope = []
        for il, L in enumerate(manifest["layers"]):
            key = (L["rope_base"], L["rope_freq_scale"])
            if key not in tables:
                tables[key] = rope_tables(cfg, il, self.N + self.pb)
            self.rope.append(tables[key])
        self.kv = None
        self._masks = {}

    def alloc_kv(self):
        c = self.c
        self.kv = TFLiteKV(c.n_layer, c.n_head_kv, c.head_dim, self.N)
        return self.kv

    def embed(self, tokens, x):
        tokens = np.asarray(tokens)
        for s, e, sig, w in _chunks(len(tokens), self.pb):
            ids = np.zeros(w, np.int32)
            ids[:e - s] = tokens[s:e]
            x[s:e] = self.embed_r[sig](ids=ids)["output_0"][:e - s]

    def mask(self, p0: int, n: int, w: int, window: int) -> np.ndarray:
        """[1, 1, w, N + w] additive: query t (position p0 + t) sees cached positions < p0 and the
        new ones <= t, within the sliding window; padded queries see the new ones (discarded)."""
        key = (p0, n, w, window)
        if key in self._masks:  # the same for every layer of a step
            return self._masks[key]
        if len(self._masks) > 8:
            self._masks.clear()
        N = self.N
        m = self._masks[key] = np.full((1, 1, w, N + w), -np.inf, np.float32)
        for t in range(w):
            if t >= n:
                m[0, 0, t, N:] = 0.0
                continue
            p = p0 + t
            lo = 0 if window <= 0 else max(0, p - window + 1)
            m[0, 0, t, lo:p0] = 0.0
            m[0, 0, t, N + max(0, lo - p0):N + t + 1] = 0.0
        return m

    def attention(self, il: int, x, o, pos0: int):
        T, E = x.shape
        if pos0 + T > self.n_ctx:
            raise EdgertError(f"KV cache: positions up to {pos0 + T} do not fit its {self.n_ctx}")
        cos, sin = self.rope[il]
        K, V = self.kv.k[il], self.kv.v[il]
        for s, e, sig, w in _chunks(T, self.pb):
            n, p0 = e - s, pos0 + s
            xb = np.zeros((1, w, E), np.float32)
            xb[0, :n] = x[s:e]
            out = self.attn[il][sig](x=xb, kc=K, vc=V, cos=np.ascontiguousarray(cos[p0:p0 + w]),
                                     sin=np.ascontiguousarray(sin[p0:p0 + w]), mask=self.mask(p0, n, w, self.window[il]))
            o[s:e] = out["output_0"][0, :n]
            K[0, :, p0:p0 + n] = out["output_1"][0, :n].transpose(1, 0, 2)   # [T, n_kv, D] -> [n_kv, T, D]
            V[0, :, p0:p0 + n] = out["output_2"][0, :n].transpose(1, 0, 2)

    def logits(self, x, out):
        for s, e, sig, w in _chunks(x.shape[0], self.pb):
            xb = np.zeros((1, w, x.shape[1]), np.float32)
            xb[0, :e - s] = x[s:e]
            out[s:e] = self.head_r[sig](x=xb)["output_0"][0, :e - s]
