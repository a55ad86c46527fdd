"""FlashReader: O_DIRECT alignment, short reads, injected EIO, and the throttle's achieved rate."""
import errno
import os
import time

import numpy as np
import pytest

from edgert.device_profiles.loader import FlashCurve
from edgert.errors import EdgertError
from edgert.flash import ALIGN, FlashReader, aligned_empty

SIZE = 8 * 2**20 + 1234  # not a multiple of the block size: the last block is partial


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # in the test's tmp dir (on this machine ext4, where O_DIRECT works)
    data = np.random.default_rng(0).integers(0, 256, SIZE, np.uint8)
    path = tmp_path_factory.mktemp("flash") / "weights.bin"
    path.write_bytes(data.tobytes())
    return str(path), data


def test_aligned_buffer():
    for n in (1, 4096, 10000):
        b = aligned_empty(n)
        assert b.ctypes.data % ALIGN == 0 and b.nbytes == n


@pytest.mark.parametrize("offset,n", [(0, 4096), (4096, 65536), (1, 10), (4095, 4098), (123457, 300001),
                                      (SIZE - 1234, 1234), (SIZE - 5000, 5000), (0, SIZE)])
def test_reads_any_range_exactly(data_file, offset, n):
    path, data = data_file
    with FlashReader(path, direct=True) as r:
        if hasattr(os, "O_DIRECT"):
            assert r.mode == "O_DIRECT"
        np.testing.assert_array_equal(r.read(offset, n), data[offset:offset + n])
        out = np.empty(n + 3, np.uint8)[3:]  # unaligned destination
        r.read_into(offset, out)
        np.testing.assert_array_equal(out, data[offset:offset + n])
        assert r.stats.requests == 2 and r.stats.bytes == 2 * n


def test_buffered_mode_and_queue(data_file):
    path, data = data_file
    with FlashReader(path, direct=False, io_threads=3) as r:
        assert r.mode == "buffered"
        outs = [aligned_empty(65536) for _ in range(8)]
        futs = [r.submit(i * 70000, o) for i, o in enumerate(outs)]
        for i, (f, o) in enumerate(zip(futs, outs)):
            f.result()
            np.testing.assert_array_equal(o, data[i * 70000:i * 70000 + 65536])
        assert r.stats.requests == 8 and r.stats.max_latency > 0


@pytest.mark.parametrize("direct", [True, False])
def test_short_reads_continue(data_file, direct):
    path, data = data_file
    calls = []

    def short_preadv(fd, bufs, off):  # returns at most 5000 bytes per call (not block-aligned)
        mv = bufs[0]
        n = os.preadv(fd, [mv[:min(8192, len(mv))]], off)  # O_DIRECT: ask for whole blocks
        calls.append(min(n, 5000))
        return min(n, 5000)

    with FlashReader(path, direct=direct, preadv=short_preadv) as r:
        got = r.read(5000, 20000)
    np.testing.assert_array_equal(got, data[5000:25000])
    assert len(calls) >= 4  # 20000 bytes in pieces of at most 5000


def test_eio_is_a_clear_error(data_file):
    path, _ = data_file

    def failing(fd, bufs, off):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with FlashReader(path, preadv=failing) as r:
        with pytest.raises(EdgertError, match=r"weights.bin: read error at offset 8192 .*Input/output error"):
            r.read(8192, 4096)
        fut = r.submit(0, aligned_empty(4096))
        with pytest.raises(EdgertError, match="read error"):
            fut.result()


def test_out_of_range_and_missing(data_file, tmp_path):
    path, _ = data_file
    with FlashReader(path) as r:
        with pytest.raises(EdgertError, match="beyond the end of the file"):
            r.read(SIZE - 10, 20)
    with pytest.raises(EdgertError, match="nope.bin: cannot open"):
        FlashReader(str(tmp_path / "nope.bin"))


@pytest.mark.parametrize("qd,req_kib", [(1, 1024), (4, 256)])
def test_throttle_achieves_the_curve(data_file, qd, req_kib):
    """The throttle imposes a slow device (well below this machine's storage): the achieved rate
    at the requested size and depth must be within 10% of the curve's."""
    path, _ = data_file
    curve = FlashCurve(((4, 1, 20.0), (4096, 1, 120.0), (4, 4, 40.0), (4096, 4, 160.0)), 200.0)
    n = req_kib << 10
    count = 48
    with FlashReader(path, io_threads=qd, throttle=curve) as r:
        bufs = [aligned_empty(n) for _ in range(qd)]
        t0 = time.perf_counter()
        futs = [r.submit((i * n) % (SIZE - n) // ALIGN * ALIGN, bufs[i % qd]) for i in range(count)]
        for f in futs:
            f.result()
        rate = count * n / (time.perf_counter() - t0)
    want = curve.throughput(n, qd)
    assert abs(rate / want - 1) < 0.10, (rate / 1e6, want / 1e6)
