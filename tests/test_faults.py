"""Faults under a running model whose FFN is read from flash (--ffn stream): a real faulty file
system (tests/faultfs.py: FUSE, as root, O_DIRECT reads reaching it every time) failing reads
with EIO and delaying them; the file truncated or replaced while the model runs. A fault is one
EdgertError naming the file and the offset, never a wrong token; a slow or short read changes
nothing. (The injected layer, FlashReader's preadv, is tested in tests/test_flash.py.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgert.errors import EdgertError
from edgert.model import Model

IDS = np.array([1, 5, 9, 13, 17])


def _fuse_ok() -> str | None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return "needs root and /dev/fuse"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy / libfuse3 missing ({e})"
    return None


@pytest.fixture
def faultfs(tmp_path, tiny_models):
    why = _fuse_ok()
    if why:
        pytest.skip(why)
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    mnt.mkdir()
    shutil.copy(tiny_models["llama"], back / "m.gguf")
    p = subprocess.Popen([sys.executable, str(Path(__file__).parent / "faultfs.py"), str(back), str(mnt)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if (mnt / "m.gguf").exists():
            break
        time.sleep(0.05)
    else:
        p.kill()
        pytest.skip("the FUSE file system did not come up")
    yield back, mnt
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()


def _decode(path, n=6):
    m = Model(str(path), n_ctx=32, n_batch=8, ffn="stream")
    out = [m.prefill(IDS)]
    for t in range(n):
        out.append(m.decode_one_token(int(np.argmax(out[-1]))))
    return m, np.stack(out)


def _ffn_range(path):
    from edgert.gguf_file import GGUFFile
    g = GGUFFile(str(path))
    t = g.tensors["blk.1.ffn_down.weight"]
    g.close()
    return t.offset, t.offset + t.nbytes


def test_real_faults_through_fuse(faultfs, tiny_models):
    back, mnt = faultfs
    _, want = _decode(tiny_models["llama"])
    m, got = _decode(mnt / "m.gguf")
    assert m.reader.mode == "O_DIRECT" and m.stats.bytes_read > 0   # the FFN really comes through the mount
    np.testing.assert_array_equal(got, want)
    (back / "RULES").write_text("delay 3\n")    # slow reads: the same logits (short reads through FUSE
    # are end of file to the kernel; they are tested on the injected layer, tests/test_flash.py)
    np.testing.assert_array_equal(_decode(mnt / "m.gguf")[1], want)
    m = Model(str(mnt / "m.gguf"), n_ctx=32, n_batch=8, ffn="stream")
    m.prefill(IDS)
    lo, hi = _ffn_range(back / "m.gguf")
    (back / "RULES").write_text(f"eio {lo} {hi}\n")          # the device fails under a running model
    with pytest.raises(EdgertError, match=r"m\.gguf: read error at offset \d+ .*Input/output error"):
        m.decode_one_token(3)


def test_truncated_while_running(tmp_path, tiny_models):
    p = tmp_path / "m.gguf"
    shutil.copy(tiny_models["llama"], p)
    m = Model(str(p), n_ctx=32, n_batch=8, ffn="stream")
    m.prefill(IDS)
    lo, _ = _ffn_range(p)
    os.truncate(p, lo + 100)
    with pytest.raises(EdgertError, match=r"m\.gguf: the file shrank from \d+ to \d+ bytes while in use"):
        m.decode_one_token(3)


def test_replaced_while_running_keeps_the_open_file(tmp_path, tiny_models):
    """An update renamed over the model while it runs: the open file (the old inode) is read to
    the end of the run, so the tokens are the old model's, not a mixture."""
    p = tmp_path / "m.gguf"
    shutil.copy(tiny_models["llama"], p)
    _, want = _decode(p)
    m = Model(str(p), n_ctx=32, n_batch=8, ffn="stream")
    out = [m.prefill(IDS)]
    shutil.copy(tiny_models["qwen2"], tmp_path / "new.gguf")
    os.replace(tmp_path / "new.gguf", p)
    for t in range(6):
        out.append(m.decode_one_token(int(np.argmax(out[-1]))))
    np.testing.assert_array_equal(np.stack(out), want)
