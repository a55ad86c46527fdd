"""edgert list: known models, and which are installed."""
from __future__ import annotations


from edgert.apps.common import parser


def main(argv) -> int:
    parser("list", __doc__).parse_args(argv)
    from edgert.registry import local_path, models_dir, registry
    reg = registry()
    print(f"models directory: {models_dir()}")
    print(f"{'NAME':<22} {'SIZE':>9}  {'INSTALLED':<9}  DESCRIPTION")
    for name, e in reg["models"].items():
        have = local_path(name).exists()
        mark = "yes" if have else "-"
        dflt = " (default)" if name == reg["default"] else ""
        size = local_path(name).stat().st_size if have else e["size"]
        size = f"{size / 1e6:7.0f}MB" if size else "      -  "
        how = f" (built by `{e['build']}`)" if e.get("build") else ""
        print(f"{name:<22} {size}  {mark:<9}  {e['description']}{dflt}{how}")
    return 0
