"""Weights that stay on flash and are read when used, through the runtime's FlashReader (O_DIRECT):

- FlashRows: an embedding table; each looked-up token's row is read;
- FlashMatrix: a matrix (the LM head when it does not fit) read in row chunks on every product,
  the next chunk's read in flight while the current one is multiplied;
- Streamer: every layer's FFN tensors, the next layer's read while the current one computes.
"""
from __future__ import annotations

import time

import numpy as np

from edgert.flash import aligned_empty
from edgert.kernels.quant import QMatrix, repack, repack_chunked, row_bytes

READ_PIECE = 1 << 20  # bytes per flash request when streaming (large: what flash serves fastest)


class Streamer:
    """Reads layers' FFN tensors from flash into two staging buffers: while layer i is computed
    from one, layer i + 1's tensors arrive in the other (each tensor in 1 MiB requests, all in
    flight at once on the FlashReader's pool)."""

    def __init__(self, reader, layers, stats):
        self.reader, self.layers, self.stats = reader, layers, stats   # layers: [(gate, up, down) TensorInfo]
        n = staging_bytes(layers)
        self.bufs = [aligned_empty(n), aligned_empty(n)]              # 2 x [largest layer's FFN bytes]
        self.pending = None                                           # (layer, buffer, futures)

    def _issue(self, il: int, bi: int):
        futs, o = [], 0
        for t in self.layers[il]:
            for p in range(0, t.nbytes, READ_PIECE):
                n = min(READ_PIECE, t.nbytes - p)
                futs.append(self.reader.submit(t.offset + p, self.bufs[bi][o + p:o + p + n]))
            o += -(-t.nbytes // 4096) * 4096
        self.stats.bytes_read += sum(t.nbytes for t in self.layers[il])
        return (il, bi, futs)

    def matrices(self, il: int):
        """Layer il's (gate, up, down) QMatrix, read from flash (prefetched if it was next)."""
        if self.pending is None or self.pending[0] != il:
            if self.pending is not None:
                for f in self.pending[2]:
                    f.result()
            self.pending = self._issue(il, 0)
        _, bi, futs = self.pending
        t0 = time.perf_counter()
        for f in futs:
            f.result()
        self.stats.io_wait_s += time.perf_counter() - t0
        self.pending = self._issue((il + 1) % len(self.layers), 1 - bi)
        out, o = [], 0
        for t in self.layers[il]:
            out.append(repack_chunked(t.qtype, t.rows, t.cols, [(0, t.rows, self.bufs[bi][o:o + t.nbytes])]))
            o += -(-t.nbytes // 4096) * 4096
        return out


def staging_bytes(tensor_sets) -> int:
    """Bytes of one Streamer buffer for these (gate, up, down) TensorInfo triples: the largest
    layer's, each tensor 4 KiB aligned."""
    return max(sum(-(-t.nbytes // 4096) * 4096 for t in ts) for ts in tensor_sets)


class FlashRows:
    """An embedding table left on flash: each token's row is read when it is looked up."""

    def __init__(self, reader, t, stats):
        self.reader, self.t, self.stats = reader, t, stats
        self.rb = row_bytes(t.qtype, t.cols)
        self.qtype, self.rows, self.cols = t.qtype, t.rows, t.cols
        self.buf = aligned_empty(-(-self.rb // 4096) * 4096 + 4096)   # [row bytes, page padded]
        self.nbytes = self.buf.nbytes

    def row(self, tok: int) -> QMatrix:
        raw = self.buf[:self.rb]
        self.reader.read_into(self.t.offset + tok * self.rb, raw)
        self.stats.bytes_read += self.rb
        return repack(self.qtype, raw, 1, self.cols)


class FlashMatrix:
    """A matrix [rows, cols] left on flash, multiplied chunk by chunk of rows as it is read."""

    CHUNK = 2 << 20  # bytes of rows per chunk

    def __init__(self, reader, t, stats):
        self.reader, self.t, self.stats = reader, t, stats
        self.qtype, self.rows, self.cols = t.qtype, t.rows, t.cols
        self.rb = row_bytes(t.qtype, t.cols)
        self.crows = max(64, self.CHUNK // self.rb // 64 * 64)                    # rows per chunk
        self.bufs = [aligned_empty(self.crows * self.rb) for _ in range(2)]       # 2 x [chunk bytes]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.bufs)

    @staticmethod
    def plan_bytes(t) -> int:
        rb = row_bytes(t.qtype, t.cols)
        crows = max(64, FlashMatrix.CHUNK // rb // 64 * 64)
        return 4 * crows * rb  # two read buffers + a repacked chunk + its product

    def _issue(self, i: int):
        r0 = i * self.crows
        r1 = min(self.rows, r0 + self.crows)
        buf = self.bufs[i % 2][:(r1 - r0) * self.rb]
        futs = [self.reader.submit(self.t.offset + r0 * self.rb + p, buf[p:p + READ_PIECE])
                for p in range(0, buf.nbytes, READ_PIECE)]
        self.stats.bytes_read += buf.nbytes
        return r0, r1, buf, futs

    def matmul(self, x, out, act):
        """out[T, rows] = x[T, cols] @ W.T, W read from flash."""
        from edgert.kernels.matmul import matmul
        n = -(-self.rows // self.crows)
        cur = self._issue(0)
        for i in range(n):
            r0, r1, buf, futs = cur
            t0 = time.perf_counter()
            for f in futs:
                f.result()
            self.stats.io_wait_s += time.perf_counter() - t0
            if i + 1 < n:
                cur = self._issue(i + 1)
            w = repack(self.qtype, buf, r1 - r0, self.cols)
            part = np.empty((x.shape[0], r1 - r0), np.float32)
            matmul(w, x, part, act)
            out[:, r0:r1] = part
        return out
