"""Open and validate a GGUF file through the `gguf` package (memory-mapped).

Every count, offset and size is checked before use, so a truncated or foreign file fails here with
one line naming the file and the problem, not later inside a kernel.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from edgert.errors import CorruptFile, EdgertError
from edgert.kernels.quant import (BLOCK, CHUNK_ROWS, Q5_0, TYPE_NAMES, QMatrix, expand_q5_0, mmap_chunks,
                                  repack_chunked, row_bytes)

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: int
    shape: tuple  # GGUF order: (ne0 = row length, ne1 = rows, ...)
    offset: int   # absolute file offset of the data
    nbytes: int

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return int(self.shape[0])


class GGUFFile:
    """Metadata and tensor index of one GGUF file; tensor data is read through an mmap on demand."""

    def __init__(self, path: str, reader=None):
        self.path = str(path)
        self.reader = reader  # a FlashReader: matrices are read through it (else from the mmap)
        self.expand_q5 = False  # hold Q5_0 matrices as Q8_0 (quant.expand_q5_0)
        self.size = _check_header(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise EdgertError(f"{self.path}: cannot map the file ({getattr(e, 'strerror', None) or e})") from None
        try:
            self.version, self.metadata, tensors = _parse(self._mm, self.path, self.size)
            self.tensors = Tensors(self.path, tensors)
        except EdgertError:
            self.close()
            raise

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def require(self, key):
        if key not in self.metadata:
            raise CorruptFile(f"{self.path}: missing metadata key '{key}'")
        return self.metadata[key]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapping."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, np.uint8, t.nbytes, t.offset)

    def release(self, name: str):
        """Drop the tensor's mapped pages from this process (they were copied by `load`)."""
        t = self.tensors[name]
        self._release_range(t.offset, t.nbytes)

    def _release_range(self, offset: int, nbytes: int):
        start = offset - offset % mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)
        except (AttributeError, OSError, ValueError):
            pass

    def load(self, name: str, rows: int | None = None, cols: int | None = None) -> QMatrix:
        """Read and repack tensor `name`, checking its type and (optionally) its shape."""
        t = self.check_type(name)
        if (rows is not None and t.rows != rows) or (cols is not None and t.cols != cols):
            raise CorruptFile(f"{self.path}: tensor '{name}' has shape {list(t.shape)}, "
                              f"expected [{cols}, {rows}]")
        if t.nbytes != t.rows * row_bytes(t.qtype, t.cols):
            raise CorruptFile(f"{self.path}: tensor '{name}' size {t.nbytes} does not match its shape")
        if self.reader is not None:
            chunks = self._read_chunks(t)
        else:
            chunks = mmap_chunks(self.raw(name), t.qtype, t.rows, t.cols,
                                 release=lambda lo, hi: self._release_range(t.offset + lo, hi - lo))
        q = repack_chunked(t.qtype, t.rows, t.cols, chunks)
        return expand_q5_0(q) if self.expand_q5 and t.qtype == Q5_0 else q

    def _read_chunks(self, t: TensorInfo):
        """Chunks (r0, r1, bytes) of tensor t read through the FlashReader, double-buffered: the
        next chunk's read is in flight while the caller repacks this one."""
        from edgert.flash import aligned_empty
        rb = row_bytes(t.qtype, t.cols)
        ranges = [(r0, min(t.rows, r0 + CHUNK_ROWS)) for r0 in range(0, t.rows, CHUNK_ROWS)]
        bufs = [aligned_empty(min(t.rows, CHUNK_ROWS) * rb) for _ in range(min(2, len(ranges)))]

        def submit(i):
            r0, r1 = ranges[i]
            return self.reader.submit(t.offset + r0 * rb, bufs[i % 2][:(r1 - r0) * rb])
        fut = submit(0)
        for i, (r0, r1) in enumerate(ranges):
            fut.result()
            if i + 1 < len(ranges):
                fut = submit(i + 1)
            yield r0, r1, bufs[i % 2][:(r1 - r0) * rb]

    def check_type(self, name: str) -> TensorInfo:
        t = self.tensor(name)
        if t.qtype not in BLOCK:
            raise EdgertError(f"{self.path}: tensor '{name}' has unsupported quant type "
                              f"{type_name(t.qtype)} (supported: {', '.join(TYPE_NAMES.values())})")
        return t

    def load_vector(self, name: str, n: int) -> np.ndarray:
        t = self.tensor(name)
        if t.qtype != 0 or t.cols * t.rows != n or t.nbytes != 4 * n:
            raise EdgertError(f"{self.path}: tensor '{name}' must be F32 of {n} values, "
                              f"is {type_name(t.qtype)} {list(t.shape)}")
        v = self.raw(name).view(np.float32).copy()
        self.release(name)
        return v

    @property
    def n_params(self) -> int:
        """Parameters stored in the file (every tensor's element count)."""
        return sum(int(np.prod(t.shape)) for t in self.tensors.values())

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CorruptFile(f"{self.path}: missing tensor '{name}'")
        return self.tensors[name]

    def close(self):
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view of raw(); the GC unmaps it
                pass
            os.close(self._fd)
            self._mm = None


# ============================================================================================
# Parsing (the gguf package's GGUFReader builds a view per array element: 2-10 s for a 262k-token
# vocabulary; this reads the same format in a fraction of a second and is checked against it)
# ============================================================================================

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


LAZY_ITEMS = 4096  # arrays longer than this (vocabularies, merges, scores) stay in the file


class LazyArray:
    """A long metadata array, validated but left in the file until asked for (through Metadata):
    a model needs its vocabulary only when a tokenizer is built, and the merges only while it is
    being built. Each access parses the array afresh; nothing is kept here."""

    def __init__(self, path: str, pos: int, etype: int, count: int, key: str):
        self.path, self.pos, self.etype, self.count, self.key = path, pos, etype, count, key

    def __len__(self):
        return self.count

    def load(self) -> list:
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            c = _Cursor(mm, self.path, size)
            c.pos = self.pos
            return c.items(self.etype, self.count, self.key)


class Metadata(dict):
    """GGUF metadata by key; long arrays (LazyArray) are read from the file when looked up."""

    def __getitem__(self, key):
        v = dict.__getitem__(self, key)
        return v.load() if isinstance(v, LazyArray) else v

    def get(self, key, default=None):
        return self[key] if key in self else default

    def length(self, key):
        """len() of an array value without reading it (None when absent)."""
        return len(dict.__getitem__(self, key)) if key in self else None


class Tensors(dict):
    """Tensor infos by name; a name the file lacks is the file's problem, said in one line."""

    def __init__(self, path, items):
        super().__init__(items)
        self.path = path

    def __missing__(self, name):
        raise CorruptFile(f"{self.path}: missing tensor '{name}'")


class _Cursor:
    def __init__(self, mm, path, size):
        self.mm, self.path, self.size, self.pos = mm, path, size, 0

    def need(self, n, what):
        if n < 0 or self.pos + n > self.size:
            raise CorruptFile(f"{self.path}: truncated GGUF while reading {what} at byte {self.pos}")

    def unpack(self, fmt, what):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.mm, self.pos)[0]
        self.pos += n
        return v

    def string(self, what):
        n = self.unpack("<Q", what)
        self.need(n, what)
        b = self.mm[self.pos:self.pos + n]
        self.pos += n
        return b.decode("utf-8", "replace")

    def value(self, vtype, what):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            etype = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            if count > LAZY_ITEMS and (etype in _NP or etype == 8):
                start = self.pos
                self.skip(etype, count, what)
                return LazyArray(self.path, start, etype, count, what)
            return self.items(etype, count, what)
        raise CorruptFile(f"{self.path}: corrupt GGUF: unknown value type {vtype} for '{what}'")

    def items(self, etype, count, what) -> list:
        if etype in _NP:
            n = count * np.dtype(_NP[etype]).itemsize
            self.need(n, what)
            arr = np.frombuffer(self.mm, _NP[etype], count, self.pos)
            self.pos += n
            return arr.tolist()
        if count > self.size:
            raise CorruptFile(f"{self.path}: corrupt GGUF: array '{what}' claims {count} items")
        return [self.value(etype, what) for _ in range(count)]

    def skip(self, etype, count, what):
        """Move past an array of `count` items, checking every length on the way."""
        if etype in _NP:
            n = count * np.dtype(_NP[etype]).itemsize
            self.need(n, what)
            self.pos += n
            return
        if count > self.size:
            raise CorruptFile(f"{self.path}: corrupt GGUF: array '{what}' claims {count} items")
        for _ in range(count):
            n = self.unpack("<Q", what)
            self.need(n, what)
            self.pos += n


def _parse(mm, path, size):
    c = _Cursor(mm, path, size)
    c.pos = 4
    version = c.unpack("<I", "version")
    n_tensors = c.unpack("<Q", "header")
    n_kv = c.unpack("<Q", "header")
    if n_tensors > size or n_kv > size:
        raise CorruptFile(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    meta = Metadata()
    for _ in range(n_kv):
        key = c.string("metadata key")
        meta[key] = c.value(c.unpack("<I", key), key)
    infos = []
    for _ in range(n_tensors):
        name = c.string("tensor name")
        n_dims = c.unpack("<I", name)
        if n_dims > 4:
            raise CorruptFile(f"{path}: corrupt GGUF: tensor '{name}' has {n_dims} dimensions")
        shape = tuple(c.unpack("<Q", name) for _ in range(n_dims))
        qtype = c.unpack("<I", name)
        offset = c.unpack("<Q", name)
        infos.append((name, qtype, shape, offset))
    align = int(meta.get("general.alignment", 32))
    if align <= 0 or align & (align - 1):
        raise CorruptFile(f"{path}: corrupt GGUF: alignment {align}")
    data_start = (c.pos + align - 1) // align * align
    tensors = {}
    for name, qtype, shape, offset in infos:
        nbytes = _tensor_nbytes(qtype, shape)
        t = TensorInfo(name, qtype, shape, data_start + offset, nbytes)
        if nbytes is not None and t.offset + nbytes > size:
            raise CorruptFile(f"{path}: truncated GGUF: tensor '{name}' ends at byte "
                              f"{t.offset + nbytes}, file has {size}")
        tensors[name] = t
    return version, meta, tensors


def _tensor_nbytes(qtype, shape):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        epb, bpb = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        return 0  # unknown type: reported when the tensor is loaded
    n = int(np.prod(shape)) if shape else 1
    return n // epb * bpb


def type_name(qtype: int) -> str:
    try:
        from gguf import GGMLQuantizationType
        return GGMLQuantizationType(qtype).name
    except Exception:
        return f"type {qtype}"


def _check_header(path: str) -> int:
    if not os.path.exists(path):
        raise EdgertError(f"{path}: no such file")
    if os.path.isdir(path):
        raise EdgertError(f"{path}: is a directory, expected a .gguf file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:  # not readable by this user, an I/O error, a special file
        raise EdgertError(f"{path}: cannot read ({e.strerror or e})") from None
    if head[:4] != GGUF_MAGIC:
        raise CorruptFile(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 24:
        raise CorruptFile(f"{path}: truncated GGUF: header is {len(head)} bytes")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise EdgertError(f"{path}: unsupported GGUF version {version}")
    return size
