"""A device edgert reaches: `adb:SERIAL` (a phone, through the real `adb` client) or
`ssh:[USER@]HOST[:PORT]` (a Jetson, a Raspberry Pi, any Linux board, through paramiko).

A Target runs a shell command and moves files; everything above it (probe, deploy) is written
against these four calls, so both transports share one push / install / run path:

    sh(cmd, timeout) -> (rc, stdout, stderr)     a POSIX shell command on the device
    put(local, remote, offset)                   copy local[offset:] and append it to remote
    get(remote, local)                           copy a device file here (temp file + rename)
    close()

Errors become one-line EdgertErrors naming the target: no device, lost connection, no client.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from edgert.errors import EdgertError
from edgert.settings import env

log = logging.getLogger(__name__)

CHUNK = 32 << 20   # bytes per adb push of a resumable upload (the unit a rerun can lose)


@dataclass(frozen=True)
class Address:
    method: str        # "adb" | "ssh"
    host: str          # adb serial ("" = the only device) or ssh host
    user: str = ""     # ssh user ("" = the current user / ssh config)
    port: int = 22

    def __str__(self) -> str:
        if self.method == "adb":
            return f"adb:{self.host}" if self.host else "adb"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port != 22 else ""
        return f"ssh:{user}{self.host}{port}"


def parse_address(spec: str) -> Address:
    """`adb`, `adb:SERIAL`, `ssh:[USER@]HOST[:PORT]` -> Address; anything else is an error."""
    if spec == "adb" or spec.startswith("adb:"):
        serial = spec[4:]
        if serial and not re.fullmatch(r"[\w.:\-]+", serial):
            raise EdgertError(f"target '{spec}': an adb serial is letters, digits and . : - _")
        return Address("adb", serial)
    if spec.startswith("ssh:"):
        m = re.fullmatch(r"(?:([\w.\-]+)@)?([\w.\-]+|\[[0-9a-fA-F:]+\])(?::(\d{1,5}))?", spec[4:])
        if not m:
            raise EdgertError(f"target '{spec}': expected ssh:[USER@]HOST[:PORT]")
        port = int(m.group(3) or 22)
        if not 0 < port < 65536:
            raise EdgertError(f"target '{spec}': port {port} is not in 1..65535")
        return Address("ssh", m.group(2).strip("[]"), m.group(1) or "", port)
    raise EdgertError(f"target '{spec}': expected adb:SERIAL or ssh:[USER@]HOST[:PORT]")


def open_target(spec: str, identity: str | None = None):
    a = parse_address(spec)
    return AdbTarget(a) if a.method == "adb" else SshTarget(a, identity)


# ============================================================================================
# adb (the real client: Debian's `adb` package or the platform tools)
# ============================================================================================

class AdbTarget:
    def __init__(self, addr: Address, adb: str | None = None):
        self.addr = addr
        self.adb = adb or env("EDGERT_ADB") or shutil.which("adb")
        if not self.adb:
            raise EdgertError(f"{addr}: the adb client is not installed (apt install adb, or Android's "
                              "platform-tools on PATH)")
        self.check()

    def argv(self, *args: str) -> list[str]:
        """The adb command line for `adb [-s SERIAL] ARGS...`."""
        return [self.adb] + (["-s", self.addr.host] if self.addr.host else []) + list(args)

    def _adb(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.argv(*args), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EdgertError(f"{self.addr}: adb {args[0]} timed out after {timeout:g} s") from None

    def check(self) -> None:
        """The device is there and authorised (`adb get-state` says 'device')."""
        r = self._adb("get-state", timeout=20)
        state = r.stdout.decode(errors="replace").strip()
        if r.returncode or state != "device":
            msg = (r.stderr.decode(errors="replace").strip().splitlines() or [state or "no device"])[-1]
            raise EdgertError(f"{self.addr}: no usable device ({msg.removeprefix('error: ')})")

    def sh(self, cmd: str, timeout: float = 600) -> tuple[int, str, str]:
        # `adb shell` returns the remote exit status since Android 7 (shell protocol v2)
        r = self._adb("shell", cmd, timeout=timeout)
        out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        if r.returncode and ("device offline" in err or "not found" in err and "device" in err):
            raise EdgertError(f"{self.addr}: device lost ({err.strip().splitlines()[-1]}); rerun to resume")
        return r.returncode, out, err

    def put(self, local: str, remote: str, offset: int = 0, progress=None) -> None:
        """Append local[offset:] to remote in CHUNK pieces (push a piece, then `cat >>` it), so a
        lost device costs at most one piece."""
        import tempfile
        size = os.path.getsize(local)
        with open(local, "rb") as f, tempfile.TemporaryDirectory(prefix="edgert-push-") as tmp:
            f.seek(offset)
            piece = os.path.join(tmp, "piece")
            while offset < size:
                data = f.read(CHUNK)
                with open(piece, "wb") as p:
                    p.write(data)
                r = self._adb("push", piece, remote + ".piece", timeout=600)
                if r.returncode:
                    raise EdgertError(f"{self.addr}: push of {os.path.basename(local)} failed at "
                                      f"{offset >> 20} MiB ({_last(r)}); rerun to resume")
                rc, _, err = self.sh(f"cat {q(remote + '.piece')} >> {q(remote)} && rm {q(remote + '.piece')}")
                if rc:
                    raise EdgertError(f"{self.addr}: cannot write {remote} ({err.strip() or rc})")
                offset += len(data)
                if progress:
                    progress(len(data))

    def get(self, remote: str, local: str) -> None:
        tmp = local + ".part"
        r = self._adb("pull", remote, tmp, timeout=600)
        if r.returncode:
            raise EdgertError(f"{self.addr}: cannot pull {remote} ({_last(r)})")
        os.replace(tmp, local)

    def close(self) -> None:
        pass


def last_line(text: str, rc: int) -> str:
    """The last non-empty line of a command's output (its error, usually), else its exit code."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit {rc}"


def _last(r: subprocess.CompletedProcess) -> str:
    return last_line((r.stderr or r.stdout).decode(errors="replace"), r.returncode)


# ============================================================================================
# ssh (paramiko: keys from ~/.ssh or --identity, host keys trusted on first use)
# ============================================================================================

class SshTarget:
    def __init__(self, addr: Address, identity: str | None = None):
        try:
            import paramiko
        except ImportError:
            raise EdgertError(f"{addr}: ssh targets need paramiko (pip install 'edgert[deploy]')") from None
        self.addr, self._paramiko = addr, paramiko
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)   # its transport thread's errors are ours
        self.known_hosts = os.path.join(os.path.expanduser(env("EDGERT_CACHE")), "known_hosts")
        c = paramiko.SSHClient()
        c.load_system_host_keys()
        os.makedirs(os.path.dirname(self.known_hosts), exist_ok=True)
        if os.path.exists(self.known_hosts):
            c.load_host_keys(self.known_hosts)
        c.set_missing_host_key_policy(_TrustOnFirstUse(self.known_hosts))
        try:
            c.connect(addr.host, port=addr.port, username=addr.user or None,
                      key_filename=os.path.expanduser(identity) if identity else None,
                      timeout=20, banner_timeout=30, auth_timeout=30)
        except paramiko.BadHostKeyException as e:
            host = addr.host if addr.port == 22 else f"[{addr.host}]:{addr.port}"
            raise EdgertError(f"{addr}: the host key changed ({e.key.get_name()} {e.key.get_fingerprint().hex()[:16]}...) "
                              f"since it was first trusted: if the device was reinstalled, run "
                              f"`ssh-keygen -R '{host}' -f {self.known_hosts}`; otherwise do not connect") from None
        except paramiko.AuthenticationException:
            raise EdgertError(f"{addr}: authentication failed (give a key with --identity)") from None
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise EdgertError(f"{addr}: cannot connect ({e})") from None
        self.client = c
        self._sftp = None

    def _lost(self, what: str, e: Exception) -> EdgertError:
        return EdgertError(f"{self.addr}: connection lost during {what} ({e or type(e).__name__}); rerun to resume")

    def sh(self, cmd: str, timeout: float = 600) -> tuple[int, str, str]:
        try:
            _, out, err = self.client.exec_command(cmd, timeout=timeout)
            o, e = out.read().decode(errors="replace"), err.read().decode(errors="replace")
            return out.channel.recv_exit_status(), o, e
        except TimeoutError:
            raise EdgertError(f"{self.addr}: command timed out after {timeout:g} s: {cmd[:60]}") from None
        except (OSError, self._paramiko.SSHException, EOFError) as e:
            raise self._lost(f"'{cmd[:40]}'", e) from None

    @property
    def sftp(self):
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
        return self._sftp

    def put(self, local: str, remote: str, offset: int = 0, progress=None) -> None:
        try:
            with open(local, "rb") as f, self.sftp.open(remote, "ab") as r:
                r.set_pipelined(True)
                f.seek(offset)
                while data := f.read(1 << 20):
                    r.write(data)
                    if progress:
                        progress(len(data))
        except (OSError, self._paramiko.SSHException, EOFError) as e:
            if getattr(e, "errno", None) == errno.ENOSPC or "No space" in str(e):
                raise EdgertError(f"{self.addr}: no space left writing {remote}") from None
            raise self._lost(f"push of {os.path.basename(local)}", e) from None

    def get(self, remote: str, local: str) -> None:
        tmp = local + ".part"
        try:
            self.sftp.get(remote, tmp)
        except FileNotFoundError:
            raise EdgertError(f"{self.addr}: {remote} does not exist") from None
        except (OSError, self._paramiko.SSHException, EOFError) as e:
            raise self._lost(f"pull of {remote}", e) from None
        os.replace(tmp, local)

    def close(self) -> None:
        self.client.close()


class _TrustOnFirstUse:
    """ssh's `StrictHostKeyChecking=accept-new`: an unknown host's key is saved to edgert's
    known_hosts and trusted from then on; a changed key is refused by paramiko itself."""
    def __init__(self, path: str):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        client.save_host_keys(self.path)
        log.info("ssh: trusted new host key of %s (%s), saved in %s", hostname, key.get_name(), self.path)


def q(s: str) -> str:
    """A path or word quoted for the device's shell."""
    return shlex.quote(s)
