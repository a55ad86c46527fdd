"""tok/s against the share of expert bytes the budget leaves for the expert cache, from one
`edgert bench` JSON (--ffn cached,stream --mem-budget LIST --cap): a markdown table and a PNG.

    .venv/bin/edgert bench -m pydocs-moe -p 0 -n 64 -r 2 -t 2 --ffn cached,stream \
        --mem-budget 163MB,170MB,178MB,190MB,205MB,225MB,260MB --cap \
        --text ~/.cache/edgert/models/pydocs-heldout.txt --baseline llama.cpp \
        --save-json docs/experiments/moe-budget-curve.json
    .venv/bin/python docs/experiments/moe_budget_curve.py docs/experiments/moe-budget-curve.json \
        docs/moe-budget-curve.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = json.load(open(sys.argv[1]))
by_budget = {}
for r in rows:
    kind = r["ffn"] if r["backend"].startswith("edgert") else "llama.cpp"
    by_budget.setdefault(r["mem_budget_bytes"], {})[kind] = r
print("| cgroup cap = budget | experts cached | edgert cached t/s | hit / prefetch recall | MiB read / token "
      "| edgert stream t/s | cached / stream | llama.cpp t/s |")
print("|---:|---:|---:|---|---:|---:|---:|---:|")
xs, ys, ss = [], [], []
for b in sorted(by_budget):
    c, s, ll = by_budget[b]["cached"], by_budget[b]["stream"], by_budget[b]["llama.cpp"]
    share = c["expert_slots"] / c["experts_total"]
    xs.append(100 * share), ys.append(c["avg_ts"]), ss.append(s["avg_ts"])
    print(f"| {b / 2**20:.0f} MiB | {c['expert_slots']}/{c['experts_total']} ({share:.0%}) | {c['avg_ts']:.1f} "
          f"| {c['expert_hit_rate']:.0%} / {c['prefetch_recall']:.0%} | {c['bytes_read_per_token'] / 2**20:.2f} "
          f"| {s['avg_ts']:.1f} | {c['avg_ts'] / s['avg_ts']:.2f}x | {ll['avg_ts']:.0f} |")
fig, ax = plt.subplots(figsize=(7, 4.5))
ax.plot(xs, ys, marker="o", label="edgert --ffn cached (prefetch on)")
ax.plot(xs, ss, marker="s", label="edgert --ffn stream (on-demand)")
ax.set_xlabel("expert bytes the budget leaves for the cache, % of all experts")
ax.set_ylabel("decode tokens / s (tg64)")
ax.grid(True, alpha=0.3)
ax.legend()
ax.set_title(f"{rows[0]['model_filename']}: decode under a cgroup cap = budget, reads O_DIRECT")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
