"""Writing files so that a killed run never leaves a half-written one: a temp file beside the
target, then an atomic rename."""
from __future__ import annotations

import hashlib
import os


def write_atomic(path: str, write, mode: str = "w"):
    """write(f) into a temp file beside path, then rename: a killed run leaves no half-made file.
    A target that is not a regular file (/dev/null, a FIFO, /dev/stdout) is written in place: a
    rename would replace the device node."""
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, mode) as f:
            write(f)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path: str, data) -> None:
    import json
    write_atomic(path, lambda f: json.dump(data, f, indent=1))


def sha256_file(path, limit: int | None = None) -> str:
    """sha256 of a file (of its first `limit` bytes)."""
    h, left = hashlib.sha256(), limit if limit is not None else 1 << 62
    with open(path, "rb") as f:
        while left > 0 and (b := f.read(min(1 << 22, left))):
            h.update(b)
            left -= len(b)
    return h.hexdigest()
