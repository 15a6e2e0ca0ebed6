#!/usr/bin/env bash
# Lamina's main job on its embedded default store (RocksDB + local packs;
# no server to install): import a directory as a layer, change it, import
# again, show the history and the difference, export, verify; serve the
# store to a second store on loopback and sync a change both ways; as root,
# also mount a composition, boot the fixture guest, and serve a pool of it to
# a user's browser (headless Chromium logs in, connects, and its screenshot
# is saved as $LAMINA_DEMO_SHOT, default /tmp/lamina-console.png).
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
  [ -z "${agent_pid:-}" ] || kill "$agent_pid" 2>/dev/null || true
  [ -z "${driver_pid:-}" ] || kill "$driver_pid" 2>/dev/null || true
  if [ -d "$work/host" ]; then
    for vm in $($lamina --store "$work/host" --json vm ls 2>/dev/null | python3 -c 'import json,sys;[print(v["name"]) for v in json.load(sys.stdin)]' 2>/dev/null); do
      $lamina --store "$work/host" vm kill "$vm" >/dev/null 2>&1 || true
    done
    for p in "$work"/host/broker/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  fi
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
diff -r --no-dereference "$work/merged-server" "$work/merged-laptop"
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

# The broker (as root, like the VM runner above): this machine is also the
# host (a host agent over a store of its own holding the guest's disk and a
# template), a pool of the fixture guest kept with one idle VM, a user with a
# console password, and headless Chromium driven over WebDriver (chromedriver)
# logging in and pressing Connect: the guest's screen in the page.
[ "$(id -u)" -eq 0 ] || exit 0
host=(--store "$work/host")
$lamina "${host[@]}" init
$lamina "${host[@]}" layer create os/guest --kind os --format disk
$lamina "${host[@]}" layer import os/guest "$work/guest/disk.raw" -m "fixture guest disk"
$lamina "${host[@]}" vm template create desk --profile pc --memory 256 \
  --kernel "$work/guest/vmlinuz" --initrd "$work/guest/initrd.img" --append "console=ttyS0 quiet panic=-1"
$lamina "${host[@]}" user add broker --admin
$lamina "${host[@]}" --json token create broker | sed -n 's/.*"token":"\([^"]*\)".*/\1/p' > "$work/host.token"
$lamina "${host[@]}" --json host-agent --listen 127.0.0.1:0 --tls-cert "$work/server.pem" \
  --tls-key "$work/server.key" > "$work/agent.json" 2> "$work/agent.log" &
agent_pid=$!
while ! grep -q url "$work/agent.json" 2>/dev/null; do sleep 0.1; done
agent_url=$(sed -n 's/.*"url":"\([^"]*\)".*/\1/p' "$work/agent.json")
$lamina host add h1 "$agent_url" --token-file "$work/host.token" --ca "$work/ca.pem"
$lamina pool create desk --template desk --base os/guest --min-idle 1 --max 2
$lamina pool subscribe desk alice
printf 'demo-password\n' > "$work/alice.pw"
$lamina user passwd alice --password-file "$work/alice.pw"
$lamina --json server --listen 127.0.0.1:0 --tls-cert "$work/server.pem" --tls-key "$work/server.key" \
  --rules-interval 1s > "$work/server.json" 2> "$work/server.log" &
server_pid=$!
while ! grep -q url "$work/server.json" 2>/dev/null; do sleep 0.1; done
url=$(sed -n 's/.*"url":"\([^"]*\)".*/\1/p' "$work/server.json")
set +x
echo "waiting for the rule engine to start the pool's idle VM"
for _ in $(seq 600); do
  $lamina --json pool ls | grep -q '"idle":1' && break
  sleep 0.5
done
set -x
$lamina pool show desk
chromedriver --port=9515 > "$work/chromedriver.log" 2>&1 &
driver_pid=$!
wd=http://127.0.0.1:9515
until curl -s "$wd/status" | grep -q '"ready":true'; do sleep 0.2; done
set +x
caps='{"capabilities":{"alwaysMatch":{"acceptInsecureCerts":true,"goog:chromeOptions":{"binary":"/usr/bin/chromium","args":["--headless=new","--no-sandbox","--disable-dev-shm-usage","--disable-gpu","--disable-background-networking","--disable-component-update","--ignore-certificate-errors","--window-size=1280,900"]}}}}'
value() { python3 -c 'import json,sys;v=json.load(sys.stdin)["value"];print(list(v.values())[0] if isinstance(v,dict) else v)'; }
sid=$(curl -s -X POST "$wd/session" -d "$caps" | python3 -c 'import json,sys;print(json.load(sys.stdin)["value"]["sessionId"])')
wdc() { local body='{}'; [ $# -lt 3 ] || body=$3; curl -s -X "$1" "$wd/session/$sid$2" -d "$body"; }
el() { wdc POST /element "{\"using\":\"css selector\",\"value\":\"$1\"}" | value; }
js() { wdc POST /execute/sync "{\"script\":\"$1\",\"args\":[]}" | value; }
echo "Chromium: log in as alice at $url/console and connect to pool desk"
wdc POST /url "{\"url\":\"$url/console/login\"}" >/dev/null
wdc POST "/element/$(el '#user')/value" '{"text":"alice"}' >/dev/null
wdc POST "/element/$(el '#password')/value" '{"text":"demo-password"}' >/dev/null
wdc POST "/element/$(el '#login')/click" >/dev/null
until [ "$(js 'return location.pathname')" = /console ]; do sleep 0.2; done
wdc POST "/element/$(el '#connect-desk')/click" >/dev/null
for _ in $(seq 240); do
  [ "$(js 'return document.body.dataset.state||0')" = connected ] && break
  sleep 0.5
done
echo "screen state: $(js 'return document.body.dataset.state||0') ($(js 'return document.getElementById(\"status\").textContent'))"
# Until the guest has drawn its colour bars (it may still be booting).
colours="const cv=document.querySelector('#screen canvas');if(!cv)return 0;const d=cv.getContext('2d').getImageData(0,0,cv.width,cv.height).data;const s=new Set();for(let i=0;i<d.length;i+=4*61)s.add((d[i]<<16)|(d[i+1]<<8)|d[i+2]);return s.size"
for _ in $(seq 240); do
  [ "$(js "$colours")" -ge 6 ] 2>/dev/null && break
  sleep 0.5
done
echo "colours on the guest's screen: $(js "$colours")"
shot=${LAMINA_DEMO_SHOT:-/tmp/lamina-console.png}
wdc GET /screenshot | python3 -c 'import json,sys,base64;open(sys.argv[1],"wb").write(base64.b64decode(json.load(sys.stdin)["value"]))' "$shot"
wdc DELETE "" >/dev/null
echo "saved the console's screenshot: $shot"
set -x
$lamina session ls
$lamina audit ls
