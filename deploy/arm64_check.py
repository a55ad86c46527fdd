"""The Arm kernels on this machine's aarch64 Debian userland (qemu-user; `make arm64-check`, root).

    python deploy/arm64_check.py                      # the whole check, from the host
    python deploy/arm64_check.py reference OUT.npz M  # (internal) products and logits here
    python deploy/arm64_check.py compare REF.npz M    # (internal) the same there, compared

The whole check:
1. installs edgert (a wheel of this checkout) and its pinned dependencies for aarch64 into a venv
   in the root (deploy.build_wheels: the versions installed here), with pytest;
2. runs test_quant.py's kernel tests inside the root under EDGERT_ISA=neon-dotprod: every NEON
   kernel against the naive NumPy reference (and rows8 = rows bit for bit);
3. computes here (x86, the exact kernels) every row type's products at 1, 4 and 9 tokens, and
   SmolLM2's teacher-forced logits and 16 greedy tokens, then the same inside the root with the
   NEON kernels, and compares: products and logits must be bit-identical (the NEON kernels keep
   the x86 float stage and their integer stage is exact; docs/kernels.md), the tokens equal.

Emulated: correctness, not speed. The root, its venv and its Numba cache are kept in
~/.cache/edgert/arm64-root, so a second run compiles nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(os.path.expanduser(os.environ.get("EDGERT_ARM64_ROOT", "~/.cache/edgert/arm64-root")))
HERE = Path(__file__).resolve().parent.parent
INSIDE = "/opt/edgert-check"            # in the root
TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the Universe was created. "
        "This has made a lot of people very angry and been widely regarded as a bad move. def main():")
PROMPT = "Once upon a time"


def products(seed: int = 7) -> dict:
    """{name: out} for every row type (and Q4_K's rows8) at 1, 4 and 9 tokens: random GGUF blocks
    (converters.tiny.random_blocks) against random activations, the seed fixed on both sides."""
    from edgert.converters.tiny import random_blocks
    from edgert.kernels.matmul import ActBuffers, matmul
    from edgert.kernels.quant import Q4_K, ROW_TYPES, TYPE_NAMES, repack
    rng = np.random.default_rng(seed)
    out = {}
    for qtype, layout in [(t, "rows") for t in ROW_TYPES] + [(Q4_K, "rows8")]:
        R, C = 40, 512
        raw = np.ascontiguousarray(random_blocks(qtype, R, C, rng)).view(np.uint8).reshape(-1)
        w = repack(qtype, raw, R, C, layout)
        for T in (1, 4, 9):
            x = rng.standard_normal((T, C)).astype(np.float32)
            y = np.empty((T, R), np.float32)
            matmul(w, x, y, ActBuffers(T, C))
            out[f"{TYPE_NAMES[qtype]}-{layout}-T{T}"] = y
    return out


def model_outputs(path: str) -> dict:
    """SmolLM2's logits for every position of TEXT (one batch) and 16 greedy tokens after PROMPT."""
    from edgert.model import Model
    from edgert.tokenizer import Tokenizer
    m = Model(path, n_ctx=256)
    tok = Tokenizer(m.gguf.metadata, path)
    ids = np.array(tok.encode(TEXT, add_special=True)[:48], np.int32)
    logits = np.array(m.forward(ids, all_logits=True), np.float32)
    m.reset()
    greedy, cur = [], np.array(tok.encode(PROMPT, add_special=True), np.int32)
    row = m.prefill(cur)
    for _ in range(16):
        nxt = int(np.argmax(row))
        greedy.append(nxt)
        row = m.decode_one_token(nxt)
    return {"ids": ids, "logits": logits, "greedy": np.array(greedy, np.int32)}


def reference(out: str, model: str) -> None:
    from edgert.kernels import isa
    res = {**{f"prod/{k}": v for k, v in products().items()}, **model_outputs(model)}
    np.savez(out + ".tmp.npz", isa=np.array(isa.describe()), **res)
    os.replace(out + ".tmp.npz", out)


def compare(ref: str, model: str) -> int:
    """0 when every product and logit equals the reference bit for bit and the tokens agree."""
    from edgert.kernels import isa
    want = np.load(ref)
    got = {**{f"prod/{k}": v for k, v in products().items()}, **model_outputs(model)}
    print(f"reference: {want['isa']}; here: {isa.describe()} ({os.uname().machine})")
    bad = 0
    for k in sorted(k for k in got if k.startswith("prod/")):
        same = np.array_equal(got[k].view(np.uint32), want[k].view(np.uint32))
        err = float(np.max(np.abs(got[k] - want[k])))
        bad += not same
        print(f"  {k[5:]:<22} {'bit-identical' if same else f'DIFFERS (max |diff| {err:.3g})'}")
    lg, lw = got["logits"], want["logits"]
    same = np.array_equal(lg.view(np.uint32), lw.view(np.uint32))
    top1 = float(np.mean(lg.argmax(1) == lw.argmax(1)))
    print(f"  SmolLM2 logits, {lg.shape[0]} positions x {lg.shape[1]}: "
          f"{'bit-identical' if same else 'DIFFER'}; max |diff| {float(np.max(np.abs(lg - lw))):.3g} "
          f"(largest |logit| {float(np.max(np.abs(lw))):.3g}); top-1 agreement {top1:.4f}")
    tok_same = np.array_equal(got["greedy"], want["greedy"])
    print(f"  greedy 16 tokens: {'equal' if tok_same else 'DIFFER'} {got['greedy'].tolist()}")
    return 0 if (bad == 0 and same and tok_same) else 1


# ----------------------------------------------------------------------------------------------
# The host side
# ----------------------------------------------------------------------------------------------

def _chroot(cmd: str, timeout: int = 7200) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "NUMBA_CACHE_DIR": f"{INSIDE}/numba",
           "EDGERT_ISA": "neon-dotprod", "EDGERT_CACHE": f"{INSIDE}/cache", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    t0 = time.time()
    r = subprocess.run([shutil.which("chroot") or "/usr/sbin/chroot", str(ROOT), "/bin/sh", "-c", cmd], env=env, timeout=timeout)
    print(f"[{time.time() - t0:.0f} s] {cmd}", flush=True)
    if r.returncode:
        sys.exit(f"arm64-check: failed in the aarch64 root (exit {r.returncode}): {cmd}")


def _test_wheels(dest: Path) -> None:
    """pytest and what it needs, as pure-Python wheels (any platform)."""
    if not list(dest.glob("pytest-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(dest),
                        "pytest>=8"], check=True)


def main() -> int:
    from edgert.deploy import build_wheels
    from edgert.registry import resolve
    if os.geteuid() != 0 or not (ROOT / ".edgert-ready").exists():
        sys.exit(f"arm64-check: needs root and the aarch64 root at {ROOT} (deploy/arm64-userland.sh start)")
    model = resolve("smollm2-135m")
    box = ROOT / INSIDE.lstrip("/")
    wheels = build_wheels("aarch64", (3, 11), ("glibc", "2.36"))
    tests = wheels.parent / "aarch64-test-wheels"
    tests.mkdir(exist_ok=True)
    _test_wheels(tests)
    shutil.rmtree(box / "wheels", ignore_errors=True)
    (box / "wheels").mkdir(parents=True)
    for f in list(wheels.glob("*.whl")) + list(tests.glob("*.whl")):
        shutil.copy2(f, box / "wheels" / f.name)
    shutil.rmtree(box / "src", ignore_errors=True)
    shutil.copytree(HERE / "tests", box / "src" / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(Path(__file__), box / "src" / "arm64_check.py")
    (box / "models").mkdir(exist_ok=True)
    if not (box / "models" / Path(model).name).exists():
        shutil.copy2(model, box / "models" / Path(model).name)
    whl = next((box / "wheels").glob("edgert-*.whl")).name
    pip = f"{INSIDE}/venv/bin/pip install --quiet --no-index --find-links {INSIDE}/wheels"
    _chroot(f"[ -x {INSIDE}/venv/bin/python ] || python3 -m venv {INSIDE}/venv; "
            f"{pip} --force-reinstall --no-deps {INSIDE}/wheels/{whl} && {pip} {INSIDE}/wheels/{whl} pytest")
    # (the tests import the installed edgert, not this checkout: -p no:cacheprovider, run from src)
    _chroot(f"cd {INSIDE}/src && {INSIDE}/venv/bin/python -m pytest -q -p no:cacheprovider tests/test_quant.py "
            "-k 'rows or layouts_agree or activation'")
    ref = box / "ref.npz"
    reference(str(ref), model)
    _chroot(f"cd {INSIDE}/src && {INSIDE}/venv/bin/python arm64_check.py compare {INSIDE}/ref.npz "
            f"{INSIDE}/models/{Path(model).name}")
    print("arm64-check: passed")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("reference", "compare"):
        sys.exit(reference(sys.argv[2], sys.argv[3]) or 0 if sys.argv[1] == "reference" else compare(sys.argv[2], sys.argv[3]))
    sys.exit(main())
