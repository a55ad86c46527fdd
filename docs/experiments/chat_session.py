"""A scripted `edgert chat` session in a pseudo-terminal (what a user types, Ctrl-C included):
10 turns at -c 512 with --timings; Ctrl-C is sent during turn 5's reply. Prints each turn's
prefilled tokens and prompt time, and checks: turn 10's prompt time within 2x of turn 2's, the
session usable after Ctrl-C (turn 6 onward answered), the process ends with /exit.

  .venv/bin/python docs/experiments/chat_session.py [-m MODEL] [--save-json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import sys
import time

MESSAGES = ["Hi! Who are you?", "What is the capital of France?", "Name three rivers in Europe.",
            "Write a haiku about the sea.", "Tell me a long story about a dragon and a knight.",
            "Thanks. What is 12 times 12?", "What did I ask you first?", "Explain what a CPU cache is.",
            "Give me two tips for learning Python.", "Say goodbye in French."]
TIMING = re.compile(r"\[prompt (\d+) tokens in ([\d.]+) ms, reply (\d+) tokens")


def read_until(fd, pattern, timeout=300):
    buf, t0 = b"", time.time()
    while time.time() - t0 < timeout:
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            if re.search(pattern, buf.decode(errors="replace")):
                return buf.decode(errors="replace")
    raise SystemExit(f"timeout waiting for {pattern!r}; got: {buf.decode(errors='replace')[-500:]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("-c", "--ctx-size", default="512")
    ap.add_argument("--save-json", default=None)
    a = ap.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "edgert")
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(exe, [exe, "chat", "-m", a.model, "-c", a.ctx_size, "-n", "64", "--temp", "0", "--timings", "-t", "2"])
    read_until(fd, r"> $")
    rows = []
    for i, msg in enumerate(MESSAGES, 1):
        os.write(fd, (msg + "\r").encode())
        if i == 5:   # Ctrl-C once the reply has started
            read_until(fd, msg[-10:] + r".*\n.*\S")
            time.sleep(0.3)
            os.write(fd, b"\x03")
        out = read_until(fd, r"\[prompt [^\]]*\][^>]*> $")
        m = TIMING.findall(out)[-1]
        rows.append({"turn": i, "prefilled": int(m[0]), "prompt_ms": float(m[1]), "reply_tokens": int(m[2]),
                     "stopped": "[stopped]" in out, "context_shift": "oldest" in out})
        print(f"turn {i:2}: prefilled {m[0]:>4} tokens in {float(m[1]):8.1f} ms, reply {m[2]:>3} tokens"
              + ("  [Ctrl-C: stopped]" if rows[-1]["stopped"] else "")
              + ("  [context full: oldest turns dropped]" if rows[-1]["context_shift"] else ""))
    os.write(fd, b"/exit\r")
    _, status = os.waitpid(pid, 0)
    ratio = rows[9]["prompt_ms"] / rows[1]["prompt_ms"]
    ok = ratio <= 2 and rows[4]["stopped"] and all(r["reply_tokens"] > 0 for r in rows[5:]) and status == 0
    print(f"turn 10 / turn 2 prompt time: {ratio:.2f}x; Ctrl-C in turn 5 stopped the reply: {rows[4]['stopped']}; "
          f"exit status {os.waitstatus_to_exitcode(status)} -> {'PASS' if ok else 'FAIL'}")
    if a.save_json:
        with open(a.save_json, "w") as f:
            json.dump({"model": a.model, "ctx": int(a.ctx_size), "turns": rows, "ratio_10_2": ratio, "pass": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
