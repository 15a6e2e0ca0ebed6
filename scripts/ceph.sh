#!/usr/bin/env bash
# A one-node Ceph cluster for development and CI: one monitor, one manager,
# one OSD, all on 127.0.0.1, pool size 1, no authentication, in its own
# directory. Nothing outside that directory is touched (no /etc/ceph, no
# /var/run/ceph), and daemons are stopped by the pids in their pid files.
#
#   scripts/ceph.sh up     [DIR]   start (creating the cluster on first use);
#                                  returns once pool `lamina` takes writes
#   scripts/ceph.sh down   [DIR]   stop the daemons (data stays)
#   scripts/ceph.sh purge  [DIR]   stop and remove DIR
#   scripts/ceph.sh status [DIR]   daemons and cluster health
#   scripts/ceph.sh env    [DIR]   prints CEPH_CONF=… for clients
#
# DIR defaults to $LAMINA_CEPH_DIR or /tmp/lamina-ceph. Clients use
# DIR/ceph.conf (`lamina init --backend rados --ceph-conf DIR/ceph.conf`,
# or CEPH_CONF=DIR/ceph.conf).
#
# Settings (environment):
#   CEPH_STORE=bluestore|memstore   OSD object store (bluestore: a sparse file
#                                   DIR/osd/block that survives restarts;
#                                   memstore: RAM, lost when the OSD stops)
#   CEPH_BLOCK_GB=40                size of bluestore's sparse file
#   CEPH_MON_PORT=6789 CEPH_MON_V2_PORT=3300   the monitor's v1 and v2 ports
#   CEPH_PORT_MIN=6800 CEPH_PORT_MAX=7100   ports of the OSD and manager
#   CEPH_UP_TIMEOUT=60              seconds `up` waits for a writable pool
set -euo pipefail

cmd="${1:-}"
dir="${2:-${LAMINA_CEPH_DIR:-/tmp/lamina-ceph}}"
store="${CEPH_STORE:-bluestore}"
block_gb="${CEPH_BLOCK_GB:-40}"
v1_port="${CEPH_MON_PORT:-6789}"
v2_port="${CEPH_MON_V2_PORT:-3300}"
up_timeout="${CEPH_UP_TIMEOUT:-60}"
conf="$dir/ceph.conf"

say() { echo "ceph.sh: $*" >&2; }
die() { say "$*"; exit 1; }

install_packages() {
  local pkgs=(ceph-mon ceph-osd ceph-mgr ceph-common) missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# pid of daemon $1 (mon.a, osd.0, mgr.x) if it runs, else nothing.
daemon_pid() {
  local f="$dir/run/$1.pid" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
  return 0
}

write_conf() {
  local fsid="$1"
  cat > "$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$v2_port,v1:127.0.0.1:$v1_port]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind port min = ${CEPH_PORT_MIN:-6800}
ms bind port max = ${CEPH_PORT_MAX:-7100}
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 2000
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
run dir = $dir/run
# Clients (lamina, rados) give up instead of waiting forever.
client mount timeout = 15
rados mon op timeout = 15
rados osd op timeout = 30

[mon]
mon data = $dir/mon/\$cluster-\$id
paxos propose interval = 0.1
mon mgr digest period = 1
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid

[mgr]
mgr data = $dir/mgr/\$cluster-\$id
mgr stats period = 1
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid

[osd]
osd data = $dir/osd/\$cluster-\$id
osd objectstore = $store
bluestore block path = $dir/osd/block
bluestore block create = true
bluestore block size = $((block_gb * 1024 * 1024 * 1024))
bluestore fsck on mount = false
osd memory target = 2147483648
memstore device bytes = $((block_gb * 1024 * 1024 * 1024))
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
EOF
}

ceph_cli() { timeout 30 ceph -c "$conf" "$@"; }

create_cluster() {
  say "creating a one-node cluster ($store) in $dir"
  mkdir -p "$dir"/{mon,mgr,osd,run,log}
  local fsid
  fsid="$(cat /proc/sys/kernel/random/uuid)"
  write_conf "$fsid"
  monmaptool --create --clobber --fsid "$fsid" \
    --addv a "[v2:127.0.0.1:$v2_port,v1:127.0.0.1:$v1_port]" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >/dev/null 2>&1 \
    || die "ceph-mon --mkfs failed (see $dir/log)"
  touch "$dir/created-mon"
}

start_mon() {
  [ -n "$(daemon_pid mon.a)" ] && return 0
  ceph-mon -c "$conf" -i a 2>>"$dir/log/start.log" || die "ceph-mon did not start (see $dir/log/mon.a.log)"
}

create_osd() {
  [ -f "$dir/created-osd" ] && return 0
  local uuid id
  uuid="$(cat /proc/sys/kernel/random/uuid)"
  id="$(ceph_cli osd new "$uuid")" || die "ceph osd new failed"
  mkdir -p "$dir/osd/ceph-$id"
  ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$uuid" >"$dir/log/osd-mkfs.log" 2>&1 \
    || die "ceph-osd --mkfs failed (see $dir/log/osd-mkfs.log)"
  echo "$id" > "$dir/created-osd"
}

start_osd() {
  local id
  id="$(cat "$dir/created-osd")"
  [ -n "$(daemon_pid "osd.$id")" ] && return 0
  ceph-osd -c "$conf" -i "$id" 2>>"$dir/log/start.log" || die "ceph-osd did not start (see $dir/log/osd.$id.log)"
}

start_mgr() {
  [ -n "$(daemon_pid mgr.x)" ] && return 0
  mkdir -p "$dir/mgr/ceph-x"
  ceph-mgr -c "$conf" -i x 2>>"$dir/log/start.log" || die "ceph-mgr did not start (see $dir/log/mgr.x.log)"
}

wait_writable() {
  local deadline=$((SECONDS + up_timeout))
  until ceph_cli osd pool ls 2>/dev/null | grep -qx lamina \
      || ceph_cli osd pool create lamina >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "the monitor did not answer within ${up_timeout}s (see $dir/log)"
    sleep 0.5
  done
  until echo probe | timeout 10 rados -c "$conf" -p lamina put ceph.sh-probe - 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || die "pool lamina is not writable after ${up_timeout}s (see $dir/log)"
    sleep 0.5
  done
  timeout 10 rados -c "$conf" -p lamina rm ceph.sh-probe 2>/dev/null || true
}

up() {
  install_packages
  if [ ! -f "$dir/created-mon" ]; then
    rm -rf "$dir"
    create_cluster
  fi
  start_mon
  create_osd
  start_osd
  start_mgr
  wait_writable
  say "up: $conf"
}

stop_pid() {
  local name="$1" pid
  pid="$(daemon_pid "$name")"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  say "$name ($pid) did not stop on SIGTERM; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

down() {
  [ -d "$dir/run" ] || return 0
  for f in "$dir"/run/*.pid; do
    [ -e "$f" ] || continue
    stop_pid "$(basename "$f" .pid)"
  done
  say "down"
}

status() {
  local any=0
  for f in "$dir"/run/*.pid; do
    [ -e "$f" ] || continue
    local name pid
    name="$(basename "$f" .pid)"
    pid="$(daemon_pid "$name")"
    if [ -n "$pid" ]; then echo "$name: running (pid $pid)"; any=1; else echo "$name: stopped"; fi
  done
  [ $any -eq 1 ] || { echo "no daemon runs in $dir"; return 1; }
  ceph_cli -s
}

case "$cmd" in
  up) up ;;
  down) down ;;
  purge) down; rm -rf "$dir"; say "removed $dir" ;;
  status) status ;;
  env) echo "CEPH_CONF=$conf" ;;
  *) die "usage: $0 up|down|purge|status|env [DIR]" ;;
esac
