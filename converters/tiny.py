"""Tiny random-weight GGUF models of each supported architecture, written with gguf's writer.

They are for wiring tests (same logits as llama.cpp on the same file) and for compiling kernels,
never for claims about quality or speed. Matrix types are chosen per tensor so that one small
file exercises every supported quant type.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from edgert.kernels.quant import BLOCK, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0

# which type each matrix gets (rows of 256 allow the K-quants everywhere)
DEFAULT_TYPES = {"attn_q": Q4_0, "attn_k": Q5_0, "attn_v": Q8_0, "attn_output": Q4_K,
                 "ffn_gate": Q4_1, "ffn_up": Q4_K, "ffn_down": Q6_K, "token_embd": Q8_0, "output": F16}


def random_blocks(qtype: int, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """Random but valid quantised data [rows, row_bytes]: every bit pattern of the quants, with
    block scales set to small normal fp16 values so the weights stay in a sane range."""
    epb, bpb = BLOCK[qtype]
    if qtype == F32:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    if qtype == F16:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float16)
    nb = cols // epb
    b = rng.integers(0, 256, (rows, nb, bpb), dtype=np.uint8)

    def put_f16(off, vals):
        b[:, :, off:off + 2] = vals.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)

    d = (rng.uniform(0.5, 1.5, (rows, nb)) * scale).astype(np.float32)
    if qtype in (Q4_0, Q5_0):
        put_f16(0, d / 8)
    elif qtype == Q4_1:
        put_f16(0, d / 8)
        put_f16(2, -d)
    elif qtype == Q5_1:
        put_f16(0, d / 16)
        put_f16(2, -d)
    elif qtype == Q8_0:
        put_f16(0, d / 64)
    elif qtype in (Q4_K, Q5_K):
        put_f16(0, d / 256)
        put_f16(2, d / 64)
    elif qtype == Q2_K:
        put_f16(80, d / 32)
        put_f16(82, d / 32)
    elif qtype == Q3_K:
        put_f16(108, d / 64)
    elif qtype == Q6_K:
        b[:, :, 192:208] = (rng.integers(-32, 32, (rows, nb, 16))).astype(np.int8).view(np.uint8)
        put_f16(208, d / 256)
    return b.reshape(rows, nb * bpb)


def random_matrix(rows: int, cols: int, seed: int = 0) -> dict:
    """{qtype: QMatrix} of random valid weights [rows, cols] in every supported type (cols a
    multiple of 256, rows of 64), repacked as the engine loads them."""
    from edgert.kernels.quant import TYPE_NAMES, repack
    rng = np.random.default_rng(seed)
    return {q: repack(q, random_blocks(q, rows, cols, rng).view(np.uint8).reshape(rows, -1), rows, cols)
            for q in TYPE_NAMES}


def write_tiny_gguf(path: str, arch: str = "llama", n_layer: int = 2, n_embd: int = 256, n_ff: int = 512,
                    n_head: int = 4, n_head_kv: int = 2, head_dim: int = 64, n_vocab: int = 320,
                    types: dict | None = None, seed: int = 0, sliding_window: int = 8,
                    tied: bool = False, n_expert: int = 0, n_expert_used: int = 2) -> str:
    """Write a random-weight model; returns path. The file is written to a temp name, then renamed.
    n_expert > 0 (or a MoE architecture: qwen2moe, qwen3moe, olmoe) writes a mixture-of-experts
    FFN: router `ffn_gate_inp` (F32) and stacked `ffn_{gate,up,down}_exps` of n_ff each (qwen2moe
    also a shared expert behind a sigmoid gate)."""
    import gguf
    types = {**DEFAULT_TYPES, **(types or {})}
    rng = np.random.default_rng(seed)
    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    moe = n_expert > 0 or arch in ("qwen2moe", "qwen3moe", "olmoe")
    if arch == "olmoe":  # its k norm spans n_embd: no grouped-query attention
        n_head_kv = n_head
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    if moe:
        n_expert = n_expert or 8
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        if arch != "llama":
            w.add_expert_feed_forward_length(n_ff)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(n_ff)
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(sliding_window)
    elif head_dim * n_head != n_embd:
        raise ValueError("llama/qwen2 need head_dim * n_head == n_embd")
    else:
        w.add_rope_dimension_count(head_dim)
    # SentencePiece-style vocabulary: specials, 256 byte tokens, then single characters
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    alphabet = [chr(c) for c in range(0x21, 0x7F)] + ["\u2581" + chr(c) for c in range(0x61, 0x7B)]
    toks += alphabet[: n_vocab - len(toks)]
    toks += [f"<extra{i}>" for i in range(n_vocab - len(toks))]
    ttypes = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(n_vocab - 259)])
    w.add_token_types(ttypes)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def mat(name, kind, rows, cols):
        data = random_blocks(types[kind], rows, cols, rng)
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(types[kind]) if types[kind] not in (F32, F16) else None)

    def vec(name, n, around=1.0):
        w.add_tensor(name, (around + 0.1 * rng.standard_normal(n)).astype(np.float32))

    Dq, Dkv = n_head * head_dim, n_head_kv * head_dim
    # token_embd scale: bigger than the matrices so the residual stream is not all noise
    w.add_tensor("token_embd.weight", random_blocks(types["token_embd"], n_vocab, n_embd, rng, 1.0),
                 raw_dtype=gguf.GGMLQuantizationType(types["token_embd"]) if types["token_embd"] not in (F32, F16) else None)
    vec("output_norm.weight", n_embd)
    if not tied:
        mat("output.weight", "output", n_vocab, n_embd)
    for il in range(n_layer):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", n_embd)
        mat(p + "attn_q.weight", "attn_q", Dq, n_embd)
        mat(p + "attn_k.weight", "attn_k", Dkv, n_embd)
        mat(p + "attn_v.weight", "attn_v", Dkv, n_embd)
        mat(p + "attn_output.weight", "attn_output", n_embd, Dq)
        if arch in ("qwen2", "qwen2moe"):
            vec(p + "attn_q.bias", Dq, 0.0)
            vec(p + "attn_k.bias", Dkv, 0.0)
            vec(p + "attn_v.bias", Dkv, 0.0)
        if arch == "gemma3":
            vec(p + "attn_q_norm.weight", head_dim)
            vec(p + "attn_k_norm.weight", head_dim)
            vec(p + "post_attention_norm.weight", n_embd)
            vec(p + "post_ffw_norm.weight", n_embd)
        if arch == "qwen3moe":
            vec(p + "attn_q_norm.weight", head_dim)
            vec(p + "attn_k_norm.weight", head_dim)
        if arch == "olmoe":  # over the whole q / k vector
            vec(p + "attn_q_norm.weight", Dq)
            vec(p + "attn_k_norm.weight", Dkv)
        vec(p + "ffn_norm.weight", n_embd)
        if not moe:
            mat(p + "ffn_gate.weight", "ffn_gate", n_ff, n_embd)
            mat(p + "ffn_up.weight", "ffn_up", n_ff, n_embd)
            mat(p + "ffn_down.weight", "ffn_down", n_embd, n_ff)
            continue
        # a router with spread (distinct top-k), then every expert's matrices stacked
        w.add_tensor(p + "ffn_gate_inp.weight", (rng.standard_normal((n_expert, n_embd)) * 0.3).astype(np.float32))
        for name, kind, rows, cols in (("ffn_gate_exps", "ffn_gate", n_ff, n_embd), ("ffn_up_exps", "ffn_up", n_ff, n_embd),
                                       ("ffn_down_exps", "ffn_down", n_embd, n_ff)):
            q = types[kind]
            data = random_blocks(q, n_expert * rows, cols, rng)
            data = data.reshape(n_expert, rows, -1)
            w.add_tensor(p + name + ".weight", data, raw_dtype=gguf.GGMLQuantizationType(q) if q not in (F32, F16) else None)
        if arch == "qwen2moe":
            vec(p + "ffn_gate_inp_shexp.weight", n_embd, 0.0)
            mat(p + "ffn_gate_shexp.weight", "ffn_gate", n_ff, n_embd)
            mat(p + "ffn_up_shexp.weight", "ffn_up", n_ff, n_embd)
            mat(p + "ffn_down_shexp.weight", "ffn_down", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def tiny_model_path(arch: str = "llama", **kw) -> str:
    """A tiny model in a temporary directory (for warm-up and tests)."""
    d = tempfile.mkdtemp(prefix="edgert-tiny-")
    return write_tiny_gguf(os.path.join(d, f"tiny-{arch}.gguf"), arch, **kw)


# A Mixtral-like shape scaled down (Mixtral 8x7B: d 4096, FFN 14336 = 3.5 d, 32 layers, 8 experts,
# top-2, 32 query / 8 KV heads of 128): the FFN ratio, expert count, top-k and head size kept
MIXTRAL_LIKE = dict(n_embd=1536, n_ff=5376, n_head=12, n_head_kv=4, head_dim=128, n_expert=8, n_expert_used=2)


def write_random_moe(path: str, target_bytes: float = 2e9, qtype: int = Q4_0, seed: int = 0) -> str:
    """A random-weight Mixtral-like MoE of about target_bytes (layers added until it is reached),
    every matrix at qtype: for I/O benchmarks at a realistic shape, never for quality."""
    from edgert.kernels.quant import row_bytes
    s = MIXTRAL_LIKE
    E, F, X = s["n_embd"], s["n_ff"], s["n_expert"]
    Dq, Dkv = s["n_head"] * s["head_dim"], s["n_head_kv"] * s["head_dim"]
    per_layer = X * 3 * F * row_bytes(qtype, E) + (2 * Dq + 2 * Dkv) * row_bytes(qtype, E)
    n_layer = max(1, round(target_bytes / per_layer))
    types = {k: qtype for k in DEFAULT_TYPES}
    return write_tiny_gguf(path, "llama", n_layer=n_layer, types={**types, "token_embd": Q8_0}, seed=seed,
                           n_vocab=512, **s)



if __name__ == "__main__":  # make random-moe: the ~2 GB Mixtral-like file of the expert benchmark
    import sys
    out = sys.argv[1]
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_random_moe(out, float(sys.argv[2]) if len(sys.argv) > 2 else 2e9)
