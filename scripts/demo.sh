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
trap 'rm -rf "$work"' EXIT
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
