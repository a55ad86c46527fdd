"""The edgert package: one GGUF file (`*.edgert.gguf`, 4 KiB alignment) holding the source model's
metadata and tensors unchanged plus, per layer, the FFN as neuron clusters and a gate predictor
(kind "neurons", below), or, for a mixture of experts, each expert as its own tensors at its own
ggml type (kind "experts": converters/expert_bits.py; edgert.recipe.kind = "experts",
edgert.recipe.expert_types the count of experts per type, the stacked `blk.N.ffn_*_exps.weight`
replaced by `blk.N.ffn_*_exps.E.weight`, every tensor's sha256 as below).

Metadata (all under `edgert.`):
    edgert.magic = "edgert", edgert.format_version = FORMAT_VERSION
    edgert.recipe.*            source file name and sha256, converter version, calibration text
                               sha256 and token count, sparsity, cluster size, predictor rank,
                               down-column type, measured perplexity cost of that layout
    edgert.sparsity_levels     [n_levels] target sparsities the thresholds were calibrated for
    edgert.sha256.<tensor>     hex sha256 of every tensor's bytes

Tensors per layer N (hot-to-cold order = decreasing activation frequency on the calibration text):
    blk.N.ffn_clusters  I8 [n_clusters, cluster_bytes]   C neurons a cluster (layout below)
    blk.N.ffn_perm      I32 [n_ff]      hot-order position -> neuron index of the source matrices
    blk.N.ffn_freq      F32 [n_ff]      activation frequency at the recipe's sparsity, hot order
    blk.N.ffn_thresh    F32 [n_levels]  |act(gate) * up| thresholds, one per sparsity level
    blk.N.gate_thresh   F32 [n_levels]  |act(gate)| candidate thresholds (exact gate)
    blk.N.pred_a  I8 [r, n_embd], blk.N.pred_a_scale F32 [r]    low-rank gate predictor:
    blk.N.pred_b  I8 [n_ff, r],   blk.N.pred_b_scale F32 [n_ff]  g ~ (b * sb) @ ((a * sa) @ x)
    blk.N.pred_thresh   F32 [n_levels]  |act(predicted gate)| candidate thresholds per level

Cluster layout: two sections, each padded to 4 KiB so either can be read alone with O_DIRECT:
    gate section:    gate rows of the C neurons in the row layout (qs, qh, sc, d, m fields)
    up+down section: up rows (same fields), down columns along n_embd as Q8_0 or Q5_0 (the recipe's
                     down_type), in the same row layout
Each field is a [C, width] array starting on a 64-byte boundary.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from edgert.errors import EdgertError

MAGIC = "edgert"
FORMAT_VERSION = 1
CONVERTER_VERSION = "0.1.0"
SECTION_ALIGN = 4096
FIELD_ALIGN = 64
DOWN_TYPES = {"Q8_0": 8, "Q5_0": 6}  # down-column types (gguf-py quantises both)


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


def row_field_widths(qtype: int, cols: int) -> list[int]:
    """Bytes per row of the five row-layout fields (qs, qh, sc, d, m) of a qtype matrix."""
    from edgert.kernels.quant import BLOCK, repack
    epb, bpb = BLOCK[qtype]
    q = repack(qtype, np.zeros(cols // epb * bpb, np.uint8), 1, cols, "rows")
    return [a.nbytes for a in q.arrays()]


@dataclass(frozen=True)
class ClusterLayout:
    C: int                 # neurons per cluster
    gate_type: int
    up_type: int
    n_embd: int
    lay: np.ndarray        # int64 [30]: (offset, row bytes) of the 15 fields (kernels/sparse.py)
    gate_bytes: int        # the gate section, 4 KiB padded
    nbytes: int            # the whole cluster, 4 KiB padded
    down_type: int = 8

    @property
    def updown_bytes(self) -> int:
        return self.nbytes - self.gate_bytes


def cluster_layout(gate_type: int, up_type: int, n_embd: int, C: int, down_type: int = 8) -> ClusterLayout:
    lay, o = [], 0
    for f, w in enumerate(row_field_widths(gate_type, n_embd)):
        o = _up(o, FIELD_ALIGN)
        lay += [o, w]
        o += C * w
    gate_bytes = _up(o, SECTION_ALIGN)
    o = gate_bytes
    widths = row_field_widths(up_type, n_embd) + row_field_widths(down_type, n_embd)
    for w in widths:
        o = _up(o, FIELD_ALIGN)
        lay += [o, w]
        o += C * w
    return ClusterLayout(C, gate_type, up_type, n_embd, np.array(lay, np.int64), gate_bytes, _up(o, SECTION_ALIGN),
                         down_type)


def choose_cluster_size(gate_type: int, up_type: int, n_embd: int, n_ff: int, target: int = 128 << 10,
                        down_type: int = 8) -> int:
    """The number of neurons per cluster: a divisor of n_ff whose cluster is near `target` bytes
    (large requests are what flash serves fast) with the least padding."""
    best = None
    for C in (8, 16, 24, 32, 48, 64, 96, 128):
        if n_ff % C:
            continue
        L = cluster_layout(gate_type, up_type, n_embd, C, down_type)
        per = L.nbytes / C
        score = per * (1.0 + abs(np.log2(L.nbytes / target)) * 0.05)
        if best is None or score < best[0]:
            best = (score, C)
    if best is None:
        raise EdgertError(f"n_ff {n_ff} is not a multiple of 8: no cluster size fits")
    return best[1]


def sha256_bytes(a) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


def is_package(g) -> bool:
    return "edgert.magic" in g.metadata


@dataclass
class PackageInfo:
    """What the runtime needs of a package's metadata, validated."""
    path: str
    recipe: dict
    levels: list
    C: int
    rank: int
    down_type: int = 8
    kind: str = "neurons"   # "neurons" (the FFN as clusters) or "experts" (per-expert bit widths)

    def level_index(self, sparsity: float) -> int:
        for i, s in enumerate(self.levels):
            if abs(s - sparsity) < 1e-6:
                return i
        raise EdgertError(f"{self.path}: no thresholds for sparsity {sparsity:g} (this package has "
                          f"{', '.join(f'{s:g}' for s in self.levels)}; re-run edgert convert --levels)")


def open_package(g) -> PackageInfo:
    """Validate the package metadata of GGUFFile g (magic, version, recipe, per-layer tensors)."""
    p = g.path
    if g.get("edgert.magic") != MAGIC:
        raise EdgertError(f"{p}: not an edgert package (edgert.magic is {g.get('edgert.magic')!r})")
    v = g.get("edgert.format_version")
    if v != FORMAT_VERSION:
        raise EdgertError(f"{p}: package format version {v}, this edgert reads version {FORMAT_VERSION}: "
                          f"convert the source model again with this edgert")
    recipe = {k[len("edgert.recipe."):]: g.metadata[k] for k in g.metadata if k.startswith("edgert.recipe.")}
    kind = recipe.get("kind", "neurons")
    if kind == "experts":  # per-expert tensors: their presence, shapes and types checked by experts.expert_matrices
        for k in ("source_sha256", "converter_version", "expert_types"):
            if k not in recipe:
                raise EdgertError(f"{p}: package recipe lacks '{k}'")
        return PackageInfo(p, recipe, [], 0, 0, kind="experts")
    if kind != "neurons":
        raise EdgertError(f"{p}: package kind {kind!r} (this edgert reads neurons, experts)")
    for k in ("source_sha256", "converter_version", "cluster_neurons", "predictor_rank", "sparsity"):
        if k not in recipe:
            raise EdgertError(f"{p}: package recipe lacks '{k}'")
    levels = g.get("edgert.sparsity_levels")
    if not isinstance(levels, list) or not levels or not all(0 <= float(x) < 1 for x in levels):
        raise EdgertError(f"{p}: package metadata 'edgert.sparsity_levels' is missing or invalid")
    n_layer = sum(1 for n in g.tensors if n.endswith(".ffn_clusters"))
    for il in range(n_layer):
        for t in ("ffn_clusters", "ffn_perm", "ffn_freq", "ffn_thresh", "gate_thresh", "pred_a", "pred_a_scale", "pred_b",
                  "pred_b_scale", "pred_thresh"):
            g.tensor(f"blk.{il}.{t}")
    C, rank = int(recipe["cluster_neurons"]), int(recipe["predictor_rank"])
    if C <= 0 or rank <= 0:
        raise EdgertError(f"{p}: package recipe has cluster_neurons {C}, predictor_rank {rank}")
    dt = recipe.get("down_type", "Q8_0")
    if dt not in DOWN_TYPES:
        raise EdgertError(f"{p}: package recipe has down_type {dt!r} (this edgert reads {', '.join(DOWN_TYPES)})")
    return PackageInfo(p, recipe, [float(x) for x in levels], C, rank, DOWN_TYPES[dt])


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _verified_file() -> str:
    from edgert.settings import env
    return os.path.join(os.path.expanduser(env("EDGERT_CACHE")), "verified-packages.json")


def verify_once(g, reader=None):
    """verify_tensors the first time this file (path, size, mtime, inode) is opened, then remember
    it in EDGERT_CACHE/verified-packages.json: a package is checked once, not read whole at every
    start (1.8 GiB for Qwen2.5-Coder-1.5B). A rewritten or copied file has a new stamp and is
    checked again."""
    import json
    rec = _verified_file()
    try:
        with open(rec) as f:
            done = set(json.load(f))
    except (OSError, ValueError):
        done = set()
    stamp = _stamp(g.path)
    if stamp in done:
        return
    verify_tensors(g, reader=reader)
    done.add(stamp)
    try:  # temp file + rename: a killed run leaves the old record, never half of one
        os.makedirs(os.path.dirname(rec), exist_ok=True)
        tmp = f"{rec}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(sorted(done)[-256:], f)
        os.replace(tmp, rec)
    except OSError:  # a read-only cache: verify again next time
        pass


def verify_tensors(g, names=None, reader=None):
    """Check the sha256 of tensors (all by default) against the package's metadata; raise naming
    the first that differs. Reads through `reader` (a FlashReader: O_DIRECT, no page cache) when
    given, in 8 MiB pieces."""
    from edgert.flash import aligned_empty
    buf = aligned_empty(8 << 20)
    for name in names or list(g.tensors):
        want = g.get(f"edgert.sha256.{name}")
        if want is None:
            raise EdgertError(f"{g.path}: package has no checksum for tensor '{name}'")
        t = g.tensors[name]
        h = hashlib.sha256()
        for o in range(0, t.nbytes, buf.nbytes):
            n = min(buf.nbytes, t.nbytes - o)
            if reader is not None:
                reader.read_into(t.offset + o, buf[:n])
                h.update(memoryview(buf[:n]))
            else:
                h.update(memoryview(g.raw(name)[o:o + n]))
        if h.hexdigest() != want:
            raise EdgertError(f"{g.path}: tensor '{name}' is corrupted (sha256 differs from the package's "
                              f"record): re-run edgert convert")
