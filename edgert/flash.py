"""FlashReader: the one path for reading weights from storage.

pread into aligned buffers with O_DIRECT where the file system allows it (else buffered reads
followed by posix_fadvise(DONTNEED), so that a later read is not served from the page cache
either; `mode` says which), a small I/O thread pool with a queue, accounting of every request
(bytes, latency), and an optional throttle that imposes a device profile's flash curve.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from edgert.errors import EdgertError

log = logging.getLogger(__name__)

ALIGN = 4096  # O_DIRECT alignment of offset, length and buffer address (logical block <= 4 KiB)


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """An uninitialised uint8 buffer [nbytes] whose address is a multiple of `align`."""
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


@dataclass
class IOStats:
    requests: int = 0
    bytes: int = 0
    seconds: float = 0.0          # sum of request latencies (submit-to-done for queued reads)
    max_latency: float = 0.0
    throttle_seconds: float = 0.0  # part of the latencies added by the throttle
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes, latency, throttled):
        with self.lock:
            self.requests += 1
            self.bytes += nbytes
            self.seconds += latency
            self.max_latency = max(self.max_latency, latency)
            self.throttle_seconds += throttled

    def as_dict(self) -> dict:
        return {"requests": self.requests, "bytes": self.bytes, "seconds": self.seconds,
                "max_latency_s": self.max_latency, "throttle_seconds": self.throttle_seconds}


class FlashReader:
    """Reads byte ranges of one file. `read_into` is synchronous; `submit` queues a read on the
    I/O pool and returns a Future. Thread-safe (pread has no shared file position)."""

    def __init__(self, path: str, direct: bool = True, io_threads: int = 2, throttle=None,
                 tracer=None, preadv=os.preadv):
        self.path = str(path)
        self.throttle = throttle      # FlashCurve or None
        self.tracer = tracer
        self._preadv = preadv         # injectable for fault tests
        self.stats = IOStats()
        self._pending = 0             # requests issued and not complete (queue depth)
        self._device_free = 0.0       # throttle: when the modelled device is next idle
        self._lock = threading.Lock()
        self.mode = "buffered"
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = -1
            if direct and hasattr(os, "O_DIRECT"):
                try:
                    self.fd = os.open(self.path, flags | os.O_DIRECT)
                    self.mode = "O_DIRECT"
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: the file system refuses O_DIRECT
                        raise
                    log.info("%s: O_DIRECT refused by the file system; buffered reads + "
                             "posix_fadvise(DONTNEED)", self.path)
            if self.fd < 0:
                self.fd = os.open(self.path, flags)
                if direct:
                    self.mode = "fadvise"
        except OSError as e:
            raise EdgertError(f"{self.path}: cannot open ({e.strerror})") from None
        self.size = os.fstat(self.fd).st_size
        self._pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="edgert-io")
        self.io_threads = max(1, io_threads)

    # ---------------------------------------------------------------------------------------

    def read_into(self, offset: int, out: np.ndarray, _queued_at: float | None = None):
        """Fill `out` (uint8, C-contiguous) with the file's bytes [offset, offset + out.nbytes)."""
        nbytes = out.nbytes
        if offset < 0 or offset + nbytes > self.size:
            raise EdgertError(f"{self.path}: read of {nbytes} bytes at offset {offset} is beyond the "
                              f"end of the file ({self.size} bytes)")
        with self._lock:
            if _queued_at is None:  # a synchronous read; queued ones were counted by submit
                self._pending += 1
            # the device's queue depth: requests the app has issued and not seen complete (the
            # pool's queue included), at most what the pool keeps in flight
            qd = min(self._pending, self.io_threads) if _queued_at is not None else self._pending
        t0 = time.perf_counter()
        try:
            if self.mode == "O_DIRECT":
                self._read_direct(offset, out)
            else:
                self._pread_loop(memoryview(out).cast("B"), offset, nbytes)
                if self.mode == "fadvise":
                    os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
            slept = self._throttle(t0, nbytes, qd) if self.throttle is not None else 0.0
        finally:
            with self._lock:
                self._pending -= 1
        t_end = time.perf_counter()
        start = t0 if _queued_at is None else _queued_at
        self.stats.add(nbytes, t_end - start, slept)
        if self.tracer is not None:
            self.tracer.io(t0, t_end, offset, nbytes)

    def _throttle(self, t0, nbytes, qd) -> float:
        """Hold the request until the modelled device would have delivered it. The device is one
        shared timeline serving at the curve's aggregate rate for this size and depth, so
        concurrent requests queue behind each other; none completes before the first-byte
        latency. Returns the seconds slept."""
        c = self.throttle
        with self._lock:
            start = max(t0, self._device_free)
            end = max(start + nbytes / c.throughput(nbytes, qd), t0 + c.first_byte_us * 1e-6)
            self._device_free = end
        wait = end - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
            return wait
        return 0.0

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """A new aligned buffer [nbytes] with the file's bytes at offset."""
        out = aligned_empty(nbytes)
        self.read_into(offset, out)
        return out

    def submit(self, offset: int, out: np.ndarray) -> Future:
        """Queue a read into `out`; the Future's result() raises EdgertError on failure."""
        with self._lock:
            self._pending += 1
        return self._pool.submit(self.read_into, offset, out, time.perf_counter())

    # ---------------------------------------------------------------------------------------

    def _pread_loop(self, mv, offset, want, block=1):
        """pread into mv until `want` bytes of the file at offset arrived; a short read continues
        where it stopped (rounded down to `block`, the O_DIRECT granule, re-reading a partial one)."""
        got = 0
        while got < want:
            try:
                n = self._preadv(self.fd, [mv[got:]], offset + got)
            except OSError as e:
                raise EdgertError(f"{self.path}: read error at offset {offset + got} "
                                  f"({want - got} bytes): {e.strerror or e}") from None
            if n == 0:
                self._shrunk(offset + got)
                raise EdgertError(f"{self.path}: unexpected end of file at offset {offset + got}")
            new = got + n
            if new < want and new % block:
                new -= new % block
                if new <= got:
                    self._shrunk(offset + got)
                    raise EdgertError(f"{self.path}: O_DIRECT read at offset {offset + got} makes no "
                                      f"progress ({n} bytes per call)")
            got = new

    def _shrunk(self, at: int):
        """A read came up short: if the file is now smaller than when opened, say so."""
        now = os.fstat(self.fd).st_size
        if now < self.size:
            raise EdgertError(f"{self.path}: the file shrank from {self.size} to {now} bytes while in use "
                              f"(truncated or overwritten?); read at offset {at}")

    def _read_direct(self, offset, out):
        """O_DIRECT: offset, length and address aligned. Aligned requests into aligned buffers go
        straight in; others read the aligned cover into a staging buffer and copy."""
        lo = offset - offset % ALIGN
        hi = min(-(-(offset + out.nbytes) // ALIGN) * ALIGN, -(-self.size // ALIGN) * ALIGN)
        direct_ok = lo == offset and out.ctypes.data % ALIGN == 0 and out.nbytes % ALIGN == 0
        buf = out if direct_ok else aligned_empty(hi - lo)
        want = min(hi, self.size) - lo  # bytes that exist in the cover
        self._pread_loop(memoryview(buf).cast("B")[:hi - lo], lo, want, ALIGN)
        if not direct_ok:
            out[:] = buf[offset - lo:offset - lo + out.nbytes]

    def close(self):
        self._pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
