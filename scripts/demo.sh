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
trap 'umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"' EXIT
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
