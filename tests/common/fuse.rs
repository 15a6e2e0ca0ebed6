//! Helpers for tests of the file view: compositions and mounts.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::{is_root, random_bytes, require, write, Env};

/// Whether FUSE mounts can run here (root and /dev/fuse); CI must have both.
pub fn fuse_ok() -> bool {
    require(
        is_root() && Path::new("/dev/fuse").exists(),
        "root and /dev/fuse (FUSE mounts)",
    )
}

/// A composition mounted by `lamina mount` (a daemon); unmounted on drop.
pub struct Mount<'a> {
    env: &'a Env,
    pub name: String,
    pub dir: PathBuf,
    pub pid: i32,
    mounted: bool,
}

impl Env {
    /// A tree layer `name` of `kind`, with `src` imported when given.
    pub fn tree_layer(&self, name: &str, kind: &str, src: Option<&Path>) {
        self.create(name, kind, "tree");
        if let Some(src) = src {
            self.import(name, src);
        }
    }

    /// Mounts composition `comp` on a new directory `mnt-<comp>`.
    pub fn mount(&self, comp: &str) -> Mount<'_> {
        let dir = self.path(&format!("mnt-{comp}"));
        fs::create_dir_all(&dir).unwrap();
        self.mount_at(comp, &dir)
    }

    /// Mounts composition `comp` on `dir`.
    pub fn mount_at(&self, comp: &str, dir: &Path) -> Mount<'_> {
        let doc = self.json(&[OsStr::new("mount"), OsStr::new(comp), dir.as_os_str()]);
        let m = &doc["mounted"];
        assert_eq!(m["name"], comp, "{doc}");
        Mount {
            env: self,
            name: comp.to_owned(),
            dir: PathBuf::from(m["dir"].as_str().unwrap()),
            pid: m["pid"].as_i64().unwrap() as i32,
            mounted: true,
        }
    }

    /// `lamina status NAME --json`, one entry per layer.
    pub fn status(&self, comp: &str) -> Vec<LayerStatus> {
        let doc = self.json(&["status", comp]);
        let strs = |v: &Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_owned())
                .collect()
        };
        doc.as_array()
            .unwrap()
            .iter()
            .map(|l| LayerStatus {
                layer: l["layer"].as_str().unwrap().to_owned(),
                added: strs(&l["added"]),
                changed: strs(&l["changed"]),
                deleted: strs(&l["deleted"]),
            })
            .collect()
    }
}

/// One layer's pending changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStatus {
    pub layer: String,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub deleted: Vec<String>,
}

impl Mount<'_> {
    /// A path inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// `lamina umount`, asserting success.
    pub fn umount(mut self) {
        // Marked unmounted only once it is: if this fails, the drop (after
        // the test's open files are closed) tries again.
        self.env.ok(&[OsStr::new("umount"), self.dir.as_os_str()]);
        self.mounted = false;
    }

    /// Kills the daemon with SIGKILL and waits until it is gone.
    pub fn kill9(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        for _ in 0..500 {
            if !Path::new(&format!("/proc/{}", self.pid)).exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("daemon {} survived SIGKILL", self.pid);
    }
}

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let ok = self
            .env
            .run(&[OsStr::new("umount"), self.dir.as_os_str()])
            .status
            .success();
        if !ok {
            // A test failed with files open: detach so the temporary
            // directory can go.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Runs a shell command as user `nobody` (group `nogroup`); returns
/// (success, stderr).
pub fn as_nobody(script: &str) -> (bool, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The errno of an I/O error.
pub fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {e}"))
}

/// The redirection rules of the desktop fixture.
pub fn rules_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/compose/rules.toml")
}

/// A desktop: os, two group layers, personal, system and data, composed as
/// `desk` with the fixture rules (in `mode`).
pub fn desktop(mode: &str) -> Option<Env> {
    if !fuse_ok() {
        return None;
    }
    let env = Env::new();
    let os = env.path("os-src");
    write(&os.join("etc/hostname"), b"golden\n");
    write(&os.join("etc/motd"), b"welcome\n");
    write(&os.join("etc/app.d/one.conf"), b"one\n");
    write(&os.join("etc/app.d/two.conf"), b"two\n");
    write(&os.join("usr/bin/sh"), &random_bytes(400_000, 1));
    write(&os.join("home/u/.profile"), b"os profile\n");
    write(&os.join("home/u/Documents/old.txt"), b"old doc\n");
    env.tree_layer("os", "os", Some(&os));
    let g1 = env.path("g1-src");
    write(&g1.join("opt/office/bin"), b"office 1\n");
    write(&g1.join("opt/shared"), b"from g1\n");
    env.tree_layer("g1", "group", Some(&g1));
    let g2 = env.path("g2-src");
    write(&g2.join("opt/cad/bin"), b"cad\n");
    write(&g2.join("opt/shared"), b"from g2\n");
    env.tree_layer("g2", "group", Some(&g2));
    env.tree_layer("u-apps", "personal", None);
    env.tree_layer("u-sys", "system", None);
    env.tree_layer("u-data", "data", None);
    let rules = rules_fixture();
    env.ok(&[
        "compose",
        "create",
        "desk",
        "--layer",
        "os=os",
        "--layer",
        "group=g1",
        "--layer",
        "group=g2",
        "--layer",
        "personal=u-apps",
        "--layer",
        "system=u-sys",
        "--layer",
        "data=u-data",
        "--rules",
        rules.to_str().unwrap(),
        "--mode",
        mode,
    ]);
    Some(env)
}

pub fn layer<'a>(st: &'a [LayerStatus], name: &str) -> &'a LayerStatus {
    st.iter().find(|l| l.layer == name).unwrap()
}

/// Layers `os` (imported from `src`) and `p` (personal, empty), composed
/// as `c`.
pub fn personal_over_os(env: &Env, src: &Path) {
    env.tree_layer("os", "os", Some(src));
    env.tree_layer("p", "personal", None);
    env.ok(&[
        "compose",
        "create",
        "c",
        "--layer",
        "os=os",
        "--layer",
        "personal=p",
    ]);
}
