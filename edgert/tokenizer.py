"""Tokenizer built from GGUF metadata with the `tokenizers` library.

- gpt2-style byte-level BPE (`tokenizer.ggml.model = gpt2`): vocabulary and merges from the file,
  pre-tokenizer regexes chosen by `tokenizer.ggml.pre` exactly as llama.cpp (src/llama-vocab.cpp).
- SentencePiece-style (`llama`): a BPE whose merges are ranked by the merged piece's score, which
  is llama.cpp's SPM algorithm, with byte fallback; spaces become U+2581.

Special tokens are split off first, as llama.cpp's tokenizer_st_partition does: user-defined
tokens always, control tokens only when `special=True`.
"""
from __future__ import annotations

import codecs
import logging
import re

import numpy as np

from edgert.errors import EdgertError

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
           r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
          r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> regexes applied in sequence (llama.cpp llm_tokenizer_bpe)
PRE_REGEXES = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt-2": [_GPT2], "phi-2": [_GPT2], "mpt": [_GPT2], "olmo": [_GPT2],
    "smollm": [r"\p{N}", _GPT2], "codeshell": [r"\p{N}", _GPT2],
    "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "llama-bpe": [_LLAMA3], "falcon3": [_LLAMA3],
    "qwen2": [_QWEN2], "stablelm2": [_QWEN2],
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Pieces:
    """The vocabulary's token strings in one string and an offset array (a list of 49k-262k
    Python strings costs 4-20 MiB; this costs a fifth of that). pieces[i] -> str."""

    def __init__(self, tokens: list[str]):
        self._blob = "".join(tokens)
        self._off = np.zeros(len(tokens) + 1, np.int64)                 # [n_vocab + 1]
        np.cumsum([len(t) for t in tokens], out=self._off[1:])

    def __len__(self):
        return len(self._off) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._off[i]:self._off[i + 1]]


class Tokenizer:
    """Text <-> token ids for one model, with llama.cpp-compatible results."""

    def __init__(self, meta: dict, path: str = "<model>"):
        self.path = path
        self.model = meta.get("tokenizer.ggml.model")
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise EdgertError(f"{path}: no tokenizer in the file (tokenizer.ggml.tokens missing)")
        n = len(tokens)
        self.tokens = Pieces(tokens)
        # token types 1-6, one byte each
        self.types = bytes(min(max(int(t), 0), 255) for t in (meta.get("tokenizer.ggml.token_type") or [NORMAL] * n))
        self.bos_id = meta.get("tokenizer.ggml.bos_token_id")
        self.eos_id = meta.get("tokenizer.ggml.eos_token_id")
        self.eot_id = meta.get("tokenizer.ggml.eot_token_id")
        self.chat_template = meta.get("tokenizer.chat_template")
        self.pre = meta.get("tokenizer.ggml.pre", "default")
        spm = self.model == "llama"
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", spm))
        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", spm))
        vocab = {t: i for i, t in enumerate(tokens)}  # only while building
        if self.model == "gpt2":
            self._tk = self._build_bpe(vocab, meta.get("tokenizer.ggml.merges") or [])
            b2u = _bytes_to_unicode()
            self._u2b = {u: b for b, u in b2u.items()}
        elif spm:
            self._tk = self._build_spm(vocab, meta.get("tokenizer.ggml.scores") or [0.0] * n)
        else:
            raise EdgertError(f"{path}: unsupported tokenizer model '{self.model}' (supported: gpt2, llama)")
        # special tokens split off before the model runs; longest first
        spec_all = [i for i, t in enumerate(self.types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        self._special_ids = {tokens[i]: i for i in spec_all}  # text -> id of tokens split off first
        self._special_re = {
            True: self._alternation(spec_all),
            False: self._alternation([i for i in spec_all if self.types[i] == USER_DEFINED]),
        }
        self._piece_cache: dict[int, bytes] = {}

    # -------------------------------------------------------------------------------- build
    def _alternation(self, ids):
        texts = sorted({self.tokens[i] for i in ids if self.tokens[i]}, key=len, reverse=True)
        if not texts:
            return None
        return re.compile("|".join(re.escape(t) for t in texts))

    def _build_bpe(self, vocab, merges):
        from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers
        if self.pre not in PRE_REGEXES:
            raise EdgertError(f"{self.path}: unsupported BPE pre-tokenizer '{self.pre}' "
                              f"(supported: {', '.join(sorted(PRE_REGEXES))})")
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=self.pre in ("llama3", "llama-v3", "llama-bpe", "falcon3"))
        tk = HFTokenizer(bpe)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_REGEXES[self.pre]]
        tk.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return tk

    def _build_spm(self, vocab, scores):
        from tokenizers import Tokenizer as HFTokenizer, models
        # llama.cpp's SPM merges the adjacent pair whose concatenation has the highest score; a
        # BPE with every such pair ranked by that score does the same.
        merges = []
        for tok, idx in vocab.items():
            if self.types[idx] not in (NORMAL, UNUSED) or len(tok) < 2:
                continue
            for k in range(1, len(tok)):
                a, b = tok[:k], tok[k:]
                ia, ib = vocab.get(a), vocab.get(b)
                if ia is not None and ib is not None:
                    merges.append((-scores[idx], idx, ia, ib, a, b))
        merges.sort()
        unk = self.tokens[self.types.index(UNKNOWN)] if UNKNOWN in self.types else None
        bpe = models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk,
                         byte_fallback=True, fuse_unk=False)
        return HFTokenizer(bpe)

    # ------------------------------------------------------------------------------- encode
    def encode(self, text: str, add_special: bool = True, special: bool = False) -> list[int]:
        """Text -> ids, as llama_tokenize(text, add_special, parse_special=special): BOS is added
        when add_special and the model asks for it (tokenizer.ggml.add_bos_token)."""
        check_text(text)
        out: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            out.append(int(self.bos_id))
        prev_special = True
        rx = self._special_re[bool(special)]
        pos = 0
        pieces = []
        if rx is not None:
            for mt in rx.finditer(text):
                if mt.start() > pos:
                    pieces.append((text[pos:mt.start()], None))
                pieces.append((None, self._special_ids[mt.group(0)]))
                pos = mt.end()
        if pos < len(text):
            pieces.append((text[pos:], None))
        for raw, tok in pieces:
            if tok is not None:
                out.append(tok)
                prev_special = True
                continue
            if self.model == "llama":
                if self.add_space_prefix and prev_special:
                    raw = " " + raw
                raw = raw.replace(" ", "\u2581")
            out.extend(self._tk.encode(raw, add_special_tokens=False).ids)
            prev_special = False
        return out

    # ------------------------------------------------------------------------------- decode
    def token_bytes(self, tid: int, special: bool = False) -> bytes:
        """The bytes one token stands for (control tokens: empty unless special=True)."""
        key = tid if not special else -1 - tid
        b = self._piece_cache.get(key)
        if b is not None:
            return b
        t = self.tokens[tid]
        ty = self.types[tid] if tid < len(self.types) else NORMAL
        if ty == CONTROL and not special:
            b = b""
        elif ty == BYTE or (self.model == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)):
            b = bytes([int(t[3:5], 16)])
        elif ty in (CONTROL, USER_DEFINED, UNKNOWN):
            b = t.encode()
        elif self.model == "gpt2":
            b = bytes(self._u2b.get(ch, ord(ch) & 0xFF) for ch in t)
        else:
            b = t.replace("\u2581", " ").encode()
        self._piece_cache[key] = b
        return b

    def decode(self, ids, special: bool = False) -> str:
        return b"".join(self.token_bytes(int(i), special) for i in ids).decode("utf-8", "replace")

    def stream_decoder(self):
        """Returns f(token_id) -> str that yields text as soon as its UTF-8 bytes are complete."""
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        return lambda tid: dec.decode(self.token_bytes(int(tid)))

    def is_eog(self, tid: int) -> bool:
        return tid in (self.eos_id, self.eot_id) or self.tokens[tid] in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|eot_id|>")

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)


def check_text(text: str, what: str = "the text") -> None:
    """Text must be valid Unicode: a command line's invalid UTF-8 arrives as lone surrogates
    (Python's surrogateescape), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end].encode("utf-8", "surrogateescape").hex(" ") if "\udc80" <= text[e.start] <= "\udcff" \
            else f"U+{ord(text[e.start]):04X}"
        raise EdgertError(f"{what} is not valid UTF-8 ({bad} at character {e.start})") from None
