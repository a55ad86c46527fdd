"""The instruction sets edgert's kernels target, chosen once at start-up from the CPU.

Each quantised dot product is two stages: an integer stage (the products of a block's 8-bit
values summed into 32-bit lanes: exact, so any instruction and any order give the same integers)
and a float stage (lanes converted, scaled, accumulated and summed: the order decides the last
bits). The ISA picks the integer stage; the mode picks the float stage:

    exact  llama.cpp's AVX2 float order: logits bit-identical with its x86 build (the default)
    fast   an order of our own where it is cheaper (docs/kernels.md measures what it changes)

The table below is data: a name, the machines and LLVM CPU features it needs, the weight layout
its kernels read ("rows": kernels/simd.py, GGUF blocks one row after another; "tiles":
kernels/matmul.py's portable float loops), and whether its kernels are built in this release.
`EDGERT_ISA` overrides the choice (an ISA the CPU lacks is an error, not a silent fallback), and
`EDGERT_MODE` the mode.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

from edgert.errors import EdgertError


@dataclass(frozen=True)
class ISA:
    name: str
    machines: tuple[str, ...]   # platform.machine() values it runs on (empty: any)
    features: tuple[str, ...]   # LLVM host CPU features it needs
    layout: str                 # weight layout its kernels read: "rows" or "tiles"
    built: bool                 # kernels exist in this release
    about: str


X86 = ("x86_64", "AMD64")
ARM = ("aarch64", "arm64")

# best first: the first built ISA the CPU supports is the default
ISAS = (
    ISA("avx512vnni", X86, ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni"), "rows", True,
        "AVX2 kernels with the integer stage in VNNI (vpdpbusd on 256-bit vectors)"),
    ISA("avx2", X86, ("avx2", "fma"), "rows", True,
        "llama.cpp's AVX2 kernels transcribed to LLVM IR (pmaddubsw / pmaddwd)"),
    ISA("neon-dotprod", ARM, ("neon", "dotprod"), "rows", True,
        "the same kernels with the integer stage in NEON sdot (ARMv8.2 dot product)"),
    ISA("portable", (), (), "tiles", True,
        "Numba float loops on a transposed tile layout (any CPU, and NUMBA_DISABLE_JIT)"),
)
BY_NAME = {i.name: i for i in ISAS}
MODES = ("exact", "fast")


def cpu_features() -> set[str]:
    """LLVM's feature names the host CPU has (the ones Numba compiles for); on Arm also those the
    kernel reports in the auxiliary vector (hwcap_features)."""
    from llvmlite import binding as llb
    try:
        feats = {f[1:] for f in llb.get_host_cpu_features().flatten().split(",") if f.startswith("+")}
    except RuntimeError:  # LLVM could not read them (an Arm /proc/cpuinfo it does not know)
        feats = set()
    return feats | hwcap_features() if platform.machine() in ARM else feats


# Linux / Android arm64 <asm/hwcap.h>: AT_HWCAP bit -> LLVM feature name
_HWCAP = {1: "neon", 20: "dotprod"}
_HWCAP2 = {13: "i8mm"}


def hwcap_features() -> set[str]:
    """Arm features from getauxval(AT_HWCAP / AT_HWCAP2): what the kernel (or qemu-user, whose
    /proc/cpuinfo is the host's) says this CPU executes; empty where there is no getauxval."""
    import ctypes
    if platform.machine() not in ARM:
        return set()
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return set()
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    hw, hw2 = getauxval(16), getauxval(26)
    return {n for b, n in _HWCAP.items() if hw >> b & 1} | {n for b, n in _HWCAP2.items() if hw2 >> b & 1}


def numba_features(isa: ISA) -> str | None:
    """The CPU feature string Numba must compile isa's kernels with when LLVM's own view of the
    host lacks their features (under qemu-user LLVM sees a `generic` CPU), else None: Numba's
    default. NUMBA_CPU_FEATURES, if set, is left to the user."""
    import os
    from llvmlite import binding as llb
    if os.environ.get("NUMBA_CPU_FEATURES") or isa.name == "portable":
        return None
    try:
        host = llb.get_host_cpu_features().flatten()
    except RuntimeError:
        host = ""
    have = {f[1:] for f in host.split(",") if f.startswith("+")}
    missing = [f for f in isa.features if f not in have]
    return ",".join([f for f in host.split(",") if f] + [f"+{f}" for f in missing]) if missing else None


def supported(isa: ISA, machine: str | None = None, features: set[str] | None = None) -> bool:
    """Whether this CPU (or the given machine and features) can run isa's kernels."""
    import numba as nb
    if isa.name == "portable":
        return True
    if nb.config.DISABLE_JIT:
        return False
    machine = machine or platform.machine()
    features = cpu_features() if features is None else features
    return machine in isa.machines and all(f in features for f in isa.features)


def detect() -> ISA:
    """The best built ISA this CPU supports."""
    return next(i for i in ISAS if i.built and supported(i))


@functools.lru_cache(maxsize=None)
def current() -> ISA:
    """The ISA the kernels use in this process: EDGERT_ISA if set (checked), else detect().
    EDGERT_SIMD=0 (the older switch) means portable."""
    from edgert.settings import env
    want = env("EDGERT_ISA")
    if want == "auto" and env("EDGERT_SIMD") == "0":
        want = "portable"
    return resolve(want)


def resolve(want: str, mode_: str = "exact") -> ISA:
    """The ISA a name asks for on this CPU ("auto": detect()), or a clear error; mode_ checked too."""
    if mode_ not in MODES:
        raise EdgertError(f"mode {mode_}: unknown (one of: {', '.join(MODES)})")
    if not want or want == "auto":
        return detect()
    isa = BY_NAME.get(want)
    if isa is None:
        raise EdgertError(f"instruction set {want}: unknown (one of: auto, {', '.join(BY_NAME)})")
    if not isa.built:
        raise EdgertError(f"instruction set {want}: {isa.about}")
    if not supported(isa):
        raise EdgertError(f"instruction set {want}: this CPU ({platform.machine()}) lacks "
                        f"{', '.join(f for f in isa.features if f not in cpu_features()) or 'the JIT'}")
    return isa


@functools.lru_cache(maxsize=None)
def mode() -> str:
    """exact or fast (EDGERT_MODE); fast falls back to exact where an ISA has no fast kernels."""
    from edgert.settings import env
    m = env("EDGERT_MODE")
    if m not in MODES:
        raise EdgertError(f"EDGERT_MODE={m}: unknown mode (one of: {', '.join(MODES)})")
    return m


def describe() -> str:
    """One line for `devices show host`, bench rows and traces, e.g. 'avx512vnni/exact'."""
    return f"{current().name}/{mode()}"


def row_kernels() -> bool:
    """Whether matrices are held in the row layout of kernels/simd.py (an x86 or Arm ISA chosen)."""
    return current().layout == "rows"
