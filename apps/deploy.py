"""edgert deploy -m MODEL --target adb:SERIAL|ssh:[USER@]HOST[:PORT] [--device PROFILE]

Takes edgert to a device and back: builds the runtime's wheels here for the device's platform
(its CPU, Python and libc read over the target), pushes them and the model (resumable: a rerun
continues an interrupted push; every file sha256-verified on the device), installs them offline
into a virtual environment in the profile's temp dir, warms Numba's cache there for this model,
runs `edgert bench` and a greedy `edgert run` pinned to the profile's big cores (taskset),
samples tegrastats on a Jetson, and pulls the JSON back (-o DIR). Then it prints the device's
measurement next to `simulate`'s prediction for the same profile, with the error, and
(--compare-host) whether the device's greedy tokens equal this machine's.

Without --device the target is probed first (edgert probe) and its profile written.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from edgert.apps.common import err, parser


def build_parser() -> argparse.ArgumentParser:
    p = parser("deploy", __doc__)
    p.add_argument("-m", "--model", default=None, help="model name or path (GGUF or edgert package)")
    p.add_argument("--target", required=True, help="adb, adb:SERIAL or ssh:[USER@]HOST[:PORT]")
    p.add_argument("--device", default=None, help="device profile (default: probe the target and write one)")
    p.add_argument("--identity", default=None, help="ssh private key file")
    p.add_argument("-p", "--prompt", default="The three most useful things to know about running language models on a phone are",
                   help="prompt of the greedy run on the device")
    p.add_argument("-n", "--n-predict", type=int, default=16, help="tokens of the greedy run (default %(default)s)")
    p.add_argument("--bench", default="-p 16 -n 16 -r 1",
                   help="edgert bench options for the device run (default '%(default)s')")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads on the device (default: the profile's)")
    p.add_argument("-o", "--out", default=None, help="local directory for the pulled results "
                                                    "(default EDGERT_CACHE/deploy/runs/PROFILE-TIME)")
    p.add_argument("--compare-host", action="store_true",
                   help="also run the same greedy generation here and compare the tokens (exit 1 if they differ)")
    p.add_argument("--no-simulate", action="store_true", help="skip simulate's prediction for the profile")
    p.add_argument("--simulate-n", type=int, default=16, help="decode tokens simulate predicts (default %(default)s)")
    return p


class Progress:
    """A byte counter over pushes (tqdm on a terminal, nothing otherwise)."""
    def __init__(self, what: str):
        from tqdm import tqdm
        self.bar = tqdm(desc=what, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                        disable=not sys.stderr.isatty(), file=sys.stderr)

    def __call__(self, n: int):
        self.bar.update(n)

    def close(self):
        self.bar.close()


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    from edgert import deploy as dp
    from edgert.apps.common import model_path
    from edgert.device_probe import default_temp_dir, parse, probe_to_profile, script
    from edgert.device_profiles.loader import load_profile
    from edgert.errors import EdgertError
    from edgert.settings import env
    from edgert.targets import open_target, parse_address
    if args.n_predict < 1:
        raise EdgertError("-n must be at least 1")
    local_model = model_path(args.model)
    if args.device:
        prof = load_profile(args.device)
    else:
        path, prof = probe_to_profile(args.target, identity=args.identity)
        err(f"probed {args.target}: profile {prof.name} written to {path}")
    addr = parse_address(args.target)
    temp = prof.temp_dir or default_temp_dir(addr.method)
    r = dp.Remote(temp)
    t = open_target(args.target, args.identity)
    try:
        rc, out, _ = t.sh(script(temp, storage=False), timeout=300)
        facts = parse(out, str(addr))["_facts"]
        py, libc = dp.check_python(t, facts)
        err(f"device: {facts['machine']}, Python {py[0]}.{py[1]} ({libc[0]} {libc[1]}), temp dir {temp}")
        t0 = time.perf_counter()
        wheels = dp.build_wheels(facts["machine"], py, libc)
        err(f"wheels for {facts['machine']} / cp{py[0]}{py[1]}: {len(list(wheels.glob('*.whl')))} in {wheels} "
            f"({time.perf_counter() - t0:.1f} s)")
        bar = Progress("push")
        try:
            t0 = time.perf_counter()
            ran = dp.install(t, r, wheels, bar)
            err(f"runtime {'installed' if ran else 'already installed'} in {r.venv} ({time.perf_counter() - t0:.1f} s)")
            t0 = time.perf_counter()
            remote_model = f"{r.models}/{os.path.basename(local_model)}"
            how = dp.push(t, local_model, remote_model, bar)
            err(f"model {os.path.basename(local_model)} {how} ({os.path.getsize(local_model) / 2**20:.0f} MiB, "
                f"sha256 verified, {time.perf_counter() - t0:.1f} s)")
        finally:
            bar.close()
        threads = args.threads or prof.threads
        has_taskset = t.sh("command -v taskset >/dev/null")[0] == 0
        mask = prof.big_core_mask if has_taskset else None
        if not has_taskset:
            err("taskset is not on the device: the run is not pinned to the big cores")
        out_dir = args.out or os.path.join(os.path.expanduser(env("EDGERT_CACHE")), "deploy", "runs",
                                           f"{prof.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        err(f"warm-up, bench and run on the device ({threads} threads, mask {mask or '-'}) ...")
        res = dp.run_on_device(t, r, remote_model, mask, threads, args.prompt, args.n_predict,
                               " ".join(shlex.quote(a) for a in shlex.split(args.bench)), out_dir)
    finally:
        t.close()
    err(f"warm-up (Numba cache for this model) took {res.warm_s:.0f} s on the device; results in {out_dir}")
    return report(args, prof, res, local_model)


def report(args, prof, res, local_model) -> int:
    """The device's measurement, simulate's prediction and (--compare-host) the host's tokens;
    -> the exit code (1 when the tokens differ)."""
    rows = [b for b in res.bench if b.get("avg_ts")]
    tg = next((b for b in rows if b["n_gen"] and not b["n_prompt"]), None)
    pp = next((b for b in rows if b["n_prompt"] and not b["n_gen"]), None)
    pred = None
    if not args.no_simulate:
        from edgert.apps import simulate as sim
        sargs = sim.build_parser().parse_args(["-m", local_model, "--device", prof.path, "-n", str(args.simulate_n),
                                               "-r", "1", "-p", args.prompt])
        s = sim.predict(sargs)
        pred = 1.0 / float(s["device_model"].mean())
    print(f"\n| {'device ' + prof.name:<32} | {'measured':>10} | {'simulate':>10} | {'error':>8} |")
    print(f"|{'-' * 34}|{'-' * 11}:|{'-' * 11}:|{'-' * 9}:|")
    if pp:
        print(f"| {'pp' + str(pp['n_prompt']) + ' t/s':<32} | {pp['avg_ts']:>10.2f} | {'-':>10} | {'-':>8} |")
    if tg:
        e = f"{(pred / tg['avg_ts'] - 1) * 100:+.0f}%" if pred else "-"
        print(f"| {'tg' + str(tg['n_gen']) + ' t/s':<32} | {tg['avg_ts']:>10.2f} | "
              f"{(f'{pred:.2f}' if pred else '-'):>10} | {e:>8} |")
        print(f"| {'peak RSS MiB':<32} | {tg['peak_rss_bytes'] / 2**20:>10.0f} | {'-':>10} | {'-':>8} |")
    tm = res.run.get("timings", {})
    if tm.get("n_eval"):
        print(f"| {'run: decode t/s (greedy)':<32} | {tm['n_eval'] / tm['eval_ms'] * 1e3:>10.2f} | {'-':>10} | {'-':>8} |")
    if res.tegrastats:
        s = res.tegrastats
        print(f"| {'tegrastats: mean CPU MHz':<32} | {sum(x['cpu_mhz'] for x in s) / len(s):>10.0f} | {'-':>10} | {'-':>8} |")
    if "emulated" in prof.description:
        print("the device is emulated (qemu-user): the measured speed is qemu's, not a device's; this run checks "
              "the path (install, warm-up, run, pull back, tokens), not the cost model")
    print(f"\ndevice kernels: {res.run.get('kernels', '?')}; greedy text on the device: {res.run.get('text', '')!r}")
    if args.compare_host:
        same, n = compare_host(args, local_model, res.run)
        print(f"greedy tokens equal this machine's: {'yes' if same else 'NO'} ({n} tokens)")
        return 0 if same else 1
    return 0


def compare_host(args, local_model, device_run) -> tuple[bool, int]:
    """The same greedy run here (a fresh process, as on the device): (tokens equal, count)."""
    import json
    import subprocess
    import tempfile
    from edgert.errors import EdgertError
    with tempfile.TemporaryDirectory(prefix="edgert-host-") as d:
        out = os.path.join(d, "run.json")
        r = subprocess.run([sys.executable, "-m", "edgert", "run", "-m", local_model, "-p", args.prompt,
                            "-n", str(args.n_predict), "--temp", "0", "--ignore-eos", "--json", out],
                           capture_output=True, text=True)
        if r.returncode:
            raise EdgertError(f"the host's run failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        host = json.load(open(out))
    return host["tokens"] == device_run.get("tokens"), len(host["tokens"])
