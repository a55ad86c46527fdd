"""Numba kernels. Importing this package points Numba's on-disk cache at a directory named by a
hash of the kernel sources: Numba checks only the timestamp of a cached function's own file, so
a change to a kernel it inlines from another module (e.g. quant.f16_bits into
attention.store_kv) would otherwise keep running the stale machine code."""
import hashlib
import os
from pathlib import Path

import numba

_here = Path(__file__).parent
_digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(_here.glob("*.py")))).hexdigest()[:12]
_base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "edgert", "numba")
numba.config.CACHE_DIR = os.path.join(_base, _digest)
