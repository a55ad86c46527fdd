"""Tokenizer: llama.cpp's vocab fixtures (from the llama-cpp-python sdist) and the real models."""
import glob
import os

import pytest

from conftest import english_text, real_model, require
from edgert.gguf_file import GGUFFile
from edgert.tokenizer import Tokenizer

FIXTURE_VOCABS = ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "phi-3"]


def _fixture_dir():
    root = os.environ.get("EDGERT_FIXTURES", os.path.expanduser("~/.cache/edgert/fixtures"))
    hits = glob.glob(os.path.join(root, "*", "vendor", "llama.cpp", "models"))
    require(hits, f"llama.cpp vocab fixtures not found under {root} (make test fetches them)")
    return hits[0]


@pytest.mark.parametrize("vocab", FIXTURE_VOCABS)
def test_vocab_fixtures(vocab):
    d = _fixture_dir()
    path = os.path.join(d, f"ggml-vocab-{vocab}.gguf")
    tok = Tokenizer(GGUFFile(path).metadata, path)
    inputs = open(path + ".inp", encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
    outputs = open(path + ".out", encoding="utf-8").read().split("\n")
    n = 0
    for text, want in zip(inputs, outputs):
        ids = [int(x) for x in want.split()]
        assert tok.encode(text, add_special=False) == ids, repr(text)
        n += 1
    assert n >= 20


@pytest.mark.llama
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_real_models_match_llama_cpp(name, llama_cpp):
    path = real_model(name)
    tok = Tokenizer(GGUFFile(path).metadata, path)
    ll = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    texts = [english_text(20000), "Hello  world!\n\n\tünïcödé 日本語 🤖 12345 don't <|im_start|>x<|im_end|> <start_of_turn>"]
    for text in texts:
        for special in (False, True):
            assert tok.encode(text, True, special) == ll.tokenize(text.encode(), add_bos=True, special=special)
    ids = tok.encode(texts[1], add_special=False)
    assert tok.decode(ids) == texts[1]
