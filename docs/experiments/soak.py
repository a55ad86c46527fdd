"""Soak and determinism (issue 15): 10,000 greedy tokens in one process planned to --mem-budget
and running inside a cgroup v1 memory cap of the same size (root): never killed, no RSS growth
after warm-up; the greedy tokens identical across runs and across 1 and 2 threads.

  .venv/bin/python docs/experiments/soak.py [-m smollm2-135m] [--budget 400MB] [--tokens 10000]
      [--save-json docs/experiments/soak.json]

The worker generates in rounds of --round tokens (each a fresh prompt from held-out text, the KV
cache reset: the context is smaller than 10,000), recording RSS after each round.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPTS = ["The history of the transistor begins", "def quicksort(xs):", "Once upon a time, in a small village",
           "The three laws of thermodynamics", "import numpy as np\n", "Dear hiring manager,",
           "The capital of Australia is", "Photosynthesis converts", "In 1969, the first", "A recipe for bread:"]


def worker(a) -> int:
    from edgert.budget import parse_size
    from edgert.cgroup import MemoryCap
    cap = MemoryCap(f"edgert-soak-{os.getpid()}", parse_size(a.budget))
    cap.join()
    from edgert.apps.common import load
    from edgert.apps.run import build_parser
    from edgert.budget import rss
    from edgert.generate import generate
    from edgert.sampling import SamplingParams
    model, tok = load(build_parser().parse_args(["-m", a.model, "--mem-budget", a.budget, "-t", str(a.threads),
                                                 "-c", str(a.round + 64)]))
    rows, toks, done, i, t0 = [], [], 0, 0, time.perf_counter()
    while done < a.tokens:
        model.reset()
        ids = tok.encode(PROMPTS[i % len(PROMPTS)], add_special=True)
        n = min(a.round, a.tokens - done)
        tm = generate(model, ids, n, SamplingParams(temp=0.0), is_eog=None)
        done += len(tm.tokens)
        toks.append(tm.tokens[:64])
        rows.append({"tokens": done, "rss": rss(), "cap_peak": cap.peak, "t_s": time.perf_counter() - t0})
        i += 1
    json.dump({"rows": rows, "first_tokens": toks, "oom_kills": cap.oom_kills}, sys.stdout)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--budget", default="400MB")
    ap.add_argument("--tokens", type=int, default=10000)
    ap.add_argument("--round", type=int, default=1000)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--save-json", default=None)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    def run(threads, tokens):
        r = subprocess.run([sys.executable, __file__, "--worker", "-m", a.model, "--budget", a.budget, "--tokens",
                            str(tokens), "--round", str(a.round), "-t", str(threads)], capture_output=True, text=True)
        if r.returncode:
            return {"killed": True, "returncode": r.returncode, "stderr": r.stderr[-800:]}
        return json.loads(r.stdout)
    soak = run(a.threads, a.tokens)
    if soak.get("killed"):
        print(f"FAIL: the soak worker died (exit {soak['returncode']}): {soak['stderr']}")
        return 1
    rows = soak["rows"]
    warm = rows[0]["rss"]
    growth = max(r["rss"] for r in rows[1:]) - warm if len(rows) > 1 else 0
    for r in rows:
        print(f"{r['tokens']:>6} tokens: RSS {r['rss'] / 2**20:7.1f} MiB, cgroup peak {r['cap_peak'] / 2**20:7.1f} MiB, "
              f"{r['t_s']:6.1f} s")
    same_run = run(a.threads, 2 * a.round)   # a second process: the same first rounds
    one = run(1, 2 * a.round)
    det_runs = same_run.get("first_tokens") == soak["first_tokens"][:2]
    det_threads = one.get("first_tokens") == soak["first_tokens"][:2]
    ok = soak["oom_kills"] == 0 and growth <= 2 * 2**20 and det_runs and det_threads
    print(f"{a.tokens} tokens under a {a.budget} cap: OOM kills {soak['oom_kills']}, RSS after round 1 "
          f"{warm / 2**20:.1f} MiB, growth after it {growth / 2**20:+.2f} MiB; greedy tokens equal across runs: "
          f"{det_runs}, across -t 1 / -t {a.threads}: {det_threads} -> {'PASS' if ok else 'FAIL'}")
    if a.save_json:
        with open(a.save_json, "w") as f:
            json.dump({"model": a.model, "budget": a.budget, "rows": rows, "oom_kills": soak["oom_kills"],
                       "rss_growth_bytes": growth, "equal_across_runs": det_runs,
                       "equal_across_threads": det_threads, "pass": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
