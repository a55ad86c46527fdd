"""probe / deploy without a device: target addresses, the probe's parser on recorded transcripts
(this machine's arm64 userland; a real phone's replayed through a stand-in adb executable), the
resumable sha256-verified push over a local transport with injected faults, wheel platform tags,
tegrastats parsing. The end-to-end ssh path has its own target (make deploy-check)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from edgert import deploy as dp
from edgert import device_probe as probe
from edgert.device_profiles.loader import profile_from_dict
from edgert.errors import EdgertError
from edgert.targets import AdbTarget, Address, parse_address

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------------- addresses

@pytest.mark.parametrize("spec, want", [
    ("adb", Address("adb", "")),
    ("adb:R58N12ABCDE", Address("adb", "R58N12ABCDE")),
    ("adb:192.168.1.5:5555", Address("adb", "192.168.1.5:5555")),
    ("ssh:jetson.local", Address("ssh", "jetson.local", "", 22)),
    ("ssh:root@127.0.0.1:2222", Address("ssh", "127.0.0.1", "root", 2222)),
    ("ssh:pi@[fe80::1]:22", Address("ssh", "fe80::1", "pi", 22)),
])
def test_parse_address(spec, want):
    assert parse_address(spec) == want


@pytest.mark.parametrize("spec", ["", "usb:1", "ssh:", "ssh:a@b:0", "ssh:a@b:70000", "ssh:a b", "adb:x;rm -rf /",
                                  "ssh:h:22:33"])
def test_parse_address_rejects(spec):
    with pytest.raises(EdgertError, match="target"):
        parse_address(spec)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_address_fuzz(spec):
    try:
        a = parse_address(spec)
    except EdgertError:
        return
    assert a.method in ("adb", "ssh") and (a.method == "adb" or 0 < a.port < 65536)


# ---------------------------------------------------------------------------- probe parser

def _checked(prof):
    """The profile as the loader reads it back from the TOML probe writes."""
    return profile_from_dict(tomllib.loads(probe.to_toml(prof)), "probed.toml")


def test_probe_parses_the_arm64_userland():
    """The transcript of `edgert probe` against this machine's qemu aarch64 Debian root (recorded
    2026-12-03): qemu-user shows the host's /proc/cpuinfo, no cpufreq; dd had O_DIRECT."""
    prof = probe.parse((DATA / "probe-qemu-arm64.txt").read_text(), "ssh:root@127.0.0.1:2222", "2026-12-03")
    p = _checked(prof)
    assert prof["_facts"]["machine"] == "aarch64"
    assert prof["_facts"]["python"][:3] == ["3", "11", "glibc"]
    assert sum(c.cores for c in p.clusters) == 2 and p.big_core_mask == "0x3"
    assert p.flash.kind == "device storage (O_DIRECT)" and len(p.flash.points) == 8
    assert all(r > 0 for _, _, r in p.flash.points)
    assert all(v.startswith("probed 2026-12-03 over ssh:root@127.0.0.1:2222") for v in p.sources.values())
    assert "1.0 GHz assumed" in p.sources["cpu"]   # no cpufreq: said, not hidden
    assert prof["_facts"]["emulated"] and "EMULATED" in p.sources["cpu"]   # x86 cpuinfo under aarch64


def _phone_transcript() -> str:
    """A real phone's getprop / cpuinfo / meminfo / cpufreq (tests/data/phone/, sources in its
    SOURCES.md) assembled into the probe's sections, with no storage test."""
    d = DATA / "phone"
    sec = lambda name, f: f"=== {name}\n" + ((d / f).read_text() if (d / f).exists() else "") + "\n"
    return ("=== uname\naarch64\n" + sec("getprop", "getprop.txt") + sec("cpuinfo", "cpuinfo.txt")
            + sec("cpufreq", "cpufreq.txt") + sec("meminfo", "meminfo.txt") + "=== python\nnone\n")


def test_probe_parses_a_real_phone():
    """A Pixel 8 Pro's output (tests/data/SOURCES.md): three clusters by core type and clock,
    the little A510s out of the big-core mask, the phone named from getprop."""
    prof = probe.parse(_phone_transcript(), "adb:SERIAL", "2026-12-03")
    p = _checked(prof)
    got = [(c.name, c.kind, c.cores, c.max_ghz, c.fma_pipes) for c in p.clusters]
    assert got == [("Cortex-X3", "big", 1, 2.914, 4), ("Cortex-A715", "mid", 4, 2.367, 2),
                   ("Cortex-A510", "little", 4, 1.704, 2)]
    assert p.big_core_mask == "0x1f0" and p.threads == 5
    assert p.name == "google-pixel-8-pro" and p.soc == "Tensor G3" and p.os == "Android 16 (SDK 36)"
    assert abs(p.ram_bytes / 2**30 - 11850652 / 2**20) < 0.01
    assert "placeholder" in p.sources["flash"] and not prof["_facts"]["emulated"]
    assert p.access == "adb" and p.address == "SERIAL"


def test_probe_replayed_through_adb(tmp_path, monkeypatch):
    """probe adb:SERIAL end to end through AdbTarget, the adb executable replaced by a script
    that checks the command line it gets and answers with the Pixel 8 Pro's recorded output."""
    transcript = tmp_path / "t.txt"
    transcript.write_text(_phone_transcript())
    log = tmp_path / "argv.log"
    fake = tmp_path / "adb"
    fake.write_text(f"""#!{sys.executable}
import sys
open({str(log)!r}, "a").write(repr(sys.argv[1:]) + "\\n")
a = sys.argv[1:]
assert a[:2] == ["-s", "R58N12ABCDE"], a
if a[2] == "get-state":
    print("device")
elif a[2] == "shell":
    assert len(a) == 4 and "=== cpuinfo" in a[3] or "sec cpuinfo" in a[3], a
    sys.stdout.write(open({str(transcript)!r}).read())
else:
    sys.exit(1)
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("EDGERT_ADB", str(fake))
    out = tmp_path / "phone.toml"
    path, p = probe.probe_to_profile("adb:R58N12ABCDE", output=str(out))
    assert path == str(out) and p.access == "adb" and p.temp_dir == "/data/local/tmp/edgert"
    assert p.name == "google-pixel-8-pro" and p.big_core_mask == "0x1f0"
    calls = log.read_text().splitlines()
    assert calls[0] == repr(["-s", "R58N12ABCDE", "get-state"]) and "'shell'" in calls[1]


@pytest.mark.skipif(not shutil.which("adb"), reason="the adb client is not installed (apt install adb)")
def test_real_adb_without_a_device_is_one_line():
    try:
        with pytest.raises(EdgertError, match=r"adb:NOPHONE0: no usable device"):
            AdbTarget(parse_address("adb:NOPHONE0"))
    finally:
        subprocess.run(["adb", "kill-server"], capture_output=True)


from tests.test_fuzz import FUZZ  # noqa: E402  (the campaign's settings: make fuzz)


@FUZZ
@given(st.data())
def test_probe_parser_fuzz(data):
    """Truncated, spliced and corrupted transcripts give a profile the loader accepts or one
    EdgertError, never another exception."""
    text = (DATA / "probe-qemu-arm64.txt").read_text()
    lines = text.splitlines()
    i = data.draw(st.integers(0, len(lines)))
    j = data.draw(st.integers(i, len(lines)))
    junk = data.draw(st.lists(st.text(max_size=30), max_size=5))
    mutated = "\n".join(lines[:i] + junk + lines[j:])
    try:
        prof = probe.parse(mutated, "ssh:h")
    except EdgertError:
        return
    _checked(prof)


@given(st.text(max_size=30))
@settings(max_examples=100, deadline=None)
def test_probe_toml_quotes_anything(model):
    prof = probe.parse((DATA / "probe-qemu-arm64.txt").read_text(), "ssh:h")
    prof["description"] = model
    assert _checked(prof).description == model


# ---------------------------------------------------------------------------- push

class LocalTarget:
    """A device that is a directory here: sh runs /bin/sh, put appends. fail_after cuts the
    connection after that many bytes of one put (the device gone mid-push)."""
    def __init__(self, fail_after=None):
        self.fail_after = fail_after
        self.sent = 0

    def sh(self, cmd, timeout=600):
        r = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout, r.stderr

    def put(self, local, remote, offset=0, progress=None):
        with open(local, "rb") as f, open(remote, "ab") as r:
            f.seek(offset)
            while b := f.read(1 << 16):
                if self.fail_after is not None and self.sent + len(b) > self.fail_after:
                    r.write(b[: self.fail_after - self.sent])
                    self.sent = self.fail_after
                    raise EdgertError("ssh:test: connection lost during push; rerun to resume")
                r.write(b)
                self.sent += len(b)


def test_push_resumes_and_verifies(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(os.urandom(600_000))
    dst = tmp_path / "dev" / "models" / "model.gguf"
    t = LocalTarget(fail_after=250_000)
    with pytest.raises(EdgertError, match="rerun to resume"):
        dp.push(t, str(src), str(dst))
    part = Path(str(dst) + ".part")
    assert not dst.exists() and part.stat().st_size == 250_000
    t2 = LocalTarget()
    assert dp.push(t2, str(src), str(dst)) == "resumed"
    assert t2.sent == 600_000 - 250_000 and dst.read_bytes() == src.read_bytes() and not part.exists()
    assert dp.push(LocalTarget(), str(src), str(dst)) == "present"


def test_push_restarts_a_part_that_differs(tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(100_000))
    dst = tmp_path / "dev" / "m.bin"
    dst.parent.mkdir()
    Path(str(dst) + ".part").write_bytes(os.urandom(40_000))   # another file's bytes
    t = LocalTarget()
    assert dp.push(t, str(src), str(dst)) == "sent" and t.sent == 100_000
    assert dst.read_bytes() == src.read_bytes()


def test_push_detects_corruption_on_the_device(tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(50_000))

    class Flipping(LocalTarget):
        def put(self, local, remote, offset=0, progress=None):
            super().put(local, remote, offset, progress)
            with open(remote, "r+b") as f:
                f.seek(1000)
                f.write(b"\xff\x00")
    dst = tmp_path / "dev" / "m.bin"
    with pytest.raises(EdgertError, match="sha256 on the device differs"):
        dp.push(Flipping(), str(src), str(dst))
    assert not dst.exists() and not Path(str(dst) + ".part").exists()


def test_push_refuses_without_space(tmp_path, monkeypatch):
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(10_000))
    monkeypatch.setattr(dp, "free_bytes", lambda t, d: 4096)
    with pytest.raises(EdgertError, match="no space on the device for m.bin: needs"):
        dp.push(LocalTarget(), str(src), str(tmp_path / "dev" / "m.bin"))


# ---------------------------------------------------------------------------- runtime

def test_platform_tags():
    tags = dp.platform_tags("aarch64", ("glibc", "2.36"))
    assert "manylinux_2_28_aarch64" in tags and "manylinux_2_36_aarch64" in tags and "manylinux2014_aarch64" in tags
    assert "manylinux_2_37_aarch64" not in tags
    with pytest.raises(EdgertError, match="not linked to glibc"):
        dp.platform_tags("aarch64", ("", ""))          # Termux's Python (bionic)
    with pytest.raises(EdgertError, match="armv7l"):
        dp.platform_tags("armv7l", ("glibc", "2.31"))


def test_missing_or_old_python_is_one_line():
    with pytest.raises(EdgertError, match="no python3 on the device"):
        dp.check_python(None, {"python": ["none"]})
    with pytest.raises(EdgertError, match="needs >= 3.10"):
        dp.check_python(None, {"python": ["3", "8", "glibc", "2.31"]})
    assert dp.check_python(None, {"python": ["3", "11", "glibc", "2.36"]}) == ((3, 11), ("glibc", "2.36"))


def test_remote_commands_pin_and_isolate():
    r = dp.Remote("/data/local/tmp/edgert/")
    cmd = r.edgert("bench -m 'x y.gguf'", "0xf0")
    assert cmd.startswith("cd /data/local/tmp/edgert && NUMBA_CACHE_DIR=/data/local/tmp/edgert/numba ")
    assert "taskset 0xf0 /data/local/tmp/edgert/venv/bin/edgert bench" in cmd
    assert "taskset" not in r.edgert("run", None)


@pytest.mark.parametrize("name, cores, rails", [("tegrastats-agx-orin.txt", 8, {"VDD_GPU_SOC_mw", "VIN_SYS_5V0_mw"}),
                                                ("tegrastats-orin-nano.txt", 6, {"VDD_IN_mw", "VDD_SOC_mw"})])
def test_tegrastats(name, cores, rails):
    """Real tegrastats lines (tests/data/SOURCES.md): offline cores skipped, every rail kept."""
    text = (DATA / name).read_text()
    s = dp.parse_tegrastats(text, 500)
    assert len(s) == len([l for l in text.splitlines() if "RAM " in l]) > 0
    assert all(x["ram_mib"] > 0 and x["cpu_mhz"] > 0 for x in s)
    assert rails <= set(s[0])
    first = text.splitlines()[0]
    mhz = [int(c.split("@")[1]) for c in first.split("CPU [")[1].split("]")[0].split(",") if "@" in c]
    assert len(mhz) == cores and s[0]["cpu_mhz"] == sum(mhz) / cores
    ev = dp.tegrastats_trace(s)
    assert {e["ph"] for e in ev} == {"C"} and ev[-1]["ts"] == (len(s) - 1) * 500 * 1000


@FUZZ
@given(st.data())
def test_tegrastats_parser_fuzz(data):
    """Real tegrastats lines cut, spliced and corrupted: samples or nothing, never an exception."""
    lines = ((DATA / "tegrastats-agx-orin.txt").read_text() + (DATA / "tegrastats-orin-nano.txt").read_text()).splitlines()
    line = data.draw(st.sampled_from(lines))
    i = data.draw(st.integers(0, len(line)))
    j = data.draw(st.integers(i, len(line)))
    mutated = line[:i] + data.draw(st.text(max_size=12)) + line[j:]
    for s in dp.parse_tegrastats(mutated, 500):
        assert s["ram_mib"] >= 0 and s["cpu_mhz"] >= 0
    dp.tegrastats_trace(dp.parse_tegrastats(mutated, 500))
