#!/usr/bin/env bash
# POSIX conformance: pjdfstest on a Lamina mount and on fuse-overlayfs over the
# same lower data. Root only.
#   scripts/pjdfstest.sh [WORKDIR]          (default /tmp/lamina-pjdfstest)
#   PJDFSTEST_SRC  git URL or local path    (default https://github.com/pjd/pjdfstest)
#   LAMINA         lamina binary            (default target/debug/lamina)
#   PJDFSTEST_TIMEOUT  seconds per prove run (default 3600)
# Full prove output: WORKDIR/lamina.out, WORKDIR/fuse-overlayfs.out.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "pjdfstest needs root" >&2; exit 1; }
W=$(realpath -m "${1:-/tmp/lamina-pjdfstest}")
SRC=${PJDFSTEST_SRC:-https://github.com/pjd/pjdfstest}
L=$(realpath "${LAMINA:-$(dirname "$0")/../target/debug/lamina}")
export LAMINA_STORE=$W/store

for c in autoreconf automake gcc make prove fuse-overlayfs fusermount3; do
  command -v "$c" >/dev/null || { apt-get install -y autoconf automake gcc make \
    libacl1-dev perl fuse-overlayfs fuse3 >/dev/null; break; }
done

cleanup() {
  cd /
  if mountpoint -q "$W/mnt"; then "$L" umount "$W/mnt" || true; fi
  if mountpoint -q "$W/ofsmnt"; then fusermount3 -u "$W/ofsmnt" || true; fi
}
trap cleanup EXIT
mkdir -p "$W"
cleanup
rm -rf "$W/store" "$W/lower" "$W/ofs" "$W/mnt" "$W/ofsmnt"

if [ ! -x "$W/src/pjdfstest" ]; then
  rm -rf "$W/src"
  git clone -q "$SRC" "$W/src"
  (cd "$W/src" && autoreconf -ifs && ./configure && make pjdfstest) >"$W/build.log" 2>&1 ||
    { tail -20 "$W/build.log" >&2; exit 1; }
fi

mkdir -p "$W/lower/etc" "$W/ofs/upper" "$W/ofs/work" "$W/mnt" "$W/ofsmnt"
echo hi >"$W/lower/etc/motd"
{
  "$L" init
  "$L" layer create os --kind os --format tree
  "$L" layer import os "$W/lower"
  "$L" layer create p --kind personal --format tree
  "$L" compose create c --layer os=os --layer personal=p
  "$L" mount c "$W/mnt"
} >/dev/null
fuse-overlayfs -o "lowerdir=$W/lower,upperdir=$W/ofs/upper,workdir=$W/ofs/work" "$W/ofsmnt"

run() { # NAME MOUNTPOINT: prove from a fresh subdirectory of the mount
  mkdir "$2/t"
  (cd "$2/t" && timeout "${PJDFSTEST_TIMEOUT:-3600}" prove -rv "$W/src/tests") >"$W/$1.out" 2>&1 || true
}
summary() { # NAME -> "N/T files (M/S subtests)", from prove's summary report
  perl -ne '$f=$1, $t=$2 if /^Files=(\d+), Tests=(\d+)/;
    if (/\(Wstat: (\d+) Tests: \d+ Failed: (\d+)\)/ && ($1 || $2)) { $nf++; $ns += $2 }
    END { print defined $f ? sprintf("%d/%d files (%d/%d subtests)", $nf, $f, $ns, $t)
                           : "no prove summary" }' "$W/$1.out"
}
run lamina "$W/mnt"
run fuse-overlayfs "$W/ofsmnt"
echo "pjdfstest failures: lamina $(summary lamina), fuse-overlayfs $(summary fuse-overlayfs)"
