//! `lamina bench nbd`: Lamina's NBD server beside qemu-nbd, same images,
//! same fio and nbdcopy runs, in one process run, with `nbdkit memory` as
//! the ceiling.
//!
//! Two setups: (1) a standalone qcow2 file, served by `lamina serve --file`
//! and by `qemu-nbd`, each on its own copy; (2) a disk (store base layer +
//! empty overlay) against qemu-nbd serving the equivalent qcow2 chain (base
//! qcow2 + empty overlay). Both are warmed with one sequential read first
//! (Lamina's cluster cache and the page cache), then every workload runs on
//! one server, then the other, then on `nbdkit memory` holding the same
//! image (written into it first). nbdkit's memory plugin keeps the disk in
//! RAM and does no storage work at all, so its figures are what the NBD
//! transport itself (client, socket, request framing) allows on this
//! machine: no server that stores anything can beat it by much. Every
//! server listens on a Unix socket. Throughput from fio's own JSON report.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use super::data::Rng;
use super::run_ok;
use crate::output::{bytes, Out};

/// A running NBD server.
struct Running {
    child: Child,
    uri: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SIGTERM first so Lamina closes its images cleanly.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Peak resident memory of the server process (VmHWM), bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

fn wait_for_socket(path: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("server exited early: {status}");
        }
        if Instant::now() > deadline {
            bail!("server did not start listening on {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn lamina_serve(
    lamina: &Path,
    store: &Path,
    args: &[&str],
    sock: &Path,
) -> anyhow::Result<Running> {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(lamina)
        .arg("--store")
        .arg(store)
        .arg("--quiet")
        .arg("serve")
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting lamina serve")?;
    wait_for_socket(sock, &mut child)?;
    Ok(Running {
        child,
        uri: String::new(),
    })
}

/// `nbdkit memory` with a RAM disk of `size` bytes: the ceiling.
fn nbdkit_memory(size: u64, sock: &Path) -> anyhow::Result<Running> {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(sock)
        .arg("memory")
        .arg(format!("size={size}"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting nbdkit (apt-get install nbdkit)")?;
    wait_for_socket(sock, &mut child)?;
    Ok(Running {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
    })
}

fn qemu_nbd(image: &Path, sock: &Path) -> anyhow::Result<Running> {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new("qemu-nbd")
        .args([
            "-f",
            "qcow2",
            "-t",
            "--shared=8",
            "--cache=writeback",
            "--discard=unmap",
        ])
        .arg(format!("--socket={}", sock.display()))
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-nbd (apt-get install qemu-utils)")?;
    wait_for_socket(sock, &mut child)?;
    Ok(Running {
        child,
        uri: String::new(),
    })
}

/// One fio workload.
#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "seq read 1M qd16",
        rw: "read",
        bs: "1M",
        depth: 16,
    },
    Workload {
        name: "seq write 1M qd16",
        rw: "write",
        bs: "1M",
        depth: 16,
    },
    Workload {
        name: "rand read 4K qd32",
        rw: "randread",
        bs: "4k",
        depth: 32,
    },
    Workload {
        name: "rand write 4K qd32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
    },
    Workload {
        name: "rand read 4K qd1",
        rw: "randread",
        bs: "4k",
        depth: 1,
    },
    Workload {
        name: "rand write 4K qd1",
        rw: "randwrite",
        bs: "4k",
        depth: 1,
    },
];

/// Runs fio; returns (MiB/s, IOPS) summed over jobs.
fn fio(uri: &str, w: Workload, jobs: u32, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={}", w.rw),
            &format!("--bs={}", w.bs),
            &format!("--iodepth={}", w.depth),
            &format!("--numjobs={jobs}"),
            "--group_reporting",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--randrepeat=0",
            "--output-format=json",
        ])
        .output()
        .context("running fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // The nbd engine prints "connected" lines before the JSON document.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.find('{').map_or("", |i| &text[i..]);
    let v: serde_json::Value = serde_json::from_str(json).context("fio JSON")?;
    let job = &v["jobs"][0];
    let part = if w.rw.contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    let bw_kib = part["bw"].as_f64().unwrap_or(0.0);
    Ok((bw_kib / 1024.0, part["iops"].as_f64().unwrap_or(0.0)))
}

/// nbdcopy: MiB/s reading the export to null, or writing a file into it.
fn nbdcopy(uri: &str, from_file: Option<&Path>, size: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut c = Command::new("nbdcopy");
    match from_file {
        Some(f) => c.arg(f).arg(uri),
        None => c.arg(uri).arg("null:"),
    };
    let out = c
        .output()
        .context("running nbdcopy (apt-get install libnbd-bin)")?;
    if !out.status.success() {
        bail!(
            "nbdcopy failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(size as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64())
}

#[derive(Debug, Serialize)]
struct Row {
    setup: &'static str,
    workload: String,
    connections: u32,
    lamina_mib_s: f64,
    qemu_nbd_mib_s: f64,
    nbdkit_memory_mib_s: f64,
    lamina_iops: f64,
    qemu_nbd_iops: f64,
    nbdkit_memory_iops: f64,
    /// Lamina over qemu-nbd (IOPS for 4K, MiB/s otherwise).
    ratio: f64,
    /// Lamina over nbdkit memory, the ceiling (same measure).
    ratio_nbdkit_memory: f64,
}

impl Row {
    /// A row from (MiB/s, IOPS) of Lamina, qemu-nbd and nbdkit memory.
    fn new(
        setup: &'static str,
        workload: &str,
        connections: u32,
        iops: bool,
        [l, q, n]: [(f64, f64); 3],
    ) -> Row {
        let measure = |r: (f64, f64)| if iops { r.1 } else { r.0 };
        Row {
            setup,
            workload: workload.into(),
            connections,
            lamina_mib_s: l.0,
            qemu_nbd_mib_s: q.0,
            nbdkit_memory_mib_s: n.0,
            lamina_iops: l.1,
            qemu_nbd_iops: q.1,
            nbdkit_memory_iops: n.1,
            ratio: measure(l) / measure(q).max(1e-9),
            ratio_nbdkit_memory: measure(l) / measure(n).max(1e-9),
        }
    }
}

/// Report of `bench nbd`.
#[derive(Debug, Serialize)]
pub struct NbdReport {
    image_bytes: u64,
    seconds_per_run: u64,
    qemu_nbd_version: String,
    nbdkit_version: String,
    rows: Vec<Row>,
    /// Peak RSS of `lamina serve` on a 10 GiB disk after random I/O over it.
    lamina_rss_10g_bytes: u64,
    /// Same for qemu-nbd on the equivalent qcow2 chain.
    qemu_nbd_rss_10g_bytes: u64,
}

/// A raw image of `size` bytes: mixed data with some holes, like a used disk.
fn make_raw(path: &Path, size: u64, data_fraction: f64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut rng = Rng::new(11);
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        let take = (rng.next() % 1000) as f64 / 1000.0 < data_fraction;
        if take {
            for c in buf.chunks_mut(8) {
                let v = rng.next().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
            let n = (size - pos).min(buf.len() as u64) as usize;
            f.write_all_at(&buf[..n], pos)?;
        }
        pos += buf.len() as u64;
    }
    f.sync_all()?;
    Ok(())
}

struct Setup {
    name: &'static str,
    lamina: Running,
    qemu: Running,
    nbdkit: Running,
}

impl Setup {
    /// The servers in table order: Lamina, qemu-nbd, nbdkit memory.
    fn servers(&self) -> [&Running; 3] {
        [&self.lamina, &self.qemu, &self.nbdkit]
    }
}

/// Runs `f` on each server of `setup` in turn.
fn each<T: Copy + Default>(
    setup: &Setup,
    mut f: impl FnMut(&Running) -> anyhow::Result<T>,
) -> anyhow::Result<[T; 3]> {
    let mut out = [T::default(); 3];
    for (o, srv) in out.iter_mut().zip(setup.servers()) {
        *o = f(srv)?;
    }
    Ok(out)
}

fn compare(
    setup: &Setup,
    image: &Path,
    size: u64,
    seconds: u64,
    rows: &mut Vec<Row>,
    out: &Out,
    scratch: &Path,
) -> anyhow::Result<()> {
    // The RAM disk gets the same image; then warm all: one full
    // sequential read.
    out.summary(&format!("{}: warming up…", setup.name));
    nbdcopy(&setup.nbdkit.uri, Some(image), size)?;
    each(setup, |s| nbdcopy(&s.uri, None, size))?;
    for jobs in [1u32, 4] {
        for w in WORKLOADS {
            out.summary(&format!("{}: {} × {jobs}…", setup.name, w.name));
            let r = each(setup, |s| fio(&s.uri, w, jobs, seconds))?;
            rows.push(Row::new(setup.name, w.name, jobs, w.bs == "4k", r));
        }
    }
    let src = scratch.join("nbdcopy-src.raw");
    make_raw(&src, size, 1.0)?;
    let r = each(setup, |s| Ok((nbdcopy(&s.uri, None, size)?, 0.0)))?;
    rows.push(Row::new(setup.name, "nbdcopy read", 4, false, r));
    let r = each(setup, |s| Ok((nbdcopy(&s.uri, Some(&src), size)?, 0.0)))?;
    rows.push(Row::new(setup.name, "nbdcopy write", 4, false, r));
    let _ = std::fs::remove_file(&src);
    Ok(())
}

/// Runs the NBD benchmark in `work`.
pub fn run(
    lamina: &Path,
    work: &Path,
    size: u64,
    seconds: u64,
    out: &Out,
) -> anyhow::Result<NbdReport> {
    let qemu_nbd_version =
        version_line("qemu-nbd").context("qemu-nbd not found (apt-get install qemu-utils)")?;
    let nbdkit_version =
        version_line("nbdkit").context("nbdkit not found (apt-get install nbdkit)")?;
    let lam = |args: &[&str], store: &Path| -> anyhow::Result<()> {
        run_ok(
            Command::new(lamina)
                .arg("--store")
                .arg(store)
                .arg("--quiet")
                .args(args),
            "lamina",
        )
    };
    let img = |args: &[&str]| run_ok(Command::new("qemu-img").args(args), "qemu-img");
    out.summary(&format!("preparing a {} image…", bytes(size)));
    let raw = work.join("base.raw");
    make_raw(&raw, size, 0.85)?;
    let p = |n: &str| work.join(n);
    let s = |p: &PathBuf| p.to_str().unwrap_or_default().to_owned();
    // Setup 1: a standalone qcow2, one copy each.
    img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &s(&raw),
        &s(&p("file-l.qcow2")),
    ])?;
    std::fs::copy(p("file-l.qcow2"), p("file-q.qcow2"))?;
    // Setup 2: store disk vs qcow2 chain.
    let store = p("store");
    lam(&["init"], &store)?;
    // Layer `layer` imported from `raw` with disk `disk` over it, and the
    // equivalent qcow2 chain `PREFIX-base.qcow2` <- `PREFIX-top.qcow2`.
    let disk_and_chain = |layer: &str, disk: &str, raw: &PathBuf, prefix: &str| {
        lam(
            &["layer", "create", layer, "--kind", "os", "--format", "disk"],
            &store,
        )?;
        lam(&["layer", "import", layer, &s(raw)], &store)?;
        lam(&["disk", "create", disk, "--base", layer], &store)?;
        let base = format!("{prefix}-base.qcow2");
        let top = p(&format!("{prefix}-top.qcow2"));
        img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &s(raw),
            &s(&p(&base)),
        ])?;
        img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            &base,
            "-F",
            "qcow2",
            &s(&top),
        ])?;
        anyhow::Ok(top)
    };
    let chain_top = disk_and_chain("base", "vm", &raw, "chain")?;
    let mut rows = Vec::new();
    for (name, lamina_args, qemu_image) in [
        (
            "qcow2 file",
            vec!["--file".to_owned(), s(&p("file-l.qcow2"))],
            p("file-q.qcow2"),
        ),
        ("store disk", vec![], chain_top),
    ] {
        let ls = p("lamina.sock");
        let qs = p("qemu.sock");
        let args: Vec<&str> = lamina_args.iter().map(String::as_str).collect();
        let mut lamina_srv = lamina_serve(lamina, &store, &args, &ls)?;
        let export = if args.is_empty() { "vm" } else { "" };
        lamina_srv.uri = format!("nbd+unix:///{export}?socket={}", ls.display());
        let mut qemu_srv = qemu_nbd(&qemu_image, &qs)?;
        qemu_srv.uri = format!("nbd+unix:///?socket={}", qs.display());
        let setup = Setup {
            name,
            lamina: lamina_srv,
            qemu: qemu_srv,
            nbdkit: nbdkit_memory(size, &p("nbdkit.sock"))?,
        };
        compare(&setup, &raw, size, seconds, &mut rows, out, work)?;
    }
    // Memory on a 10 GiB disk after random I/O across it.
    out.summary("measuring memory on a 10 GiB disk…");
    let big = p("big.raw");
    make_raw(&big, 10 << 30, 0.1)?;
    let big_top = disk_and_chain("big", "big", &big, "big")?;
    let _ = std::fs::remove_file(&big);
    let ls = p("lamina-big.sock");
    let qs = p("qemu-big.sock");
    let mut l = lamina_serve(lamina, &store, &[], &ls)?;
    l.uri = format!("nbd+unix:///big?socket={}", ls.display());
    let mut q = qemu_nbd(&big_top, &qs)?;
    q.uri = format!("nbd+unix:///?socket={}", qs.display());
    for srv in [&l, &q] {
        for w in [WORKLOADS[2], WORKLOADS[3], WORKLOADS[1]] {
            fio(&srv.uri, w, 4, seconds.min(5))?;
        }
    }
    Ok(NbdReport {
        image_bytes: size,
        seconds_per_run: seconds,
        qemu_nbd_version,
        nbdkit_version,
        rows,
        lamina_rss_10g_bytes: l.peak_rss(),
        qemu_nbd_rss_10g_bytes: q.peak_rss(),
    })
}

/// Text form of the report.
pub fn render(r: &NbdReport) -> String {
    let mut s = format!(
        "{} ; {} ; {} image, {} s per run\n{:<12} {:<20} {:>4} {:>12} {:>12} {:>12} {:>7} {:>7}\n",
        r.qemu_nbd_version,
        r.nbdkit_version,
        bytes(r.image_bytes),
        r.seconds_per_run,
        "setup",
        "workload",
        "conn",
        "lamina",
        "qemu-nbd",
        "nbdkit-mem",
        "/qemu",
        "/nbdkit"
    );
    for row in &r.rows {
        let fmt = |mib: f64, iops: f64| {
            if row.workload.contains("4K") {
                format!("{iops:>7.0} IOPS")
            } else {
                format!("{mib:>7.0} MiB/s")
            }
        };
        s.push_str(&format!(
            "{:<12} {:<20} {:>4} {:>12} {:>12} {:>12} {:>6.2}x {:>6.2}x\n",
            row.setup,
            row.workload,
            row.connections,
            fmt(row.lamina_mib_s, row.lamina_iops),
            fmt(row.qemu_nbd_mib_s, row.qemu_nbd_iops),
            fmt(row.nbdkit_memory_mib_s, row.nbdkit_memory_iops),
            row.ratio,
            row.ratio_nbdkit_memory
        ));
    }
    s.push_str(&format!(
        "peak RSS on a 10 GiB disk: lamina {}, qemu-nbd {}\n",
        bytes(r.lamina_rss_10g_bytes),
        bytes(r.qemu_nbd_rss_10g_bytes)
    ));
    s
}

/// The first line `TOOL --version` prints, if the tool runs.
fn version_line(tool: &str) -> Option<String> {
    let out = Command::new(tool).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned)
}
