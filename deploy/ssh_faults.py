"""Failures on the real ssh path (make deploy-check; root, the arm64 userland running):
  1. the device gone mid-push: the sshd serving the push is killed at ~40% -> a one-line error;
     the rerun resumes from the .part (its prefix checked) and the file's sha256 verifies;
  2. no space: a push into a 4 MiB tmpfs on the device -> a one-line error before sending.
Exit 0 when both behave; prints what happened."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

from edgert import deploy as dp
from edgert.errors import EdgertError
from edgert.targets import open_target

TARGET = sys.argv[1] if len(sys.argv) > 1 else "ssh:root@127.0.0.1:2222"
KEY = os.path.expanduser(sys.argv[2] if len(sys.argv) > 2 else "~/.cache/edgert/arm64-key")
ROOT = os.path.expanduser(os.environ.get("EDGERT_ARM64_ROOT", "~/.cache/edgert/arm64-root"))


def interrupted_push(src: str) -> None:
    remote = "/tmp/edgert/fault/big.bin"
    t = open_target(TARGET, KEY)
    t.sh("rm -rf /tmp/edgert/fault")
    size = os.path.getsize(src)
    sent = [0]

    def progress(n):
        sent[0] += n
        if sent[0] > 0.4 * size and not killed.is_set():
            killed.set()   # the device goes away: every sshd session process dies
            # the sshd processes serving connections (re-executed with -R; the listener has no -R)
            subprocess.run(["pkill", "-f", r"sshd -p .* -R"], check=False)
            time.sleep(0.5)
    killed = threading.Event()
    try:
        dp.push(t, src, remote, progress)
        raise SystemExit("FAIL: the push survived the killed sshd")
    except EdgertError as e:
        print(f"1. device gone at {sent[0] / 2**20:.0f} of {size / 2**20:.0f} MiB: edgert: {e}")
    t2 = open_target(TARGET, KEY)
    part = dp.remote_size(t2, remote + ".part") or 0
    how = dp.push(t2, src, remote)
    ok = dp.remote_sha256(t2, remote) == dp.sha256_file(src)
    print(f"   rerun: {how} from {part / 2**20:.0f} MiB on the device; sha256 verified: {ok}")
    t2.sh("rm -rf /tmp/edgert/fault")
    t2.close()
    if how != "resumed" or not ok:
        raise SystemExit("FAIL: the rerun did not resume to a verified file")


def no_space(src: str) -> None:
    mnt = os.path.join(ROOT, "mnt/small")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt], check=True)
    try:
        t = open_target(TARGET, KEY)
        try:
            dp.push(t, src, "/mnt/small/big.bin")
            raise SystemExit("FAIL: a push larger than the free space was started")
        except EdgertError as e:
            print(f"2. no space: edgert: {e}")
        t.close()
    finally:
        subprocess.run(["umount", mnt], check=False)


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "big.bin")
        with open(src, "wb") as f:
            for _ in range(96):
                f.write(os.urandom(1 << 20))
        interrupted_push(src)
        no_space(src)
    print("ssh fault checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
