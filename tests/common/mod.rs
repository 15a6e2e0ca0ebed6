//! Helpers for end-to-end tests: a scratch store, running the built
//! `lamina` binary, generating trees and comparing them.

#![allow(dead_code)]

pub mod broker;
pub mod ceph;
pub mod fuse;
pub mod guest;
pub mod net;
pub mod vms;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The `lamina` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lamina"))
}

/// Whether tests run as root (CI does).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Fails in CI when a test's precondition is missing; elsewhere prints why
/// the test does less than it would in CI.
pub fn require(cond: bool, what: &str) -> bool {
    if !cond {
        assert!(std::env::var_os("CI").is_none(), "CI must provide: {what}");
        eprintln!("note: skipping the part needing {what}");
    }
    cond
}

/// A temporary directory with an initialised store in it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    /// The pool of a store on Ceph.
    pub pool: Option<ceph::TestPool>,
}

impl Env {
    /// A new store: embedded, or on a new pool of the test cluster when
    /// `LAMINA_TEST_BACKEND=rados` (the store tests run both ways in CI).
    pub fn new() -> Env {
        if std::env::var("LAMINA_TEST_BACKEND").as_deref() == Ok("rados") {
            let conf = ceph::cluster().expect("LAMINA_TEST_BACKEND=rados needs a Ceph cluster");
            return Env::on_pool(ceph::TestPool::new(&conf, "env"));
        }
        let env = Env::empty();
        env.ok(&["init"]);
        env
    }

    /// A directory with no store yet.
    pub fn empty() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("lamina-test-")
            .tempdir()
            .unwrap();
        let store = dir.path().join("store");
        Env {
            dir,
            store,
            pool: None,
        }
    }

    /// A store on `pool` (joining the store there if it has one).
    pub fn on_pool(pool: ceph::TestPool) -> Env {
        let mut env = Env::empty();
        env.init_on(&pool.name, &pool.conf);
        env.pool = Some(pool);
        env
    }

    /// A second directory of this store on Ceph (another server's).
    pub fn join(&self) -> Env {
        let pool = self.pool.as_ref().expect("a store on Ceph");
        let env = Env::empty();
        env.init_on(&pool.name, &pool.conf);
        env
    }

    fn init_on(&self, pool: &str, conf: &Path) {
        self.ok(&[
            "init".as_ref(),
            "--backend".as_ref(),
            "rados".as_ref(),
            "--pool".as_ref(),
            pool.as_ref(),
            "--ceph-conf".as_ref(),
            conf.as_os_str(),
        ]);
    }

    /// Whether the store is the embedded one (tests of pack files on disk
    /// apply to it only).
    pub fn local(&self) -> bool {
        self.pool.is_none()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.arg("--store").arg(&self.store);
        c.env_remove("LAMINA_STORE");
        c
    }

    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs, asserts success, returns stdout.
    pub fn ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "lamina {:?} failed: {}\n{}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs with `--json`, asserts success, parses stdout.
    pub fn json<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Value {
        let mut all: Vec<std::ffi::OsString> = vec!["--json".into()];
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        let text = self.ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON {text:?}: {e}"))
    }

    /// Runs, asserts failure, returns (exit code, stderr).
    pub fn fail<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> (i32, String) {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "expected failure, got {}",
            String::from_utf8_lossy(&out.stdout)
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `lamina layer create LAYER --kind KIND --format FORMAT`.
    pub fn create(&self, layer: &str, kind: &str, format: &str) {
        self.ok(&["layer", "create", layer, "--kind", kind, "--format", format]);
    }

    /// `lamina --json layer import LAYER SRC`: the report.
    pub fn import_report(&self, layer: &str, src: &Path) -> Value {
        self.json(&[
            "layer".as_ref(),
            "import".as_ref(),
            layer.as_ref(),
            src.as_os_str(),
        ])
    }

    /// `lamina --json layer export SPEC DEST`: the report.
    pub fn export(&self, spec: &str, dest: &Path) -> Value {
        self.json(&[
            "layer".as_ref(),
            "export".as_ref(),
            spec.as_ref(),
            dest.as_os_str(),
        ])
    }

    /// `lamina layer export SPEC DEST`, expected to fail: (exit code, stderr).
    pub fn export_fails(&self, spec: &str, dest: &Path) -> (i32, String) {
        self.fail(&[
            "layer".as_ref(),
            "export".as_ref(),
            spec.as_ref(),
            dest.as_os_str(),
        ])
    }

    /// Imports `src` into an existing layer; returns the version id.
    pub fn import(&self, layer: &str, src: &Path) -> String {
        let v = self.json(&[
            "layer".as_ref(),
            "import".as_ref(),
            layer.as_ref(),
            src.as_os_str(),
        ]);
        v["version"].as_str().unwrap().to_owned()
    }

    /// Bytes the store occupies: its directory, or its pool's pack objects.
    pub fn store_size(&self) -> u64 {
        if self.local() {
            return dir_size(&self.store);
        }
        self.json(&["store", "stats"])["disk_bytes"]
            .as_u64()
            .unwrap()
    }
}

/// Apparent size of everything under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            dir_size(&e.path())
        } else {
            m.len()
        };
    }
    total
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap();
    }
    File::create(path).unwrap().write_all(data).unwrap();
}

/// Data/hole map of a file: (start, end) of each data region.
pub fn data_map(path: &Path) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        let start = match lseek(&f, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(_) => break,
        };
        let end = lseek(&f, start, Whence::SeekHole).unwrap().min(size);
        out.push((start as u64, end as u64));
        pos = end;
    }
    out
}

/// Everything `compare_trees` checks about one path.
#[derive(Debug, PartialEq)]
struct Node {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    size: u64,
    rdev: u64,
    content: Option<Vec<u8>>,
    target: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    holes: Option<Vec<(u64, u64)>>,
    link_group: Option<usize>,
}

fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    let mut groups: HashMap<(u64, u64), usize> = HashMap::new();
    let mut paths = Vec::new();
    walk(root, root, &mut paths);
    paths.sort();
    for rel in paths {
        let p = if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(std::ffi::OsStr::from_bytes(&rel))
        };
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let link_group = (ft.is_file() && m.nlink() > 1).then(|| {
            let n = groups.len();
            *groups.entry((m.dev(), m.ino())).or_insert(n)
        });
        let xattrs = xattr::list(&p)
            .unwrap()
            .map(|n| {
                let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                (n.as_bytes().to_vec(), v)
            })
            .collect();
        out.insert(
            rel.clone(),
            Node {
                kind: m.mode() & 0o170000,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: (m.mtime(), m.mtime_nsec()),
                size: if ft.is_dir() { 0 } else { m.len() },
                rdev: m.rdev(),
                content: ft.is_file().then(|| fs::read(&p).unwrap()),
                target: ft
                    .is_symlink()
                    .then(|| fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
                xattrs,
                holes: ft.is_file().then(|| data_map(&p)),
                link_group,
            },
        );
    }
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Vec<u8>>) {
    let rel = dir
        .strip_prefix(root)
        .unwrap()
        .as_os_str()
        .as_bytes()
        .to_vec();
    out.push(rel);
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            walk(root, &e.path(), out);
        } else {
            out.push(
                e.path()
                    .strip_prefix(root)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            );
        }
    }
}

/// Asserts two trees are equal in content and metadata: types, modes,
/// owners, mtimes (ns), sizes, device numbers, contents, symlink targets,
/// xattrs, hole maps and hard-link identity. Also runs `diff -r`.
pub fn compare_trees(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // diff reports special files it cannot compare; nothing else may differ.
    for line in text.lines() {
        assert!(
            line.starts_with("File ")
                && (line.contains("is a fifo")
                    || line.contains("is a character special")
                    || line.contains("is a block special")
                    || line.contains("is a socket")),
            "diff -r: {line}"
        );
    }
    let (sa, sb) = (snapshot(a), snapshot(b));
    let (ka, kb): (Vec<_>, Vec<_>) = (sa.keys().collect(), sb.keys().collect());
    assert_eq!(
        ka.iter()
            .map(|k| String::from_utf8_lossy(k))
            .collect::<Vec<_>>(),
        kb.iter()
            .map(|k| String::from_utf8_lossy(k))
            .collect::<Vec<_>>(),
        "paths differ"
    );
    for (k, na) in &sa {
        let nb = &sb[k];
        assert_eq!(na, nb, "{} differs", String::from_utf8_lossy(k));
    }
}

/// Writes `data` at `offset` of an existing file.
pub fn overwrite(path: &Path, offset: u64, data: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// A running `lamina serve`, stopped (SIGTERM, then waited for) on drop.
pub struct Server {
    pub child: Option<std::process::Child>,
    pub socket: PathBuf,
    pub tcp: Option<String>,
}

impl Server {
    /// Starts `lamina --json serve` with `args`, listening on a Unix socket in
    /// the env's directory and a free TCP port; returns once it is ready.
    pub fn start(env: &Env, args: &[&str]) -> Server {
        let socket = env.path(&format!("nbd-{}.sock", rand::random::<u32>()));
        let mut child = env
            .cmd()
            .arg("--json")
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        assert!(
            !line.is_empty(),
            "server exited before it was ready: {:?}",
            child.wait()
        );
        let ready: Value = serde_json::from_str(&line).unwrap();
        let tcp = ready["listening"]["tcp"].as_str().map(str::to_owned);
        Server {
            child: Some(child),
            socket,
            tcp,
        }
    }

    /// `nbd+unix:///EXPORT?socket=...`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// `nbd://HOST:PORT/EXPORT`
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp.as_deref().unwrap())
    }

    /// Kills the server with SIGKILL (no clean shutdown).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Stops the server cleanly; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server already stopped");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Runs a command; asserts success; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (see scripts/deps.sh): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a Python script with Debian's interpreter (the one with libnbd's
/// Runs `qemu-io -f FORMAT -c CMD... TARGET`; asserts it ran and that no
/// command failed (qemu-io exits 0 when a read pattern mismatches).
pub fn qemu_io(format: &str, target: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(target);
    let out = run_ok("qemu-io", &args);
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
    out
}

/// `nbd` module); asserts success; returns stdout.
pub fn python_nbd(script: &str, args: &[&str]) -> String {
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("/usr/bin/python3 with python3-libnbd is needed");
    assert!(
        out.status.success(),
        "python script failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pack files of a store.
pub fn packs(store: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for shard in fs::read_dir(store.join("packs")).unwrap() {
        for f in fs::read_dir(shard.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

/// Chunk records of a pack: (offset, chunk id, stored length). Walks the
/// format of `sync/src/backend/pack.rs`; frame records are skipped.
pub fn records(pack: &[u8]) -> Vec<(usize, String, usize)> {
    let u32_at = |i: usize| u32::from_le_bytes(pack[i..i + 4].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut at = 32;
    while at + 16 <= pack.len() {
        match &pack[at..at + 4] {
            b"LMCK" => {
                let stored = u32_at(at + 12);
                out.push((at, hex_of(&pack[at + 16..at + 48]), stored));
                at += 48 + stored;
            }
            b"LMFR" => {
                let count = u16::from_le_bytes([pack[at + 6], pack[at + 7]]) as usize;
                at += 16 + 36 * count + u32_at(at + 12);
            }
            other => panic!("unknown record {other:?} at {at}"),
        }
    }
    out
}

pub fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
