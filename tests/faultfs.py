"""A real faulty file system for the fault tests: FUSE (libfuse 3 through mfusepy), read-only,
serving the files of a backing directory through the kernel (reads with O_DIRECT reach this
process every time; the files can be mapped, which FUSE's direct_io mode would refuse), and failing reads as a file `RULES` in the backing directory says:

    eio START END        reads overlapping bytes [START, END) of any file fail with EIO
    delay MS             every read waits MS milliseconds first
    short N              every read returns at most N bytes (FUSE's kernel side takes a short
                         read for the end of the file: a truncated file, as the device sees it)

Rules are re-read on every read, so a test changes them while a model runs.

  python tests/faultfs.py BACKING MOUNTPOINT        (foreground; root and /dev/fuse)
"""
from __future__ import annotations

import errno
import os
import sys
import time


def rules(backing: str) -> list[tuple]:
    try:
        with open(os.path.join(backing, "RULES")) as f:
            return [tuple(int(x) if x.lstrip("-").isdigit() else x for x in line.split()) for line in f if line.strip()]
    except OSError:
        return []


def main(backing: str, mountpoint: str) -> None:
    import mfusepy as fuse

    class FaultFS(fuse.Operations):
        def _p(self, path):
            return os.path.join(backing, path.lstrip("/"))

        def getattr(self, path, fh=None):
            st = os.lstat(self._p(path))
            return {k: getattr(st, k) for k in ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid",
                                                 "st_atime", "st_mtime", "st_ctime")}

        def readdir(self, path, fh):
            return [".", ".."] + [n for n in os.listdir(self._p(path)) if n != "RULES"]

        def open(self, path, flags):
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise fuse.FuseOSError(errno.EROFS)
            return os.open(self._p(path), os.O_RDONLY)

        def read(self, path, size, offset, fh):
            for r in rules(backing):
                if r[0] == "eio" and offset < r[2] and offset + size > r[1]:
                    raise fuse.FuseOSError(errno.EIO)
                if r[0] == "delay":
                    time.sleep(r[1] / 1000)
                if r[0] == "short":
                    size = min(size, r[1])
            return os.pread(fh, size, offset)

        def release(self, path, fh):
            os.close(fh)
            return 0

    fuse.FUSE(FaultFS(), mountpoint, foreground=True, ro=True, allow_other=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
