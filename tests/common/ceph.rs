//! Helpers for tests on Ceph: the one-node cluster of `scripts/ceph.sh`,
//! a pool per test (removed afterwards), stores on it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::require;

/// The cluster's `ceph.conf`: `$LAMINA_CEPH_CONF`, else that of
/// `scripts/ceph.sh up`'s default directory.
pub fn conf_path() -> PathBuf {
    std::env::var_os("LAMINA_CEPH_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/lamina-ceph/ceph.conf"))
}

fn reachable(conf: &Path) -> bool {
    conf.exists()
        && Command::new("timeout")
            .args(["20", "rados", "-c"])
            .arg(conf)
            .arg("lspools")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// The cluster's `ceph.conf` if it answers; in CI a cluster is required,
/// elsewhere the test is skipped with a one-line notice.
pub fn cluster() -> Option<PathBuf> {
    static UP: OnceLock<bool> = OnceLock::new();
    let conf = conf_path();
    let up = *UP.get_or_init(|| reachable(&conf));
    require(up, "a Ceph cluster (`bash scripts/ceph.sh up`)").then_some(conf)
}

/// A pool made for one test; removed on drop.
pub struct TestPool {
    pub name: String,
    pub conf: PathBuf,
}

impl TestPool {
    pub fn new(conf: &Path, tag: &str) -> TestPool {
        let name = format!(
            "t-{tag}-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        TestPool {
            name,
            conf: conf.to_owned(),
        }
    }

    /// `rados -c CONF -p POOL ARGS…`, asserting success; stdout.
    pub fn rados(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("timeout")
            .args(["60", "rados", "-c"])
            .arg(&self.conf)
            .args(["-p", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rados {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args(["30", "ceph", "-c"])
            .arg(&self.conf)
            .args(["osd", "pool", "rm", &self.name, &self.name])
            .arg("--yes-i-really-really-mean-it")
            .output();
    }
}
