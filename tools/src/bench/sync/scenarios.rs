//! The three scenarios — disk check-in, tree check-in, two-way sync — each
//! with Lamina and its peer on the same data, and what they need: the
//! Lamina server and laptop, an rsync daemon, the data changes.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::measure::step;
use super::{Inner, Row, Run};
use crate::bench::data::{Rng, Text};
use crate::bench::{run_ok, stdout_of, Proc};

const CLUSTER: u64 = 64 << 10;

/// Writes `files` small text-like files in 1 000 directories; returns bytes.
pub(super) fn make_small_tree(root: &Path, files: u64, seed: u64) -> anyhow::Result<u64> {
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

/// The Lamina side: a central store with its server, and a laptop store.
pub(in crate::bench) struct LaminaSide {
    exe: PathBuf,
    pub(in crate::bench) central: PathBuf,
    pub(in crate::bench) laptop: PathBuf,
    /// The server's URL.
    pub(in crate::bench) url: String,
    server: Option<Proc>,
}

impl LaminaSide {
    pub(in crate::bench) fn cmd(&self, store: &Path) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--store").arg(store).arg("--quiet");
        c.env_remove("LAMINA_STORE").env("LAMINA_HOST", "laptop");
        c
    }

    pub(in crate::bench) fn ok(&self, store: &Path, args: &[&str]) -> anyhow::Result<String> {
        stdout_of(
            self.cmd(store).args(args),
            &format!("lamina {}", args.join(" ")),
        )
    }

    pub(in crate::bench) fn new(exe: &Path, work: &Path) -> anyhow::Result<LaminaSide> {
        let central = work.join("central");
        let laptop = work.join("laptop");
        let s = LaminaSide {
            exe: exe.to_owned(),
            central,
            laptop,
            url: String::new(),
            server: None,
        };
        crate::bench::make_certs(&work.join("certs"))?;
        let certs = work.join("certs");
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
        s.url.clone_from(&url);
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

/// Writes the changed clusters' data (Python's PRNG, seeded per cluster, so
/// both sides get the same bytes) to `target`: an NBD URI (through libnbd's
/// Python binding, so the disk's block map sees the writes) or a raw file.
fn write_clusters(target: &str, clusters: &[u64]) -> anyhow::Result<()> {
    let script = r#"
import sys, random, os
target = sys.argv[1]
if target.startswith("nbd"):
    import nbd
    h = nbd.NBD()
    h.connect_uri(target)
    write = h.pwrite
else:
    fd = os.open(target, os.O_WRONLY)
    write = lambda data, off: os.pwrite(fd, data, off)
for line in sys.stdin:
    c = int(line)
    write(random.Random(1000003 + c).randbytes(65536), c * 65536)
if target.startswith("nbd"):
    h.flush()
    h.shutdown()
else:
    os.fsync(fd)
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script, target])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("/usr/bin/python3 (with python3-libnbd for NBD)")?;
    {
        let mut stdin = child.stdin.take().context("stdin")?;
        for c in clusters {
            writeln!(stdin, "{c}")?;
        }
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "writing clusters to {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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

pub(super) fn disk(inner: &Inner, exe: &Path) -> anyhow::Result<Row> {
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
        write_clusters(
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
    write_clusters(&cli.join("disk.raw").to_string_lossy(), &clusters)?;
    // The copies were made within the same second: make the daemon's look
    // older, or rsync's quick check (size and mtime) would skip the file.
    run_ok(
        Command::new("touch")
            .args(["-d", "2 days ago"])
            .arg(srv.join("disk.raw")),
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
    // Space only: the work directory goes with the run anyway.
    let _ = fs::remove_dir_all(&work);
    Ok(row("disk", inner, changed, lamina, "rsync", peer))
}

/// Mounts composition `desk` (layer `layer`) of the laptop, lets `edit`
/// change the mounted tree, and unmounts: the changes are in its upper.
fn through_mount(
    l: &LaminaSide,
    work: &Path,
    layer: &str,
    edit: impl FnOnce(&Path) -> anyhow::Result<u64>,
) -> anyhow::Result<u64> {
    let mnt = work.join("mnt");
    fs::create_dir_all(&mnt)?;
    if l.ok(&l.laptop, &["compose", "show", "desk"]).is_err() {
        l.ok(
            &l.laptop,
            &[
                "compose",
                "create",
                "desk",
                "--layer",
                &format!("data={layer}"),
            ],
        )?;
    }
    l.ok(&l.laptop, &["mount", "desk", &mnt.to_string_lossy()])?;
    let changed = edit(&mnt);
    l.ok(&l.laptop, &["umount", &mnt.to_string_lossy()])?;
    changed
}

fn same_tree(a: &Path, b: &Path, what: &str) -> anyhow::Result<()> {
    let diff = Command::new("diff").args(["-rq"]).arg(a).arg(b).output()?;
    if !diff.status.success() {
        bail!(
            "{what}: the trees differ: {}",
            String::from_utf8_lossy(&diff.stdout)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

/// Two rounds on the tree. Mounted: the laptop's changes land in a
/// composition's upper, and the check-in is `commit` (reading only the
/// upper) + `push`. Scanned: the changes are made to a plain directory, and
/// the check-in is `layer import` (stat of every file; unchanged ones are
/// not read) + `push`. rsync gets the same changes each round.
pub(super) fn tree(inner: &Inner, exe: &Path) -> anyhow::Result<Vec<Row>> {
    let work = inner.work.join(format!("tree-{}", inner.link));
    fs::create_dir_all(&work)?;
    let l = LaminaSide::new(exe, &work)?;
    let layer = "user/alice/tree";
    l.ok(
        &l.central,
        &[
            "layer", "create", layer, "--kind", "data", "--format", "tree",
        ],
    )?;
    l.ok(
        &l.central,
        &["layer", "import", layer, &inner.tree.to_string_lossy()],
    )?;
    l.ok(&l.laptop, &["pull", "origin", layer])?;
    let srv = work.join("rsync-server");
    let mine = work.join("rsync-client");
    for d in [&srv, &mine] {
        run_ok(Command::new("cp").arg("-a").arg(&inner.tree).arg(d), "cp")?;
    }
    let (_daemon, port) = rsync_daemon(&work, &srv)?;
    let rsync = || {
        step(
            None,
            &mut [(
                Command::new("rsync")
                    .args(["-a", "--no-whole-file"])
                    .arg(format!("{}/", mine.display()))
                    .arg(format!("rsync://127.0.0.1:{port}/m/")),
                "rsync",
            )],
        )
    };
    // Round 1: mounted.
    let changed = through_mount(&l, &work, layer, |m| change_tree(m, inner.files, 7, 11))?;
    change_tree(&mine, inner.files, 7, 11)?;
    let lamina = step(
        l.server_pid(),
        &mut [
            (l.cmd(&l.laptop).args(["commit", "desk"]), "lamina commit"),
            (
                l.cmd(&l.laptop).args(["push", "origin", layer]),
                "lamina push",
            ),
        ],
    )?;
    let peer = rsync()?;
    let back = work.join("back");
    l.ok(
        &l.central,
        &["layer", "export", layer, &back.to_string_lossy()],
    )?;
    same_tree(&back, &mine, "mounted check-in")?;
    same_tree(&srv, &mine, "rsync")?;
    let mounted = row("tree", inner, changed, lamina, "rsync", peer);
    // Round 2: scanned, from a working copy whose import cache is warm (as
    // a laptop's is after its earlier check-ins).
    let scan = work.join("scan-tree");
    l.ok(
        &l.laptop,
        &["layer", "export", layer, &scan.to_string_lossy()],
    )?;
    l.ok(
        &l.laptop,
        &["layer", "import", layer, &scan.to_string_lossy()],
    )?;
    l.ok(&l.laptop, &["push", "origin", layer])?;
    let changed = change_tree(&scan, inner.files, 8, 13)?;
    change_tree(&mine, inner.files, 8, 13)?;
    let lamina = step(
        l.server_pid(),
        &mut [
            (
                l.cmd(&l.laptop).args(["layer", "import", layer]).arg(&scan),
                "lamina layer import",
            ),
            (
                l.cmd(&l.laptop).args(["push", "origin", layer]),
                "lamina push",
            ),
        ],
    )?;
    let peer = rsync()?;
    fs::remove_dir_all(&back)?;
    l.ok(
        &l.central,
        &["layer", "export", layer, &back.to_string_lossy()],
    )?;
    same_tree(&back, &mine, "scanned check-in")?;
    same_tree(&srv, &mine, "rsync")?;
    let scanned = row("tree-scan", inner, changed, lamina, "rsync", peer);
    // Space only: the work directory goes with the run anyway.
    let _ = fs::remove_dir_all(&work);
    Ok(vec![mounted, scanned])
}

pub(super) fn two_way(inner: &Inner, exe: &Path) -> anyhow::Result<Row> {
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
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(&inner.tree)
            .arg(&server_tree),
        "cp",
    )?;
    l.ok(
        &l.central,
        &["layer", "import", layer, &server_tree.to_string_lossy()],
    )?;
    l.ok(&l.laptop, &["pull", "origin", layer])?;
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
    // The laptop's changes land in its mounted composition's upper.
    let mut changed = change_tree(&server_tree, inner.files, 3, 21)?;
    changed += through_mount(&l, &work, layer, |m| change_tree(m, inner.files, 5, 31))?;
    change_tree(&ub, inner.files, 3, 21)?;
    change_tree(&ua, inner.files, 5, 31)?;
    l.ok(
        &l.central,
        &["layer", "import", layer, &server_tree.to_string_lossy()],
    )?;
    let lamina = step(
        l.server_pid(),
        &mut [
            (l.cmd(&l.laptop).args(["commit", "desk"]), "lamina commit"),
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
    // Space only: the work directory goes with the run anyway.
    let _ = fs::remove_dir_all(&work);
    Ok(row("two-way", inner, changed, lamina, "unison", peer))
}
