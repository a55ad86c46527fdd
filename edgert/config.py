"""ModelConfig: a frozen description of one model, built from GGUF metadata.

Architectures differ only in data (the ARCHS table): which norms exist, rope mode, activation,
embedding scale, sliding-window layout. No subclasses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from edgert.errors import EdgertError

# Per-architecture facts that GGUF does not carry; values follow llama.cpp (src/models/*.cpp).
ARCHS = {
    "llama": dict(rope_neox=False, ffn_act="silu"),
    "qwen2": dict(rope_neox=True, ffn_act="silu"),
    # gemma3: GeGLU, q/k norms, post-attention and post-FFN norms, embeddings * sqrt(n_embd),
    # 5 sliding-window layers then 1 global layer, local rope base 10000 (not in the file).
    "gemma3": dict(rope_neox=True, ffn_act="gelu", qk_norm=True, post_norms=True,
                   embed_scale=True, swa_pattern=6, rope_base_swa=10000.0),
    # mixture-of-experts layouts (llama with expert_count is mixtral's): moe_norm_w renormalises
    # the top-k router weights; qwen2moe adds a shared expert behind a sigmoid gate; olmoe's q/k
    # norms span the whole q / k vector, not each head
    "qwen2moe": dict(rope_neox=True, ffn_act="silu", moe_norm_w=False, shared_expert=True),
    "qwen3moe": dict(rope_neox=True, ffn_act="silu", qk_norm=True, moe_norm_w=True),
    "olmoe": dict(rope_neox=True, ffn_act="silu", qk_norm=True, qk_norm_full=True, moe_norm_w=False),
}
MOE_ONLY = ("qwen2moe", "qwen3moe", "olmoe")  # architectures that need expert_count
MAX_EXPERTS = 512  # llama.cpp's LLAMA_MAX_EXPERTS


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int                    # FFN width (MoE: of one expert)
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_freq_scale: float
    n_rot: int
    rope_neox: bool
    ffn_act: str                 # "silu" (SwiGLU) or "gelu" (GeGLU)
    qk_norm: bool
    post_norms: bool
    embed_scale: float           # multiplier on token embeddings (1.0 = none)
    q_scale: float               # multiplier on q before attention (gemma3), kq_scale then 1
    kq_scale: float              # softmax scale
    swa_window: int              # 0 = no sliding window
    swa_layers: tuple            # per layer: True if sliding-window (local)
    rope_base_swa: float
    tied_embeddings: bool
    file_type: str
    n_expert: int = 0            # 0: a dense FFN
    n_expert_used: int = 0       # top-k
    moe_norm_w: bool = False     # renormalise the top-k weights to sum 1
    n_ff_shexp: int = 0          # shared expert's FFN width (qwen2moe), 0 = none
    qk_norm_full: bool = False   # q/k norms over the whole vector (olmoe), else per head

    @property
    def moe(self) -> bool:
        return self.n_expert > 0

    def is_swa(self, il: int) -> bool:
        return self.swa_layers[il]

    def rope_base_for(self, il: int) -> float:
        return self.rope_base_swa if self.is_swa(il) else self.rope_base

    def rope_scale_for(self, il: int) -> float:
        return 1.0 if self.is_swa(il) else self.rope_freq_scale


def config_from_gguf(g) -> ModelConfig:
    """Build the config of GGUFFile `g`, validating every value it uses."""
    arch = g.require("general.architecture")
    if arch not in ARCHS:
        raise EdgertError(f"{g.path}: unknown architecture '{arch}' (supported: {', '.join(ARCHS)})")
    a = ARCHS[arch]

    def value(key, default=None, kind=int, lo=None, hi=None):
        """A metadata value converted and within [lo, hi]; absent -> default, or an error when
        there is no default (a required key). Per-layer arrays must hold one value."""
        full = f"{arch}.{key}"
        if full not in g.metadata and default is None:
            g.require(full)
        v = g.get(full, default)
        if v is None:
            return default
        if isinstance(v, list):  # per-layer arrays: all equal for the supported models
            if len(set(v)) != 1:
                raise EdgertError(f"{g.path}: per-layer '{full}' values are not supported")
            v = v[0]
        try:
            v = kind(v)
        except (TypeError, ValueError, OverflowError):
            raise EdgertError(f"{g.path}: '{full}' has invalid value {v!r}") from None
        if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise EdgertError(f"{g.path}: '{full}' = {v} is out of range")
        return v

    def need(key, kind=int, minimum=1):
        return value(key, None, kind, minimum)

    def opt(key, default, kind=int, lo=None, hi=None):
        return value(key, default, kind, lo, hi)

    n_embd = need("embedding_length")
    n_layer = need("block_count")
    if n_layer > 4096 or f"blk.{n_layer - 1}.attn_norm.weight" not in g.tensors \
            or f"blk.{n_layer}.attn_norm.weight" in g.tensors:   # a corrupt count would loop or misread
        raise EdgertError(f"{g.path}: '{arch}.block_count' = {n_layer} does not match the file's layers")
    n_head = need("attention.head_count")
    n_head_kv = opt("attention.head_count_kv", n_head, int, 1, n_head)
    head_dim = opt("attention.key_length", n_embd // n_head, int, 2, 1 << 14)
    if n_head_kv < 1 or n_head % n_head_kv:
        raise EdgertError(f"{g.path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    if head_dim < 2 or head_dim % 2:
        raise EdgertError(f"{g.path}: invalid head dimension {head_dim}")
    emb = g.tensor("token_embd.weight")
    n_vocab = emb.rows
    n_tokens = g.metadata.length("tokenizer.ggml.tokens")
    if n_tokens is not None and n_tokens != n_vocab:
        raise EdgertError(f"{g.path}: vocabulary has {n_tokens} tokens, embedding has {n_vocab} rows")
    swa_window = opt("attention.sliding_window", 0, int, 0) if a.get("swa_pattern") else 0
    pattern = a.get("swa_pattern", 0)
    swa_layers = tuple(bool(swa_window and pattern and (il % pattern < pattern - 1)) for il in range(n_layer))
    rope_scale = 1.0
    if g.get(f"{arch}.rope.scaling.type") == "linear":
        rope_scale = 1.0 / opt("rope.scaling.factor", 1.0, float, 1e-6, 1e6)
    q_scale = 1.0 / math.sqrt(head_dim) if arch == "gemma3" else 1.0
    n_expert = opt("expert_count", 0, int)
    n_used = opt("expert_used_count", 0, int)
    if n_expert or arch in MOE_ONLY:
        if not 1 <= n_expert <= MAX_EXPERTS:
            raise EdgertError(f"{g.path}: '{arch}.expert_count' = {n_expert} is out of range [1, {MAX_EXPERTS}]")
        if not 1 <= n_used <= n_expert:
            raise EdgertError(f"{g.path}: '{arch}.expert_used_count' = {n_used} is out of range [1, {n_expert}]")
        n_ff = need("expert_feed_forward_length") if f"{arch}.expert_feed_forward_length" in g.metadata \
            else need("feed_forward_length")
    else:
        n_ff = need("feed_forward_length")
    n_ff_shexp = 0
    if a.get("shared_expert"):
        n_ff_shexp = need("expert_shared_feed_forward_length") \
            if f"{arch}.expert_shared_feed_forward_length" in g.metadata else n_ff
    n_rot = opt("rope.dimension_count", head_dim, int, 2, head_dim)   # beyond head_dim: writes past a head
    if n_rot % 2:
        raise EdgertError(f"{g.path}: '{arch}.rope.dimension_count' = {n_rot} is odd")
    from edgert.kernels.quant import TYPE_NAMES
    return ModelConfig(
        arch=arch,
        name=str(g.get("general.name", "")),
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=n_ff,
        n_ctx_train=need("context_length"),
        rms_eps=need("attention.layer_norm_rms_epsilon", float, 0.0),
        rope_base=opt("rope.freq_base", 10000.0, float, 1e-6, 1e12),
        rope_freq_scale=rope_scale,
        n_rot=n_rot,
        rope_neox=a["rope_neox"],
        ffn_act=a["ffn_act"],
        qk_norm=a.get("qk_norm", False),
        post_norms=a.get("post_norms", False),
        embed_scale=math.sqrt(n_embd) if a.get("embed_scale") else 1.0,
        q_scale=q_scale,
        kq_scale=1.0 if arch == "gemma3" else 1.0 / math.sqrt(head_dim),
        swa_window=swa_window,
        swa_layers=swa_layers,
        rope_base_swa=opt("rope.freq_base_swa", a.get("rope_base_swa", 10000.0), float, 1e-6, 1e12),
        tied_embeddings="output.weight" not in g.tensors,
        file_type=", ".join(sorted({TYPE_NAMES.get(t.qtype, str(t.qtype)) for t in g.tensors.values()})),
        n_expert=n_expert,
        n_expert_used=n_used,
        moe_norm_w=a.get("moe_norm_w", True),
        n_ff_shexp=n_ff_shexp,
        qk_norm_full=a.get("qk_norm_full", False),
    )
