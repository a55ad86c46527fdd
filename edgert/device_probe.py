"""Probe a real device into a device profile: one POSIX shell script run over the target (works
with Android's toybox as with GNU coreutils, needs nothing installed), its sectioned output parsed
here into the TOML of device_profiles/, every number's source saying `probed <date> over <target>`.

What is read: `uname -m`, Android's `getprop`, /proc/cpuinfo, each core's cpufreq maximum,
/proc/meminfo, the device tree model / nv_tegra_release / `nvpmodel -q` (Jetson), thermal zones,
python3's version, free space of the temp dir; measured: a storage read test with dd (O_DIRECT
where the device's dd has it, else a dropped page cache as root, else said to be cached) and a
memory write-bandwidth test (dd /dev/zero -> /dev/null in 64 MiB blocks: the kernel zeroing a
buffer far beyond the caches, a lower bound of the read bandwidth).
"""
from __future__ import annotations

import datetime
import json
import re

from edgert.errors import EdgertError

SIZES_KIB = (4, 64, 512, 4096)
DEPTHS = (1, 4)
PROBE_MIB = 64          # the storage test file (written once per probe, removed after)


def script(temp_dir: str, storage: bool = True) -> str:
    """The shell script probe runs on the device; sections start with `=== name`."""
    from edgert.targets import q
    t = q(temp_dir)
    parts = [
        "sec() { echo \"=== $*\"; }",
        "sec uname; uname -m",
        "sec getprop; (getprop 2>/dev/null) | grep -E 'ro\\.(product\\.(model|manufacturer|board|cpu\\.abi)|"
        "soc\\.(model|manufacturer)|board\\.platform|build\\.version\\.(release|sdk)|hardware)\\]'",
        "sec cpuinfo; cat /proc/cpuinfo",
        "sec cpufreq; for c in /sys/devices/system/cpu/cpu[0-9]*; do "
        "echo \"${c##*/} $(cat $c/cpufreq/cpuinfo_max_freq 2>/dev/null || echo -)\"; done",
        "sec meminfo; cat /proc/meminfo",
        "sec model; cat /proc/device-tree/model 2>/dev/null | tr -d '\\0'; echo",
        "sec tegra; cat /etc/nv_tegra_release 2>/dev/null; nvpmodel -q 2>/dev/null",
        "sec thermal; for z in /sys/class/thermal/thermal_zone*; do "
        "[ -e $z/type ] && echo \"$(cat $z/type) $(cat $z/temp 2>/dev/null)\"; done",
        "sec os; (. /etc/os-release 2>/dev/null && echo \"$PRETTY_NAME\"); uname -sr",
        "sec python; python3 -c 'import sys, platform; print(sys.version_info[0], sys.version_info[1], "
        "platform.libc_ver()[0], platform.libc_ver()[1])' 2>&1 || echo none",
        f"mkdir -p {t}",
        f"sec df; df -k {t} | tail -n 1",
        "sec membw; dd if=/dev/zero of=/dev/null bs=64M count=16 2>&1 | tail -n 1",
    ]
    if storage:
        f = q(temp_dir.rstrip("/") + "/.edgert-probe")
        parts += [
            f"dd if=/dev/urandom of={f} bs=1M count={PROBE_MIB} 2>/dev/null; sync",
            f"direct=1; dd if={f} of=/dev/null bs=4k count=1 iflag=direct >/dev/null 2>&1 || direct=0",
            "sec directio; echo $direct",
            "drop() { [ $direct = 1 ] || { sync; echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; }",
            "flag() { [ $direct = 1 ] && echo iflag=direct; }",
            "sec dropped; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null && echo 1 || echo 0",
        ]
        for kib in SIZES_KIB:
            count = max(8, min(4096, (PROBE_MIB << 10) // kib // 2))   # half the file, <= 4096 requests
            for d in DEPTHS:
                per = max(1, count // d)
                span = (PROBE_MIB << 10) // kib // d   # each stream reads its own part
                streams = " ".join(
                    f"dd if={f} of=/dev/null bs={kib}k count={per} skip={i * span} $(flag) 2>&1 | tail -n 1 &"
                    for i in range(d))
                parts.append(f"sec storage {kib} {d}; drop; {streams} wait")
        parts.append(f"rm -f {f}")
    return "\n".join(parts) + "\n"


def sections(out: str) -> dict[str, str]:
    cur, data = None, {}
    for line in out.splitlines():
        if line.startswith("=== "):
            cur = line[4:].strip()
            data[cur] = ""
        elif cur is not None:
            data[cur] += line + "\n"
    return data


# Arm core part numbers (/proc/cpuinfo "CPU part" with implementer 0x41) -> (name, FMA pipes)
# source: Arm Technical Reference Manuals (MIDR part numbers) and Software Optimization Guides
# (count of 128-bit FP/ASIMD pipes that issue FMA)
ARM_PARTS = {
    0xd03: ("Cortex-A53", 1), 0xd04: ("Cortex-A35", 1), 0xd05: ("Cortex-A55", 1),
    0xd07: ("Cortex-A57", 2), 0xd08: ("Cortex-A72", 2), 0xd09: ("Cortex-A73", 2),
    0xd0a: ("Cortex-A75", 2), 0xd0b: ("Cortex-A76", 2), 0xd0d: ("Cortex-A77", 2),
    0xd41: ("Cortex-A78", 2), 0xd42: ("Cortex-A78AE", 2), 0xd44: ("Cortex-X1", 4),
    0xd46: ("Cortex-A510", 2), 0xd47: ("Cortex-A710", 2), 0xd48: ("Cortex-X2", 4),
    0xd4b: ("Cortex-A78C", 2), 0xd4d: ("Cortex-A715", 2), 0xd4e: ("Cortex-X3", 4),
    0xd80: ("Cortex-A520", 2), 0xd81: ("Cortex-A720", 2), 0xd82: ("Cortex-X4", 4),
    0xd85: ("Cortex-X925", 6), 0xd87: ("Cortex-A725", 2),
}


def _cores(cpuinfo: str) -> list[dict]:
    """One dict per logical CPU: index, name, pipes, simd bits (Arm or x86 /proc/cpuinfo)."""
    cores, cur = [], None
    for line in cpuinfo.splitlines():
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        if k == "processor" and v.isdigit() and int(v) < 4096:
            cur = {"index": int(v), "name": "", "pipes": 2, "simd": 128}
            cores.append(cur)
        elif cur is None:
            continue
        elif k == "CPU part":
            try:
                part = int(v, 16)
            except ValueError:
                continue
            cur["name"], cur["pipes"] = ARM_PARTS.get(part, (f"Arm part {v}", 2))
        elif k == "model name":
            cur["name"] = v
        elif k == "flags":
            fl = set(v.split())
            cur["simd"] = 512 if "avx512f" in fl else 256 if "avx2" in fl else 128
    return cores


def _khz(cpufreq: str) -> dict[int, float]:
    out = {}
    for line in cpufreq.splitlines():
        m = re.fullmatch(r"cpu(\d{1,4}) (\d{1,9})", line.strip())
        if m:
            out[int(m.group(1))] = int(m.group(2)) / 1e6  # kHz -> GHz
    return out


def _dd_seconds(line: str) -> tuple[int, float] | None:
    """(bytes, seconds) from dd's summary line, GNU ('N bytes (..) copied, T s, R MB/s') or
    toybox ('N bytes (..) copied, T s, R M/s')."""
    m = re.search(r"(\d+) bytes.*copied,\s*(\d+(?:\.\d+)?)\s*s", line)
    return (int(m.group(1)), float(m.group(2))) if m else None


def _getprop(text: str) -> dict[str, str]:
    return dict(re.findall(r"\[([\w.]+)\]:\s*\[(.*)\]", text))


def parse(out: str, target: str, date: str | None = None) -> dict:
    """The probe's output -> a profile dict (device_profiles' schema), sources citing the probe."""
    s = sections(out)
    if "cpuinfo" not in s or "meminfo" not in s:
        raise EdgertError(f"{target}: the probe's output lacks /proc/cpuinfo or /proc/meminfo "
                          "(not a Linux device, or the shell failed)")
    date = date or datetime.date.today().isoformat()
    src = f"probed {date} over {target}"
    props = _getprop(s.get("getprop", ""))
    machine = s.get("uname", "").strip() or "?"
    cores = _cores(s["cpuinfo"])
    if not cores:
        raise EdgertError(f"{target}: no processors in /proc/cpuinfo")
    ghz = _khz(s.get("cpufreq", ""))
    # qemu-user passes the host's /proc/cpuinfo through: an x86 cpuinfo under an aarch64 userland
    emulated = machine == "aarch64" and "vendor_id" in s["cpuinfo"]
    arm = any(line.startswith("CPU part") for line in s["cpuinfo"].splitlines())
    core_src = ("CPU part -> core and FMA pipes (Arm Technical Reference Manuals, Software Optimization Guides)"
                if arm else "model name and flags (vector width), 2 FMA pipes assumed")
    # clusters: cores of one type and one maximum frequency
    groups: dict[tuple, list[int]] = {}
    for c in cores:
        groups.setdefault((c["name"] or machine, ghz.get(c["index"], 0.0), c["pipes"], c["simd"]), []).append(c["index"])
    order = sorted(groups, key=lambda g: (-g[1], g[0]))
    cpus, big_mask = [], 0
    for i, g in enumerate(order):
        kind = "big" if i == 0 else "little" if i == len(order) - 1 else "mid"
        idx = groups[g]
        freq_src = "cpufreq cpuinfo_max_freq" if g[1] else "no cpufreq on the device: 1.0 GHz assumed"
        cpus.append({"name": g[0], "kind": kind, "cores": len(idx), "max_ghz": round(g[1] or 1.0, 3),
                     "simd_bits": g[3], "fma_pipes": g[2],
                     "source": f"{src}: /proc/cpuinfo {core_src}, {freq_src}, CPUs {','.join(map(str, idx))}"
                               + (f"; EMULATED: qemu-user shows the host's cpuinfo under {machine}" if emulated else "")})
        if kind != "little":
            big_mask |= sum(1 << j for j in idx)
    mem = dict(re.findall(r"^(\w+):\s+(\d+) kB", s["meminfo"], re.M))
    if "MemTotal" not in mem:
        raise EdgertError(f"{target}: /proc/meminfo has no MemTotal")
    ram_gb = int(mem["MemTotal"]) / 2**20
    if not 0.01 < ram_gb < 4096:
        raise EdgertError(f"{target}: /proc/meminfo's MemTotal {mem['MemTotal']} kB is impossible")
    avail = int(mem.get("MemAvailable", mem["MemTotal"])) / 2**20
    share = round(min(0.9, max(0.1, avail / ram_gb * 0.9)), 2)
    bw = _dd_seconds(s.get("membw", ""))
    bw_gbs = max(0.1, round(bw[0] / bw[1] / 1e9, 1)) if bw and bw[1] > 0 and bw[0] > 0 else 1.0
    direct = s.get("directio", "0").strip() == "1"
    dropped = s.get("dropped", "0").strip() == "1"
    mode = "O_DIRECT" if direct else "page cache dropped" if dropped else "page cache NOT bypassed (no O_DIRECT, not root)"
    curve, first_us = [], None
    for name, body in s.items():
        m = re.fullmatch(r"storage (\d+) (\d+)", name)
        if not m:
            continue
        kib, depth = int(m.group(1)), int(m.group(2))
        got = [_dd_seconds(line) for line in body.splitlines()]
        got = [g for g in got if g]
        # the streams run at once: the slowest one's own time (dd's, without process start-up)
        nbytes, secs = sum(g[0] for g in got), max((g[1] for g in got), default=0)
        if not got or secs <= 0 or nbytes <= 0 or not 0 < kib <= 1 << 20 or not 0 < depth <= 1024:
            continue
        curve.append([kib, depth, max(0.1, round(nbytes / secs / 1e6, 1))])
        if kib == 4 and depth == 1:
            first_us = max(0.1, round(secs / (nbytes / 4096) * 1e6, 1))
    if not curve:
        curve, first_us = [[4, 1, 50.0]], 100.0
        flash_src = f"{src}: no storage test ran (--no-storage or dd failed): a placeholder curve, not a measurement"
    else:
        flash_src = (f"{src}: dd reads of a {PROBE_MIB} MiB file in the temp dir, {mode}, "
                     f"request sizes {SIZES_KIB} KiB, 1 and {DEPTHS[-1]} parallel streams")
    model = (props.get("ro.product.model") or s.get("model", "").strip()
             or next((c["name"] for c in cores if c["name"]), machine))
    maker = props.get("ro.product.manufacturer", "")
    soc = props.get("ro.soc.model") or props.get("ro.board.platform") or props.get("ro.hardware") or \
        (s.get("tegra", "").splitlines() or [""])[0].strip() or cores[0]["name"] or machine
    os_name = (f"Android {props['ro.build.version.release']} (SDK {props.get('ro.build.version.sdk', '?')})"
               if "ro.build.version.release" in props else " ".join(s.get("os", "").split()) or "Linux")
    name = re.sub(r"[^a-z0-9]+", "-", f"{maker} {model}".lower()).strip("-")[:48] or "probed-device"
    thermal = [line.split() for line in s.get("thermal", "").splitlines() if line.strip()]
    nvp = re.search(r"NV Power Mode:\s*(\S+)", s.get("tegra", ""))
    notes = [f"{machine}" + (" emulated by qemu-user" if emulated else ""), f"{len(thermal)} thermal zones"] + ([f"nvpmodel {nvp.group(1)}"] if nvp else [])
    return {
        "name": name,
        "description": f"{(maker + ' ' + model).strip()}, {len(cores)} CPUs, {ram_gb:.1f} GiB ({', '.join(notes)})",
        "soc": soc, "os": os_name, "source": src,
        "cpu": cpus,
        "memory": {"ram_gb": round(ram_gb, 2), "app_share": share, "bandwidth_gbs": bw_gbs,
                   "source": f"{src}: MemTotal; app_share = 0.9 x MemAvailable/MemTotal at probe time; "
                             "bandwidth: dd /dev/zero -> /dev/null in 64 MiB blocks (kernel write "
                             "bandwidth, a lower bound of read)"},
        "flash": {"kind": f"device storage ({mode})", "first_byte_us": first_us or 100.0, "curve": curve,
                  "source": flash_src},
        "accelerators": {"list": [], "source": f"{src}: not probed (CPU only)"},
        "access": {"method": target.split(":", 1)[0], "address": target.split(":", 1)[1] if ":" in target else "",
                   "temp_dir": "", "big_core_mask": hex(big_mask or 1)},
        "_facts": {"machine": machine, "emulated": emulated, "python": s.get("python", "").split(), "thermal": thermal,
                   "free_kib": df_free_kib(s.get("df", "")), "props": props},
    }


def df_free_kib(text: str) -> int | None:
    """Free KiB from the last line of `df -k DIR` (GNU and toybox: the 4th column)."""
    f = text.split()
    return int(f[3]) if len(f) >= 4 and f[3].isdigit() else None


def to_toml(prof: dict) -> str:
    """The profile dict as a device_profiles/*.toml file (the loader's schema, no private keys)."""
    def val(v):
        if isinstance(v, str):  # a TOML basic string: JSON's escapes are TOML's, plus DEL
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)
    lines = ["# probed device profile (edgert probe); every number below was read or measured on the device"]
    for k in ("name", "description", "soc", "os", "source"):
        lines.append(f"{k} = {val(prof[k])}")
    for c in prof["cpu"]:
        lines += ["", "[[cpu]]"] + [f"{k} = {val(v)}" for k, v in c.items()]
    for t in ("memory", "flash", "accelerators", "access"):
        lines += ["", f"[{t}]"] + [f"{k} = {val(v)}" for k, v in prof[t].items()]
    return "\n".join(lines) + "\n"


def default_temp_dir(method: str) -> str:
    return "/data/local/tmp/edgert" if method == "adb" else "/tmp/edgert"


def probe_to_profile(spec: str, output: str | None = None, name: str | None = None, temp_dir: str | None = None,
                     identity: str | None = None, storage: bool = True, transcript: str | None = None,
                     replay: str | None = None):
    """Probe the device (or parse a saved transcript), validate and write its profile (temp file +
    rename). -> (path written, DeviceProfile)."""
    from pathlib import Path

    from edgert.device_profiles.loader import probed_dir, profile_from_dict
    from edgert.fileio import write_atomic
    from edgert.targets import open_target, parse_address
    addr = parse_address(spec)
    temp = temp_dir or default_temp_dir(addr.method)
    if replay:
        try:
            out = Path(replay).read_text(errors="replace")
        except OSError as e:
            raise EdgertError(f"{replay}: cannot read the transcript ({e.strerror})") from None
    else:
        t = open_target(spec, identity)
        try:
            rc, out, errs = t.sh(script(temp, storage), timeout=900)
        finally:
            t.close()
        if transcript:
            write_atomic(transcript, lambda f: f.write(out))
    prof = parse(out, str(addr))
    prof["access"]["temp_dir"] = temp
    if name:
        prof["name"] = name
    path = Path(output) if output else probed_dir() / f"{prof['name']}.toml"
    text = to_toml(prof)
    import tomllib
    checked = profile_from_dict(tomllib.loads(text), str(path))   # what the loader will read back
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(str(path), lambda f: f.write(text))
    return str(path), checked
