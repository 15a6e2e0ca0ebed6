#!/usr/bin/env bash
# Lamina's main job on its embedded default store (RocksDB + local packs;
# no server to install): import a directory as a layer, change it, import
# again, show the history and the difference, export, verify.
#   bash scripts/demo.sh [DIRECTORY]     (default: /usr/share/doc)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release --locked -q
lamina=$PWD/target/release/lamina
src=${1:-/usr/share/doc}
work=$(mktemp -d /tmp/lamina-demo.XXXXXX)
cleanup() {
  [ -z "${serve_pid:-}" ] || kill "$serve_pid" 2>/dev/null || true
  $lamina vm kill demo >/dev/null 2>&1 || true
  umount "$work/mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export LAMINA_STORE=$work/store
cp -a "$src" "$work/tree"
set -x
$lamina init
$lamina layer create os/demo --kind os --format tree
$lamina layer import os/demo "$work/tree" -m "first import"
echo "a change" > "$work/tree/NEW-FILE"
$lamina layer import os/demo "$work/tree" -m "second import"
$lamina layer ls
$lamina layer log os/demo
$lamina layer diff os/demo@head~1 os/demo@head
$lamina layer export os/demo@head~1 "$work/export"
diff -r --no-dereference "$src" "$work/export" && echo "export of the first version equals $src"
$lamina fsck
$lamina gc
# The file view (FUSE needs root): compose the layer with an empty personal
# layer, change the mounted tree, commit the change as a new version.
if [ "$(id -u)" -eq 0 ] && [ -e /dev/fuse ]; then
  $lamina layer create demo/apps --kind personal --format tree
  $lamina compose create demo --layer os=os/demo --layer personal=demo/apps
  mkdir "$work/mnt"
  $lamina mount demo "$work/mnt"
  echo "written through the mount" > "$work/mnt/FROM-MOUNT"
  rm "$work/mnt/NEW-FILE"
  $lamina status demo
  $lamina umount "$work/mnt"
  $lamina commit demo -m "session changes"
  $lamina layer log demo/apps
fi
# The VM runner: the fixture guest (Debian's kernel, a busybox initramfs, an
# ext4 disk) imported as a disk layer, served over NBD, booted in QEMU (TCG
# when KVM does not work here), looked at, powered off; its write committed.
bash fixtures/guest/build.sh "$work/guest" 2>/dev/null
$lamina layer create os/guest --kind os --format disk
$lamina layer import os/guest "$work/guest/disk.raw" -m "fixture guest disk"
$lamina disk create demo-vm --base os/guest
$lamina serve --socket "$work/nbd.sock" --json > "$work/serve.json" &
serve_pid=$!
while ! [ -S "$work/nbd.sock" ]; do sleep 0.1; done
$lamina vm template create demo-pc --profile pc --memory 256 \
  --kernel "$work/guest/vmlinuz" --initrd "$work/guest/initrd.img" --append "console=ttyS0 quiet panic=-1"
$lamina vm create demo --template demo-pc --disk "nbd+unix:///demo-vm?socket=$work/nbd.sock"
$lamina vm start demo
log=$($lamina --json vm show demo | sed -n 's/.*"console_log":"\([^"]*\)".*/\1/p')
set +x
for _ in $(seq 600); do grep -q LAMINA-GUEST-IDLE "$log" 2>/dev/null && break; sleep 0.5; done
cat "$log"
set -x
$lamina vm ls
$lamina vm stats demo
$lamina vm screenshot demo "$work/screen.png"
$lamina vm stop demo
kill "$serve_pid"; wait "$serve_pid" || true; serve_pid=
$lamina disk commit demo-vm -m "the guest's write"
$lamina layer log os/guest
