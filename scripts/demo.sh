#!/usr/bin/env bash
# Lamina's main job on its embedded default store (RocksDB + local packs;
# no server to install): import a directory as a layer, change it, import
# again, show the history and the difference, export, verify; serve the
# store to a second store on loopback and sync a change both ways.
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
  [ -z "${server_pid:-}" ] || kill "$server_pid" 2>/dev/null || true
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
# Sync: this store serves its layers over TLS (a certificate made here with
# openssl); a second store, a laptop, checks the layer out; the laptop and
# the admin each change it; one sync merges both ways.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=demo CA" -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
  -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
echo "subjectAltName=IP:127.0.0.1,DNS:localhost" > "$work/ext.cnf"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -days 1 -extfile "$work/ext.cnf" -out "$work/server.pem" 2>/dev/null
$lamina user add alice
$lamina layer grant os/demo alice write
$lamina token create alice > "$work/alice.token"
$lamina --json server --listen 127.0.0.1:0 --tls-cert "$work/server.pem" --tls-key "$work/server.key" \
  > "$work/server.json" 2> "$work/server.log" &
server_pid=$!
while ! grep -q url "$work/server.json" 2>/dev/null; do sleep 0.1; done
url=$(sed -n 's/.*"url":"\([^"]*\)".*/\1/p' "$work/server.json")
laptop=(--store "$work/laptop")
$lamina "${laptop[@]}" init
$lamina "${laptop[@]}" remote add origin "$url" --token-file "$work/alice.token" --ca "$work/ca.pem"
$lamina "${laptop[@]}" pull origin os/demo
$lamina "${laptop[@]}" layer export os/demo "$work/laptop-tree"
echo "written on the laptop" > "$work/laptop-tree/FROM-LAPTOP"
$lamina "${laptop[@]}" layer import os/demo "$work/laptop-tree" -m "laptop change"
echo "written by the admin" > "$work/tree/FROM-ADMIN"
$lamina layer import os/demo "$work/tree" -m "admin change"
$lamina "${laptop[@]}" sync origin
$lamina "${laptop[@]}" sync origin
$lamina layer export os/demo "$work/merged-server"
$lamina "${laptop[@]}" layer export os/demo "$work/merged-laptop"
diff -r "$work/merged-server" "$work/merged-laptop"
test -f "$work/merged-server/FROM-LAPTOP" && test -f "$work/merged-server/FROM-ADMIN" \
  && echo "server and laptop both hold both changes"
$lamina layer log os/demo
kill "$server_pid"; wait "$server_pid" || true; server_pid=
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
