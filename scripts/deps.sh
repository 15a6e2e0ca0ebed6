#!/usr/bin/env bash
# Installs the Debian packages Lamina builds and tests with, if missing.
#   librocksdb-dev libclang-dev : the catalog (rocksdb crate links Debian's RocksDB)
#   libzstd-dev pkg-config      : chunk compression (links Debian's zstd)
#   restic                      : the peer of `lamina bench import`
#   util-linux                  : setpriv, to run tests as an unprivileged user
#   libnbd-bin python3-libnbd fio openssl nbdkit
#                               : NBD peers (nbdinfo, nbdcopy, nbdsh, fio's nbd
#                                 engine), test certificates, and `nbdkit memory`,
#                                 the ceiling column of `lamina bench nbd`
#   qemu-system-x86 qemu-system-arm qemu-utils
#                               : QEMU boots the fixture guest (x86_64; aarch64 with
#                                 qemu-system-aarch64 from qemu-system-arm); qemu-img,
#                                 qemu-io, qemu-nbd. Installed together, qemu-utils
#                                 pinned to qemu-system-x86's version: a newer
#                                 qemu-utils from outside the package sources (as on
#                                 these machines) blocks the install otherwise.
#   fuse3 fuse-overlayfs        : FUSE mounts (fusermount3) and the peer of
#                                 `lamina bench fs`
#   linux-image-amd64 busybox-static e2fsprogs cpio
#                               : the fixture guest (fixtures/guest/build.sh)
#   curl                        : raw requests to the sync API in its tests
#   novnc websockify            : the web console's VNC client (served by the broker)
#                                 and the peer of `lamina bench broker`
#   chromium chromium-driver    : the console's browser tests (WebDriver)
#   rsync unison iproute2       : the peers of `lamina bench sync`, and the
#                                 network namespace and tbf it runs in
#   librados-dev ceph-mon ceph-osd ceph-mgr ceph-common
#                               : the RADOS backend (links librados) and the
#                                 one-node cluster of its tests (scripts/ceph.sh)
set -euo pipefail
pkgs=(librocksdb-dev libclang-dev libzstd-dev pkg-config restic util-linux
      libnbd-bin python3-libnbd fio openssl nbdkit fuse3 fuse-overlayfs
      linux-image-amd64 busybox-static e2fsprogs cpio curl rsync unison iproute2
      novnc websockify chromium chromium-driver
      librados-dev ceph-mon ceph-osd ceph-mgr ceph-common)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
need_qemu=0
installed qemu-system-x86 || need_qemu=1
installed qemu-system-arm || need_qemu=1
if [ ${#missing[@]} -gt 0 ] || [ $need_qemu -eq 1 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]} $([ $need_qemu -eq 1 ] && echo qemu-system-x86 qemu-system-arm qemu-utils)" >&2
  $sudo apt-get update -qq
  export DEBIAN_FRONTEND=noninteractive
  if [ ${#missing[@]} -gt 0 ]; then
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ $need_qemu -eq 1 ]; then
    qv="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')"
    $sudo apt-get install -y -qq --no-install-recommends --allow-downgrades \
      qemu-system-x86 qemu-system-arm "qemu-utils=$qv" >/dev/null
  fi
fi
