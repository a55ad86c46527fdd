"""A real memory cap for a benchmark worker: a cgroup v1 memory controller group (page cache
counts against it, as on a phone), and dropping a file's cached pages before a capped run.

Needs root and a mounted v1 memory controller (/sys/fs/cgroup/memory); `available()` says.
"""
from __future__ import annotations

import logging
import os

from edgert.errors import EdgertError

log = logging.getLogger(__name__)

ROOT = "/sys/fs/cgroup/memory"


def available() -> bool:
    return os.path.isdir(ROOT) and os.access(ROOT, os.W_OK)


class MemoryCap:
    """A cgroup capped at `limit` bytes (no swap on this machine, so the cap is hard: a process
    above it is reclaimed from, then killed)."""

    def __init__(self, name: str, limit: int):
        if not available():
            raise EdgertError(f"a memory cap needs root and the cgroup v1 memory controller at {ROOT}")
        self.path = os.path.join(ROOT, name)
        os.makedirs(self.path, exist_ok=True)
        self.limit = int(limit)
        self._write("memory.limit_in_bytes", str(self.limit))
        try:
            self._write("memory.max_usage_in_bytes", "0")  # reset the peak
        except OSError:
            pass

    def _write(self, f, v):
        with open(os.path.join(self.path, f), "w") as fh:
            fh.write(v)

    def _read(self, f) -> str:
        with open(os.path.join(self.path, f)) as fh:
            return fh.read()

    def join(self, pid: int | None = None):
        """Move a process (default: this one) into the group."""
        self._write("cgroup.procs", str(pid or os.getpid()))

    @property
    def peak(self) -> int:
        """Peak usage of the group (RSS and page cache), bytes."""
        return int(self._read("memory.max_usage_in_bytes"))

    @property
    def oom_kills(self) -> int:
        for line in self._read("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self):
        try:
            os.rmdir(self.path)
        except OSError as e:  # still has a process: leave it, say so
            log.info("cgroup %s not removed: %s", self.path, e)


def drop_file_cache(*paths):
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED; as root also the whole
    clean page cache through /proc/sys/vm/drop_caches) so a run starts cold, as after a reboot."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(p, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError:
        pass
