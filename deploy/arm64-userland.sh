#!/usr/bin/env bash
# An aarch64 Debian userland with a real OpenSSH server on 127.0.0.1:$PORT, run through qemu-user
# and binfmt_misc (../shared/ARM64.md): the stand-in device of `make deploy-check`. As root.
# Idempotent: the root is cached at $ROOT (outside the repository); a second call only starts sshd.
#   deploy/arm64-userland.sh start   # create if missing, mount /proc /dev, start sshd
#   deploy/arm64-userland.sh stop    # stop sshd, unmount
set -euo pipefail
ROOT=${EDGERT_ARM64_ROOT:-$HOME/.cache/edgert/arm64-root}
PORT=${EDGERT_ARM64_PORT:-2222}
KEY=${EDGERT_ARM64_KEY:-$HOME/.cache/edgert/arm64-key}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

need_root() { [ "$(id -u)" = 0 ] || { echo "arm64-userland: needs root (debootstrap, mount, chroot)" >&2; exit 1; }; }

host_tools() {
  command -v debootstrap >/dev/null && [ -e /usr/bin/qemu-aarch64-static ] && return
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap binfmt-support >/dev/null
}

binfmt() {
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
}

create() {
  [ -e "$ROOT/.edgert-ready" ] && return
  rm -rf "$ROOT.tmp"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,openssh-server,coreutils,procps,util-linux \
    bookworm "$ROOT.tmp" "$MIRROR"
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT.tmp/etc/ssl/certs/"
  touch "$ROOT.tmp/.edgert-ready"
  mv "$ROOT.tmp" "$ROOT"
  # a new root has new host keys: forget the old root's in edgert's known_hosts
  ssh-keygen -q -R "[127.0.0.1]:$PORT" -f "$HOME/.cache/edgert/known_hosts" 2>/dev/null || true
}

mounts() {
  mountpoint -q "$ROOT/proc" || mount --bind /proc "$ROOT/proc"
  mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
  mountpoint -q "$ROOT/sys" || mount --bind /sys "$ROOT/sys"
}

keys() {
  [ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N "" -f "$KEY"
  mkdir -p "$ROOT/root/.ssh"; chmod 700 "$ROOT/root/.ssh"
  cp "$KEY.pub" "$ROOT/root/.ssh/authorized_keys"; chmod 600 "$ROOT/root/.ssh/authorized_keys"
  chroot "$ROOT" bash -c 'ls /etc/ssh/ssh_host_ed25519_key >/dev/null 2>&1 || ssh-keygen -A'
}

start() {
  need_root; host_tools; binfmt; create; mounts; keys
  mkdir -p "$ROOT/run/sshd"
  if ! pgrep -f "sshd -p $PORT" >/dev/null; then
    chroot "$ROOT" /usr/sbin/sshd -p "$PORT" -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password \
      -o PasswordAuthentication=no
  fi
  echo "ssh:root@127.0.0.1:$PORT (key $KEY)"
}

stop() {
  pkill -f "sshd -p $PORT" || true
  for m in sys dev proc; do mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m" || true; done
}

case "${1:-start}" in start) start ;; stop) stop ;; *) echo "usage: $0 start|stop" >&2; exit 2 ;; esac
