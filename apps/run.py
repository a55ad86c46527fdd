"""edgert run: generate from a prompt, streaming tokens, then llama.cpp-style timing lines."""
from __future__ import annotations

import argparse
import sys

from edgert.apps.common import add_model_args, add_sampling_args, err, load, parser, pct, ranged, save_json


def build_parser() -> argparse.ArgumentParser:
    p = parser("run", __doc__)
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="prompt text")
    p.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    p.add_argument("-n", "--n-predict", type=ranged(int, -1), default=128,
                   help="tokens to generate (-1 = until end of stream or the context is full)")
    add_sampling_args(p, temp=0.8)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--no-display-prompt", action="store_true", help="do not echo the prompt")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print the memory report: the plan and the measured peak in one MiB table")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the prompt and generated token ids, the text and the timings to FILE")
    return p


def report_stats(model):
    """The FFN stores' counters of the run (sparse / streamed FFN, embedding rows from flash)."""
    st = model.stats.as_dict()
    if model.placement.ffn == "dense" and not st["bytes_read_per_token"]:
        return
    io = (f"{st['bytes_read_per_token'] / 2**20:.2f} MiB read per token ({model.reader.mode if model.reader else '-'}), "
          f"{st['io_wait_s'] * 1e3:.0f} ms waiting on I/O over {st['tokens']} tokens")
    if model.cfg.moe:
        err(f"{'experts':>16} = {model.placement.ffn}: hit rate {pct(st['expert_hit_rate'], 1)} ({st['expert_hits']} "
            f"hits, {st['expert_misses']} misses), prefetch recall {pct(st['prefetch_recall'], 1)} precision "
            f"{pct(st['prefetch_precision'], 1)}, " + io)
        return
    hit = "-" if st["neuron_hit_rate"] is None else f"{st['neuron_hit_rate']:.1%}"
    err(f"{'ffn':>16} = {model.placement.ffn}: sparsity {st['sparsity']:.1%}, cluster hit rate {hit}, "
        f"{st['bytes_read_per_token'] / 2**20:.2f} MiB read per token ({model.reader.mode if model.reader else '-'}), "
        f"{st['io_wait_s'] * 1e3:.0f} ms waiting on I/O over {st['tokens']} tokens")


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    from edgert.chat import format_chat, template_for
    from edgert.errors import EdgertError
    from edgert.generate import generate
    from edgert.sampling import SamplingParams
    prompt = args.prompt
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise EdgertError(f"{args.file}: cannot read prompt ({e})") from None
    if prompt is None:
        prompt = "Once upon a time"
    model, tok = load(args)
    if args.chat:
        text = format_chat(template_for(tok, model.cfg.arch), [{"role": "user", "content": prompt}], tok)
        ids = tok.encode(text, add_special=False, special=True)
    else:
        ids = tok.encode(prompt, add_special=True)
    if not args.no_display_prompt:
        sys.stdout.write(prompt if not args.chat else text)
        sys.stdout.flush()
    stream = tok.stream_decoder()

    def on_token(t):
        sys.stdout.write(stream(t))
        sys.stdout.flush()

    n = args.n_predict if args.n_predict >= 0 else model.n_ctx
    params = SamplingParams(temp=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    tm = generate(model, ids, n, params, is_eog=None if args.ignore_eos else tok.is_eog, on_token=on_token)
    sys.stdout.write("\n")
    sys.stdout.flush()
    err("")
    for line in tm.lines():
        err(line)
    from edgert.settings import peak_rss
    err(f"{'first token':>16} = {tm.t_load_ms + tm.t_prompt_ms + (tm.t_sample_ms / max(tm.n_sample, 1)):10.2f} ms after start of load")
    err(f"{'peak RSS':>16} = {peak_rss() / 2**20:10.1f} MiB (weights {model.weight_bytes / 2**20:.1f} MiB, "
        f"KV cache {model.kv_bytes / 2**20:.1f} MiB)")
    err(f"{'memory budget':>16} = {model.budget.summary()}")
    from edgert.kernels import isa
    err(f"{'kernels':>16} = {isa.describe()} ({isa.current().about})")
    h = model.kv.histogram(model.n_past)
    err(f"{'KV cache':>16} = {model.kv.describe()}; in use at {model.n_past} positions: "
        + ", ".join(f"{k} {v}" for k, v in h.items() if k != "bits_in_use") + f" ({h['bits_in_use']:.2f} bits per value)")
    for line in model.placement.lines():
        err(line)
    from edgert.placement import memory_report
    mem = memory_report(model.placement, peak_rss(), model.budget.source)
    if args.verbose:
        w = max(map(len, mem))
        err(f"\n| {'memory':<{w}} | {'MiB':>9} |\n|{'-' * (w + 2)}|{'-' * 10}:|")
        for k, v in mem.items():
            err(f"| {k:<{w}} | {v:>9.1f} |")
    report_stats(model)
    if args.json:
        save_json(args.json, {"model": args.model, "prompt_tokens": [int(t) for t in ids],
                              "tokens": [int(t) for t in tm.tokens], "text": tok.decode(tm.tokens),
                              "timings": {"load_ms": tm.t_load_ms, "prompt_ms": tm.t_prompt_ms,
                                          "n_prompt": tm.n_prompt, "eval_ms": tm.t_eval_ms, "n_eval": tm.n_eval},
                              "peak_rss": peak_rss(), "memory_mib": mem, "kernels": isa.describe()})
    return 0
