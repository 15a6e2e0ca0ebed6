//! `lamina bundle ...`: a user's desktop on removable storage (the seeds'
//! eBag), run offline on another Linux computer and checked in later.
//!
//! ```text
//! DIR/lamina        this binary
//! DIR/lamina-run    the launcher: `lamina bundle run DIR "$@"`
//! DIR/bundle.json   what it holds: remote, user, layers and the versions bundled
//! DIR/store/        a store with those layers fully cached, a composition
//!                   `desktop` of the tree layers and a disk per disk layer
//! ```
//!
//! The remote's address, CA and signing keys are in the store; its token is
//! not: `lamina-run sync` asks for one. Every action first verifies the
//! bundle — its binary against the manifest, every byte of the store
//! against its ids, and each layer's head against the version bundled (it
//! may only have moved forward, by offline commits) — and refuses to run a
//! bundle that fails.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;
use lamina_fs::compose::{CreateOptions, LayerArg, Mode as ComposeMode};
use lamina_sync::remote::{ConnectOptions, Connection, Mode, SyncOptions};
use lamina_sync::{
    Access, LayerFormat, LayerId, LayerKind, LockWait, NoProgress, OpenOptions, Store, VersionId,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cli::{BundleCommand, BundleCreateArgs, BundleRun, Cli};
use crate::cmd::sync::host_name;
use crate::cmd::{default_author, open, read_token_file};
use crate::output::{bytes, Out, UsageError};
use crate::progress::Bar;

const MANIFEST: &str = "bundle.json";
const FORMAT: u32 = 1;
/// The composition of the bundle's tree layers.
const DESKTOP: &str = "desktop";

/// `DIR/bundle.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    created: String,
    remote: String,
    url: String,
    user: String,
    layers: Vec<Carried>,
    /// BLAKE3 of `DIR/lamina`, hex.
    binary_blake3: String,
    composition: Option<String>,
    disks: Vec<String>,
}

/// A layer the bundle carries, as bundled.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Carried {
    name: String,
    id: LayerId,
    kind: LayerKind,
    format: LayerFormat,
    version: VersionId,
}

pub fn run(cli: &Cli, out: &Out, c: &BundleCommand) -> anyhow::Result<ExitCode> {
    match c {
        BundleCommand::Create(a) => create(cli, out, a),
        BundleCommand::Check { dir } => {
            let m = check(dir)?;
            print_check(out, dir, &m)?;
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Run { dir, action } => run_bundle(out, dir, action),
    }
}

fn open_store(dir: &Path, access: Access) -> anyhow::Result<Store> {
    let notice = |_: &str| {};
    let path = dir.join("store");
    Store::open(
        &path,
        &OpenOptions {
            access,
            wait: LockWait::Wait(Some(Duration::from_secs(30))),
            notice: &notice,
            command: "lamina bundle".into(),
        },
    )
    .with_context(|| format!("opening the bundle's store {}", path.display()))
}

fn hash_file(p: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", p.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

const LAUNCHER: &str = r#"#!/bin/sh
# Lamina bundle launcher: runs this bundle's own lamina on its own store.
#   ./lamina-run mount DIR | umount DIR | boot | sync | check | status
here=$(cd "$(dirname "$0")" && pwd) || exit 1
exec "$here/lamina" bundle run "$here" "$@"
"#;

fn create(cli: &Cli, out: &Out, a: &BundleCreateArgs) -> anyhow::Result<ExitCode> {
    let dir = &a.dir;
    let existed = dir.exists();
    if existed
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        return Err(UsageError(format!(
            "{} is not empty: a bundle is written to an empty or new directory",
            dir.display()
        ))
        .into());
    }
    let src = open(cli, out, Access::Read)?;
    let cfg = src.remote(&a.remote)?;
    let layers = if a.layers.is_empty() {
        src.tracked(&a.remote)?
    } else {
        a.layers.clone()
    };
    drop(src);
    if layers.is_empty() {
        return Err(UsageError(format!(
            "no layer is tracked from remote {} here: name the user's layers with --layer",
            a.remote
        ))
        .into());
    }
    let conn = Connection::open(
        &cfg,
        &ConnectOptions {
            retries: a.who.retries,
            ..ConnectOptions::default()
        },
    )?;
    let me = conn.whoami()?;
    if me.user != a.user && !me.admin {
        return Err(UsageError(format!(
            "remote {}'s token is user {}'s, not {}'s (an admin's token may bundle for anyone)",
            a.remote, me.user, a.user
        ))
        .into());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let made = write_bundle(out, dir, &cfg, &conn, a, &layers);
    match made {
        Ok(m) => {
            out.result(&m, || {
                format!(
                    "bundle for {} in {}: {} layers ({}), launcher {}",
                    m.user,
                    dir.display(),
                    m.layers.len(),
                    bytes(conn.bytes().1),
                    dir.join("lamina-run").display()
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // Nothing half-written stays behind.
            let cleaned = if existed {
                std::fs::read_dir(dir).map(|entries| {
                    for e in entries.flatten() {
                        let p = e.path();
                        let _ = if p.is_dir() {
                            std::fs::remove_dir_all(&p)
                        } else {
                            std::fs::remove_file(&p)
                        };
                    }
                })
            } else {
                std::fs::remove_dir_all(dir)
            };
            if let Err(c) = cleaned {
                tracing::warn!(dir = %dir.display(), %c, "could not remove the unfinished bundle");
            }
            Err(e)
        }
    }
}

fn write_bundle(
    out: &Out,
    dir: &Path,
    cfg: &lamina_sync::remote::RemoteConfig,
    conn: &Connection,
    a: &BundleCreateArgs,
    layers: &[String],
) -> anyhow::Result<Manifest> {
    let store_dir = dir.join("store");
    Store::init(&store_dir)?;
    let store = open_store(dir, Access::Write)?;
    // The address, CA and trusted keys travel; the token does not.
    store.add_remote(&lamina_sync::remote::RemoteConfig {
        token: String::new(),
        user: Some(a.user.clone()),
        ..cfg.clone()
    })?;
    let bar = Bar::new(out.progress_allowed());
    let opts = SyncOptions {
        host: host_name(&a.who.host),
        author: a.who.author.clone().unwrap_or_else(default_author),
        progress: &bar,
    };
    let mut carried = Vec::new();
    for name in layers {
        store.sync_layer(conn, name, Mode::Pull, &opts)?;
        let l = store.layer(name)?;
        let version = store
            .current(&l)?
            .ok_or_else(|| UsageError(format!("layer {name} has no version to bundle")))?;
        carried.push(Carried {
            name: l.name.clone(),
            id: l.id,
            kind: l.kind,
            format: l.format,
            version,
        });
    }
    drop(bar);
    // The desktop: the tree layers stacked, os and group read-only.
    let tree: Vec<LayerArg> = carried
        .iter()
        .filter(|c| c.format == LayerFormat::Tree)
        .map(|c| LayerArg {
            kind: c.kind,
            layer: c.name.clone(),
            version: matches!(c.kind, LayerKind::Os | LayerKind::Group).then(|| c.version.to_hex()),
        })
        .collect();
    let composition = if tree.is_empty() {
        None
    } else {
        lamina_fs::compose::create(
            &store,
            &CreateOptions {
                name: DESKTOP.into(),
                layers: tree,
                rules: None,
                mode: ComposeMode::Persistent,
                streamed: Vec::new(),
            },
        )?;
        Some(DESKTOP.to_owned())
    };
    // A disk per disk layer, named by its kind.
    let mut disks = Vec::new();
    for c in carried.iter().filter(|c| c.format == LayerFormat::Disk) {
        let base = c.kind.as_str();
        let name = (1..)
            .map(|i| {
                if i == 1 {
                    base.to_owned()
                } else {
                    format!("{base}-{i}")
                }
            })
            .find(|n| !disks.contains(n))
            .unwrap_or_default();
        let l = store.layer(&c.name)?;
        lamina_nbd::disk::create(&store, &name, Some((&l, c.version)), None)?;
        disks.push(name);
    }
    drop(store);
    let exe = std::env::current_exe().context("finding this lamina binary")?;
    let bin = dir.join("lamina");
    std::fs::copy(&exe, &bin)
        .with_context(|| format!("copying {} to {}", exe.display(), bin.display()))?;
    let launcher = dir.join("lamina-run");
    std::fs::write(&launcher, LAUNCHER)
        .with_context(|| format!("writing {}", launcher.display()))?;
    set_mode(&launcher, 0o755)?;
    set_mode(&bin, 0o755)?;
    let m = Manifest {
        format: FORMAT,
        created: lamina_sync::rfc3339(lamina_sync::now_ns()),
        remote: cfg.name.clone(),
        url: cfg.url.clone(),
        user: a.user.clone(),
        layers: carried,
        binary_blake3: hash_file(&bin)?,
        composition,
        disks,
    };
    // Plain data always serialises.
    #[allow(clippy::expect_used)]
    let doc = serde_json::to_vec_pretty(&m).expect("manifest serialises");
    lamina_sync::write_atomic(&dir.join(MANIFEST), &doc)?;
    Ok(m)
}

fn set_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", p.display()))
}

/// Verifies the bundle at `dir` (see the module doc).
fn check(dir: &Path) -> anyhow::Result<Manifest> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read(&mpath).map_err(|e| {
        UsageError(format!(
            "{} is not a Lamina bundle: {}: {e}",
            dir.display(),
            mpath.display()
        ))
    })?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| {
        anyhow::anyhow!(
            "bundle {}: {} is damaged: {e}",
            dir.display(),
            mpath.display()
        )
    })?;
    if m.format != FORMAT {
        anyhow::bail!(
            "bundle {}: format {} is not one this lamina reads ({FORMAT})",
            dir.display(),
            m.format
        );
    }
    let bin = hash_file(&dir.join("lamina"))?;
    if bin != m.binary_blake3 {
        anyhow::bail!(
            "bundle {} refused: its lamina binary is not the one it was made with (tampered?)",
            dir.display()
        );
    }
    let store = open_store(dir, Access::Read)?;
    let report = store.fsck(&NoProgress)?;
    if let Some(p) = report.problems.first() {
        anyhow::bail!(
            "bundle {} refused: its store fails verification ({} problems; first: {}: {})",
            dir.display(),
            report.problems.len(),
            p.object,
            p.message
        );
    }
    for c in &m.layers {
        let l = store.layer(&c.name).map_err(|e| {
            anyhow::anyhow!("bundle {} refused: layer {}: {e}", dir.display(), c.name)
        })?;
        if l.id != c.id {
            anyhow::bail!(
                "bundle {} refused: layer {} is not the layer bundled (its id changed)",
                dir.display(),
                c.name
            );
        }
        let head = store.head(&l)?;
        if !head.is_some_and(|h| descends(&store, h, c.version).unwrap_or(false)) {
            anyhow::bail!(
                "bundle {} refused: layer {}'s head does not descend from the version bundled ({})",
                dir.display(),
                c.name,
                c.version.short()
            );
        }
        if let Some(cur) = store.current(&l)? {
            store.check_usable(&l, cur)?;
        }
    }
    Ok(m)
}

/// Whether `v` is `ancestor` or descends from it.
fn descends(store: &Store, v: VersionId, ancestor: VersionId) -> anyhow::Result<bool> {
    let mut stack = vec![v];
    let mut seen = std::collections::HashSet::new();
    while let Some(x) = stack.pop() {
        if x == ancestor {
            return Ok(true);
        }
        if seen.insert(x) {
            stack.extend(store.version(x)?.parents);
        }
    }
    Ok(false)
}

fn print_check(out: &Out, dir: &Path, m: &Manifest) -> anyhow::Result<()> {
    out.result(&json!({"ok": true, "bundle": m}), || {
        format!(
            "bundle {} is intact: user {}, {} layers from {} ({})",
            dir.display(),
            m.user,
            m.layers.len(),
            m.remote,
            m.url
        )
    })
}

/// The bundle's own lamina on its own store.
fn lamina(dir: &Path) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("finding this lamina binary")?;
    let mut c = Command::new(exe);
    c.arg("--store").arg(dir.join("store"));
    Ok(c)
}

fn status_of(mut c: Command, what: &str) -> anyhow::Result<ExitCode> {
    let s = c.status().with_context(|| format!("running {what}"))?;
    Ok(match s.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(n) => ExitCode::from(u8::try_from(n).unwrap_or(1)),
        None => ExitCode::from(1),
    })
}

fn run_bundle(out: &Out, dir: &Path, action: &BundleRun) -> anyhow::Result<ExitCode> {
    let m = check(dir)?;
    match action {
        BundleRun::Check => {
            print_check(out, dir, &m)?;
            Ok(ExitCode::SUCCESS)
        }
        BundleRun::Mount { mountpoint } => {
            let Some(comp) = &m.composition else {
                return Err(UsageError(
                    "this bundle carries no tree layers to mount (boot its disks)".into(),
                )
                .into());
            };
            let mut c = lamina(dir)?;
            c.arg("mount").arg(comp).arg(mountpoint);
            status_of(c, "lamina mount")
        }
        BundleRun::Umount { mountpoint } => {
            let mut c = lamina(dir)?;
            c.arg("umount").arg(mountpoint);
            status_of(c, "lamina umount")
        }
        BundleRun::Boot {
            memory,
            timeout,
            kernel,
            initrd,
            append,
        } => boot(
            dir,
            &m,
            &Boot {
                memory: *memory,
                timeout: timeout.as_deref(),
                kernel: kernel.as_deref(),
                initrd: initrd.as_deref(),
                append,
            },
        ),
        BundleRun::Sync { token_file } => sync(out, dir, &m, token_file.as_deref()),
        BundleRun::Status => {
            let store = open_store(dir, Access::Read)?;
            let mut layers = Vec::new();
            for c in &m.layers {
                let l = store.layer(&c.name)?;
                layers
                    .push(json!({"layer": c.name, "bundled": c.version, "head": store.head(&l)?}));
            }
            let disks: Vec<_> = m
                .disks
                .iter()
                .map(|d| {
                    let s = lamina_nbd::disk::status(&store, d).ok();
                    json!({"disk": d, "changed_clusters": s.map(|s| s.clusters)})
                })
                .collect();
            let doc = json!({"user": m.user, "remote": m.remote, "url": m.url, "layers": layers, "disks": disks});
            out.result(&doc, || {
                serde_json::to_string_pretty(&doc).unwrap_or_default()
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The user's token: `$LAMINA_TOKEN`, a token file, or the terminal.
fn ask_token(user: &str, file: Option<&Path>) -> anyhow::Result<String> {
    if let Some(t) = std::env::var("LAMINA_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Ok(t.trim().to_owned());
    }
    if let Some(f) = file {
        return read_token_file(f);
    }
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .ok()
        .filter(|t| t.is_terminal());
    let Some(mut tty) = tty else {
        return Err(UsageError(
            "the bundle keeps no token: set LAMINA_TOKEN, pass --token-file or run on a terminal"
                .into(),
        )
        .into());
    };
    write!(tty, "token for {user}: ").context("writing to the terminal")?;
    tty.flush().context("writing to the terminal")?;
    let old = nix::sys::termios::tcgetattr(&tty).context("reading the terminal's settings")?;
    let mut quiet = old.clone();
    quiet
        .local_flags
        .remove(nix::sys::termios::LocalFlags::ECHO);
    nix::sys::termios::tcsetattr(&tty, nix::sys::termios::SetArg::TCSANOW, &quiet)
        .context("turning the terminal's echo off")?;
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    // Echo comes back whatever was read.
    let _ = nix::sys::termios::tcsetattr(&tty, nix::sys::termios::SetArg::TCSANOW, &old);
    let _ = writeln!(tty);
    read.context("reading the token")?;
    let t = line.trim().to_owned();
    if t.is_empty() {
        return Err(UsageError("no token given".into()).into());
    }
    Ok(t)
}

fn sync(
    out: &Out,
    dir: &Path,
    m: &Manifest,
    token_file: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let token = ask_token(&m.user, token_file)?;
    // Offline work first becomes versions: the desktop's pending changes
    // (by its daemon if it is mounted) and the changes of disks the user
    // may check in (an os disk's stay on the stick).
    if let Some(comp) = &m.composition {
        let mut c = lamina(dir)?;
        c.args(["--quiet", "commit", comp, "-m", "offline work (bundle)"]);
        let code = c.status().context("running lamina commit")?;
        if !code.success() {
            anyhow::bail!("committing the desktop's offline work failed");
        }
    }
    for (d, carried) in m
        .disks
        .iter()
        .zip(m.layers.iter().filter(|c| c.format == LayerFormat::Disk))
    {
        if matches!(carried.kind, LayerKind::Os | LayerKind::Group) {
            continue;
        }
        let mut c = lamina(dir)?;
        c.args([
            "--quiet",
            "disk",
            "commit",
            d,
            "-m",
            "offline work (bundle)",
        ]);
        c.stdout(Stdio::null());
        let code = c.status().context("running lamina disk commit")?;
        if !code.success() {
            anyhow::bail!("committing disk {d}'s offline work failed");
        }
    }
    let store = open_store(dir, Access::Write)?;
    let cfg = lamina_sync::remote::RemoteConfig {
        token,
        ..store.remote(&m.remote)?
    };
    let conn = Connection::open(&cfg, &ConnectOptions::default())?;
    let bar = Bar::new(out.progress_allowed());
    let opts = SyncOptions {
        host: host_name(&None),
        author: format!("{}@bundle", m.user),
        progress: &bar,
    };
    let mut reports = Vec::new();
    for c in &m.layers {
        let mode = if matches!(c.kind, LayerKind::Os | LayerKind::Group) {
            Mode::Pull
        } else {
            Mode::Sync
        };
        reports.push(store.sync_layer(&conn, &c.name, mode, &opts)?);
    }
    drop(bar);
    let (sent, received) = conn.bytes();
    out.result(
        &json!({"remote": m.remote, "layers": reports, "body_bytes": {"sent": sent, "received": received}}),
        || {
            reports
                .iter()
                .map(|r| format!("{}: {}", r.layer, r.action.as_str()))
                .collect::<Vec<_>>()
                .join("\n")
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// How `lamina-run boot` starts the VM.
struct Boot<'a> {
    memory: u32,
    timeout: Option<&'a str>,
    kernel: Option<&'a Path>,
    initrd: Option<&'a Path>,
    append: &'a str,
}

/// Serves the bundle's disks on a socket in the bundle and boots them.
fn boot(dir: &Path, m: &Manifest, b: &Boot<'_>) -> anyhow::Result<ExitCode> {
    let (memory, timeout) = (b.memory, b.timeout);
    let Some(first) = m.disks.first() else {
        return Err(
            UsageError("this bundle carries no disk to boot (mount its desktop)".into()).into(),
        );
    };
    let limit = timeout
        .map(|t| {
            humantime::parse_duration(t).map_err(|e| UsageError(format!("--timeout {t}: {e}")))
        })
        .transpose()?;
    let run = dir.join("run");
    std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
    let sock = run.join("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut serve = lamina(dir)?;
    serve
        .args(["--quiet", "serve", "--socket"])
        .arg(&sock)
        .stdout(Stdio::null());
    let mut server = serve.spawn().context("starting lamina serve")?;
    let up = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        sock.exists()
    });
    if !up {
        let _ = server.kill();
        let _ = server.wait();
        anyhow::bail!("lamina serve did not open {}", sock.display());
    }
    let qemu = Path::new("qemu-system-x86_64");
    let probe = lamina_vm::accel::cached_or_probe(&run.join("accel.json"), qemu, false).0;
    let mut q = Command::new(qemu);
    q.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
    ])
    .args(["-m", &memory.to_string()])
    .args(["-accel", if probe.kvm { "kvm" } else { "tcg" }])
    .args([
        "-no-reboot",
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]);
    if let Some(k) = b.kernel {
        q.arg("-kernel").arg(k).args(["-append", b.append]);
    }
    if let Some(i) = b.initrd {
        q.arg("-initrd").arg(i);
    }
    for d in std::iter::once(first).chain(m.disks.iter().skip(1)) {
        q.arg("-drive").arg(format!(
            "file=nbd:unix:{}:exportname={d},format=raw,if=virtio,cache=none",
            sock.display()
        ));
    }
    let mut vm = q
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = vm.try_wait().context("waiting for QEMU")? {
            break Some(s);
        }
        if limit.is_some_and(|l| started.elapsed() > l) {
            let _ = vm.kill();
            let _ = vm.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The server ends cleanly on SIGTERM (the disks' writes are synced).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(server.id()).unwrap_or(0)),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = server.wait();
    Ok(match status {
        Some(s) if s.success() => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}
