//! `lamina bench fs`: a Lamina mount beside fuse-overlayfs and kernel
//! overlayfs, on the same lower data, in one run.
//!
//! # Set-up
//!
//! The work directory gets a lower tree `lower/` holding one file, `big`,
//! of `--size` pseudo-random (incompressible) bytes. Lamina imports that
//! tree as a version of an `os` layer and composes it under an empty
//! `personal` layer (`lamina compose create c --layer os=os --layer
//! personal=p`); fuse-overlayfs and kernel overlayfs take `lower/` itself as
//! their `lowerdir`. The tarball for `tar xf` is the largest `*.crate` (a
//! gzip tarball of real Rust sources) in the cargo registry cache, or else
//! a tar of the registry's unpacked sources; the report names it.
//!
//! # Method
//!
//! Each workload runs on all three file systems before the next workload
//! starts, so the peers are measured close together in time. Every
//! (workload, file system) pair gets a new mount with an empty upper (a new
//! overlay `upperdir`, or the composition's pending changes dropped with
//! `lamina compose reset`), and the page cache is dropped (`sync`, then
//! `echo 3 > /proc/sys/vm/drop_caches`) just after mounting. Then:
//!
//! * **seq read, cold / warm**: fio reads `big` sequentially (1 MiB, psync)
//!   twice; the first read is cold, the second warm.
//! * **seq read, cold, 2nd mount**: one more cold read on a new mount. The
//!   overlays behave as in the first; Lamina now serves the file from its
//!   materialised copy (`STORE/cache/files`, written in the background
//!   after the first open) through FUSE passthrough, where the first cold
//!   read came from the store's chunks.
//! * **seq write**: fio writes a new `--size` file, 1 MiB blocks, with an
//!   fsync at the end that counts in fio's time.
//! * **rand read 4K**: after one sequential read of `big` (warm-up), fio
//!   4 KiB random reads, psync, queue depth 1, for [`RANDREAD_SECS`].
//! * **create / stat / unlink**: in this process, `--files` empty files
//!   created (and closed) in a new directory, then stat'ed, then unlinked;
//!   each phase is timed on its own.
//! * **tar xf + sync**: `tar xf` of the tarball into the mount, then a
//!   system-wide `sync`: what the FUSE daemons wrote lands on the host file
//!   system, which a per-mount `syncfs` would not reach.
//! * **find, warm**: `find DIR -printf ''` over the extracted tree, once to
//!   warm up, then the median of [`FIND_RUNS`] timed runs.
//!
//! Every workload runs `--runs` rounds (default 3), the file systems in a
//! rotating order, and the median of each is reported: on these shared
//! machines one run of a workload can be off by 2× either way. Before each
//! round of the first cold read, Lamina's cache of materialised files is
//! emptied, so that read really comes from the store's chunks.
//!
//! Rates come from fio's JSON (MB = 10^6 bytes) or from wall-clock time in
//! this process; times are wall-clock around child processes, so their
//! start-up counts for every file system alike. Ratios are oriented so that
//! above 1 means Lamina did better: lamina/peer for rates, peer/lamina for
//! times. A workload that fails on one file system is reported (for Lamina
//! with the tail of the mount daemon's log) and the rest still run; the
//! command then exits 1.

use std::cell::Cell;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;

use super::data::Rng;
use super::{run_ok, stdout_of};
use crate::output::{bytes, Out, UsageError};

/// Length of the random-read run: long enough for a stable IOPS figure at
/// queue depth 1, short enough to keep the whole run to minutes.
const RANDREAD_SECS: u64 = 10;
/// Timed `find` runs (the median is reported): one run over a few thousand
/// entries takes milliseconds, so a single one is at the mercy of noise.
const FIND_RUNS: usize = 3;
/// Lines of the Lamina daemon log kept with a failure.
const DAEMON_LOG_LINES: usize = 40;
/// The composition Lamina mounts.
const COMPOSITION: &str = "c";

/// The file systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Lamina,
    FuseOverlayfs,
    KernelOverlayfs,
}

const PEERS: [Peer; 3] = [Peer::Lamina, Peer::FuseOverlayfs, Peer::KernelOverlayfs];

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Lamina => "lamina",
            Peer::FuseOverlayfs => "fuse-overlayfs",
            Peer::KernelOverlayfs => "kernel overlayfs",
        }
    }

    /// Directory-name form of the name.
    fn slug(self) -> &'static str {
        match self {
            Peer::Lamina => "lamina",
            Peer::FuseOverlayfs => "fuse-overlayfs",
            Peer::KernelOverlayfs => "overlay",
        }
    }
}

/// One value per file system.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct PerPeer<T> {
    lamina: T,
    fuse_overlayfs: T,
    kernel_overlayfs: T,
}

impl<T> PerPeer<T> {
    fn get(&self, p: Peer) -> &T {
        match p {
            Peer::Lamina => &self.lamina,
            Peer::FuseOverlayfs => &self.fuse_overlayfs,
            Peer::KernelOverlayfs => &self.kernel_overlayfs,
        }
    }

    fn get_mut(&mut self, p: Peer) -> &mut T {
        match p {
            Peer::Lamina => &mut self.lamina,
            Peer::FuseOverlayfs => &mut self.fuse_overlayfs,
            Peer::KernelOverlayfs => &mut self.kernel_overlayfs,
        }
    }
}

/// Unit of a result row.
#[derive(Debug, Clone, Copy, Serialize)]
enum Unit {
    #[serde(rename = "MB/s")]
    MbPerSec,
    #[serde(rename = "IOPS")]
    Iops,
    #[serde(rename = "ops/s")]
    OpsPerSec,
    #[serde(rename = "s")]
    Secs,
}

impl Unit {
    fn format(self, v: f64) -> String {
        match self {
            Unit::MbPerSec => format!("{v:.0} MB/s"),
            Unit::Iops => format!("{v:.0} IOPS"),
            Unit::OpsPerSec => format!("{v:.0} ops/s"),
            Unit::Secs => format!("{v:.3} s"),
        }
    }

    /// Lamina's value against a peer's, > 1 when Lamina did better.
    fn ratio(self, lamina: f64, peer: f64) -> f64 {
        match self {
            Unit::Secs => peer / lamina.max(1e-9),
            _ => lamina / peer.max(1e-9),
        }
    }
}

/// One workload: a new mount per file system, one or more result rows.
#[derive(Debug, Clone, Copy)]
enum Case {
    Read,
    ReadRemount,
    Write,
    RandRead,
    Metadata,
    TarFind,
}

const CASES: [Case; 6] = [
    Case::Read,
    Case::ReadRemount,
    Case::Write,
    Case::RandRead,
    Case::Metadata,
    Case::TarFind,
];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Read => "seq read",
            Case::ReadRemount => "seq read, 2nd mount",
            Case::Write => "seq write",
            Case::RandRead => "rand read",
            Case::Metadata => "create/stat/unlink",
            Case::TarFind => "tar and find",
        }
    }

    /// The rows this case produces, in the order `Bench::case` returns them.
    fn rows(self, size: u64, files: u64) -> Vec<(String, Unit)> {
        let size = bytes(size);
        match self {
            Case::Read => vec![
                (format!("seq read {size}, cold"), Unit::MbPerSec),
                (format!("seq read {size}, warm"), Unit::MbPerSec),
            ],
            Case::ReadRemount => {
                vec![(format!("seq read {size}, cold, 2nd mount"), Unit::MbPerSec)]
            }
            Case::Write => vec![(format!("seq write {size} + fsync"), Unit::MbPerSec)],
            Case::RandRead => vec![("rand read 4K qd1".into(), Unit::Iops)],
            Case::Metadata => vec![
                (format!("create {files} empty files"), Unit::OpsPerSec),
                (format!("stat {files} files"), Unit::OpsPerSec),
                (format!("unlink {files} files"), Unit::OpsPerSec),
            ],
            Case::TarFind => vec![
                ("tar xf + sync".into(), Unit::Secs),
                ("find, warm".into(), Unit::Secs),
            ],
        }
    }
}

/// One result row of the report.
#[derive(Debug, Serialize)]
struct Row {
    workload: String,
    unit: Unit,
    /// `null` where the workload failed.
    #[serde(flatten)]
    values: PerPeer<Option<f64>>,
    /// > 1: Lamina did better.
    lamina_vs_fuse_overlayfs: Option<f64>,
    /// > 1: Lamina did better.
    lamina_vs_kernel_overlayfs: Option<f64>,
}

/// A workload that failed on one file system.
#[derive(Debug, Serialize)]
struct Failure {
    file_system: &'static str,
    workload: &'static str,
    error: String,
    /// Tail of the Lamina mount daemon's log (Lamina failures only).
    daemon_log: Option<String>,
}

/// Where the `tar xf` input came from.
#[derive(Debug, Serialize)]
struct Tarball {
    path: PathBuf,
    /// `crate` (a registry `*.crate`) or `cargo-registry-src` (generated).
    source: &'static str,
    bytes: u64,
}

/// Report of `bench fs`.
#[derive(Debug, Serialize)]
pub struct FsReport {
    size_bytes: u64,
    files: u64,
    /// Rounds per workload; each figure is their median.
    runs: usize,
    work_dir: PathBuf,
    kernel: String,
    fuse_overlayfs_version: String,
    fio_version: String,
    tarball: Tarball,
    /// `lamina layer import` of the lower tree, seconds (set-up, not compared).
    lamina_import_secs: f64,
    rows: Vec<Row>,
    /// Entries `find` saw in the extracted tree (equal on a correct run).
    find_entries: PerPeer<Option<u64>>,
    /// Bytes in Lamina's materialised-file cache at the end.
    lamina_file_cache_bytes: u64,
    failures: Vec<Failure>,
}

impl FsReport {
    /// Whether some workload failed on some file system.
    pub fn failed(&self) -> bool {
        !self.failures.is_empty()
    }
}

/// `bench fs` mounts kernel overlayfs and drops the page cache: root only.
pub fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(UsageError(
            "lamina bench fs must run as root: it mounts kernel overlayfs, \
             runs fuse-overlayfs and drops the page cache"
                .into(),
        )
        .into());
    }
    Ok(())
}

/// Flushes dirty data, then drops the page, dentry and inode caches.
fn drop_caches() -> anyhow::Result<()> {
    run_ok(&mut Command::new("sync"), "sync")?;
    fs::write("/proc/sys/vm/drop_caches", "3")
        .context("dropping the page cache (/proc/sys/vm/drop_caches)")
}

/// Whether `dir` is the root of a mount (its device differs from its
/// parent's).
fn is_mount_point(dir: &Path) -> anyhow::Result<bool> {
    let parent = dir
        .parent()
        .with_context(|| format!("{} has no parent", dir.display()))?;
    let d = fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    let p = fs::metadata(parent).with_context(|| format!("stat {}", parent.display()))?;
    Ok(d.dev() != p.dev())
}

/// What fio measured.
struct FioResult {
    bytes_per_sec: f64,
    iops: f64,
    io_bytes: u64,
}

/// Runs one fio job on `file` (psync, page cache left alone) and returns
/// the figures of its `read` or `write` side.
fn fio(file: &Path, write: bool, args: &[&str]) -> anyhow::Result<FioResult> {
    let text = stdout_of(
        Command::new("fio")
            .arg("--name=bench")
            .arg(format!("--filename={}", file.display()))
            .args(["--ioengine=psync", "--invalidate=0", "--output-format=json"])
            .args(args),
        "fio",
    )?;
    // fio may print warnings before the JSON document.
    let json = text.find('{').map_or("", |i| &text[i..]);
    let v: serde_json::Value = serde_json::from_str(json).context("parsing fio's JSON")?;
    let job = &v["jobs"][0];
    if let Some(e) = job["error"].as_i64().filter(|&e| e != 0) {
        bail!("fio reported error {e} on {}", file.display());
    }
    let side = &job[if write { "write" } else { "read" }];
    Ok(FioResult {
        bytes_per_sec: side["bw_bytes"]
            .as_f64()
            .context("fio's JSON has no bw_bytes")?,
        iops: side["iops"].as_f64().context("fio's JSON has no iops")?,
        io_bytes: side["io_bytes"].as_u64().unwrap_or(0),
    })
}

/// Sequential read of all of `file` with fio; MB/s.
fn seq_read(file: &Path, size: u64) -> anyhow::Result<f64> {
    let r = fio(file, false, &["--rw=read", "--bs=1M", "--readonly"])?;
    if r.io_bytes < size {
        bail!(
            "sequential read of {} got {} of {} bytes",
            file.display(),
            r.io_bytes,
            size
        );
    }
    Ok(r.bytes_per_sec / 1e6)
}

/// A file of `size` pseudo-random bytes, synced.
fn write_random(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_random(&mut buf[..n]);
        f.write_all(&buf[..n])
            .with_context(|| format!("write {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all()
        .with_context(|| format!("sync {}", path.display()))?;
    Ok(())
}

/// The tarball to extract: the largest registry `*.crate`, or a tar of the
/// registry's unpacked sources written to `work`.
fn find_tarball(work: &Path) -> anyhow::Result<Tarball> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set: cannot find a tarball to extract")?;
    let registry = cargo_home.join("registry");
    let mut best: Option<(u64, PathBuf)> = None;
    if let Ok(indexes) = fs::read_dir(registry.join("cache")) {
        for index in indexes.flatten() {
            let Ok(crates) = fs::read_dir(index.path()) else {
                continue;
            };
            for c in crates.flatten() {
                let p = c.path();
                if p.extension().is_some_and(|e| e == "crate") {
                    let len = c.metadata().map_or(0, |m| m.len());
                    if best.as_ref().is_none_or(|(b, _)| len > *b) {
                        best = Some((len, p));
                    }
                }
            }
        }
    }
    if let Some((len, path)) = best {
        return Ok(Tarball {
            path,
            source: "crate",
            bytes: len,
        });
    }
    let src = registry.join("src");
    if !src.is_dir() {
        bail!(
            "no *.crate under {} and no {}: nothing to extract for the tar workload",
            registry.join("cache").display(),
            src.display()
        );
    }
    let path = work.join("registry-src.tar");
    run_ok(
        Command::new("tar")
            .arg("cf")
            .arg(&path)
            .arg("-C")
            .arg(&src)
            .arg("."),
        "tar cf (cargo registry sources)",
    )?;
    let bytes = fs::metadata(&path)?.len();
    Ok(Tarball {
        path,
        source: "cargo-registry-src",
        bytes,
    })
}

/// The last `n` lines of every Lamina mount daemon log in `store`.
fn daemon_log_tail(store: &Path, n: usize) -> Option<String> {
    let mut s = String::new();
    for comp in fs::read_dir(store.join("compositions")).ok()?.flatten() {
        let log = comp.path().join("daemon.log");
        let Ok(text) = fs::read_to_string(&log) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        s.push_str(&format!("==> {} <==\n", log.display()));
        for l in &lines[lines.len().saturating_sub(n)..] {
            s.push_str(l);
            s.push('\n');
        }
    }
    (!s.is_empty()).then_some(s)
}

/// Inputs and tools of one run.
struct Bench<'a> {
    lamina: PathBuf,
    work: PathBuf,
    store: PathBuf,
    lower: PathBuf,
    big: PathBuf,
    tarball: PathBuf,
    size: u64,
    files: u64,
    out: &'a Out,
    /// Mounts made so far (names each overlay's upper directory).
    mounts: Cell<u32>,
}

/// A mounted file system; unmounted on drop if [`Mounted::finish`] was not
/// reached (an error on the way).
struct Mounted<'m> {
    bench: &'m Bench<'m>,
    peer: Peer,
    dir: PathBuf,
    /// The overlay's upper and work directories (removed after unmount).
    upper: Option<PathBuf>,
    live: bool,
}

impl Mounted<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Unmounts, reporting failure.
    fn finish(mut self) -> anyhow::Result<()> {
        self.live = false;
        self.bench.unmount(self.peer, &self.dir)
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if self.live {
            if let Err(e) = self.bench.unmount(self.peer, &self.dir) {
                self.bench.out.note(&format!(
                    "warning: {e:#}; detaching {} lazily",
                    self.dir.display()
                ));
                if let Err(e) = run_ok(Command::new("umount").arg("-l").arg(&self.dir), "umount -l")
                {
                    self.bench.out.note(&format!("warning: {e:#}"));
                }
            }
        }
        if let Some(u) = &self.upper {
            // Only frees space; a leftover is removed with the work directory.
            if let Err(e) = fs::remove_dir_all(u) {
                self.bench
                    .out
                    .note(&format!("warning: could not remove {}: {e}", u.display()));
            }
        }
    }
}

impl Bench<'_> {
    /// Empties Lamina's cache of materialised lower files.
    fn clear_file_cache(&self) -> anyhow::Result<()> {
        let dir = self.store.join("cache/files");
        let Ok(rd) = fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in rd {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            if e.file_name() != "tmp" && e.file_type()?.is_dir() {
                fs::remove_dir_all(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        Ok(())
    }

    fn lamina_cmd(&self) -> Command {
        let mut c = Command::new(&self.lamina);
        c.arg("--store").arg(&self.store).arg("--quiet");
        c
    }

    fn lamina_run(&self, args: &[&str]) -> anyhow::Result<()> {
        run_ok(
            self.lamina_cmd().args(args),
            &format!("lamina {}", args.join(" ")),
        )
    }

    /// Generates the lower tree and sets up the Lamina store; returns the
    /// seconds `lamina layer import` took.
    fn set_up(&self) -> anyhow::Result<f64> {
        fs::create_dir_all(&self.lower)?;
        self.out.summary(&format!(
            "writing {} of random data to {}…",
            bytes(self.size),
            self.big.display()
        ));
        write_random(&self.big, self.size, 7)?;
        self.out.summary("importing it into a Lamina store…");
        self.lamina_run(&["init"])?;
        self.lamina_run(&["layer", "create", "os", "--kind", "os", "--format", "tree"])?;
        let lower = self
            .lower
            .to_str()
            .context("the work directory's path is not UTF-8")?;
        let started = Instant::now();
        self.lamina_run(&["layer", "import", "os", lower])?;
        let import_secs = started.elapsed().as_secs_f64();
        self.lamina_run(&[
            "layer", "create", "p", "--kind", "personal", "--format", "tree",
        ])?;
        self.lamina_run(&[
            "compose",
            "create",
            COMPOSITION,
            "--layer",
            "os=os",
            "--layer",
            "personal=p",
        ])?;
        Ok(import_secs)
    }

    /// Mounts `peer` with an empty upper.
    fn mount(&self, peer: Peer) -> anyhow::Result<Mounted<'_>> {
        let n = self.mounts.get();
        self.mounts.set(n + 1);
        let dir = self.work.join("mnt").join(peer.slug());
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let upper = match peer {
            Peer::Lamina => {
                self.lamina_run(&["compose", "reset", COMPOSITION])?;
                run_ok(
                    self.lamina_cmd().arg("mount").arg(COMPOSITION).arg(&dir),
                    "lamina mount",
                )?;
                None
            }
            Peer::FuseOverlayfs | Peer::KernelOverlayfs => {
                let u = self.work.join("upper").join(format!("{}-{n}", peer.slug()));
                fs::create_dir_all(u.join("upper"))?;
                fs::create_dir_all(u.join("work"))?;
                let opts = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    self.lower.display(),
                    u.join("upper").display(),
                    u.join("work").display()
                );
                if peer == Peer::FuseOverlayfs {
                    run_ok(
                        Command::new("fuse-overlayfs")
                            .arg("-o")
                            .arg(&opts)
                            .arg(&dir),
                        "fuse-overlayfs",
                    )?;
                } else {
                    run_ok(
                        Command::new("mount")
                            .args(["-t", "overlay", "overlay", "-o"])
                            .arg(&opts)
                            .arg(&dir),
                        "mount -t overlay",
                    )?;
                }
                Some(u)
            }
        };
        let m = Mounted {
            bench: self,
            peer,
            dir,
            upper,
            live: true,
        };
        if !is_mount_point(&m.dir)? {
            bail!(
                "{} is not a mount point after mounting {}",
                m.dir.display(),
                peer.name()
            );
        }
        Ok(m)
    }

    fn unmount(&self, peer: Peer, dir: &Path) -> anyhow::Result<()> {
        match peer {
            Peer::Lamina => run_ok(self.lamina_cmd().arg("umount").arg(dir), "lamina umount"),
            Peer::FuseOverlayfs => run_ok(
                Command::new("fusermount3").arg("-u").arg(dir),
                "fusermount3 -u",
            ),
            Peer::KernelOverlayfs => run_ok(Command::new("umount").arg(dir), "umount"),
        }
    }

    /// Runs `case` on a new mount of `peer`; returns the values of
    /// `case.rows()` and, for the tar case, the entries `find` saw.
    fn case(&self, case: Case, peer: Peer) -> anyhow::Result<(Vec<f64>, Option<u64>)> {
        if matches!(case, Case::Read) && peer == Peer::Lamina {
            // A cold first read comes from the store's chunks: forget the
            // copy an earlier round materialised.
            self.clear_file_cache()?;
        }
        let m = self.mount(peer)?;
        drop_caches()?;
        let big = m.path("big");
        let mut entries = None;
        let values = match case {
            Case::Read => {
                let cold = seq_read(&big, self.size)?;
                let warm = seq_read(&big, self.size)?;
                vec![cold, warm]
            }
            Case::ReadRemount => vec![seq_read(&big, self.size)?],
            Case::Write => {
                let size = format!("--size={}", self.size);
                let r = fio(
                    &m.path("written"),
                    true,
                    &[
                        "--rw=write",
                        "--bs=1M",
                        &size,
                        "--end_fsync=1",
                        "--fallocate=none",
                    ],
                )?;
                if r.io_bytes < self.size {
                    bail!("fio wrote {} of {} bytes", r.io_bytes, self.size);
                }
                vec![r.bytes_per_sec / 1e6]
            }
            Case::RandRead => {
                seq_read(&big, self.size)?;
                let runtime = format!("--runtime={RANDREAD_SECS}");
                let r = fio(
                    &big,
                    false,
                    &[
                        "--rw=randread",
                        "--bs=4k",
                        "--iodepth=1",
                        "--readonly",
                        "--time_based",
                        &runtime,
                        "--randrepeat=0",
                        "--norandommap",
                    ],
                )?;
                vec![r.iops]
            }
            Case::Metadata => metadata_ops(&m.path("meta"), self.files)?.to_vec(),
            Case::TarFind => {
                let dest = m.path("src");
                fs::create_dir(&dest).with_context(|| format!("mkdir {}", dest.display()))?;
                let started = Instant::now();
                run_ok(
                    Command::new("tar")
                        .arg("xf")
                        .arg(&self.tarball)
                        .arg("-C")
                        .arg(&dest),
                    "tar xf",
                )?;
                run_ok(&mut Command::new("sync"), "sync")?;
                let tar_secs = started.elapsed().as_secs_f64();
                // Warm-up run, which also counts the entries.
                let listing = stdout_of(
                    Command::new("find").arg(&dest).args(["-printf", "."]),
                    "find",
                )?;
                entries = Some(listing.len() as u64);
                let mut runs = Vec::with_capacity(FIND_RUNS);
                for _ in 0..FIND_RUNS {
                    let started = Instant::now();
                    run_ok(
                        Command::new("find").arg(&dest).args(["-printf", ""]),
                        "find",
                    )?;
                    runs.push(started.elapsed().as_secs_f64());
                }
                runs.sort_by(f64::total_cmp);
                vec![tar_secs, runs[runs.len() / 2]]
            }
        };
        m.finish()?;
        Ok((values, entries))
    }
}

/// Creates, stats and unlinks `n` empty files in a new directory `dir`;
/// returns ops/s of each phase.
fn metadata_ops(dir: &Path, n: u64) -> anyhow::Result<[f64; 3]> {
    fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let names: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("f{i:06}"))).collect();
    let rate = |started: Instant| n as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let started = Instant::now();
    for p in &names {
        File::create(p).with_context(|| format!("create {}", p.display()))?;
    }
    let create = rate(started);
    let started = Instant::now();
    for p in &names {
        fs::symlink_metadata(p).with_context(|| format!("stat {}", p.display()))?;
    }
    let stat = rate(started);
    let started = Instant::now();
    for p in &names {
        fs::remove_file(p).with_context(|| format!("unlink {}", p.display()))?;
    }
    let unlink = rate(started);
    Ok([create, stat, unlink])
}

/// First line of `program --version` that contains `marker`.
fn version(program: &str, marker: &str, hint: &str) -> anyhow::Result<String> {
    let text = stdout_of(Command::new(program).arg("--version"), program)
        .with_context(|| format!("{program} not found ({hint})"))?;
    Ok(text
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// Runs the file-system benchmark in `work` (an empty directory).
pub fn run(
    lamina: &Path,
    work: &Path,
    size: u64,
    files: u64,
    runs: usize,
    out: &Out,
) -> anyhow::Result<FsReport> {
    // Overlay mount options are comma-separated and fio file names
    // colon-separated: such paths would be misread.
    if work.to_string_lossy().contains([',', ':']) {
        return Err(UsageError(format!(
            "{}: the work directory's path must not contain ',' or ':'",
            work.display()
        ))
        .into());
    }
    if size == 0 {
        return Err(UsageError("--size must be above 0".into()).into());
    }
    let fuse_overlayfs_version = version(
        "fuse-overlayfs",
        "fuse-overlayfs",
        "apt-get install fuse-overlayfs",
    )?;
    version("fusermount3", "fusermount3", "apt-get install fuse3")?;
    let fio_version = version("fio", "fio", "apt-get install fio")?;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release")?
        .trim()
        .to_owned();
    let tarball = find_tarball(work)?;
    let lower = work.join("lower");
    let bench = Bench {
        lamina: lamina.to_owned(),
        work: work.to_owned(),
        store: work.join("store"),
        big: lower.join("big"),
        lower,
        tarball: tarball.path.clone(),
        size,
        files,
        out,
        mounts: Cell::new(0),
    };
    let lamina_import_secs = bench.set_up()?;

    let mut samples: Vec<PerPeer<Vec<f64>>> = Vec::new();
    let mut units = Vec::new();
    let mut names = Vec::new();
    let mut find_entries = PerPeer::default();
    let mut failures = Vec::new();
    for case in CASES {
        let rows = case.rows(size, files);
        let first = samples.len();
        for (name, unit) in &rows {
            names.push(name.clone());
            units.push(*unit);
            samples.push(PerPeer::default());
        }
        // Rounds rotate the order so that no file system always runs first
        // (right after another's writeback, say).
        let order =
            (0..runs).flat_map(|r| (0..PEERS.len()).map(move |i| PEERS[(i + r) % PEERS.len()]));
        for peer in order {
            out.summary(&format!("{}: {}…", case.name(), peer.name()));
            match bench.case(case, peer) {
                Ok((vals, entries)) => {
                    for (i, v) in vals.into_iter().enumerate() {
                        if let Some(row) = samples.get_mut(first + i) {
                            row.get_mut(peer).push(v);
                        }
                    }
                    if entries.is_some() {
                        *find_entries.get_mut(peer) = entries;
                    }
                }
                Err(e) => {
                    out.note(&format!("{} failed on {}: {e:#}", case.name(), peer.name()));
                    failures.push(Failure {
                        file_system: peer.name(),
                        workload: case.name(),
                        error: format!("{e:#}"),
                        daemon_log: (peer == Peer::Lamina)
                            .then(|| daemon_log_tail(&bench.store, DAEMON_LOG_LINES))
                            .flatten(),
                    });
                }
            }
        }
    }
    let values = samples.iter().map(|row| PerPeer {
        lamina: median(&row.lamina),
        fuse_overlayfs: median(&row.fuse_overlayfs),
        kernel_overlayfs: median(&row.kernel_overlayfs),
    });
    let rows = names
        .into_iter()
        .zip(units)
        .zip(values)
        .map(|((workload, unit), values)| {
            let vs = |peer: Peer| match (values.lamina, *values.get(peer)) {
                (Some(l), Some(p)) => Some(unit.ratio(l, p)),
                _ => None,
            };
            Row {
                workload,
                unit,
                lamina_vs_fuse_overlayfs: vs(Peer::FuseOverlayfs),
                lamina_vs_kernel_overlayfs: vs(Peer::KernelOverlayfs),
                values,
            }
        })
        .collect();
    let cache = bench.store.join("cache/files");
    let lamina_file_cache_bytes = if cache.is_dir() {
        super::dir_size(&cache)?
    } else {
        0
    };
    Ok(FsReport {
        size_bytes: size,
        files,
        runs,
        work_dir: work.to_owned(),
        kernel,
        fuse_overlayfs_version,
        fio_version,
        tarball,
        lamina_import_secs,
        rows,
        find_entries,
        lamina_file_cache_bytes,
        failures,
    })
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Text form of the report.
pub fn render(r: &FsReport) -> String {
    let mut s = format!(
        "kernel {}, {}, {}\n",
        r.kernel, r.fuse_overlayfs_version, r.fio_version
    );
    s.push_str(&format!(
        "lower: one {} random file; tar input: {} ({}, {}); lamina import of the lower tree {:.1} s\n",
        bytes(r.size_bytes),
        r.tarball.path.display(),
        r.tarball.source,
        bytes(r.tarball.bytes),
        r.lamina_import_secs
    ));
    s.push_str(&format!(
        "{:<34} {:>12} {:>15} {:>17} {:>22} {:>14}\n",
        "workload",
        "lamina",
        "fuse-overlayfs",
        "kernel overlayfs",
        "lamina/fuse-overlayfs",
        "lamina/kernel"
    ));
    let value =
        |v: Option<f64>, unit: Unit| v.map_or_else(|| "failed".to_owned(), |v| unit.format(v));
    let ratio = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x"));
    for row in &r.rows {
        s.push_str(&format!(
            "{:<34} {:>12} {:>15} {:>17} {:>22} {:>14}\n",
            row.workload,
            value(row.values.lamina, row.unit),
            value(row.values.fuse_overlayfs, row.unit),
            value(row.values.kernel_overlayfs, row.unit),
            ratio(row.lamina_vs_fuse_overlayfs),
            ratio(row.lamina_vs_kernel_overlayfs)
        ));
    }
    let count = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    s.push_str(&format!(
        "medians of {} rounds; ratios above 1: Lamina better. find entries: lamina {}, fuse-overlayfs {}, kernel overlayfs {}; lamina file cache {}\n",
        r.runs,
        count(r.find_entries.lamina),
        count(r.find_entries.fuse_overlayfs),
        count(r.find_entries.kernel_overlayfs),
        bytes(r.lamina_file_cache_bytes)
    ));
    for f in &r.failures {
        s.push_str(&format!(
            "FAILED {} on {}: {}\n",
            f.workload, f.file_system, f.error
        ));
        if let Some(log) = &f.daemon_log {
            s.push_str(log);
        }
    }
    s
}
