"""edgert devices [show NAME|FILE] [--refresh]: list device profiles, or show one with its sources.

`host` is this machine, measured live (cores, RAM, memory bandwidth, storage read curve) and
cached; --refresh measures again.
"""
from __future__ import annotations


from edgert.apps.common import parser


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def show(prof) -> None:
    clusters = ", ".join(f"{c.cores}x {c.name} {c.max_ghz:g} GHz ({c.kind})" for c in prof.clusters)
    fc = prof.flash
    curve = "  ".join(f"{k:g}K@{d}:{r:g}" for k, d, r in sorted(fc.points, key=lambda p: (p[1], p[0])))
    rows = [
        ("name", prof.name), ("description", prof.description), ("soc", prof.soc), ("os", prof.os),
        ("cpu", clusters), ("threads (default)", f"{prof.threads} (big + mid cores, mask {prof.big_core_mask})"),
        ("ram", f"{_fmt_bytes(prof.ram_bytes)}, app share {prof.app_share:.0%} = {_fmt_bytes(prof.app_budget)}"),
        ("memory bandwidth", f"{prof.mem_bandwidth / 1e9:.1f} GB/s"),
        ("flash", f"{fc.kind}, first byte {fc.first_byte_us:g} us"),
        ("flash curve MB/s", curve + "   (request KiB @ queue depth)"),
        ("accelerators", ", ".join(prof.accelerators) or "none"),
        ("access", f"{prof.access} {prof.address}".strip() + f", temp dir {prof.temp_dir}"),
        ("file", prof.path),
    ]
    if prof.name == "host":  # the kernels this machine runs (kernels/isa.py)
        from edgert.kernels import isa
        has = [i.name for i in isa.ISAS if i.built and isa.supported(i)]
        rows.insert(5, ("kernels", f"{isa.describe()}: {isa.current().about}; this CPU runs: {', '.join(has)} "
                                   "(EDGERT_ISA, EDGERT_MODE)"))
    for k, v in rows:
        print(f"{k:<20} {v}")
    print("sources:")
    for k, v in prof.sources.items():
        print(f"  {k:<13} {v}")


def main(argv) -> int:
    p = parser("devices", __doc__)
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?", help="profile name or path to a .toml file (for show)")
    p.add_argument("--refresh", action="store_true", help="measure the host again")
    args = p.parse_args(argv)
    from edgert.device_profiles.loader import load_profile, profile_names
    from edgert.errors import EdgertError
    if args.action == "show":
        if not args.name:
            raise EdgertError("devices show: which device? (see `edgert devices`)")
        show(load_profile(args.name, refresh=args.refresh))
        return 0
    print(f"{'NAME':<22} {'CORES':>5} {'RAM':>9} {'APP':>9} {'MEM BW':>9} {'FLASH':<24} OS")
    for name in profile_names():
        if name == "host" and not args.refresh:
            from edgert.probes import _cache_path
            if not _cache_path().exists():  # do not run minutes of probes just to list
                print(f"{'host':<22} {'':>5} {'':>9} {'':>9} {'':>9} {'(measured: devices show host)':<24}")
                continue
        pr = load_profile(name, refresh=args.refresh)
        print(f"{pr.name:<22} {sum(c.cores for c in pr.clusters):>5} {_fmt_bytes(pr.ram_bytes):>9} "
              f"{_fmt_bytes(pr.app_budget):>9} {pr.mem_bandwidth / 1e9:>6.1f}GB/s {pr.flash.kind:<24} {pr.os}")
    return 0
