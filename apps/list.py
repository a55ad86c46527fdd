"""edgert list: known models, and which are installed."""
from __future__ import annotations

import argparse


def main(argv) -> int:
    argparse.ArgumentParser(prog="edgert list", description=__doc__).parse_args(argv)
    from edgert.registry import local_path, models_dir, registry
    reg = registry()
    print(f"models directory: {models_dir()}")
    print(f"{'NAME':<22} {'SIZE':>9}  {'INSTALLED':<9}  DESCRIPTION")
    for name, e in reg["models"].items():
        mark = "yes" if local_path(name).exists() else "-"
        dflt = " (default)" if name == reg["default"] else ""
        print(f"{name:<22} {e['size'] / 1e6:7.0f}MB  {mark:<9}  {e['description']}{dflt}")
    return 0
