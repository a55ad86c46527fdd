"""Deploy edgert to a device and run it there: wheels for the device's platform built here, pushed
with the model (resumable, sha256-verified), installed offline into a virtual environment in the
profile's temp dir, Numba's cache warmed on the device, `bench` / `run` pinned to the big cores,
and the JSON (and tegrastats samples on a Jetson) pulled back.

Layout on the device (TEMP = the profile's temp dir, /data/local/tmp/edgert on Android):
    TEMP/wheels/   the runtime's wheels         TEMP/venv/    the virtual environment
    TEMP/models/   models and packages          TEMP/numba/   Numba's on-disk cache
    TEMP/out/      results of the last run (bench.json, run.json, tegrastats.log)
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgert.errors import EdgertError
from edgert.device_probe import df_free_kib
from edgert.fileio import sha256_file
from edgert.targets import last_line, q

log = logging.getLogger(__name__)

# the runtime's core dependencies, pinned on the device to the versions installed here
CORE = ("numpy", "numba", "llvmlite", "psutil", "gguf", "tokenizers", "jinja2", "tqdm")


def remote_sha256(t, path: str, limit: int | None = None) -> str | None:
    """sha256 of a device file (its first `limit` bytes), None when it does not exist."""
    cmd = f"head -c {limit} {q(path)} | sha256sum" if limit is not None else f"sha256sum {q(path)}"
    rc, out, _ = t.sh(f"[ -f {q(path)} ] && {cmd}")
    m = re.match(r"([0-9a-f]{64})", out.strip())
    return m.group(1) if rc == 0 and m else None


def remote_size(t, path: str) -> int | None:
    rc, out, _ = t.sh(f"[ -f {q(path)} ] && wc -c < {q(path)}")
    return int(out.strip()) if rc == 0 and out.strip().isdigit() else None


def free_bytes(t, directory: str) -> int | None:
    rc, out, _ = t.sh(f"mkdir -p {q(directory)} && df -k {q(directory)} | tail -n 1")
    kib = df_free_kib(out) if rc == 0 else None
    return kib * 1024 if kib is not None else None


def push(t, local: str, remote: str, progress=None, want: str | None = None) -> str:
    """Copy a file to the device unless it is there already; resumes a `.part` left by an
    interrupted push when its bytes match the local file's prefix; verified by sha256 (`want`,
    computed when not given) before the rename. Returns 'present', 'resumed' or 'sent'."""
    size, want = os.path.getsize(local), want or sha256_file(local)
    if remote_size(t, remote) == size and remote_sha256(t, remote) == want:
        if progress:
            progress(size)
        return "present"
    part = remote + ".part"
    have = remote_size(t, part) or 0
    if have > size or (have and remote_sha256(t, part, have) != sha256_file(local, have)):
        have = 0
    rc, _, err = t.sh(f"mkdir -p {q(os.path.dirname(remote))} && " +
                      (f": > {q(part)}" if not have else "true"))
    if rc:
        raise EdgertError(f"cannot create {os.path.dirname(remote)} on the device ({err.strip() or rc})")
    free = free_bytes(t, os.path.dirname(remote))
    if free is not None and free < size - have:
        raise EdgertError(f"no space on the device for {os.path.basename(local)}: needs "
                          f"{(size - have) / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free in {os.path.dirname(remote)}")
    if progress and have:
        progress(have)
    t.put(local, part, have, progress)
    if remote_sha256(t, part) != want:
        t.sh(f"rm -f {q(part)}")
        raise EdgertError(f"{remote}: sha256 on the device differs from {local} after the push (removed; rerun)")
    rc, _, err = t.sh(f"mv {q(part)} {q(remote)}")
    if rc:
        raise EdgertError(f"cannot rename {part} on the device ({err.strip()})")
    return "resumed" if have else "sent"


# ============================================================================================
# The runtime's wheels for the device's platform
# ============================================================================================

def platform_tags(machine: str, libc: tuple[str, str]) -> list[str]:
    """pip --platform tags for a device: manylinux (glibc) wheels exist for aarch64 and x86_64.
    Android's own libc (bionic, Termux's Python) has no numba/llvmlite wheels: a clear error."""
    if machine not in ("aarch64", "x86_64"):
        raise EdgertError(f"the device's CPU is {machine}: edgert's dependencies ship wheels for "
                          "aarch64 and x86_64 only")
    if libc[0] != "glibc":
        raise EdgertError(f"the device's Python is not linked to glibc ({libc[0] or 'unknown libc'}): numba and "
                          "llvmlite have no wheels for it; run edgert inside a Debian arm64 root (docs/deploy.md)")
    major, minor = (int(x) for x in libc[1].split(".")[:2])
    tags = [f"manylinux_2_{v}_{machine}" for v in range(17, minor + 1)] if major == 2 else []
    return tags + [f"manylinux2014_{machine}"]


def build_wheels(machine: str, py: tuple[int, int], libc: tuple[str, str]) -> Path:
    """The wheels a device needs, in EDGERT_CACHE/deploy/<machine>-cp<py>/: edgert (built from this
    checkout) and the core dependencies at the versions installed here, downloaded for the
    device's platform. Cached; edgert's wheel is rebuilt each time (it is what changes)."""
    from importlib.metadata import PackageNotFoundError, version

    from edgert.settings import env
    tags = platform_tags(machine, libc)
    out = Path(env("EDGERT_CACHE")).expanduser() / "deploy" / f"{machine}-cp{py[0]}{py[1]}"
    out.mkdir(parents=True, exist_ok=True)
    pins = []
    for name in CORE:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    stamp = out / ".pins"
    if not stamp.exists() or stamp.read_text() != " ".join(pins):
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--implementation", "cp",
               "--python-version", f"{py[0]}.{py[1]}", "-d", str(out)] + \
              [a for t in tags for a in ("--platform", t)] + pins
        _pip(cmd, f"downloading the runtime's dependencies for {machine} / Python {py[0]}.{py[1]}")
        stamp.write_text(" ".join(pins))
    src = Path(__file__).resolve().parent.parent
    if not (src / "pyproject.toml").exists():
        raise EdgertError(f"deploy builds edgert's wheel from its source checkout; {src} has no pyproject.toml")
    for old in out.glob("edgert-*.whl"):
        old.unlink()
    shutil.rmtree(src / "build", ignore_errors=True)   # setuptools' tree of an earlier build: stale files
    _pip([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(src)],
         "building edgert's wheel")
    return out


def _pip(cmd: list[str], what: str) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        lines = [l.strip() for l in (r.stderr + r.stdout).splitlines() if l.strip() and not l.startswith("WARNING")]
        tail = [l for l in lines if l.lower().startswith("error")][:1] or lines[-1:]
        raise EdgertError(f"{what} failed: {tail[0] if tail else 'pip exit ' + str(r.returncode)}")


# ============================================================================================
# On the device
# ============================================================================================

@dataclass
class Remote:
    """Paths on the device under the profile's temp dir."""
    temp: str

    def __post_init__(self):
        self.temp = self.temp.rstrip("/") or "/"
        self.wheels, self.venv, self.models = (f"{self.temp}/{d}" for d in ("wheels", "venv", "models"))
        self.numba, self.out, self.cache = (f"{self.temp}/{d}" for d in ("numba", "out", "cache"))

    @property
    def env(self) -> str:
        return (f"NUMBA_CACHE_DIR={q(self.numba)} EDGERT_CACHE={q(self.cache)} "
                f"EDGERT_MODELS={q(self.models)} EDGERT_LOG=warning")

    def edgert(self, args: str, mask: str | None = None) -> str:
        pin = f"taskset {mask} " if mask else ""
        return f"cd {q(self.temp)} && {self.env} {pin}{q(self.venv + '/bin/edgert')} {args}"


def check_python(t, facts: dict) -> tuple[tuple[int, int], tuple[str, str]]:
    """(python version, libc) of the device's python3, or a clear error."""
    py = facts.get("python") or []
    if len(py) < 2 or not all(x.isdigit() for x in py[:2]):
        raise EdgertError("no python3 on the device (`python3` not found): install Python >= 3.10 and its "
                          "venv module (Debian: apt install python3-venv), see docs/deploy.md")
    ver = (int(py[0]), int(py[1]))
    if ver < (3, 10):
        raise EdgertError(f"the device's python3 is {ver[0]}.{ver[1]}: edgert needs >= 3.10")
    return ver, (py[2] if len(py) > 2 else "", py[3] if len(py) > 3 else "")


def install(t, r: Remote, wheels: Path, progress=None) -> bool:
    """Push the wheels and install them into r.venv with pip offline; skipped when the same set
    is installed already. Returns whether pip ran."""
    files = sorted(wheels.glob("*.whl"))
    sums = {f: sha256_file(str(f)) for f in files}
    stamp = hashlib.sha256("".join(f"{f.name}:{sums[f]}" for f in files).encode()).hexdigest()
    rc, out, _ = t.sh(f"cat {q(r.venv + '/.edgert-wheels')} 2>/dev/null")
    if rc == 0 and out.strip() == stamp:
        return False
    t.sh(f"mkdir -p {q(r.wheels)} && cd {q(r.wheels)} && for f in *.whl; do [ -e \"$f\" ] || continue; "
         f"case \" {' '.join(f.name for f in files)} \" in *\" $f \"*) ;; *) rm -f \"$f\";; esac; done")
    for f in files:
        push(t, str(f), f"{r.wheels}/{f.name}", progress, sums[f])
    edgert_whl = next(f.name for f in files if f.name.startswith("edgert-"))
    cmd = (f"[ -x {q(r.venv + '/bin/python')} ] || python3 -m venv {q(r.venv)} && "
           f"{q(r.venv + '/bin/pip')} install --quiet --no-index --find-links {q(r.wheels)} "
           f"--force-reinstall --no-deps {q(r.wheels + '/' + edgert_whl)} && "
           f"{q(r.venv + '/bin/pip')} install --quiet --no-index --find-links {q(r.wheels)} {q(r.wheels + '/' + edgert_whl)} && "
           f"echo {stamp} > {q(r.venv + '/.edgert-wheels')}")
    rc, out, err = t.sh(cmd, timeout=3600)
    if rc:
        last = [l for l in (err or out).splitlines() if l.strip()][-1:] or [f"exit {rc}"]
        if "ensurepip" in (err + out) or "venv" in last[0]:
            raise EdgertError(f"cannot create a virtual environment on the device: {last[0]} "
                              "(Debian: apt install python3-venv)")
        raise EdgertError(f"installing edgert on the device failed: {last[0]}")
    return True


TEGRA_RE = re.compile(r"RAM (\d+)/(\d+)MB.*?CPU \[([^\]]*)\](?:.*?EMC_FREQ (\d+)%(?:@(\d+))?)?")


def parse_tegrastats(text: str, interval_ms: int) -> list[dict]:
    """tegrastats lines -> samples {t_ms, ram_mib, cpu_mhz (mean of online cores), cpu_load %,
    emc_pct, and every power rail NAME_mw}."""
    samples = []
    for i, line in enumerate(l for l in text.splitlines() if "RAM " in l):
        m = TEGRA_RE.search(line)
        if not m:
            continue
        cores = [re.fullmatch(r"\s*(\d+)%@(\d+)\s*", c) for c in m.group(3).split(",")]   # "off": offline
        loads = [int(c.group(1)) for c in cores if c]
        mhz = [int(c.group(2)) for c in cores if c]
        s = {"t_ms": i * interval_ms, "ram_mib": int(m.group(1)),
             "cpu_mhz": sum(mhz) / len(mhz) if mhz else 0, "cpu_load": sum(loads) / len(loads) if loads else 0}
        if m.group(4):
            s["emc_pct"] = int(m.group(4))
        for name, mw in re.findall(r"\b([A-Z][A-Z0-9_]+) (\d+)mW/\d+mW", line):
            s[f"{name}_mw"] = int(mw)
        samples.append(s)
    return samples


def tegrastats_trace(samples: list[dict], pid: int = 1) -> list[dict]:
    """Chrome-trace counter events ("ph": "C") of tegrastats samples."""
    ev = []
    for s in samples:
        ts = s["t_ms"] * 1000
        ev.append({"name": "tegrastats RAM MiB", "ph": "C", "ts": ts, "pid": pid, "args": {"ram": s["ram_mib"]}})
        ev.append({"name": "tegrastats CPU", "ph": "C", "ts": ts, "pid": pid,
                   "args": {"MHz": s["cpu_mhz"], "load %": s["cpu_load"]}})
        if "emc_pct" in s:
            ev.append({"name": "tegrastats EMC %", "ph": "C", "ts": ts, "pid": pid, "args": {"emc": s["emc_pct"]}})
        rails = {k[:-3]: v for k, v in s.items() if k.endswith("_mw")}
        if rails:
            ev.append({"name": "tegrastats power mW", "ph": "C", "ts": ts, "pid": pid, "args": rails})
    return ev


@dataclass
class RunResult:
    bench: list = field(default_factory=list)     # rows of the device's bench JSON
    run: dict = field(default_factory=dict)       # the device's run JSON (tokens, timings)
    tegrastats: list = field(default_factory=list)
    warm_s: float = 0.0


def run_on_device(t, r: Remote, model_remote: str, mask: str | None, threads: int, prompt: str, n: int,
                  bench: str, local_dir: str, tegra_ms: int = 500, profile_n: int = 8) -> RunResult:
    """Warm the cache, then `bench`, a greedy `run` and a traced `profile` (Chrome trace) there,
    tegrastats sampled when the device has it; results pulled into local_dir."""
    import json
    import time
    res = RunResult()
    os.makedirs(local_dir, exist_ok=True)
    t.sh(f"rm -rf {q(r.out)} && mkdir -p {q(r.out)} {q(r.numba)} {q(r.cache)}")
    t0 = time.perf_counter()
    rc, out, err = t.sh(r.edgert(f"warmup -m {q(model_remote)}", mask), timeout=7200)
    res.warm_s = time.perf_counter() - t0
    if rc:
        raise EdgertError(f"warm-up on the device failed: {last_line(err or out, rc)}")
    rc, _, _ = t.sh("command -v tegrastats >/dev/null")
    tegra = rc == 0
    if tegra:
        t.sh(f"(tegrastats --interval {tegra_ms} --logfile {q(r.out + '/tegrastats.log')} >/dev/null 2>&1 &)")
    try:
        rc, out, err = t.sh(r.edgert(f"bench -m {q(model_remote)} -t {threads} {bench} --save-json "
                                     f"{q(r.out + '/bench.json')} -o json", mask), timeout=7200)
        if rc:
            raise EdgertError(f"bench on the device failed: {last_line(err or out, rc)}")
        rc, out, err = t.sh(r.edgert(f"run -m {q(model_remote)} -t {threads} -p {q(prompt)} -n {n} --temp 0 "
                                     f"--ignore-eos --json {q(r.out + '/run.json')}", mask), timeout=7200)
        if rc:
            raise EdgertError(f"run on the device failed: {last_line(err or out, rc)}")
        rc, out, err = t.sh(r.edgert(f"profile -m {q(model_remote)} -t {threads} -n {profile_n} -r 1 "
                                     f"--trace {q(r.out + '/trace.json')}", mask), timeout=7200)
        if rc:
            raise EdgertError(f"profile on the device failed: {last_line(err or out, rc)}")
    finally:
        if tegra:
            t.sh("tegrastats --stop >/dev/null 2>&1 || pkill tegrastats")
    for name in ("bench.json", "run.json", "trace.json") + (("tegrastats.log",) if tegra else ()):
        t.get(f"{r.out}/{name}", os.path.join(local_dir, name))
    try:
        res.bench = json.loads(Path(local_dir, "bench.json").read_text())
        res.run = json.loads(Path(local_dir, "run.json").read_text())
    except (ValueError, OSError) as e:
        raise EdgertError(f"{local_dir}: the device's results are not readable JSON ({e})") from None
    if tegra:
        res.tegrastats = parse_tegrastats(Path(local_dir, "tegrastats.log").read_text(), tegra_ms)
        from edgert.fileio import save_json
        save_json(os.path.join(local_dir, "tegrastats.trace.json"), {"traceEvents": tegrastats_trace(res.tegrastats)})
    return res

