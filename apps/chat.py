"""edgert chat: an interactive conversation with the model's chat template, as llama-cli's.

The conversation's KV cache is kept between turns: each message prefills only its own tokens.
Ctrl-C stops a reply and returns to the prompt (the partial reply stays in the conversation);
Ctrl-D or /exit quits; /clear starts over. When the context is full the oldest turns are
dropped (the system prompt stays) with a notice. Input history is kept with readline
(EDGERT_CACHE/chat_history).
"""
from __future__ import annotations

import os
import signal
import sys

from edgert.apps.common import add_model_args, add_sampling_args, err, load, parser, ranged


def main(argv) -> int:
    p = parser("chat", __doc__)
    add_model_args(p)
    p.add_argument("-n", "--n-predict", type=ranged(int, -1), default=512,
                   help="max tokens per reply (-1 = until end of stream or the context is full)")
    add_sampling_args(p, temp=0.7)
    p.add_argument("-sys", "--system-prompt", "--system", dest="system", default=None, help="system message")
    p.add_argument("--timings", action="store_true",
                   help="after each reply, the tokens prefilled and the speeds (stderr)")
    args = p.parse_args(argv)
    from edgert.chat import Conversation, template_for
    from edgert.sampling import SamplingParams
    model, tok = load(args)
    params = SamplingParams(temp=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    conv = Conversation(model, tok, template_for(tok, model.cfg.arch), params, args.system,
                        reserve=min(256, max(16, model.n_ctx // 8)))
    interactive = sys.stdin.isatty()
    history = _readline() if interactive else None
    stopped = [False]

    def on_sigint(signum, frame):
        stopped[0] = True

    def notice(msg):
        err(f"[{msg}]")

    try:
        while True:
            try:
                line = input("> ") if interactive else sys.stdin.readline()
            except KeyboardInterrupt:
                sys.stdout.write("\n(Ctrl-D or /exit to quit)\n")
                continue
            except EOFError:
                break
            if not interactive and not line:
                break
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.strip() == "/exit":
                break
            if text.strip() == "/clear":
                conv.clear()
                notice("conversation cleared")
                continue
            from edgert.tokenizer import check_text
            check_text(text, "the message")
            stream = tok.stream_decoder()
            stopped[0] = False
            old = signal.signal(signal.SIGINT, on_sigint)
            try:
                _, tm = conv.turn(text, args.n_predict, on_token=lambda t: _write(stream(t)), on_notice=notice,
                                  stop=lambda: stopped[0])
            finally:
                signal.signal(signal.SIGINT, old)
            sys.stdout.write("\n")
            sys.stdout.flush()
            if stopped[0]:
                notice("stopped")
            if args.timings:
                ev = f"{tm.n_eval / tm.t_eval_ms * 1e3:.1f} t/s" if tm.n_eval else "-"
                err(f"[prompt {tm.n_prompt} tokens in {tm.t_prompt_ms:.1f} ms, reply {len(tm.tokens)} tokens at {ev}, "
                    f"context {model.n_past}/{model.n_ctx}]")
    finally:
        if history:
            history()
    return 0


def _write(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


def _readline():
    """Line editing and a history file for input(); -> a function that saves the history."""
    try:
        import readline
    except ImportError:
        return None
    from edgert.settings import env
    path = os.path.join(os.path.expanduser(env("EDGERT_CACHE")), "chat_history")
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save():
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass
    return save
