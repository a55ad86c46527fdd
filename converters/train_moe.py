"""Train `pydocs-moe`: a small mixture-of-experts language model on the Python documentation,
exported as a GGUF llama.cpp loads (mixtral layout: `llama` architecture with `expert_count`).

No MoE with trained weights exists on the package index (../shared/MODELS.md), and every number
that depends on real routing (locality, skew, predictability, per-expert sensitivity) needs one.

    python -m edgert.converters.train_moe --out ~/.cache/edgert/models/pydocs-moe.f16.gguf \
        --quantized ~/.cache/edgert/models/pydocs-moe.gguf          # what `make moe` runs

Corpus: Debian's `python3.11-doc` (`_sources/**/*.rst.txt`, PSF licence), every 10th file in
sorted order held out for evaluation (written beside the model as `pydocs-heldout.txt`). Tokenizer:
byte-level BPE trained here (`tokenizers`, GPT-2 pre-tokenizer, 8192 tokens). Model: 6 layers,
d 512, 8 heads / 2 KV heads, 16 SwiGLU experts of 512, top-2 with renormalised weights (the mixtral
router, as llama.cpp computes it), a Switch-style load-balancing loss, tied embeddings, interleaved
RoPE (ggml's mode 0, so no weight permutation at export). Needs the `train` extra (torch 2.13.0 CPU).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    n_vocab: int = 8192
    n_embd: int = 512
    n_layer: int = 6
    n_head: int = 8
    n_head_kv: int = 2
    n_expert: int = 16
    n_expert_used: int = 2
    n_ff: int = 512          # per expert
    n_ctx: int = 256         # training sequence length (the GGUF says 2048: RoPE extrapolates a little)
    rope_base: float = 10000.0
    rms_eps: float = 1e-5


def corpus_files(doc_dir: Path) -> tuple[list[Path], list[Path]]:
    """-> (training files, held-out files): every 10th of the sorted .rst.txt sources held out."""
    files = sorted(doc_dir.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"{doc_dir}: no *.rst.txt files (unpack python3.11-doc there)")
    return [f for i, f in enumerate(files) if i % 10], [f for i, f in enumerate(files) if i % 10 == 0]


def calib_file(train_texts: list[str], path: Path, every: int = 20) -> Path:
    """Calibration text for edgert convert (per-expert bit widths): every 20th training file, so
    that no held-out text is calibrated on."""
    path.write_text("\n\n".join(train_texts[::every]), encoding="utf-8")
    return path


def fetch_corpus(work: Path) -> Path:
    """Debian's python3.11-doc, downloaded and unpacked under work (apt-get download)."""
    root = work / "python3.11-doc"
    src = root / "usr/share/doc/python3.11/html/_sources"
    if src.is_dir():
        return src
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=work, check=True, capture_output=True)
    deb = next(work.glob("python3.11-doc_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return src


def train_tokenizer(texts: list[str], n_vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def build_model(s: Shape):
    import torch
    from torch import nn
    F = torch.nn.functional
    hd = s.n_embd // s.n_head

    def rope_tables(T):
        inv = s.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)   # [hd/2]
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]              # [T, hd/2]
        return ang.cos(), ang.sin()

    def rope(x, cos, sin):  # x [B, T, H, hd]; ggml mode 0: pairs (2i, 2i+1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, sn = cos[None, :, None], sin[None, :, None]
        return torch.stack((x0 * c - x1 * sn, x0 * sn + x1 * c), dim=-1).flatten(-2)

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(s.n_embd))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.rms_eps) * self.weight

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            E, Fd, X = s.n_embd, s.n_ff, s.n_expert
            self.router = nn.Linear(E, X, bias=False)
            self.gate = nn.Parameter(torch.randn(X, Fd, E) / math.sqrt(E))
            self.up = nn.Parameter(torch.randn(X, Fd, E) / math.sqrt(E))
            self.down = nn.Parameter(torch.randn(X, E, Fd) / math.sqrt(Fd) / math.sqrt(2 * s.n_layer))

        def forward(self, x):  # x [N, E] -> ([N, E], aux loss)
            probs = F.softmax(self.router(x), dim=-1)                     # [N, X]
            w, idx = probs.topk(s.n_expert_used, dim=-1)                  # [N, k]
            w = w / w.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            for e in range(s.n_expert):
                tok, slot = (idx == e).nonzero(as_tuple=True)
                if tok.numel() == 0:
                    continue
                h = x[tok]
                y = (F.silu(h @ self.gate[e].T) * (h @ self.up[e].T)) @ self.down[e].T
                out.index_add_(0, tok, y * w[tok, slot, None])
            frac = torch.zeros(s.n_expert).index_add_(0, idx.flatten(), torch.ones(idx.numel())) / idx.numel()
            aux = s.n_expert * (frac * probs.mean(0)).sum()
            return out, aux

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            E = s.n_embd
            self.attn_norm, self.ffn_norm = RMSNorm(), RMSNorm()
            self.q = nn.Linear(E, s.n_head * hd, bias=False)
            self.k = nn.Linear(E, s.n_head_kv * hd, bias=False)
            self.v = nn.Linear(E, s.n_head_kv * hd, bias=False)
            self.o = nn.Linear(s.n_head * hd, E, bias=False)
            nn.init.normal_(self.o.weight, std=0.02 / math.sqrt(2 * s.n_layer))
            self.moe = MoE()

        def forward(self, x, cos, sin):
            B, T, E = x.shape
            h = self.attn_norm(x)
            q = rope(self.q(h).view(B, T, s.n_head, hd), cos, sin).transpose(1, 2)
            k = rope(self.k(h).view(B, T, s.n_head_kv, hd), cos, sin).transpose(1, 2)
            v = self.v(h).view(B, T, s.n_head_kv, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.o(a.transpose(1, 2).reshape(B, T, E))
            y, aux = self.moe(self.ffn_norm(x).view(B * T, E))
            return x + y.view(B, T, E), aux

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embd = nn.Embedding(s.n_vocab, s.n_embd)
            nn.init.normal_(self.embd.weight, std=0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(s.n_layer))
            self.norm = RMSNorm()

        def forward(self, tokens):  # [B, T] -> (logits [B, T, V], aux)
            cos, sin = rope_tables(tokens.shape[1])
            x = self.embd(tokens)
            aux = 0.0
            for b in self.blocks:
                x, a = b(x, cos, sin)
                aux = aux + a
            return self.norm(x) @ self.embd.weight.T, aux / s.n_layer

    return LM()


def export_gguf(model, tok, s: Shape, path: Path, meta: dict):
    """Write the trained model as a mixtral-layout GGUF (F16 matrices, F32 norms), temp + rename."""
    import gguf
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = tok.to_str()
    import json
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(merges)["model"]["merges"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name("pydocs-moe")
        w.add_description(f"edgert's trained MoE on python3.11-doc: {meta}")
        w.add_context_length(2048)
        w.add_embedding_length(s.n_embd)
        w.add_block_count(s.n_layer)
        w.add_feed_forward_length(s.n_ff)
        w.add_head_count(s.n_head)
        w.add_head_count_kv(s.n_head_kv)
        w.add_layer_norm_rms_eps(s.rms_eps)
        w.add_rope_freq_base(s.rope_base)
        w.add_rope_dimension_count(s.n_embd // s.n_head)
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        w.add_vocab_size(s.n_vocab)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL
                           for t in tokens])
        w.add_token_merges(merges)
        eot = vocab["<|endoftext|>"]
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
        w.add_add_bos_token(True)
        f16 = lambda a: a.astype(np.float16)
        w.add_tensor("token_embd.weight", f16(sd["embd.weight"]))
        w.add_tensor("output_norm.weight", sd["norm.weight"])
        for il in range(s.n_layer):
            p, q = f"blk.{il}.", f"blocks.{il}."
            w.add_tensor(p + "attn_norm.weight", sd[q + "attn_norm.weight"])
            for a, b in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_output", "o")):
                w.add_tensor(p + a + ".weight", f16(sd[q + b + ".weight"]))
            w.add_tensor(p + "ffn_norm.weight", sd[q + "ffn_norm.weight"])
            w.add_tensor(p + "ffn_gate_inp.weight", sd[q + "moe.router.weight"])   # [n_expert, E], F32
            for a, b in (("ffn_gate_exps", "gate"), ("ffn_up_exps", "up"), ("ffn_down_exps", "down")):
                w.add_tensor(p + a + ".weight", f16(sd[q + "moe." + b]))          # [n_expert, rows, cols]
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="the GGUF to write (F16)")
    ap.add_argument("--quantized", type=Path, help="also write this Q8_0 copy (llama.cpp's quantiser)")
    ap.add_argument("--docs", type=Path, help="python3.11-doc's _sources directory (default: download)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/edgert/corpus")
    ap.add_argument("--minutes", type=float, default=24.0, help="training wall-clock budget")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    s = Shape()
    docs = a.docs or fetch_corpus(a.work)
    train_files, held_files = corpus_files(docs)
    read = lambda fs: [f.read_text(encoding="utf-8", errors="replace") for f in fs]
    train_texts, held_texts = read(train_files), read(held_files)
    heldout = a.out.parent / "pydocs-heldout.txt"
    heldout.parent.mkdir(parents=True, exist_ok=True)
    heldout.write_text("\n\n".join(held_texts), encoding="utf-8")
    calib_file(train_texts, a.out.parent / "pydocs-calib.txt")
    tok = train_tokenizer(train_texts, s.n_vocab)
    eot = tok.token_to_id("<|endoftext|>")
    ids = []
    for enc in tok.encode_batch(train_texts):
        ids.extend(enc.ids)
        ids.append(eot)
    data = torch.tensor(ids, dtype=torch.long)
    log.info("corpus: %d training files, %d tokens; %d held out (%s)", len(train_files), len(data),
             len(held_files), heldout)
    model = build_model(s)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    budget_s, t0, step, warm = a.minutes * 60, time.perf_counter(), 0, 50
    gen = torch.Generator().manual_seed(a.seed)
    ema = None
    while True:
        frac = (time.perf_counter() - t0) / budget_s
        if frac >= 1:
            break
        lr = a.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for gp in opt.param_groups:
            gp["lr"] = lr
        starts = torch.randint(0, len(data) - s.n_ctx - 1, (a.batch,), generator=gen)
        x = torch.stack([data[i:i + s.n_ctx] for i in starts])
        y = torch.stack([data[i + 1:i + s.n_ctx + 1] for i in starts])
        logits, aux = model(x)
        ce = torch.nn.functional.cross_entropy(logits.view(-1, s.n_vocab), y.view(-1))
        loss = ce + 0.01 * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = ce.item() if ema is None else 0.98 * ema + 0.02 * ce.item()
        step += 1
        if step % 25 == 0:
            log.info("step %d  %.0f%%  loss %.3f (ppl %.1f)  aux %.3f  lr %.2e", step, frac * 100, ema,
                     math.exp(ema), float(aux), lr)
    tokens_seen = step * a.batch * s.n_ctx
    meta = dict(params=n_params, steps=step, tokens=tokens_seen, minutes=a.minutes, seed=a.seed,
                train_loss=round(ema, 4))
    log.info("trained %s", meta)
    export_gguf(model, tok, s, a.out, meta)
    log.info("wrote %s", a.out)
    if a.quantized:
        from edgert.converters.quantize import quantize
        quantize(str(a.out), str(a.quantized), "Q8_0", pure=True)
        log.info("wrote %s", a.quantized)


if __name__ == "__main__":
    main()
