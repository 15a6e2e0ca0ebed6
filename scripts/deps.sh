#!/usr/bin/env bash
# Installs the Debian packages Lamina builds and tests with, if missing.
#   librocksdb-dev libclang-dev : the catalog (rocksdb crate links Debian's RocksDB)
#   libzstd-dev pkg-config      : chunk compression (links Debian's zstd)
#   restic                      : the peer of `lamina bench import`
#   util-linux                  : setpriv, to run tests as an unprivileged user
#   qemu-utils libnbd-bin python3-libnbd fio openssl
#                               : NBD peers (qemu-img, qemu-io, qemu-nbd, nbdinfo,
#                                 nbdcopy, nbdsh, fio's nbd engine), test certificates
set -euo pipefail
pkgs=(librocksdb-dev libclang-dev libzstd-dev pkg-config restic util-linux
      qemu-utils libnbd-bin python3-libnbd fio openssl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
