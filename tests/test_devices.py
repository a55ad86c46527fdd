"""Device profiles: every shipped file loads, cites its sources, and bad files get one-line errors."""
import tomllib

import pytest

from edgert.device_profiles.loader import HERE, FlashCurve, load_profile, profile_from_dict, profile_names
from edgert.errors import EdgertError

REQUIRED = {"pixel-8-pro", "oneplus-12", "galaxy-s24", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb",
            "raspberry-pi-5-8gb"}


def test_shipped_profiles_load_and_cite_sources():
    names = set(profile_names())
    assert REQUIRED <= names and "host" in names
    for name in REQUIRED:
        p = load_profile(name)
        assert p.name == name
        assert p.threads >= 1 and p.app_budget < p.ram_bytes
        assert all(len(s) > 20 for s in p.sources.values()), name
        # the default threads run on big + mid cores: the mask names exactly that many CPUs
        assert bin(int(p.big_core_mask, 16)).count("1") == p.threads, name


def _pixel():
    return tomllib.loads((HERE / "pixel-8-pro.toml").read_text())


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d.update(colour="red"), "unknown field 'colour'"),
    (lambda d: d["memory"].pop("bandwidth_gbs"), "missing field 'memory.bandwidth_gbs'"),
    (lambda d: d["memory"].update(app_share=1.5), "'memory.app_share' = 1.5 is impossible"),
    (lambda d: d["memory"].update(ram_gb=-8), "'memory.ram_gb' = -8 is impossible"),
    (lambda d: d["memory"].update(source=" "), "every number needs a source"),
    (lambda d: d["cpu"][0].update(cores="one"), "'cpu.cores' must be int"),
    (lambda d: d["cpu"][0].update(kind="huge"), "'cpu[0].kind' = 'huge'"),
    (lambda d: d["flash"].update(curve=[[4, 1]]), "'flash.curve[0]' must be"),
    (lambda d: d["flash"].update(curve=[[4, 1, 0]]), "'flash.curve[0].mb_per_s' = 0 is impossible"),
    (lambda d: d["access"].update(big_core_mask="0x3ff"), "names 10 CPUs, more than the 9 cores"),
    (lambda d: d.pop("flash"), "missing table [flash]"),
])
def test_bad_profile_errors_name_field(edit, msg):
    d = _pixel()
    edit(d)
    with pytest.raises(EdgertError, match=None) as e:
        profile_from_dict(d, "bad.toml")
    assert str(e.value).startswith("bad.toml: ") and msg in str(e.value), str(e.value)


def test_bad_profile_file_and_name(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text("name = [")
    with pytest.raises(EdgertError, match="x.toml: not valid TOML"):
        load_profile(str(f))
    with pytest.raises(EdgertError, match="unknown device 'pixel-9'"):
        load_profile("pixel-9")


def test_flash_curve_interpolates_in_log_size():
    c = FlashCurve(((4, 1, 40.0), (4096, 1, 2000.0), (4, 8, 200.0), (4096, 8, 2000.0)), 100.0)
    assert c.throughput(4096) == pytest.approx(40e6)
    assert c.throughput(4096 << 10) == pytest.approx(2000e6)
    assert c.throughput(128 << 10) == pytest.approx((40 + 0.5 * 1960) * 1e6)  # halfway in log2
    assert c.throughput(4096, qd=16) == pytest.approx(200e6)   # largest depth <= 16
    assert c.throughput(1 << 30) == pytest.approx(2000e6)      # clamped
    assert c.request_seconds(4096, 1) == pytest.approx(4096 / 40e6)
    assert c.request_seconds(512) == pytest.approx(100e-6)      # never faster than first byte


def test_cli_one_line_errors_for_profiles(tmp_path):
    from test_cli import one_line_error, run_cli
    bad = tmp_path / "phone.toml"
    d = _pixel()
    d["memory"]["app_share"] = 2.0
    bad.write_text("\n".join(_toml_lines(d)))
    r = run_cli("devices", "show", str(bad))
    one_line_error(r, "phone.toml", "memory.app_share", "impossible")
    r = run_cli("devices", "show", "pixel-9")
    one_line_error(r, "unknown device 'pixel-9'")
    r = run_cli("devices", "show", "pixel-8-pro")
    assert r.returncode == 0 and "Tensor G3" in r.stdout and "sources:" in r.stdout


def _toml_lines(d, prefix=""):
    """A minimal TOML writer for the profile's shape (tables, arrays of tables, scalars, lists)."""
    import json
    out = []
    for k, v in d.items():
        if not isinstance(v, (dict, list)) or (isinstance(v, list) and v and not isinstance(v[0], dict)):
            out.append(f"{k} = {json.dumps(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"[{k}]")
            out += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"[[{k}]]")
                out += [f"{kk} = {json.dumps(vv)}" for kk, vv in item.items()]
    return out
