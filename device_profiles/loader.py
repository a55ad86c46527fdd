"""Device profiles: one TOML file per device in this folder, loaded into a frozen DeviceProfile.

Every table that holds numbers must carry a `source` string saying where they come from (spec
sheet, paper, measurement, or an explicit edgert assumption). The loader refuses unknown keys,
missing fields and impossible values with one line naming the file and the field. The `host`
profile is not a file: it is measured live (edgert.probes) and cached per machine.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgert.errors import EdgertError

HERE = Path(__file__).parent
ACCESS_METHODS = ("adb", "ssh", "local")
CLUSTER_KINDS = ("big", "mid", "little")


@dataclass(frozen=True)
class Cluster:
    name: str          # core type, e.g. "Cortex-X4"
    kind: str          # big | mid | little
    cores: int
    max_ghz: float
    simd_bits: int     # vector width of one FP/ASIMD pipe
    fma_pipes: int     # vector FMA pipes per core

    @property
    def peak_gflops(self) -> float:
        """fp32 FMA peak of the cluster: cores x GHz x lanes x pipes x 2."""
        return self.cores * self.max_ghz * (self.simd_bits // 32) * self.fma_pipes * 2


@dataclass(frozen=True)
class FlashCurve:
    """Read throughput by request size and queue depth, and the first-byte latency."""
    points: tuple          # ((request_kib, queue_depth, mb_per_s), ...)
    first_byte_us: float
    kind: str = ""

    def throughput(self, nbytes: int, qd: int = 1) -> float:
        """Bytes/s for requests of `nbytes` at queue depth `qd`: log-linear interpolation in the
        request size, at the largest measured queue depth <= qd (clamped at the ends)."""
        depths = sorted({p[1] for p in self.points})
        d = max([x for x in depths if x <= qd] or [depths[0]])
        pts = sorted((p[0], p[2]) for p in self.points if p[1] == d)
        kib = max(nbytes / 1024, 1e-3)
        if kib <= pts[0][0]:
            return pts[0][1] * 1e6
        for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
            if kib <= k1:
                f = (math.log(kib) - math.log(k0)) / (math.log(k1) - math.log(k0))
                return (r0 + f * (r1 - r0)) * 1e6
        return pts[-1][1] * 1e6

    def request_seconds(self, nbytes: int, qd: int = 1) -> float:
        """Service time of one request when `qd` are in flight. The curve's points are sustained
        aggregate rates (latency included), so each of qd requests sees 1/qd of the rate; no
        request completes faster than the first-byte latency."""
        return max(self.first_byte_us * 1e-6, nbytes * max(qd, 1) / self.throughput(nbytes, qd))


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    soc: str
    os: str
    clusters: tuple            # (Cluster, ...), big first
    ram_bytes: int
    app_share: float           # share of RAM an app may use
    mem_bandwidth: float       # bytes/s, sustained read
    flash: FlashCurve
    accelerators: tuple        # (str, ...)
    access: str                # adb | ssh | local
    address: str               # adb serial or ssh host ("" = first device / none)
    temp_dir: str
    big_core_mask: str         # hex CPU mask of the cores edgert should run on
    sources: dict              # table -> source text
    path: str = ""

    @property
    def app_budget(self) -> int:
        return int(self.ram_bytes * self.app_share)

    @property
    def threads(self) -> int:
        """Threads edgert uses by default: the big and mid cores (little cores slow a parallel
        region down to their pace)."""
        return sum(c.cores for c in self.clusters if c.kind != "little") or self.clusters[0].cores

    @property
    def compute_clusters(self) -> tuple:
        """The clusters the default thread count runs on, fastest first."""
        out, left = [], self.threads
        for c in sorted(self.clusters, key=lambda c: -c.max_ghz):
            if left <= 0:
                break
            n = min(c.cores, left)
            out.append(Cluster(c.name, c.kind, n, c.max_ghz, c.simd_bits, c.fma_pipes))
            left -= n
        return tuple(out)


# ============================================================================================
# Validation
# ============================================================================================

SCHEMA = {  # table -> {field: (type, required)}
    "": {"name": (str, True), "description": (str, True), "soc": (str, True), "os": (str, True),
         "source": (str, True)},
    "cpu": {"name": (str, True), "kind": (str, True), "cores": (int, True), "max_ghz": (float, True),
            "simd_bits": (int, True), "fma_pipes": (int, True), "source": (str, True)},
    "memory": {"ram_gb": (float, True), "app_share": (float, True), "bandwidth_gbs": (float, True),
               "source": (str, True)},
    "flash": {"kind": (str, True), "first_byte_us": (float, True), "curve": (list, True),
              "source": (str, True)},
    "accelerators": {"list": (list, True), "source": (str, True)},
    "access": {"method": (str, True), "address": (str, False), "temp_dir": (str, True),
               "big_core_mask": (str, True)},
}


def _check_table(where, table, fields, data):
    if not isinstance(data, dict):
        raise EdgertError(f"{where}: [{table}] must be a table")
    for k in data:
        if k not in fields and not (table == "" and k in SCHEMA):
            raise EdgertError(f"{where}: unknown field '{_dotted(table, k)}'")
    for k, (typ, required) in fields.items():
        if k not in data:
            if required:
                raise EdgertError(f"{where}: missing field '{_dotted(table, k)}'")
            continue
        v = data[k]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) if typ is float else \
            isinstance(v, typ) and not isinstance(v, bool)
        if not ok:
            raise EdgertError(f"{where}: field '{_dotted(table, k)}' must be {typ.__name__}, "
                              f"not {type(v).__name__}")
        if typ is str and k == "source" and not v.strip():
            raise EdgertError(f"{where}: field '{_dotted(table, k)}' is empty: every number needs a source")


def _dotted(table, key):
    return f"{table}.{key}" if table else key


def _positive(where, field, v, upper=None):
    if not (v > 0) or (upper is not None and v > upper) or (isinstance(v, float) and not math.isfinite(v)):
        rng = f"in (0, {upper}]" if upper is not None else "> 0"
        raise EdgertError(f"{where}: field '{field}' = {v} is impossible (must be {rng})")


def profile_from_dict(d: dict, where: str) -> DeviceProfile:
    """Validate a parsed profile and build the DeviceProfile; errors name `where` and the field."""
    _check_table(where, "", SCHEMA[""], d)
    for t in ("cpu", "memory", "flash", "accelerators", "access"):
        if t not in d:
            raise EdgertError(f"{where}: missing table [{t}]")
    cpus = d["cpu"]
    if not isinstance(cpus, list) or not cpus:
        raise EdgertError(f"{where}: [[cpu]] must list at least one cluster")
    clusters = []
    for i, c in enumerate(cpus):
        _check_table(where, "cpu", SCHEMA["cpu"], c)
        if c["kind"] not in CLUSTER_KINDS:
            raise EdgertError(f"{where}: field 'cpu[{i}].kind' = '{c['kind']}' is not one of {CLUSTER_KINDS}")
        _positive(where, f"cpu[{i}].cores", c["cores"], 256)
        _positive(where, f"cpu[{i}].max_ghz", c["max_ghz"], 10)
        if c["simd_bits"] not in (64, 128, 256, 512):
            raise EdgertError(f"{where}: field 'cpu[{i}].simd_bits' = {c['simd_bits']} is impossible")
        _positive(where, f"cpu[{i}].fma_pipes", c["fma_pipes"], 8)
        clusters.append(Cluster(c["name"], c["kind"], c["cores"], float(c["max_ghz"]),
                                c["simd_bits"], c["fma_pipes"]))
    clusters.sort(key=lambda c: CLUSTER_KINDS.index(c.kind))
    m = d["memory"]
    _check_table(where, "memory", SCHEMA["memory"], m)
    _positive(where, "memory.ram_gb", m["ram_gb"], 4096)
    _positive(where, "memory.app_share", m["app_share"], 1.0)
    _positive(where, "memory.bandwidth_gbs", m["bandwidth_gbs"], 10000)
    f = d["flash"]
    _check_table(where, "flash", SCHEMA["flash"], f)
    _positive(where, "flash.first_byte_us", f["first_byte_us"], 1e6)
    points = []
    for i, p in enumerate(f["curve"]):
        if not (isinstance(p, list) and len(p) == 3 and all(isinstance(x, (int, float)) for x in p)):
            raise EdgertError(f"{where}: field 'flash.curve[{i}]' must be [request_kib, queue_depth, mb_per_s]")
        for j, name in enumerate(("request_kib", "queue_depth", "mb_per_s")):
            _positive(where, f"flash.curve[{i}].{name}", p[j], 1e7)
        points.append((float(p[0]), int(p[1]), float(p[2])))
    if not points:
        raise EdgertError(f"{where}: field 'flash.curve' is empty")
    a = d["accelerators"]
    _check_table(where, "accelerators", SCHEMA["accelerators"], a)
    acc = d["access"]
    _check_table(where, "access", SCHEMA["access"], acc)
    if acc["method"] not in ACCESS_METHODS:
        raise EdgertError(f"{where}: field 'access.method' = '{acc['method']}' is not one of {ACCESS_METHODS}")
    try:
        mask = int(acc["big_core_mask"], 16)
    except ValueError:
        mask = 0
    if mask <= 0:
        raise EdgertError(f"{where}: field 'access.big_core_mask' = '{acc['big_core_mask']}' is not a hex CPU mask")
    n_cores = sum(c.cores for c in clusters)
    # CPU numbers need not be contiguous (a probe sees only the online cores), but the mask
    # cannot name more CPUs than the profile has
    if bin(mask).count("1") > n_cores or mask >> 1024:
        raise EdgertError(f"{where}: field 'access.big_core_mask' names {bin(mask).count('1')} CPUs, more than "
                          f"the {n_cores} cores")
    return DeviceProfile(
        name=d["name"], description=d["description"], soc=d["soc"], os=d["os"],
        clusters=tuple(clusters), ram_bytes=int(m["ram_gb"] * 2**30), app_share=float(m["app_share"]),
        mem_bandwidth=float(m["bandwidth_gbs"]) * 1e9,
        flash=FlashCurve(tuple(points), float(f["first_byte_us"]), f["kind"]),
        accelerators=tuple(map(str, a["list"])), access=acc["method"], address=acc.get("address", ""),
        temp_dir=acc["temp_dir"], big_core_mask=acc["big_core_mask"],
        sources={"device": d["source"], "cpu": "; ".join(c["source"] for c in cpus),
                 "memory": m["source"], "flash": f["source"], "accelerators": a["source"]},
        path=where)


# ============================================================================================
# Lookup
# ============================================================================================

def probed_dir() -> Path:
    """Where `edgert probe` writes the profiles of real devices (EDGERT_CACHE/devices)."""
    from edgert.settings import env
    return Path(env("EDGERT_CACHE")).expanduser() / "devices"


def profile_names() -> list[str]:
    shipped = {p.stem for p in HERE.glob("*.toml")}
    probed = {p.stem for p in probed_dir().glob("*.toml")} if probed_dir().is_dir() else set()
    return ["host"] + sorted(shipped | probed)


def load_profile(name_or_path: str, refresh: bool = False) -> DeviceProfile:
    """A profile by name (`host`, or a file in this folder) or by path to a .toml file."""
    if name_or_path == "host":
        from edgert.probes import host_profile
        return host_profile(refresh=refresh)
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = HERE / f"{name_or_path}.toml"
        if not p.exists():  # a probed device (edgert probe)
            p = probed_dir() / f"{name_or_path}.toml"
        if not p.exists():
            raise EdgertError(f"unknown device '{name_or_path}' (known: {', '.join(profile_names())})")
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise EdgertError(f"{p}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgertError(f"{p}: not valid TOML ({e})") from None
    return profile_from_dict(data, str(p))
