"""edgert chat: an interactive conversation using the model's chat template (Ctrl-D to quit)."""
from __future__ import annotations

import sys

from edgert.apps.common import add_model_args, add_sampling_args, load, parser, ranged


def main(argv) -> int:
    p = parser("chat", __doc__)
    add_model_args(p)
    p.add_argument("-n", "--n-predict", type=ranged(int, -1), default=512,
                   help="max tokens per reply (-1 = until end of stream or the context is full)")
    add_sampling_args(p, temp=0.7)
    p.add_argument("--system", default=None, help="system message")
    args = p.parse_args(argv)
    from edgert.chat import format_chat, template_for
    from edgert.generate import generate
    from edgert.sampling import SamplingParams
    model, tok = load(args)
    template = template_for(tok, model.cfg.arch)
    params = SamplingParams(temp=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tok.encode(format_chat(template, messages, tok), add_special=False, special=True)
        model.reset()  # re-evaluates the whole conversation; simple and always consistent
        stream = tok.stream_decoder()
        reply = []

        def on_token(t):
            if tok.is_eog(t):
                return
            reply.append(t)
            sys.stdout.write(stream(t))
            sys.stdout.flush()

        budget = min(args.n_predict, model.n_ctx - len(ids))
        if budget <= 0:
            sys.stdout.write("[context full: conversation cleared]\n")
            messages = messages[:1] if args.system else []
            continue
        generate(model, ids, budget, params, is_eog=tok.is_eog, on_token=on_token)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": tok.decode(reply)})
    return 0
