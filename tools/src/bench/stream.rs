//! `lamina bench stream`: the fixture guest booted from a golden disk of
//! `--size` (its 64 MiB file system, then random data no boot reads) over a
//! tbf-limited loopback inside a network namespace, two ways in the same
//! run:
//!
//! * **streamed**: `disk create --base origin:LAYER --stream` (manifests
//!   only), `lamina serve` (prefetch on), QEMU: time from the create to the
//!   guest's first serial marker (`LAMINA-GUEST-BOOTED`), and what had been
//!   fetched by then; then the prefetcher's fill rate over 20 s while the
//!   guest runs, beside the link rate; then a second boot (served again,
//!   from the cache).
//! * **pull, then boot**: a second laptop store `pull`s the layer whole,
//!   creates a disk over it and boots: time from the pull to the marker.
//!
//! The physical bound of the pull is the image's data bytes ÷ the link
//! rate; the streamed boot's is the bytes it fetched ÷ the link rate plus
//! the boot's own time (TCG here).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::sync::{LaminaSide, Netns};
use super::vm::wait_marker;
use super::{run_ok, stdout_of, Proc};
use crate::output::bytes;

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;
/// How long the fill rate is measured while the guest runs.
const FILL_WINDOW: Duration = Duration::from_secs(20);
const LAYER: &str = "os/golden";

#[derive(Debug, Serialize, Deserialize)]
struct Inner {
    work: PathBuf,
    guest: PathBuf,
    image: PathBuf,
    rate_bits: u64,
}

/// What was measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct StreamReport {
    /// The link, e.g. `100mbit`.
    pub link: String,
    /// Link rate, bytes/s.
    pub link_bytes_s: f64,
    /// The golden disk's size.
    pub image_bytes: u64,
    /// Of it, clusters holding data (what a pull moves), bytes.
    pub data_bytes: u64,
    /// `disk create --stream`: manifests fetched, s.
    pub stream_create_s: f64,
    /// QEMU start to the first marker, streamed, s.
    pub streamed_boot_s: f64,
    /// Create plus boot.
    pub streamed_total_s: f64,
    /// Cached when the marker appeared, bytes.
    pub fetched_at_boot_bytes: u64,
    /// The prefetcher's fill rate while the guest ran, bytes/s.
    pub prefetch_bytes_s: f64,
    /// Second boot, from the cache: QEMU start to the marker, s.
    pub cached_boot_s: f64,
    /// `pull` of the whole layer, s.
    pub pull_s: f64,
    /// Then the boot, s.
    pub pulled_boot_s: f64,
    /// Pull plus boot.
    pub pull_total_s: f64,
    /// The pull's bound: data bytes ÷ link rate, s.
    pub pull_bound_s: f64,
    /// Pull-then-boot over streamed (higher is better).
    pub speedup: f64,
}

/// Boots the guest from `drive`, its console in `log`; returns the child
/// and the seconds to the first marker.
fn boot(guest: &Path, drive: &str, log: &Path) -> anyhow::Result<(Proc, f64)> {
    let _ = std::fs::remove_file(log);
    let t0 = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.img"))
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!("file={drive},format=raw,if=virtio"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting QEMU")?;
    let child = Proc(child);
    let s = wait_marker(log, "LAMINA-GUEST-BOOTED", t0, Duration::from_secs(600))?;
    Ok((child, s))
}

/// `lamina serve` on a Unix socket of `store`; returns it and the socket.
fn serve(side: &LaminaSide, store: &Path, sock: &Path) -> anyhow::Result<Proc> {
    let _ = std::fs::remove_file(sock);
    let child = side
        .cmd(store)
        .args(["serve", "--socket"])
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting lamina serve")?;
    let t0 = Instant::now();
    while !sock.exists() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("lamina serve did not listen on {}", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Proc(child))
}

fn local_bytes(side: &LaminaSide, store: &Path, disk: &str) -> anyhow::Result<u64> {
    let v: serde_json::Value =
        serde_json::from_str(&side.ok(store, &["--json", "disk", "show", disk])?)?;
    Ok(v["stream"]["local_clusters"].as_u64().unwrap_or(0) * CLUSTER)
}

fn uri(sock: &Path, disk: &str) -> String {
    format!("nbd+unix:///{disk}?socket={}", sock.display())
}

/// The measured part, inside the namespace; prints the report as JSON.
pub fn inner(exe: &Path, spec: &str) -> anyhow::Result<()> {
    let inner: Inner = serde_json::from_str(spec).context("bad --inner spec")?;
    let side = LaminaSide::new(exe, &inner.work)?;
    side.ok(
        &side.central,
        &["layer", "create", LAYER, "--kind", "os", "--format", "disk"],
    )?;
    let imported: serde_json::Value = serde_json::from_str(&side.ok(
        &side.central,
        &[
            "--json",
            "layer",
            "import",
            LAYER,
            &inner.image.to_string_lossy(),
        ],
    )?)?;
    let image_bytes = std::fs::metadata(&inner.image)?.len();
    // Plain bytes of the chunks stored: the disk's data, holes left out.
    let data_bytes = imported["stats"]["bytes_new"]
        .as_u64()
        .context("layer import did not report bytes_new")?;
    let link = inner.rate_bits as f64 / 8.0;

    // Streamed.
    let t = Instant::now();
    side.ok(
        &side.laptop,
        &[
            "disk",
            "create",
            "s",
            "--base",
            &format!("origin:{LAYER}"),
            "--stream",
        ],
    )?;
    let stream_create_s = t.elapsed().as_secs_f64();
    let sock = inner.work.join("laptop.sock");
    let server = serve(&side, &side.laptop, &sock)?;
    let (vm, streamed_boot_s) = boot(&inner.guest, &uri(&sock, "s"), &inner.work.join("s1.log"))?;
    let fetched_at_boot_bytes = local_bytes(&side, &side.laptop, "s")?;
    let t = Instant::now();
    let before = fetched_at_boot_bytes;
    std::thread::sleep(FILL_WINDOW);
    let after = local_bytes(&side, &side.laptop, "s")?;
    let prefetch_bytes_s = after.saturating_sub(before) as f64 / t.elapsed().as_secs_f64();
    drop(vm);
    drop(server);
    let server = serve(&side, &side.laptop, &sock)?;
    let (vm, cached_boot_s) = boot(&inner.guest, &uri(&sock, "s"), &inner.work.join("s2.log"))?;
    drop(vm);
    drop(server);

    // Pull, then boot, on a second laptop.
    let laptop2 = inner.work.join("laptop2");
    side.ok(&laptop2, &["init"])?;
    run_ok(
        side.cmd(&laptop2)
            .args(["remote", "add", "origin", &side.url, "--token-file"])
            .arg(inner.work.join("alice.token"))
            .arg("--ca")
            .arg(inner.work.join("certs/ca.pem")),
        "lamina remote add",
    )?;
    let t = Instant::now();
    side.ok(&laptop2, &["pull", "origin", LAYER])?;
    let pull_s = t.elapsed().as_secs_f64();
    side.ok(&laptop2, &["disk", "create", "p", "--base", LAYER])?;
    let sock2 = inner.work.join("laptop2.sock");
    let server = serve(&side, &laptop2, &sock2)?;
    let (vm, pulled_boot_s) = boot(&inner.guest, &uri(&sock2, "p"), &inner.work.join("p.log"))?;
    drop(vm);
    drop(server);

    let streamed_total_s = stream_create_s + streamed_boot_s;
    let pull_total_s = pull_s + pulled_boot_s;
    let report = StreamReport {
        link: format!("{} Mbit/s", inner.rate_bits / 1_000_000),
        link_bytes_s: link,
        image_bytes,
        data_bytes,
        stream_create_s,
        streamed_boot_s,
        streamed_total_s,
        fetched_at_boot_bytes,
        prefetch_bytes_s,
        cached_boot_s,
        pull_s,
        pulled_boot_s,
        pull_total_s,
        pull_bound_s: data_bytes as f64 / link,
        speedup: pull_total_s / streamed_total_s,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Builds the golden image, runs the namespace, and returns the report.
pub fn run(
    exe: &Path,
    guest: &Path,
    work: &Path,
    size: u64,
    rate: &str,
    note: &dyn Fn(&str),
) -> anyhow::Result<StreamReport> {
    if !nix::unistd::geteuid().is_root() {
        bail!("lamina bench stream needs root (a network namespace and tc)");
    }
    let fs = guest.join("disk.raw");
    let fs_len = std::fs::metadata(&fs)
        .with_context(|| {
            format!(
                "{}: build the guest with fixtures/guest/build.sh",
                fs.display()
            )
        })?
        .len();
    if size < fs_len + 64 * MIB {
        bail!(
            "--size must be at least {} (the guest's file system and 64 MiB)",
            bytes(fs_len + 64 * MIB)
        );
    }
    note(&format!("generating a {} golden disk…", bytes(size)));
    let image = work.join("golden.raw");
    std::fs::copy(&fs, &image)?;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&image)?;
        let mut rng = super::data::Rng::new(17);
        let mut buf = vec![0u8; MIB as usize];
        let mut left = size - fs_len;
        while left > 0 {
            for w in buf.chunks_exact_mut(8) {
                w.copy_from_slice(&rng.next().to_le_bytes());
            }
            let n = left.min(MIB) as usize;
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
    }
    let rate_bits = super::sync::parse_rate(rate)?;
    let ns = Netns::new(
        format!("lamina-bench-stream-{}", std::process::id()),
        Some(rate),
    )?;
    note(&format!("booting over {rate}…"));
    let spec = Inner {
        work: work.to_owned(),
        guest: guest.to_owned(),
        image,
        rate_bits,
    };
    let out = stdout_of(
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(exe)
            .args(["bench", "stream", "--inner", &serde_json::to_string(&spec)?]),
        "the benchmark inside the namespace",
    )?;
    serde_json::from_str(out.trim()).context("the inner run's report")
}

/// The table.
pub fn render(r: &StreamReport) -> String {
    let mb = |b: f64| b / 1e6;
    format!(
        "golden disk {} ({} of data), link {} ({:.1} MB/s)\n\
         streamed:  create {:.2} s + boot to first marker {:.2} s = {:.2} s; fetched by then {}\n\
         pull+boot: pull {:.2} s (bound {:.2} s) + boot {:.2} s = {:.2} s\n\
         first boot {:.1}x faster streamed\n\
         second boot from the cache: {:.2} s\n\
         prefetch while the guest runs: {:.1} MB/s = {:.2}x the link\n",
        bytes(r.image_bytes),
        bytes(r.data_bytes),
        r.link,
        mb(r.link_bytes_s),
        r.stream_create_s,
        r.streamed_boot_s,
        r.streamed_total_s,
        bytes(r.fetched_at_boot_bytes),
        r.pull_s,
        r.pull_bound_s,
        r.pulled_boot_s,
        r.pull_total_s,
        r.speedup,
        r.cached_boot_s,
        mb(r.prefetch_bytes_s),
        r.prefetch_bytes_s / r.link_bytes_s,
    )
}
