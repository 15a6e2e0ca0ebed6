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
//!   rewritten, half by an insert in the middle). Lamina: `layer import`
//!   (unchanged files skipped by the import cache) + `push`. rsync: `rsync
//!   -a --no-whole-file` to the daemon.
//! * **two-way**: the tree again; the server side and the laptop each change
//!   1 % of different files. Lamina: the laptop's `layer import` + `sync`
//!   (the admin's `layer import` on the server happened before). unison
//!   2.52: one run between the two replicas over its socket protocol.
//!
//! Every run starts with the page cache dropped. Wire bytes are the
//! namespace's `lo` transmit counter (every packet, TLS and TCP included);
//! disk reads are `/proc/PID/io` `read_bytes` of the client process and of
//! the Lamina server, and the machine's `/proc/diskstats` sectors read for
//! the whole run (the rsync daemon forks per connection, so its side is the
//! total minus the client). The physical bound is the changed bytes over
//! the link rate.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::data::{make_image, Rng, Text};
use super::{run_ok, stdout_of};
use crate::output::bytes;

const CLUSTER: u64 = 64 << 10;

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

/// Writes `files` small text-like files in 1 000 directories; returns bytes.
fn make_small_tree(root: &Path, files: u64, seed: u64) -> anyhow::Result<u64> {
    let mut rng = Rng::new(seed);
    let text = Text::new(&mut rng);
    let mut total = 0;
    let mut buf = vec![0u8; 64 << 10];
    for i in 0..files {
        let dir = root.join(format!("d{:02}/s{:03}", i % 10, (i / 10) % 100));
        if i < 1000 {
            fs::create_dir_all(&dir)?;
        }
        let len =
            (512.0 * (64.0f64).powf((rng.next() >> 11) as f64 / (1u64 << 53) as f64)) as usize;
        text.fill(&mut rng, &mut buf[..len]);
        fs::write(dir.join(format!("f{i:06}.txt")), &buf[..len])?;
        total += len as u64;
    }
    Ok(total)
}

/// Changes 1 % of the tree's files, those with `i % 100 == pick`: half
/// rewritten, half by an insert in the middle. Returns the bytes written.
fn change_tree(root: &Path, files: u64, pick: u64, seed: u64) -> anyhow::Result<u64> {
    let mut rng = Rng::new(seed);
    let text = Text::new(&mut rng);
    let mut changed = 0;
    for i in (0..files).filter(|i| i % 100 == pick) {
        let p = root.join(format!("d{:02}/s{:03}/f{i:06}.txt", i % 10, (i / 10) % 100));
        let mut data = fs::read(&p).with_context(|| format!("read {}", p.display()))?;
        if (i / 100) % 2 == 0 {
            text.fill(&mut rng, &mut data);
        } else {
            let mut ins = vec![0u8; 100];
            text.fill(&mut rng, &mut ins);
            let mid = data.len() / 2;
            data.splice(mid..mid, ins);
        }
        fs::write(&p, &data)?;
        changed += data.len() as u64;
    }
    Ok(changed)
}

/// The clusters rewritten in the disk scenario, and their data's seed.
fn changed_clusters(image_bytes: u64) -> Vec<u64> {
    let clusters = image_bytes / CLUSTER;
    let mut rng = Rng::new(77);
    let mut set = BTreeSet::new();
    while (set.len() as u64) < (clusters / 100).max(1) {
        set.insert(rng.next() % clusters);
    }
    set.into_iter().collect()
}

fn lo_tx() -> anyhow::Result<u64> {
    Ok(fs::read_to_string("/sys/class/net/lo/statistics/tx_bytes")?
        .trim()
        .parse()?)
}

/// Sectors read from every whole disk, in bytes.
fn disk_reads() -> u64 {
    let Ok(text) = fs::read_to_string("/proc/diskstats") else {
        return 0;
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f.get(2)?;
            // Whole devices only (partitions would count twice).
            let whole = !name.chars().last()?.is_ascii_digit()
                || name.starts_with("nvme") && !name.contains('p');
            whole.then(|| f.get(5)?.parse::<u64>().ok()).flatten()
        })
        .sum::<u64>()
        * 512
}

fn proc_read_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("read_bytes: ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

fn drop_caches() {
    // Best effort: without it the runs read from the page cache alike.
    let _ = Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3\n");
}

/// Runs `cmd` to completion; returns wall time and the bytes it read from
/// storage (read from /proc before the exited child is reaped).
fn measured(cmd: &mut Command, what: &str) -> anyhow::Result<(f64, u64)> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {what}"))?;
    let pid = child.id();
    waitid(
        Id::Pid(nix::unistd::Pid::from_raw(pid as i32)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let read = proc_read_bytes(pid);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((secs, read))
}

/// One measured step of a scenario: drop caches, run `steps`, count.
fn step(server_pid: Option<u32>, steps: &mut [(&mut Command, &str)]) -> anyhow::Result<Run> {
    drop_caches();
    let (tx0, d0) = (lo_tx()?, disk_reads());
    let s0 = server_pid.map_or(0, proc_read_bytes);
    let mut run = Run::default();
    for (cmd, what) in steps.iter_mut() {
        let (secs, read) = measured(cmd, what)?;
        run.secs += secs;
        run.client_read_bytes += read;
    }
    run.wire_bytes = lo_tx()? - tx0;
    let total = disk_reads().saturating_sub(d0);
    run.server_read_bytes = match server_pid {
        Some(p) => proc_read_bytes(p).saturating_sub(s0),
        None => total.saturating_sub(run.client_read_bytes),
    };
    Ok(run)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Lamina side: a central store with its server, and a laptop store.
struct LaminaSide {
    exe: PathBuf,
    central: PathBuf,
    laptop: PathBuf,
    server: Option<Proc>,
}

impl LaminaSide {
    fn cmd(&self, store: &Path) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--store").arg(store).arg("--quiet");
        c.env_remove("LAMINA_STORE").env("LAMINA_HOST", "laptop");
        c
    }

    fn ok(&self, store: &Path, args: &[&str]) -> anyhow::Result<String> {
        stdout_of(
            self.cmd(store).args(args),
            &format!("lamina {}", args.join(" ")),
        )
    }

    fn new(exe: &Path, work: &Path) -> anyhow::Result<LaminaSide> {
        let central = work.join("central");
        let laptop = work.join("laptop");
        let s = LaminaSide {
            exe: exe.to_owned(),
            central,
            laptop,
            server: None,
        };
        let certs = work.join("certs");
        fs::create_dir_all(&certs)?;
        for args in [
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca",
            "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.csr -subj /CN=localhost",
        ] {
            run_ok(Command::new("openssl").current_dir(&certs).args(args.split(' ')), "openssl")?;
        }
        fs::write(certs.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n")?;
        run_ok(
            Command::new("openssl").current_dir(&certs).args(
                "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf"
                    .split(' '),
            ),
            "openssl",
        )?;
        s.ok(&s.central, &["init"])?;
        s.ok(&s.central, &["user", "add", "alice", "--admin"])?;
        let tok = s.ok(&s.central, &["token", "create", "alice"])?;
        fs::write(work.join("alice.token"), tok.trim())?;
        let mut server = s
            .cmd(&s.central)
            .args(["--json", "server", "--listen", "127.0.0.1:0", "--tls-cert"])
            .arg(certs.join("server.pem"))
            .arg("--tls-key")
            .arg(certs.join("server.key"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(server.stdout.take().context("server stdout")?).read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line).context("server did not start")?;
        let url = v["url"].as_str().context("server url")?.to_owned();
        let mut s = s;
        s.server = Some(Proc(server));
        s.ok(&s.laptop, &["init"])?;
        let token = work.join("alice.token");
        let ca = certs.join("ca.pem");
        run_ok(
            s.cmd(&s.laptop)
                .args(["remote", "add", "origin", &url, "--token-file"])
                .arg(&token)
                .arg("--ca")
                .arg(&ca),
            "lamina remote add",
        )?;
        Ok(s)
    }

    fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(|p| p.0.id())
    }
}

/// An rsync daemon serving `dir` as module `m` on a free port.
fn rsync_daemon(work: &Path, dir: &Path) -> anyhow::Result<(Proc, u16)> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let conf = work.join(format!("rsyncd-{port}.conf"));
    fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = root\ngid = root\n[m]\npath = {}\nread only = no\n",
            dir.display()
        ),
    )?;
    let child = Command::new("rsync")
        .args([
            "--daemon",
            "--no-detach",
            "--address",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--config",
        ])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the rsync daemon")?;
    wait_port(port)?;
    Ok((Proc(child), port))
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn row(data: &str, inner: &Inner, changed: u64, lamina: Run, peer_name: &str, peer: Run) -> Row {
    Row {
        data: data.into(),
        link: inner.link.clone(),
        changed_bytes: changed,
        speedup: peer.secs / lamina.secs.max(1e-9),
        bound_secs: inner.rate_bits.map(|r| changed as f64 * 8.0 / r as f64),
        lamina,
        peer_name: peer_name.into(),
        peer,
    }
}

/// Writes the changed clusters through NBD (so the disk's block map sees
/// them) with libnbd's Python binding.
fn write_clusters_nbd(uri: &str, clusters: &[u64]) -> anyhow::Result<()> {
    let script = r#"
import sys, nbd, random
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for line in sys.stdin:
    c = int(line)
    r = random.Random(1000003 + c)
    h.pwrite(r.randbytes(65536), c * 65536)
h.flush()
h.shutdown()
"#;
    // The data is generated the same way on both sides (Python's PRNG), so
    // the raw copy for rsync gets the same bytes (see `write_clusters_raw`).
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script, uri])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("/usr/bin/python3 with libnbd's nbd module (python3-libnbd)")?;
    {
        let mut stdin = child.stdin.take().context("stdin")?;
        for c in clusters {
            writeln!(stdin, "{c}")?;
        }
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "writing clusters over NBD: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The same writes to a raw file (Python's PRNG again, for the same bytes).
fn write_clusters_raw(path: &Path, clusters: &[u64]) -> anyhow::Result<()> {
    let script = r#"
import sys, random, os
fd = os.open(sys.argv[1], os.O_WRONLY)
for line in sys.stdin:
    c = int(line)
    r = random.Random(1000003 + c)
    os.pwrite(fd, r.randbytes(65536), c * 65536)
os.fsync(fd)
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(path)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        let mut stdin = child.stdin.take().context("stdin")?;
        for c in clusters {
            writeln!(stdin, "{c}")?;
        }
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("writing clusters: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (fa, fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let len = fa.metadata()?.len();
    if len != fb.metadata()?.len() {
        return Ok(false);
    }
    let mut ba = vec![0u8; 8 << 20];
    let mut bb = vec![0u8; 8 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(ba.len() as u64) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

fn disk(inner: &Inner, exe: &Path) -> anyhow::Result<Row> {
    let work = inner.work.join(format!("disk-{}", inner.link));
    fs::create_dir_all(&work)?;
    let l = LaminaSide::new(exe, &work)?;
    let image_bytes = fs::metadata(&inner.image)?.len();
    l.ok(
        &l.central,
        &[
            "layer", "create", "vm/disk", "--kind", "data", "--format", "disk",
        ],
    )?;
    l.ok(
        &l.central,
        &["layer", "import", "vm/disk", &inner.image.to_string_lossy()],
    )?;
    l.ok(&l.laptop, &["pull", "origin", "vm/disk"])?;
    l.ok(&l.laptop, &["disk", "create", "vm", "--base", "vm/disk"])?;
    let clusters = changed_clusters(image_bytes);
    let changed = clusters.len() as u64 * CLUSTER;
    {
        let sock = work.join("nbd.sock");
        let mut serve = l
            .cmd(&l.laptop)
            .args(["serve", "--socket"])
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(serve.stdout.take().context("serve stdout")?).read_line(&mut line)?;
        let _serve = Proc(serve);
        write_clusters_nbd(
            &format!("nbd+unix:///vm?socket={}", sock.display()),
            &clusters,
        )?;
    }
    let lamina = step(
        l.server_pid(),
        &mut [
            (
                l.cmd(&l.laptop).args(["disk", "commit", "vm"]),
                "lamina disk commit",
            ),
            (
                l.cmd(&l.laptop).args(["push", "origin", "vm/disk"]),
                "lamina push",
            ),
        ],
    )?;
    // rsync: the daemon holds the original, the laptop a changed raw copy.
    let srv = work.join("rsync-server");
    let cli = work.join("rsync-client");
    fs::create_dir_all(&srv)?;
    fs::create_dir_all(&cli)?;
    for d in [&srv, &cli] {
        run_ok(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&inner.image)
                .arg(d.join("disk.raw")),
            "cp",
        )?;
    }
    write_clusters_raw(&cli.join("disk.raw"), &clusters)?;
    // The copies were made within the same second: make the daemon's look
    // older, or rsync's quick check (size and mtime) would skip the file.
    run_ok(
        Command::new("touch").args(["-d", "2 days ago"]).arg(srv.join("disk.raw")),
        "touch",
    )?;
    let (_daemon, port) = rsync_daemon(&work, &srv)?;
    let dest = format!("rsync://127.0.0.1:{port}/m/disk.raw");
    let peer = step(
        None,
        &mut [(
            Command::new("rsync")
                .args(["--inplace", "--no-whole-file", "-t"])
                .arg(cli.join("disk.raw"))
                .arg(&dest),
            "rsync",
        )],
    )?;
    // Both ends hold the same disk.
    let back = work.join("back.raw");
    l.ok(
        &l.central,
        &["layer", "export", "vm/disk", &back.to_string_lossy()],
    )?;
    if !same_file(&back, &cli.join("disk.raw"))? || !same_file(&srv.join("disk.raw"), &back)? {
        bail!("the disk checked in differs from the disk rsync copied");
    }
    let _ = fs::remove_dir_all(&work);
    Ok(row("disk", inner, changed, lamina, "rsync", peer))
}

fn tree(inner: &Inner, exe: &Path) -> anyhow::Result<Row> {
    let work = inner.work.join(format!("tree-{}", inner.link));
    fs::create_dir_all(&work)?;
    let l = LaminaSide::new(exe, &work)?;
    l.ok(
        &l.central,
        &[
            "layer",
            "create",
            "user/alice/tree",
            "--kind",
            "data",
            "--format",
            "tree",
        ],
    )?;
    l.ok(
        &l.central,
        &[
            "layer",
            "import",
            "user/alice/tree",
            &inner.tree.to_string_lossy(),
        ],
    )?;
    l.ok(&l.laptop, &["pull", "origin", "user/alice/tree"])?;
    let mine = work.join("laptop-tree");
    run_ok(
        Command::new("cp").arg("-a").arg(&inner.tree).arg(&mine),
        "cp",
    )?;
    // The laptop's own import of its working tree fills its import cache
    // (as a real laptop's earlier check-ins did).
    l.ok(
        &l.laptop,
        &[
            "layer",
            "import",
            "user/alice/tree",
            &mine.to_string_lossy(),
        ],
    )?;
    l.ok(&l.laptop, &["push", "origin", "user/alice/tree"])?;
    let srv = work.join("rsync-server");
    run_ok(
        Command::new("cp").arg("-a").arg(&inner.tree).arg(&srv),
        "cp",
    )?;
    let changed = change_tree(&mine, inner.files, 7, 11)?;
    let lamina = step(
        l.server_pid(),
        &mut [
            (
                l.cmd(&l.laptop)
                    .args(["layer", "import", "user/alice/tree"])
                    .arg(&mine),
                "lamina layer import",
            ),
            (
                l.cmd(&l.laptop).args(["push", "origin", "user/alice/tree"]),
                "lamina push",
            ),
        ],
    )?;
    let (_daemon, port) = rsync_daemon(&work, &srv)?;
    let peer = step(
        None,
        &mut [(
            Command::new("rsync")
                .args(["-a", "--no-whole-file"])
                .arg(format!("{}/", mine.display()))
                .arg(format!("rsync://127.0.0.1:{port}/m/")),
            "rsync",
        )],
    )?;
    let diff = Command::new("diff")
        .args(["-rq"])
        .arg(&mine)
        .arg(&srv)
        .output()?;
    if !diff.status.success() {
        bail!(
            "rsync left the trees different: {}",
            String::from_utf8_lossy(&diff.stdout)
        );
    }
    let _ = fs::remove_dir_all(&work);
    Ok(row("tree", inner, changed, lamina, "rsync", peer))
}

fn two_way(inner: &Inner, exe: &Path) -> anyhow::Result<Row> {
    let work = inner.work.join(format!("twoway-{}", inner.link));
    fs::create_dir_all(&work)?;
    let l = LaminaSide::new(exe, &work)?;
    let layer = "user/alice/tree";
    l.ok(
        &l.central,
        &[
            "layer", "create", layer, "--kind", "data", "--format", "tree",
        ],
    )?;
    let server_tree = work.join("server-tree");
    let mine = work.join("laptop-tree");
    for d in [&server_tree, &mine] {
        run_ok(Command::new("cp").arg("-a").arg(&inner.tree).arg(d), "cp")?;
    }
    l.ok(
        &l.central,
        &["layer", "import", layer, &server_tree.to_string_lossy()],
    )?;
    l.ok(&l.laptop, &["pull", "origin", layer])?;
    l.ok(
        &l.laptop,
        &["layer", "import", layer, &mine.to_string_lossy()],
    )?;
    // unison's replicas, with archives from a first run.
    let ua = work.join("unison-a");
    let ub = work.join("unison-b");
    for d in [&ua, &ub] {
        run_ok(Command::new("cp").arg("-a").arg(&inner.tree).arg(d), "cp")?;
    }
    let port = {
        let s = std::net::TcpListener::bind("127.0.0.1:0")?;
        s.local_addr()?.port()
    };
    let home = work.join("unison-home");
    fs::create_dir_all(&home)?;
    let unison_server = Proc(
        Command::new("unison")
            .args(["-socket", &port.to_string()])
            .env("HOME", &home)
            .env("UNISON", home.join("server"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting unison -socket")?,
    );
    wait_port(port)?;
    let unison = |home: &Path| {
        let mut c = Command::new("unison");
        c.arg(&ua)
            .arg(format!("socket://127.0.0.1:{port}/{}", ub.display()))
            .args([
                "-batch",
                "-auto",
                "-silent",
                "-times",
                "-confirmbigdel=false",
            ])
            .env("HOME", home)
            .env("UNISON", home.join("client"));
        c
    };
    run_ok(&mut unison(&home), "unison (first run)")?;
    // Both sides change 1 % of different files.
    let mut changed = change_tree(&server_tree, inner.files, 3, 21)?;
    changed += change_tree(&mine, inner.files, 5, 31)?;
    change_tree(&ub, inner.files, 3, 21)?;
    change_tree(&ua, inner.files, 5, 31)?;
    l.ok(
        &l.central,
        &["layer", "import", layer, &server_tree.to_string_lossy()],
    )?;
    let lamina = step(
        l.server_pid(),
        &mut [
            (
                l.cmd(&l.laptop).args(["layer", "import", layer]).arg(&mine),
                "lamina layer import",
            ),
            (
                l.cmd(&l.laptop).args(["sync", "origin", layer]),
                "lamina sync",
            ),
        ],
    )?;
    let peer = step(None, &mut [(&mut unison(&home), "unison")])?;
    drop(unison_server);
    // Both tools end with both sides' changes on both sides.
    let merged = work.join("merged");
    l.ok(
        &l.central,
        &["layer", "export", layer, &merged.to_string_lossy()],
    )?;
    for other in [&ua, &ub] {
        let diff = Command::new("diff")
            .args(["-rq"])
            .arg(&merged)
            .arg(other)
            .output()?;
        if !diff.status.success() {
            bail!(
                "the two-way results differ: {}",
                String::from_utf8_lossy(&diff.stdout)
                    .lines()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
    }
    let _ = fs::remove_dir_all(&work);
    Ok(row("two-way", inner, changed, lamina, "unison", peer))
}

/// The measured part, run inside the namespace; prints its rows as JSON.
pub fn inner(exe: &Path, spec: &str) -> anyhow::Result<()> {
    let inner: Inner = serde_json::from_str(spec).context("bad --inner spec")?;
    let rows = vec![
        disk(&inner, exe)?,
        tree(&inner, exe)?,
        two_way(&inner, exe)?,
    ];
    println!("{}", serde_json::to_string(&rows)?);
    Ok(())
}

/// A network namespace with `lo` up, limited by tbf when `rate` is given;
/// deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String, rate: Option<&str>) -> anyhow::Result<Netns> {
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
        "{:<8} {:<10} {:>10} {:>9} {:>9} {:>7} {:>11} {:>11} {:>11} {:>11} {:>9}\n",
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
            "{:<8} {:<10} {:>10} {:>9.2} {:>9.2} {:>6.1}x {:>11} {:>11} {:>11} {:>11} {:>9}\n",
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
