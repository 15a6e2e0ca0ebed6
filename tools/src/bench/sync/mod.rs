//! `lamina bench sync`: Lamina's check-in and two-way sync beside rsync and
//! unison, on the same data, over loopback inside a network namespace —
//! once with `lo` limited by tbf (`--rate`, 100 Mbit/s by default) and once
//! unlimited.
//!
//! * **disk**: an image (`--size`, a used-disk mix of holes, zeros, text
//!   and random data) checked out on a laptop store; 1 % of its 64 KiB
//!   clusters rewritten with random data through `lamina serve` (so the
//!   block map sees them). Lamina: `disk commit` + `push`. rsync: the same
//!   writes to a raw copy, then `rsync --inplace --no-whole-file` to an
//!   rsync daemon holding the original.
//! * **tree**: `--files` small files in 1 000 directories; 1 % changed (half
//!   rewritten, half by an insert in the middle). Lamina, as a laptop uses
//!   it: the changes are made in a mounted composition (so they land in its
//!   upper), and the check-in is `commit` (which reads only the upper) +
//!   `push`. **tree-scan**: another 1 % changed in a plain working copy, and
//!   the check-in is `layer import` (every file stat'ed, unchanged ones
//!   skipped by the import cache) + `push`. rsync: `rsync -a
//!   --no-whole-file` to the daemon, both rounds.
//! * **two-way**: the tree again; the server side and the laptop each change
//!   1 % of different files (the laptop through its mount). Lamina: the
//!   laptop's `commit` + `sync` (the admin's `layer import` on the server
//!   happened before). unison 2.52: one run between the two replicas over
//!   its socket protocol.
//!
//! Every run starts with the page cache dropped. Wire bytes are the
//! namespace's `lo` transmit counter (every packet, TLS and TCP included);
//! disk reads are `/proc/PID/io` `read_bytes` of the client process and of
//! the Lamina server, and the machine's `/proc/diskstats` sectors read for
//! the whole run (the rsync daemon forks per connection, so its side is the
//! total minus the client). The physical bound is the changed bytes over
//! the link rate.

mod measure;
mod scenarios;

pub(super) use scenarios::LaminaSide;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::data::make_image;
use super::{run_ok, stdout_of};
use crate::output::bytes;
use scenarios::{disk, make_small_tree, tree, two_way};

/// One measured run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Run {
    /// Wall time, seconds.
    pub secs: f64,
    /// Bytes sent on `lo` (both directions).
    pub wire_bytes: u64,
    /// Bytes the client read from storage.
    pub client_read_bytes: u64,
    /// Bytes the server side read from storage.
    pub server_read_bytes: u64,
}

/// One scenario: Lamina beside its peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// disk, tree, two-way.
    pub data: String,
    /// Link: a rate, or unlimited.
    pub link: String,
    /// Bytes that changed.
    pub changed_bytes: u64,
    /// Lamina.
    pub lamina: Run,
    /// The peer (rsync or unison).
    pub peer_name: String,
    /// The peer.
    pub peer: Run,
    /// Peer time over Lamina's.
    pub speedup: f64,
    /// Changed bytes over the link rate, seconds (limited links only).
    pub bound_secs: Option<f64>,
}

/// The whole benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncReport {
    /// Versions of the peers.
    pub peers: Vec<String>,
    /// Data set sizes.
    pub image_bytes: u64,
    /// Files in the tree.
    pub files: u64,
    /// Bytes of the tree.
    pub tree_bytes: u64,
    /// Rows.
    pub rows: Vec<Row>,
}

/// Settings passed to the run inside the namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inner {
    pub work: PathBuf,
    pub link: String,
    pub rate_bits: Option<u64>,
    pub image: PathBuf,
    pub tree: PathBuf,
    pub files: u64,
}

fn tool_version(cmd: &str, arg: &str) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .arg(arg)
        .output()
        .with_context(|| format!("{cmd} not found (Debian: apt-get install {cmd})"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok(text.lines().next().unwrap_or("").trim().to_owned())
}

/// Parses `100mbit`, `1gbit`, `500kbit` into bits per second.
pub fn parse_rate(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1_000_000_000)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1_000_000)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1_000)
    } else {
        bail!("bad rate `{s}`: expected e.g. 100mbit or 1gbit")
    };
    Ok(num
        .parse::<u64>()
        .with_context(|| format!("bad rate `{s}`"))?
        * mult)
}

/// The measured part, run inside the namespace; prints its rows as JSON.
pub fn inner(exe: &Path, spec: &str) -> anyhow::Result<()> {
    let inner: Inner = serde_json::from_str(spec).context("bad --inner spec")?;
    let mut rows = vec![disk(&inner, exe)?];
    rows.extend(tree(&inner, exe)?);
    rows.push(two_way(&inner, exe)?);
    println!("{}", serde_json::to_string(&rows)?);
    Ok(())
}

/// A network namespace with `lo` up, limited by tbf when `rate` is given;
/// deleted on drop.
pub(super) struct Netns(pub(super) String);

impl Netns {
    pub(super) fn new(name: String, rate: Option<&str>) -> anyhow::Result<Netns> {
        run_ok(
            Command::new("ip").args(["netns", "add", &name]),
            "ip netns add",
        )?;
        let ns = Netns(name);
        let exec = |args: &[&str]| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.0]).args(args);
            run_ok(&mut c, &args.join(" "))
        };
        match rate {
            Some(r) => {
                // tbf drops everything at lo's default 64 KiB MTU.
                exec(&["ip", "link", "set", "lo", "mtu", "1500", "up"])?;
                exec(&[
                    "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", r, "burst", "256kb",
                    "latency", "100ms",
                ])?;
            }
            None => exec(&["ip", "link", "set", "lo", "up"])?,
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// Generates the data, runs both links, and returns the report.
pub fn run(
    exe: &Path,
    work: &Path,
    size: u64,
    files: u64,
    rate: &str,
    note: &dyn Fn(&str),
) -> anyhow::Result<SyncReport> {
    if !nix::unistd::geteuid().is_root() {
        bail!("lamina bench sync needs root (network namespaces, tc, dropping the page cache)");
    }
    let rate_bits = parse_rate(rate)?;
    let peers = vec![
        tool_version("rsync", "--version")?,
        tool_version("unison", "-version")?,
    ];
    tool_version("tc", "-V")?;
    let image = work.join("data/disk.raw");
    let tree = work.join("data/tree");
    fs::create_dir_all(work.join("data"))?;
    note(&format!(
        "generating a {} image and {files} files…",
        bytes(size)
    ));
    let image_bytes = make_image(&image, size, 5)?;
    let tree_bytes = make_small_tree(&tree, files, 9)?;
    let mut rows = Vec::new();
    for (link, r) in [
        (rate.to_owned(), Some(rate)),
        ("unlimited".to_owned(), None),
    ] {
        note(&format!("link {link}…"));
        let ns = Netns::new(
            format!("lamina-bench-{}-{}", std::process::id(), rows.len()),
            r,
        )?;
        let spec = Inner {
            work: work.to_owned(),
            link: link.clone(),
            rate_bits: r.map(|_| rate_bits),
            image: image.clone(),
            tree: tree.clone(),
            files,
        };
        let out = stdout_of(
            Command::new("ip")
                .args(["netns", "exec", &ns.0])
                .arg(exe)
                .args(["bench", "sync", "--inner", &serde_json::to_string(&spec)?]),
            "the benchmark inside the namespace",
        )?;
        let got: Vec<Row> = serde_json::from_str(out.trim()).context("the inner run's report")?;
        rows.extend(got);
    }
    Ok(SyncReport {
        peers,
        image_bytes,
        files,
        tree_bytes,
        rows,
    })
}

/// The table.
pub fn render(r: &SyncReport) -> String {
    let mut s = format!(
        "{}\n{}\ndisk {}; tree {} files, {}\n",
        r.peers[0],
        r.peers.get(1).map_or("", String::as_str),
        bytes(r.image_bytes),
        r.files,
        bytes(r.tree_bytes)
    );
    s.push_str(&format!(
        "{:<9} {:<10} {:>10} {:>9} {:>9} {:>7} {:>11} {:>11} {:>11} {:>11} {:>9}\n",
        "data",
        "link",
        "changed",
        "lamina s",
        "peer s",
        "ratio",
        "lamina wire",
        "peer wire",
        "lamina read",
        "peer read",
        "bound s"
    ));
    for row in &r.rows {
        s.push_str(&format!(
            "{:<9} {:<10} {:>10} {:>9.2} {:>9.2} {:>6.1}x {:>11} {:>11} {:>11} {:>11} {:>9}\n",
            row.data,
            row.link,
            bytes(row.changed_bytes),
            row.lamina.secs,
            row.peer.secs,
            row.speedup,
            bytes(row.lamina.wire_bytes),
            bytes(row.peer.wire_bytes),
            bytes(row.lamina.client_read_bytes + row.lamina.server_read_bytes),
            bytes(row.peer.client_read_bytes + row.peer.server_read_bytes),
            row.bound_secs.map_or("-".into(), |b| format!("{b:.2}")),
        ));
    }
    s.push_str("(ratio: peer time over Lamina's; wire: bytes on lo; read: bytes read from storage, client + server; bound: changed bytes over the link rate)\n");
    s
}
