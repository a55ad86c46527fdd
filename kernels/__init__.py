"""Numba kernels. Importing this package points Numba's on-disk cache at a directory named by a
hash of the kernel sources and by the instruction set and mode asked for (kernels/isa.py):
Numba checks only the timestamp of a cached function's own file, so a change to a kernel it
inlines from another module (e.g. quant.f16_bits into attention.store_kv), or IR chosen for
another ISA, would otherwise keep running stale machine code."""
import hashlib
import os
from pathlib import Path

import numba

_here = Path(__file__).parent
_digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(_here.glob("*.py")))).hexdigest()[:12]
_base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "edgert", "numba")
from edgert.errors import EdgertError  # noqa: E402
from edgert.kernels import isa as _isa  # noqa: E402

try:  # named by what the choice resolves to ("auto" and its ISA named alike share one cache)
    _choice = f"{_isa.current().name}-{_isa.mode()}"
    _features = _isa.numba_features(_isa.current())
    if _features:  # e.g. +dotprod under qemu-user, where LLVM sees a generic CPU
        numba.config.CPU_FEATURES = _features
except EdgertError:  # a bad choice: the error is raised where the kernels are first used
    _choice = "unresolved"
numba.config.CACHE_DIR = os.path.join(_base, f"{_digest}-{_choice}")
