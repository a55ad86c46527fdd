"""What the subcommands share: the model / thread / context flags and loading."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from edgert.settings import default_threads, env


def add_model_args(p: argparse.ArgumentParser, ctx: bool = True):
    p.add_argument("-m", "--model", default=env("EDGERT_MODEL") or None,
                   help="pulled model name (see `edgert list`) or path to a .gguf file "
                        "[env EDGERT_MODEL; default: the registry's default model]")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads [env EDGERT_THREADS; default: physical cores]")
    if ctx:
        p.add_argument("-c", "--ctx-size", type=int, default=int(env("EDGERT_N_CTX") or 0),
                       help="context size in tokens (0 = min(4096, the model's)) [env EDGERT_N_CTX]")
        p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt batch size")


def setup_threads(n: int | None) -> int:
    import numba
    from edgert.errors import EdgertError
    n = n or default_threads()
    cap = numba.config.NUMBA_NUM_THREADS
    if n < 1 or n > cap:
        raise EdgertError(f"-t {n}: must be between 1 and {cap} (NUMBA_NUM_THREADS)")
    numba.set_num_threads(n)
    return n


def model_path(name: str | None) -> str:
    from edgert.registry import default_model, resolve
    return resolve(name or default_model())


def load(args):
    """-> (Model, Tokenizer) for the parsed args."""
    from edgert.model import Model
    from edgert.tokenizer import Tokenizer
    setup_threads(args.threads)
    path = model_path(args.model)
    model = Model(path, n_ctx=getattr(args, "ctx_size", 0), n_batch=getattr(args, "batch_size", 512))
    tok = Tokenizer(model.gguf.metadata, path)
    return model, tok


def setup_logging():
    level = env("EDGERT_LOG").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def err(msg: str):
    print(msg, file=sys.stderr, flush=True)


def is_tty(stream=sys.stderr) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("CI")
