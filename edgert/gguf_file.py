"""Open and validate a GGUF file through the `gguf` package (memory-mapped).

Every count, offset and size is checked before use, so a truncated or foreign file fails here with
one line naming the file and the problem, not later inside a kernel.
"""
from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass

import numpy as np

from edgert.errors import EdgertError
from edgert.kernels.quant import BLOCK, TYPE_NAMES, QMatrix, repack, row_bytes

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

    def __init__(self, path: str):
        self.path = str(path)
        self.size = _check_header(self.path)
        try:
            from gguf import GGUFReader
            reader = GGUFReader(self.path, "r")
        except Exception as e:  # gguf raises ValueError / IndexError / struct errors on bad files
            raise EdgertError(f"{self.path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None
        self.metadata = {}
        for key, field in reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except Exception:
                continue
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            info = TensorInfo(t.name, int(t.tensor_type), tuple(int(s) for s in t.shape),
                              int(t.data_offset), int(t.n_bytes))
            if info.offset < 0 or info.offset + info.nbytes > self.size:
                raise EdgertError(f"{self.path}: truncated GGUF: tensor '{t.name}' ends at byte "
                                  f"{info.offset + info.nbytes}, file has {self.size}")
            self.tensors[t.name] = info
        del reader
        self._fd = os.open(self.path, os.O_RDONLY)
        self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def require(self, key):
        if key not in self.metadata:
            raise EdgertError(f"{self.path}: missing metadata key '{key}'")
        return self.metadata[key]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapping."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, np.uint8, t.nbytes, t.offset)

    def release(self, name: str):
        """Drop the tensor's mapped pages from this process (they were copied by `load`)."""
        t = self.tensors[name]
        start = t.offset - t.offset % mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)
        except (AttributeError, OSError, ValueError):
            pass

    def load(self, name: str, rows: int | None = None, cols: int | None = None) -> QMatrix:
        """Read and repack tensor `name`, checking its type and (optionally) its shape."""
        t = self.tensor(name)
        if t.qtype not in BLOCK:
            raise EdgertError(f"{self.path}: tensor '{name}' has unsupported quant type "
                              f"{_type_name(t.qtype)} (supported: {', '.join(TYPE_NAMES.values())})")
        if (rows is not None and t.rows != rows) or (cols is not None and t.cols != cols):
            raise EdgertError(f"{self.path}: tensor '{name}' has shape {list(t.shape)}, "
                              f"expected [{cols}, {rows}]")
        if t.nbytes != t.rows * row_bytes(t.qtype, t.cols):
            raise EdgertError(f"{self.path}: tensor '{name}' size {t.nbytes} does not match its shape")
        q = repack(t.qtype, self.raw(name), t.rows, t.cols)
        self.release(name)
        return q

    def load_vector(self, name: str, n: int) -> np.ndarray:
        q = self.load(name)
        if q.qtype != 0 or q.cols * q.rows != n:
            raise EdgertError(f"{self.path}: tensor '{name}' must be F32 of {n} values, "
                              f"is {_type_name(q.qtype)} {list(self.tensors[name].shape)}")
        return q.d.reshape(n).copy()

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise EdgertError(f"{self.path}: missing tensor '{name}'")
        return self.tensors[name]

    def close(self):
        if self._mm is not None:
            self._mm.close()
            os.close(self._fd)
            self._mm = None


def _type_name(qtype: int) -> str:
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
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise EdgertError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 24:
        raise EdgertError(f"{path}: truncated GGUF: header is {len(head)} bytes")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise EdgertError(f"{path}: unsupported GGUF version {version}")
    return size
