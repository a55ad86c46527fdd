"""Tracer and the profile / simulate commands on a tiny model: the Chrome trace is valid Trace
Event Format, spans nest per layer, counters and thread names are present."""
import json

import numpy as np

from edgert.model import Model
from edgert.trace import Tracer
from test_cli import run_cli

PHASES = {"X", "C", "M"}


def validate_chrome_trace(doc):
    """The Trace Event Format as chrome://tracing and Perfetto read it (JSON object form)."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    for e in doc["traceEvents"]:
        assert e["ph"] in PHASES, e
        for k in ("name", "pid", "tid", "ts"):
            assert k in e, (k, e)
        assert isinstance(e["name"], str) and isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0
            assert isinstance(e.get("args", {}), dict)
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values())
        if e["ph"] == "M":
            assert (e["name"] in ("process_name", "thread_name") and "name" in e["args"]
                    or e["name"] == "process_labels" and e["args"]["labels"].startswith("kernels "))


def test_tracer_records_ops_inside_layers(tiny_models, tmp_path):
    tr = Tracer()
    m = Model(tiny_models["gemma3"], n_ctx=32, n_batch=8, tracer=tr)
    m.forward(np.arange(3, 8))
    m.decode_one_token(4)
    tr.counter("memory", rss_mib=1.0)
    names = {s[0] for s in tr.spans}
    assert {"attention", "ffn", "qkv", "gate_up", "qk_norm", "post_ffn_norm", "output", "load weights"} <= names
    assert any(s[1] == "io" and s[6] > 0 for s in tr.spans)  # the load's reads
    layers = [s for s in tr.spans if s[1] == "layer"]
    assert len(layers) == 2 * 2 * m.cfg.n_layer  # attention + ffn, two forward calls
    for blk in layers:  # every op of a layer lies inside its block's span
        inner = [s for s in tr.spans if s[1] == "op" and s[5] == blk[5] and blk[3] <= s[3] <= blk[4]]
        assert inner and all(s[4] <= blk[4] for s in inner)
    path = tmp_path / "t.json"
    tr.write(str(path))
    validate_chrome_trace(json.loads(path.read_text()))
    # detaching restores the untraced kernels: no new spans
    m.attach_tracer(None)
    n = len(tr.spans)
    m.decode_one_token(5)
    assert len(tr.spans) == n and not hasattr(m.ops.qkv, "__wrapped__")


def test_profile_cli_writes_trace(tiny_models, tmp_path):
    out = tmp_path / "p.json"
    r = run_cli("profile", "-m", tiny_models["llama"], "-n", "4", "-t", "1", "--trace", str(out))
    assert r.returncode == 0, r.stderr
    assert "| gate_up" in r.stdout and "| layer |" in r.stdout
    assert "tracer cost" in r.stderr and "RSS:" in r.stderr and "I/O (loading weights" in r.stderr
    doc = json.loads(out.read_text())
    validate_chrome_trace(doc)
    ev = doc["traceEvents"]
    assert any(e["ph"] == "C" and e["name"] == "memory" for e in ev)
    assert any(e["ph"] == "M" and e["args"].get("name") == "main" for e in ev)
    assert any(e["ph"] == "X" and e.get("cat") == "io" for e in ev)


def test_profile_cli_mixture_of_experts_cached(tiny_models, tmp_path):
    """A mixture of experts from an expert cache: expert and flash counters per token in the trace,
    the summary reporting the cache rather than 'every weight resident'."""
    out = tmp_path / "p.json"
    r = run_cli("profile", "-m", tiny_models["qwen2moe"], "-n", "4", "-r", "1", "-t", "1", "--ffn", "cached",
                "--mem-budget", "1GB", "--trace", str(out))
    assert r.returncode == 0, r.stderr
    assert "decode (ffn cached" in r.stderr and "caches: expert cache" in r.stderr, r.stderr
    ev = json.loads(out.read_text())["traceEvents"]
    experts = [e["args"] for e in ev if e["ph"] == "C" and e["name"] == "experts"]
    reads = [e["args"] for e in ev if e["ph"] == "C" and e["name"] == "flash reads"]
    assert len(experts) == len(reads) >= 4
    hm = [a["hits"] + a["misses"] for a in experts]
    assert hm == sorted(hm) and hm[-1] > hm[0]  # cumulative, and every token routes experts
    assert reads[-1]["mib"] > 0  # experts were read from flash


def test_simulate_cli_on_a_device(tiny_models):
    r = run_cli("simulate", "-m", tiny_models["llama"], "--device", "raspberry-pi-5-8gb", "-n", "3", "-r", "1",
                "--every", "1")
    assert r.returncode == 0, r.stderr
    assert "device raspberry-pi-5-8gb, modelled per token" in r.stdout
    assert "cost model check on this host" in r.stdout and "| mean |" in r.stdout.replace("  ", " ")
    assert "through the device flash curve" in r.stderr
    r = run_cli("simulate", "-m", tiny_models["llama"], "--device", "pixel-8-pro", "--mem-budget", "10KB")
    assert r.returncode == 1 and "is below this process's fixed cost" in r.stderr and "Traceback" not in r.stderr
