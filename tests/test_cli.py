"""The CLI as a user meets it: commands on a tiny model, and one-line errors for bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest

from edgert.apps.cli import main


def run_cli(*args, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgert", *args], capture_output=True, text=True, env=e, timeout=300)


def one_line_error(r, *fragments):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("edgert: ") and "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_run_tokenize_show_on_tiny(tiny_models, capsys):
    path = tiny_models["llama"]
    assert main(["run", "-m", path, "-p", "ab", "-n", "8", "--temp", "0", "-t", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ab")
    assert "prompt eval time" in err and "eval time" in err and "load time" in err
    assert main(["tokenize", "-m", path, "-p", "abc"]) == 0
    out, _ = capsys.readouterr()
    assert out.strip().startswith("[1, ") and out.strip().endswith("]")
    assert main(["show", path]) == 0
    out, _ = capsys.readouterr()
    assert "architecture" in out and "llama" in out


def test_run_greedy_is_reproducible(tiny_models, tmp_path, capsys):
    """Greedy tokens equal across runs and across 1 and 2 threads (the row split of the kernels
    never changes a row's sums)."""
    import json
    toks = []
    for i, t in enumerate(("2", "2", "1")):
        main(["run", "-m", tiny_models["gemma3"], "-p", "xyz", "-n", "12", "--temp", "0", "--ignore-eos", "-t", t,
              "--json", str(tmp_path / f"r{i}.json")])
        capsys.readouterr()
        toks.append(json.loads((tmp_path / f"r{i}.json").read_text())["tokens"])
    assert len(toks[0]) == 12 and toks[0] == toks[1] == toks[2]


def test_error_not_a_file(tmp_path):
    one_line_error(run_cli("run", "-m", str(tmp_path / "missing.gguf"), "-p", "x"), "missing.gguf", "no such file")


def test_error_not_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, this is not a model")
    one_line_error(run_cli("run", "-m", str(p), "-p", "x"), "notes.gguf", "not a GGUF file")


def test_error_truncated(tiny_models, tmp_path):
    p = tmp_path / "half.gguf"
    data = open(tiny_models["llama"], "rb").read()
    p.write_bytes(data[: len(data) // 2])
    one_line_error(run_cli("run", "-m", str(p), "-p", "x"), "half.gguf", "truncated")


def test_error_unknown_model_name():
    one_line_error(run_cli("run", "-m", "llama-9000b", "-p", "x"), "unknown model 'llama-9000b'")
    one_line_error(run_cli("pull", "llama-9000b"), "unknown model 'llama-9000b'")


def test_error_prompt_longer_than_context(tiny_models):
    r = run_cli("run", "-m", tiny_models["llama"], "-p", "abcd" * 40, "-c", "32", "-n", "4")
    one_line_error(r, "more than the context of 32")


def test_error_bad_prompt_file(tiny_models, tmp_path):
    one_line_error(run_cli("run", "-m", tiny_models["llama"], "-f", str(tmp_path / "nope.txt")), "nope.txt")


def test_nothing_written_on_error(tiny_models, tmp_path):
    before = set(os.listdir(tmp_path))
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    r = run_cli("run", "-m", str(p), "-p", "x", env={"EDGERT_MODELS": str(tmp_path)})
    one_line_error(r, "bad.gguf")
    assert set(os.listdir(tmp_path)) == before | {"bad.gguf"}


def test_unknown_command():
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_bench_text_input_fuzzed(tiny_models, tmp_path):
    """bench --text: any bytes give token ids inside the vocabulary or a one-line error naming the file."""
    from edgert.apps.bench import text_tokens
    from edgert.errors import EdgertError
    path = tiny_models["llama"]
    rng = np.random.default_rng(0)
    for i in range(30):
        f = tmp_path / f"t{i}.txt"
        f.write_bytes(rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes())
        try:
            ids = text_tokens(path, str(f))
        except EdgertError as e:
            assert str(e) == f"--text {f}: no text to feed"
            continue
        assert ids.dtype == np.int32 and len(ids) >= 2 and 0 <= ids.min() and ids.max() < 320
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(EdgertError, match="empty.txt: no text to feed"):
        text_tokens(path, str(tmp_path / "empty.txt"))
    r = run_cli("bench", "-m", path, "-p", "0", "-n", "1", "--text", str(tmp_path / "missing.txt"))
    one_line_error(r, "--text", "missing.txt", "cannot read")


@pytest.mark.parametrize("args, option, bound", [
    (["-c", "-5"], "-c/--ctx-size", ">= 0"), (["-n", "-5"], "-n/--n-predict", ">= -1"),
    (["-t", "0"], "-t/--threads", ">= 1"), (["-b", "0"], "-b/--batch-size", ">= 1"),
    (["--temp", "-1"], "--temp", ">= 0"), (["--top-p", "2"], "--top-p", "<= 1"),
    (["--temp", "nan"], "--temp", ">= 0"), (["-t", "two"], "-t/--threads", "not an integer"),
])
def test_out_of_range_options_are_refused(tiny_models, args, option, bound):
    """llama.cpp's ranges (-n -1 = until end of stream): argparse's one-line usage error, no run."""
    r = run_cli("run", "-m", tiny_models["llama"], "-p", "ab", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("edgert run: error: argument " + option) and bound in last, last


def test_invalid_utf8_prompt_is_one_line(tiny_models):
    for cmd in ("run", "tokenize"):
        for bad in (b"\xff\xfe abc", b"ok \xed\xa0\x80"):   # invalid UTF-8, a UTF-8-encoded surrogate
            argv = [sys.executable, "-m", "edgert", cmd, "-m", tiny_models["llama"], "-p", bad]
            r = subprocess.run(argv + (["-n", "1"] if cmd == "run" else []), capture_output=True, text=True, timeout=300)
            one_line_error(r, "is not valid UTF-8", ("ff fe" if bad[0] == 0xff else "ed a0 80"))


def test_unreadable_model_is_one_line():
    one_line_error(run_cli("show", "/proc/self/mem"), "/proc/self/mem: cannot read")


def test_help_shows_defaults():
    r = run_cli("run", "--help")
    assert r.returncode == 0 and "(default: 128)" in r.stdout and "(default: 0.8)" in r.stdout


def test_memory_report_is_one_table(tiny_models, tmp_path, capsys):
    """run -v: the plan and the measured peak in one MiB table; --json carries the same numbers."""
    import json
    out = tmp_path / "r.json"
    assert main(["run", "-m", tiny_models["llama"], "-p", "ab", "-n", "2", "--temp", "0", "-v", "--json", str(out)]) == 0
    err = capsys.readouterr()[1]
    mem = json.loads(out.read_text())["memory_mib"]
    for k, v in mem.items():
        assert f"| {k}" in err and f"{v:.1f} |" in err
    planned = [v for k, v in mem.items() if k.endswith("(planned)")]
    peak = mem["planned peak (load staging freed before the caches)"]
    assert peak <= mem["fixed process cost (measured at plan time)"] + sum(planned) + 0.1
    assert abs(mem["headroom (budget - measured peak)"] - (next(v for k, v in mem.items() if k.startswith("memory budget"))
                                                             - mem["measured peak RSS"])) < 0.11


def test_json_to_a_device_node_writes_through(tiny_models, tmp_path, capsys):
    """--json /dev/null must not rename a temp file over the device node (as root it could)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    import threading
    got = []
    t = threading.Thread(target=lambda: got.append(open(fifo).read()))
    t.start()
    assert main(["run", "-m", tiny_models["llama"], "-p", "ab", "-n", "2", "--temp", "0", "--json", str(fifo)]) == 0
    t.join(10)
    assert fifo.exists() and not fifo.is_file() and '"tokens"' in got[0]
    assert main(["run", "-m", tiny_models["llama"], "-p", "ab", "-n", "1", "--json", "/dev/null"]) == 0
    assert not os.path.isfile("/dev/null")


def test_bench_json_carries_the_memory_report(tiny_models, tmp_path):
    import json
    out = tmp_path / "b.json"
    r = run_cli("bench", "-m", tiny_models["llama"], "-p", "4", "-n", "2", "-r", "1", "-t", "1", "--save-json", str(out))
    assert r.returncode == 0, r.stderr[-800:]
    rows = json.loads(out.read_text())
    assert rows and all(row["memory_mib"]["measured peak RSS"] > 0 for row in rows)
