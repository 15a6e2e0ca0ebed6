#!/usr/bin/env bash
# The test command: installs what the tests need, then runs formatting,
# lints and every test (unit, property, and end-to-end against the built
# binary). Tests needing root run as root in CI and fail there if they can't.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# The one-node Ceph cluster of the RADOS tests (its own directory; stopped
# by its pids at the end). Outside CI a failure to start only skips them.
ceph_dir="${LAMINA_CEPH_DIR:-/tmp/lamina-ceph-test}"
export LAMINA_CEPH_CONF="$ceph_dir/ceph.conf"
if [ -n "${CI:-}" ]; then
  bash scripts/ceph.sh up "$ceph_dir"
else
  bash scripts/ceph.sh up "$ceph_dir" || echo "note: no Ceph cluster; the RADOS tests skip" >&2
fi
trap 'bash scripts/ceph.sh purge "$ceph_dir" || true' EXIT
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The store tests again, on a RADOS store.
LAMINA_TEST_BACKEND=rados cargo test --locked --test store
