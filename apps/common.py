"""What the subcommands share: the model / thread / context flags and loading."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from edgert.fileio import save_json, write_atomic  # noqa: F401  (the apps write through these)
from edgert.settings import default_threads, env


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Module docstrings as written, and every option's default in --help."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or "default" in h.lower() or action.default in (None, False, argparse.SUPPRESS) \
                or action.nargs == 0:
            return h
        return h + " (default: %(default)s)"


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of one subcommand."""
    return argparse.ArgumentParser(prog=f"edgert {prog}", description=doc, formatter_class=HelpFormatter)


def ranged(kind, lo=None, hi=None, above: bool = False, meaning: str = ""):
    """An argparse type: `kind` within [lo, hi] (or (lo, hi] with above=True); bad values are
    argparse's one-line usage error naming the option."""
    bound = " and ".join(x for x in (
        (f"> {lo}" if above else f">= {lo}") if lo is not None else "", f"<= {hi}" if hi is not None else "") if x)

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
        if v != v or v in (float("inf"), float("-inf")) or (lo is not None and (v < lo or (above and v == lo))) \
                or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {bound}{meaning})")
        return v
    return parse


def add_sampling_args(p: argparse.ArgumentParser, temp: float):
    """llama.cpp's sampling options and meanings (run, chat)."""
    p.add_argument("--temp", type=ranged(float, 0), default=temp, help="temperature (0 = greedy)")
    p.add_argument("--top-k", type=ranged(int, 0), default=40, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=ranged(float, 0, 1), default=0.95,
                   help="keep the most likely tokens up to this probability mass (1 = all)")
    p.add_argument("-s", "--seed", type=ranged(int, -1), default=-1, help="RNG seed (-1 = random)")


def add_model_args(p: argparse.ArgumentParser, ctx: bool = True, runtime: bool = True):
    """-m, and (runtime) the options of running a model: threads, device, budget, FFN, KV, context."""
    p.add_argument("-m", "--model", default=env("EDGERT_MODEL") or None,
                   help="pulled model name (see `edgert list`) or path to a .gguf file "
                        "[env EDGERT_MODEL; default: the registry's default model]")
    if not runtime:  # a command that only reads the file (tokenize): no flag that would do nothing
        return
    p.add_argument("-t", "--threads", type=ranged(int, 1), default=None,
                   help="CPU threads [env EDGERT_THREADS; default: physical cores]")
    p.add_argument("--device", default=env("EDGERT_DEVICE") or None,
                   help="device profile (see `edgert devices`): its app share of RAM is the memory "
                        "budget and its big + mid cores the thread count [env EDGERT_DEVICE]")
    p.add_argument("--mem-budget", default=env("EDGERT_MEM_BUDGET") or None, metavar="SIZE",
                   help="peak RSS of the whole process, e.g. 700MB, 1.5GB (overrides the device's) "
                        "[env EDGERT_MEM_BUDGET; default: available memory]")
    p.add_argument("--expand-q5", action="store_true", default=env("EDGERT_EXPAND_Q5") == "1",
                   help="hold Q5_0 matrices as 8-bit: faster Q5_0 products for 1.5x their memory "
                        "[env EDGERT_EXPAND_Q5=1]")
    p.add_argument("--ffn", default=env("EDGERT_FFN"), choices=("auto", "dense", "stream", "sparse", "cached"),
                   help="where the FFN lives: resident (dense), read from flash every use (stream), or "
                        "sparse from a neuron cache (packages); a mixture of experts: experts resident "
                        "(dense), in an expert cache (cached) or read on every use (stream); auto: dense "
                        "when it fits the budget [env EDGERT_FFN]")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="mixture of experts: do not prefetch the next layer's predicted experts")
    p.add_argument("--sparsity", type=ranged(float, 0, 1, meaning=", a share of the FFN neurons"), default=float(env("EDGERT_SPARSITY")) if env("EDGERT_SPARSITY") else None,
                   help="FFN sparsity of sparse decode, one of the package's calibrated levels "
                        "[env EDGERT_SPARSITY; default: the package's recipe]")
    p.add_argument("--selector", default=env("EDGERT_SELECTOR"), choices=("auto", "predictor", "gate"),
                   help="how sparse decode picks neurons: the exact gate (gate matrices resident), the "
                        "low-rank predictor (no FFN weight read first), or auto: the gate when it fits "
                        "[env EDGERT_SELECTOR]")
    p.add_argument("--backend", default=env("EDGERT_BACKEND") or "numba", choices=("numba", "onnx", "tflite"),
                   help="what runs the embedding, attention blocks and LM head: edgert's kernels, or ONNX "
                        "Runtime / LiteRT on the graphs of `edgert convert --to onnx|tflite` (-m that directory, "
                        "or the model: exported once into EDGERT_CACHE/exports) [env EDGERT_BACKEND]")
    p.add_argument("--hot-fraction", type=ranged(float, 0, 1), default=0.5,
                   help="share of the neuron cache pinned to the hottest clusters (the rest is LRU)")
    add_kv_args(p)
    if ctx:
        p.add_argument("-c", "--ctx-size", type=ranged(int, 0), default=int(env("EDGERT_N_CTX") or 0),
                       help="context size in tokens (0 = min(4096, the model's)) [env EDGERT_N_CTX]")
        p.add_argument("-b", "--batch-size", type=ranged(int, 1), default=512, help="prompt batch size")


def add_kv_args(p: argparse.ArgumentParser):
    from edgert.kv_cache import TYPE_NAMES
    names = ", ".join(TYPE_NAMES)
    p.add_argument("-ctk", "--cache-type-k", default=env("EDGERT_CACHE_TYPE_K") or "f16", metavar="TYPE",
                   help=f"KV cache type for K: {names} (auto: token-adaptive, with --kv-bits) "
                        "[env EDGERT_CACHE_TYPE_K; default f16]")
    p.add_argument("-ctv", "--cache-type-v", default=env("EDGERT_CACHE_TYPE_V") or "f16", metavar="TYPE",
                   help="KV cache type for V, as -ctk [env EDGERT_CACHE_TYPE_V; default f16]")
    p.add_argument("--kv-bits", type=float, default=None, metavar="AVG",
                   help="auto: average bits per cached value, scales included (e.g. 3.5)")
    p.add_argument("--kv-tiers", default=None, metavar="T0,T1,T2",
                   help="auto: its three types, top to bottom, each TYPE or KTYPE/VTYPE (default: f16/q8_0 "
                        "and the two rungs of the K/V ladder around the budget)")
    p.add_argument("--kv-window", type=int, default=64, help="auto: recent positions kept in the top tier")
    p.add_argument("--kv-sinks", type=int, default=4, help="auto: first positions kept in the top tier")
    p.add_argument("--kv-rotate", choices=("on", "off"), default="on",
                   help="Hadamard-rotate quantised K and V rows per head (default on)")


def kv_format(args):
    """The KVFormat of parsed args (errors name the flag)."""
    from edgert.errors import EdgertError
    from edgert.kv_cache import KVFormat, TYPE_NAMES
    ck, cv = getattr(args, "cache_type_k", "f16"), getattr(args, "cache_type_v", "f16")
    for flag, v in (("-ctk", ck), ("-ctv", cv)):
        if v not in TYPE_NAMES:
            raise EdgertError(f"{flag} {v}: unknown KV cache type (one of {', '.join(TYPE_NAMES)})")
    bits = getattr(args, "kv_bits", None)
    if bits is not None and "auto" not in (ck, cv):
        raise EdgertError("--kv-bits applies to -ctk / -ctv auto")
    if bits is not None and not 1.0 < bits <= 16.0:
        raise EdgertError(f"--kv-bits {bits:g}: must be in (1, 16]")
    tiers = getattr(args, "kv_tiers", None)
    window, sinks = getattr(args, "kv_window", 64), getattr(args, "kv_sinks", 4)
    if window < 1 or sinks < 0:
        raise EdgertError("--kv-window must be >= 1 and --kv-sinks >= 0")
    return KVFormat(ck, cv, bits, tuple(tiers.split(",")) if tiers else None, sinks, window,
                    getattr(args, "kv_rotate", "on") == "on")


def read_text(path: str) -> str:
    """A UTF-8 text file's contents; a clear error naming the file otherwise."""
    from edgert.errors import EdgertError
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgertError(f"{path}: cannot read text ({e})") from None


def pct(v, digits: int = 0) -> str:
    """A share as a percentage, '-' when there is none (None)."""
    return "-" if v is None else f"{v:.{digits}%}"


def pyplot():
    """matplotlib's pyplot on the Agg backend (the plot extra), or a one-line error."""
    try:
        import matplotlib
    except ImportError:
        from edgert.errors import EdgertError
        raise EdgertError("--png needs matplotlib: pip install 'edgert[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path: str):
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), "wb")


def setup_threads(n: int | None) -> int:
    import numba

    from edgert.errors import EdgertError
    from edgert.kernels.matmul import set_threads
    n = n or default_threads()
    cap = numba.config.NUMBA_NUM_THREADS
    if n < 1 or n > cap:
        raise EdgertError(f"-t {n}: must be between 1 and {cap} (NUMBA_NUM_THREADS)")
    set_threads(n)
    return n


def model_path(name: str | None) -> str:
    from edgert.registry import default_model, resolve
    return resolve(name or default_model())


def device_threads(args) -> int | None:
    """-t, else the device profile's big + mid cores (capped at this machine's), else None."""
    if args.threads or not getattr(args, "device", None):
        return args.threads
    from edgert.device_profiles.loader import load_profile
    from edgert.settings import default_threads
    return min(load_profile(args.device).threads, default_threads())


def load(args):
    """-> (Model, Tokenizer) for the parsed args, under the memory budget of the args."""
    from edgert.budget import budget_from_args
    from edgert.model import Model
    from edgert.tokenizer import Tokenizer
    setup_threads(device_threads(args))
    path = model_path(args.model)
    budget = budget_from_args(getattr(args, "mem_budget", None), getattr(args, "device", None))
    made = []

    def make_tokenizer(g):  # before the plan: its memory is part of the measured fixed cost
        made.append(Tokenizer(g.metadata, path))
    model = Model(path, n_ctx=getattr(args, "ctx_size", 0), n_batch=getattr(args, "batch_size", 512),
                  budget=budget, direct_io=getattr(args, "direct_io", False),
                  throttle=getattr(args, "throttle", None), tracer=getattr(args, "tracer", None),
                  expand_q5=getattr(args, "expand_q5", False), before_weights=make_tokenizer,
                  ffn=getattr(args, "ffn", "auto"), sparsity=getattr(args, "sparsity", None),
                  selector=getattr(args, "selector", "auto"), hot_fraction=getattr(args, "hot_fraction", 0.5),
                  measure_recall=getattr(args, "measure_recall", False), kv=kv_format(args),
                  prefetch=getattr(args, "prefetch", True), backend=getattr(args, "backend", "numba"))
    return model, made[0]


def setup_logging():
    level = env("EDGERT_LOG").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def err(msg: str):
    print(msg, file=sys.stderr, flush=True)


def is_tty(stream=sys.stderr) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("CI")
