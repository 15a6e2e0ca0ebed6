//! `lamina bench`: Lamina beside the tool a user would use instead, in the
//! same run, on the same data.
//!
//! `bench import` generates a mixed tree and a raw disk image, then for each
//! runs `lamina layer import` and `restic backup` twice: fresh (empty store)
//! and unchanged (same data again). Both tools run as child processes, so
//! start-up costs count for both. Throughput is source bytes over wall time
//! (MB = 10^6 bytes); store size is every byte under the store/repository.
//! Data is read from the page cache by both (it was just generated).
//!
//! `bench nbd` (see [`nbd`]) compares Lamina's NBD server with qemu-nbd;
//! `bench fs` (see [`fs`]) compares a Lamina mount with fuse-overlayfs and
//! kernel overlayfs; `bench sync` (see [`sync`]) compares check-in and
//! two-way sync with rsync and unison.

mod broker;
mod ceph;
mod data;
mod fs;
mod nbd;
mod screens;
mod stream;
mod sync;
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::cli::{BenchCommand, BenchImportArgs, Cli};
use crate::output::{bytes, Out};

pub fn run(_cli: &Cli, out: &Out, c: &BenchCommand) -> anyhow::Result<ExitCode> {
    match c {
        BenchCommand::Import(a) => import(out, a),
        BenchCommand::Nbd(a) => {
            let work = work_dir(a.dir.as_deref(), "nbd")?;
            let result = nbd::run(&std::env::current_exe()?, &work, a.size, a.seconds, out);
            finish_work(&work, a.keep, out);
            let report = result?;
            out.result(&report, || nbd::render(&report))?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Fs(a) => {
            fs::require_root()?;
            let work = work_dir(a.dir.as_deref(), "fs")?;
            let result = fs::run(
                &std::env::current_exe()?,
                &work,
                a.size,
                a.files,
                a.runs as usize,
                out,
            );
            finish_work(&work, a.keep, out);
            let report = result?;
            out.result(&report, || fs::render(&report))?;
            // The table is printed either way; a workload that failed on
            // some file system makes the run a failure.
            Ok(if report.failed() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        BenchCommand::Vm(a) => {
            let arch: lamina_vm::Arch = a
                .arch
                .parse()
                .map_err(|e: lamina_vm::Error| crate::output::UsageError(e.to_string()))?;
            let guest = a.guest.clone().unwrap_or_else(|| match arch {
                lamina_vm::Arch::X86_64 => PathBuf::from("fixtures/guest/out"),
                lamina_vm::Arch::Aarch64 => PathBuf::from("fixtures/guest/out/aarch64"),
            });
            let guest = std::path::absolute(&guest)?;
            let work = work_dir(a.dir.as_deref(), "vm")?;
            let result = vm::run(
                &std::env::current_exe()?,
                arch,
                &guest,
                &work,
                a.vms as usize,
                out,
            );
            finish_work(&work, a.keep, out);
            let report = result?;
            out.result(&report, || vm::render(&report))?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Broker(a) => {
            let work = work_dir(a.dir.as_deref(), "broker")?;
            let result = broker::run(&std::env::current_exe()?, &work, a.users, &|m| out.note(m));
            finish_work(&work, a.keep, out);
            let report = result?;
            out.result(&report, || broker::render(&report))?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Stream(a) => {
            let exe = std::env::current_exe()?;
            if let Some(spec) = &a.inner {
                stream::inner(&exe, spec)?;
                return Ok(ExitCode::SUCCESS);
            }
            let guest = a
                .guest
                .clone()
                .unwrap_or_else(|| PathBuf::from("fixtures/guest/out"));
            let guest = std::path::absolute(&guest)?;
            let size = crate::output::parse_size(&a.size)?;
            let work = work_dir(a.dir.as_deref(), "stream")?;
            let result = stream::run(&exe, &guest, &work, size, &a.rate, &|m| out.note(m));
            finish_work(&work, a.keep, out);
            let report = result?;
            out.result(&report, || stream::render(&report))?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Ceph(a) => {
            let size = crate::output::parse_size(&a.size)?;
            let work = work_dir(a.dir.as_deref(), "ceph")?;
            let result = ceph::run(&std::env::current_exe()?, &a.ceph_conf, &work, size, &|m| {
                out.note(m)
            });
            finish_work(&work, a.keep, out);
            let report = result?;
            out.result(&report, || ceph::render(&report))?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Sync(a) => {
            let exe = std::env::current_exe()?;
            if let Some(spec) = &a.inner {
                sync::inner(&exe, spec)?;
                return Ok(ExitCode::SUCCESS);
            }
            let size = crate::output::parse_size(&a.size)?;
            let work = work_dir(a.dir.as_deref(), "sync")?;
            let result = sync::run(&exe, &work, size, a.files, &a.rate, &|m| out.note(m));
            finish_work(&work, a.keep, out);
            let report = result?;
            out.result(&report, || sync::render(&report))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A new, empty work directory: `dir`, or one under the temporary directory.
fn work_dir(dir: Option<&Path>, what: &str) -> anyhow::Result<PathBuf> {
    let work = match dir {
        Some(d) => d.to_owned(),
        None => std::env::temp_dir().join(format!("lamina-bench-{what}-{}", std::process::id())),
    };
    if work.exists() && std::fs::read_dir(&work)?.next().is_some() {
        bail!("{}: work directory is not empty", work.display());
    }
    std::fs::create_dir_all(&work)?;
    Ok(work)
}

#[derive(Debug, Serialize)]
struct Row {
    data: &'static str,
    phase: &'static str,
    bytes: u64,
    lamina_secs: f64,
    restic_secs: f64,
    lamina_mb_s: f64,
    restic_mb_s: f64,
    /// Lamina throughput over restic's.
    speedup: f64,
}

#[derive(Debug, Serialize)]
struct Sizes {
    data: &'static str,
    lamina_store_bytes: u64,
    restic_repo_bytes: u64,
    /// Lamina store size over restic's (lower is better).
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    restic_version: String,
    work_dir: PathBuf,
    rows: Vec<Row>,
    sizes: Vec<Sizes>,
}

/// Apparent size of every file under `dir`.
fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}

/// Runs `cmd` with stdin closed and returns its stdout; fails with its
/// stderr when it fails.
fn stdout_of(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `cmd`, discarding its output; fails with its stderr when it fails.
fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    stdout_of(cmd.stdout(Stdio::null()), what).map(drop)
}

/// Runs `cmd` like [`run_ok`] and returns its wall time in seconds.
fn timed(cmd: &mut Command, what: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    run_ok(cmd, what)?;
    Ok(started.elapsed().as_secs_f64())
}

/// Removes the work directory unless asked to keep it (a failure to remove
/// it is only a warning).
fn finish_work(work: &Path, keep: bool, out: &Out) {
    if keep {
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(work) {
        out.note(&format!(
            "warning: could not remove {}: {e}",
            work.display()
        ));
    }
}

struct Tools {
    lamina: PathBuf,
    restic: PathBuf,
    work: PathBuf,
}

impl Tools {
    fn lamina(&self, store: &Path) -> Command {
        let mut c = Command::new(&self.lamina);
        c.arg("--store").arg(store).arg("--quiet");
        c
    }

    fn restic(&self, repo: &Path) -> Command {
        let mut c = Command::new(&self.restic);
        c.env("RESTIC_PASSWORD", "lamina-bench")
            .arg("--repo")
            .arg(repo)
            .arg("--cache-dir")
            .arg(self.work.join("restic-cache"))
            .arg("--quiet");
        c
    }
}

fn one(
    tools: &Tools,
    name: &'static str,
    format: &str,
    source: &Path,
    logical: u64,
    out: &Out,
) -> anyhow::Result<(Vec<Row>, Sizes)> {
    let mut rows = Vec::new();
    let store = tools.work.join(format!("lamina-{name}"));
    let repo = tools.work.join(format!("restic-{name}"));
    timed(tools.lamina(&store).arg("init"), "lamina init")?;
    timed(
        tools.lamina(&store).args([
            "layer", "create", "bench", "--kind", "os", "--format", format,
        ]),
        "lamina layer create",
    )?;
    timed(tools.restic(&repo).arg("init"), "restic init")?;
    for phase in ["fresh", "unchanged"] {
        out.summary(&format!("{name} {phase}: lamina import…"));
        let l = timed(
            tools
                .lamina(&store)
                .args(["layer", "import", "bench"])
                .arg(source),
            "lamina layer import",
        )?;
        out.summary(&format!("{name} {phase}: restic backup…"));
        let r = timed(
            tools.restic(&repo).arg("backup").arg(source),
            "restic backup",
        )?;
        let mbs = |s: f64| logical as f64 / 1e6 / s.max(1e-9);
        rows.push(Row {
            data: name,
            phase,
            bytes: logical,
            lamina_secs: l,
            restic_secs: r,
            lamina_mb_s: mbs(l),
            restic_mb_s: mbs(r),
            speedup: r / l.max(1e-9),
        });
    }
    let (ls, rs) = (dir_size(&store)?, dir_size(&repo)?);
    let sizes = Sizes {
        data: name,
        lamina_store_bytes: ls,
        restic_repo_bytes: rs,
        ratio: ls as f64 / rs.max(1) as f64,
    };
    Ok((rows, sizes))
}

fn import(out: &Out, a: &BenchImportArgs) -> anyhow::Result<ExitCode> {
    let restic_version = Command::new(&a.restic)
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .with_context(|| {
            format!(
                "{} not found: install restic (Debian: apt-get install restic)",
                a.restic.display()
            )
        })?;
    let work = work_dir(a.dir.as_deref(), "import")?;
    let tools = Tools {
        lamina: std::env::current_exe()?,
        restic: a.restic.clone(),
        work: work.clone(),
    };
    let result = (|| -> anyhow::Result<Report> {
        out.summary(&format!(
            "generating {} of test data in {}…",
            bytes(2 * a.size),
            work.display()
        ));
        let tree = work.join("data/tree");
        let (tree_bytes, files) = data::make_tree(&tree, a.size, 1)?;
        let image = work.join("data/image.raw");
        let image_bytes = data::make_image(&image, a.size, 2)?;
        out.summary(&format!(
            "tree: {files} files, {}; image: {}",
            bytes(tree_bytes),
            bytes(image_bytes)
        ));
        let mut rows = Vec::new();
        let mut sizes = Vec::new();
        for (name, format, source, logical) in [
            ("tree", "tree", &tree, tree_bytes),
            ("image", "disk", &image, image_bytes),
        ] {
            let (r, z) = one(&tools, name, format, source, logical, out)?;
            rows.extend(r);
            sizes.push(z);
        }
        Ok(Report {
            restic_version,
            work_dir: work.clone(),
            rows,
            sizes,
        })
    })();
    finish_work(&work, a.keep, out);
    let report = result?;
    out.result(&report, || {
        let mut s = format!("{}\n", report.restic_version);
        s.push_str(&format!(
            "{:<6} {:<10} {:>10} {:>10} {:>8}\n",
            "data", "phase", "lamina", "restic", "ratio"
        ));
        for r in &report.rows {
            s.push_str(&format!(
                "{:<6} {:<10} {:>6.0} MB/s {:>6.0} MB/s {:>7.2}x\n",
                r.data, r.phase, r.lamina_mb_s, r.restic_mb_s, r.speedup
            ));
        }
        s.push_str(&format!(
            "{:<6} {:>14} {:>14} {:>8}\n",
            "data", "lamina store", "restic repo", "ratio"
        ));
        for z in &report.sizes {
            s.push_str(&format!(
                "{:<6} {:>14} {:>14} {:>7.3}x\n",
                z.data,
                bytes(z.lamina_store_bytes),
                bytes(z.restic_repo_bytes),
                z.ratio
            ));
        }
        s
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A child process killed (and reaped) when dropped.
pub(crate) struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA and a server certificate it signed for 127.0.0.1, made with
/// openssl in `dir`: (CA, certificate, key).
pub(crate) fn make_certs(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    for args in [
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca",
        "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.csr -subj /CN=localhost",
    ] {
        run_ok(Command::new("openssl").current_dir(dir).args(args.split(' ')), "openssl")?;
    }
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n")?;
    run_ok(
        Command::new("openssl").current_dir(dir).args(
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf"
                .split(' '),
        ),
        "openssl",
    )?;
    Ok((
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    ))
}
