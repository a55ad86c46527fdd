"""edgert probe adb:SERIAL | ssh:[USER@]HOST[:PORT]: read a real device into a device profile.

Runs one POSIX shell script on the device (nothing needs installing: Android's toybox or GNU
coreutils): getprop, /proc/cpuinfo, cpufreq per core, /proc/meminfo, the Jetson's nv_tegra_release
and nvpmodel, thermal zones, python3; measures storage reads with dd (O_DIRECT where the device's
dd has it) and memory write bandwidth. Writes the profile (every number's source `probed <date>
over <target>`) to EDGERT_CACHE/devices/NAME.toml, or -o FILE; `--device NAME` then finds it.
"""
from __future__ import annotations


from edgert.apps.common import err, parser


def main(argv) -> int:
    p = parser("probe", __doc__)
    p.add_argument("target", help="adb, adb:SERIAL or ssh:[USER@]HOST[:PORT]")
    p.add_argument("-o", "--output", default=None, help="profile file to write (default EDGERT_CACHE/devices/NAME.toml)")
    p.add_argument("--name", default=None, help="profile name (default: from the device's maker and model)")
    p.add_argument("--temp-dir", default=None,
                   help="device directory for edgert's files and the storage test (default /data/local/tmp/edgert "
                        "on adb, /tmp/edgert on ssh)")
    p.add_argument("--identity", default=None, help="ssh private key file")
    p.add_argument("--no-storage", action="store_true", help="skip the storage read test (writes 64 MiB)")
    p.add_argument("--save-transcript", default=None, metavar="FILE",
                   help="also keep the probe's raw output (replay it with --replay)")
    p.add_argument("--replay", default=None, metavar="FILE",
                   help="parse a saved transcript instead of reaching the device")
    args = p.parse_args(argv)
    from edgert.device_probe import probe_to_profile
    path, prof = probe_to_profile(args.target, output=args.output, name=args.name, temp_dir=args.temp_dir,
                                  identity=args.identity, storage=not args.no_storage,
                                  transcript=args.save_transcript, replay=args.replay)
    c = ", ".join(f"{x.cores}x {x.name} {x.max_ghz:g} GHz ({x.kind})" for x in prof.clusters)
    err(f"probed {args.target}: {prof.description}")
    err(f"  cpu {c}; big-core mask {prof.big_core_mask}")
    err(f"  memory {prof.ram_bytes / 2**30:.1f} GiB (app share {prof.app_share:.0%}), "
        f"write bandwidth {prof.mem_bandwidth / 1e9:.1f} GB/s; storage {prof.flash.kind}")
    print(path)
    return 0
