//! `lamina mirror add|ls|status|sync|verify|rm`, and the loop of `lamina
//! server` that keeps every mirror up to date.
//!
//! A mirror is a record in the store's catalog (kind `mirror`, so every
//! server of a store on Ceph sees it) naming its target; the mirror itself
//! is a store of its own: the directory of a `dir:` target, or a store on
//! the pool of a `rados:` target whose local directory sits under
//! `STORE/mirrors/`. The result of the last pass is kept beside it in
//! `STORE/mirrors/NAME.status.json`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lamina_sync::api::Gate;
use lamina_sync::{
    now_ns, rfc3339, write_atomic, Access, MirrorReport, OpenOptions, Progress, Store, StoreBackend,
};
use serde::{Deserialize, Serialize};

use crate::cli::{CephArgs, Cli, MirrorCommand};
use crate::cmd::open;
use crate::cmd::store::rados_target;
use crate::output::{bytes, Out, UsageError};
use crate::progress::Bar;

/// Record kind of mirrors.
const KIND: &str = lamina_sync::MIRROR_RECORD;

/// A mirror's definition, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Mirror {
    /// `dir:PATH` or `rados:POOL`.
    target: String,
    /// ceph.conf of a `rados:` target.
    #[serde(default)]
    conf: Option<PathBuf>,
    /// Ceph user of a `rados:` target.
    #[serde(default)]
    user: Option<String>,
    /// When it was added.
    added: String,
}

/// The last pass, kept beside the mirror.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Status {
    last_try: Option<String>,
    last_ok: Option<String>,
    last_error: Option<String>,
    last_report: Option<MirrorReport>,
    passes: u64,
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        || name.starts_with('.')
    {
        return Err(UsageError(format!(
            "bad mirror name `{}` (letters, digits, `.`, `_`, `-`)",
            name.escape_debug()
        ))
        .into());
    }
    Ok(())
}

fn mirrors_dir(root: &Path) -> PathBuf {
    root.join("mirrors")
}

fn status_path(root: &Path, name: &str) -> PathBuf {
    mirrors_dir(root).join(format!("{name}.status.json"))
}

fn load(store: &Store, name: &str) -> anyhow::Result<Mirror> {
    let bytes = store
        .record(KIND, name)?
        .ok_or_else(|| UsageError(format!("no mirror `{name}` (see `lamina mirror ls`)")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("mirror record {name} is damaged: {e}"))
}

fn all(store: &Store) -> anyhow::Result<Vec<(String, Mirror)>> {
    let mut out = Vec::new();
    for (name, bytes) in store.records(KIND)? {
        match serde_json::from_slice(&bytes) {
            Ok(m) => out.push((name, m)),
            Err(e) => tracing::warn!(%name, %e, "skipping a damaged mirror record"),
        }
    }
    Ok(out)
}

fn read_status(root: &Path, name: &str) -> Status {
    std::fs::read(status_path(root, name))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_status(root: &Path, name: &str, s: &Status) {
    let dir = mirrors_dir(root);
    let written = std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))
        .and_then(|()| {
            let json = serde_json::to_vec_pretty(s)?;
            Ok(write_atomic(&status_path(root, name), &json)?)
        });
    if let Err(e) = written {
        tracing::warn!(mirror = name, %e, "could not record the mirror's status");
    }
}

/// Opens (with `create`, first creating) a mirror's store.
fn open_mirror(
    root: &Path,
    name: &str,
    m: &Mirror,
    create: bool,
    access: Access,
) -> anyhow::Result<Store> {
    let write = OpenOptions::new(access);
    if let Some(path) = m.target.strip_prefix("dir:") {
        let path = Path::new(path);
        if create && !path.join("lamina-store").exists() {
            Store::init(path)?;
        }
        if !path.join("lamina-store").exists() {
            return Err(anyhow::anyhow!(
                "mirror target {} holds no store (unmounted or removed?)",
                path.display()
            ));
        }
        return Ok(Store::open(path, &write)?);
    }
    if let Some(pool) = m.target.strip_prefix("rados:") {
        let dir = mirrors_dir(root).join(name);
        if !dir.join("lamina-store").exists() {
            let mut t = lamina_sync::rados::RadosTarget::new(pool, m.conf.clone());
            if let Some(u) = &m.user {
                t.user = u.clone();
            }
            Store::init_with(&dir, &StoreBackend::Rados(t))?;
        }
        return Ok(Store::open(&dir, &write)?);
    }
    Err(UsageError(format!(
        "bad mirror target `{}`: expected dir:PATH or rados:POOL",
        m.target
    ))
    .into())
}

/// One pass of mirror `name` from `src`; the outcome is recorded.
fn pass(
    src: &Store,
    root: &Path,
    name: &str,
    m: &Mirror,
    progress: &dyn Progress,
) -> anyhow::Result<MirrorReport> {
    let mut status = read_status(root, name);
    status.last_try = Some(rfc3339(now_ns()));
    status.passes += 1;
    let dst = open_mirror(root, name, m, false, Access::Write);
    let result = dst
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|dst| {
            if dst.id() == src.id() {
                return Err(anyhow::anyhow!("mirror `{name}` is this store itself"));
            }
            Ok(src.mirror_into(dst, progress)?)
        });
    match &result {
        Ok(r) => {
            status.last_ok = status.last_try.clone();
            status.last_error = None;
            status.last_report = Some(r.clone());
        }
        Err(e) => status.last_error = Some(format!("{e:#}")),
    }
    // Recorded before the mirror is closed: closing a store on a full file
    // system can abort the process (RocksDB asserts on a failed sync).
    write_status(root, name, &status);
    drop(dst);
    result
}

pub fn run(cli: &Cli, out: &Out, c: &MirrorCommand) -> anyhow::Result<ExitCode> {
    match c {
        MirrorCommand::Add {
            name,
            target,
            ceph,
            no_sync,
        } => add(cli, out, name, target, ceph, *no_sync),
        MirrorCommand::Ls => ls(cli, out),
        MirrorCommand::Status { name } => status(cli, out, name),
        MirrorCommand::Sync { name } => sync(cli, out, name),
        MirrorCommand::Verify { name } => verify(cli, out, name),
        MirrorCommand::Rm { name } => rm(cli, out, name),
    }
}

fn add(
    cli: &Cli,
    out: &Out,
    name: &str,
    target: &str,
    ceph: &CephArgs,
    no_sync: bool,
) -> anyhow::Result<ExitCode> {
    check_name(name)?;
    let store = open(cli, out, Access::Write)?;
    if store.record(KIND, name)?.is_some() {
        return Err(UsageError(format!("mirror `{name}` exists")).into());
    }
    let m = if let Some(path) = target.strip_prefix("dir:") {
        if path.is_empty() {
            return Err(UsageError("dir: needs a path".into()).into());
        }
        let abs = std::path::absolute(path)?;
        if abs.starts_with(store.root()) || store.root().starts_with(&abs) {
            return Err(UsageError(format!(
                "mirror directory {} overlaps the store {}",
                abs.display(),
                store.root().display()
            ))
            .into());
        }
        Mirror {
            target: format!("dir:{}", abs.display()),
            conf: None,
            user: None,
            added: rfc3339(now_ns()),
        }
    } else if let Some(pool) = target.strip_prefix("rados:") {
        let mut c = ceph.clone();
        c.pool = Some(pool.to_owned());
        let t = rados_target(&c)?;
        if store.store_backend() == StoreBackend::Rados(t.clone()) {
            return Err(UsageError(format!("pool {pool} holds this store itself")).into());
        }
        Mirror {
            target: format!("rados:{pool}"),
            conf: t.conf.clone(),
            user: Some(t.user.clone()),
            added: rfc3339(now_ns()),
        }
    } else {
        return Err(UsageError(format!(
            "bad mirror target `{target}`: expected dir:PATH or rados:POOL"
        ))
        .into());
    };
    // Create the target now, so a wrong path or pool is said at once.
    let dst = open_mirror(store.root(), name, &m, true, Access::Write)?;
    if dst.id() == store.id() {
        return Err(UsageError(format!("{target} holds this store itself")).into());
    }
    let has_layers = !dst.layers()?.is_empty();
    drop(dst);
    if has_layers {
        return Err(UsageError(format!(
            "{target} already holds a store with layers; mirror into an empty one"
        ))
        .into());
    }
    let mut b = store.batch()?;
    b.put_record(KIND, name, &serde_json::to_vec(&m)?)?;
    store.commit(b)?;
    let report = if no_sync {
        None
    } else {
        let bar = Bar::new(out.progress_allowed());
        Some(pass(&store, store.root(), name, &m, &bar)?)
    };
    let doc = serde_json::json!({"mirror": name, "target": m.target, "first_pass": report});
    out.result(&doc, || match &report {
        Some(r) => format!(
            "mirror {name} → {}: {} versions, {} chunks ({}) copied",
            m.target,
            r.versions,
            r.chunks,
            bytes(r.bytes)
        ),
        None => format!("mirror {name} → {} added", m.target),
    })?;
    Ok(ExitCode::SUCCESS)
}

fn ls(cli: &Cli, out: &Out) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let mut rows = Vec::new();
    for (name, m) in all(&store)? {
        let s = read_status(store.root(), &name);
        rows.push(serde_json::json!({
            "name": name, "target": m.target, "added": m.added,
            "last_ok": s.last_ok, "last_error": s.last_error,
        }));
    }
    let doc = serde_json::json!({ "mirrors": rows });
    out.result(&doc, || {
        let mut t = format!("{:<16} {:<40} {:<22} ERROR\n", "NAME", "TARGET", "LAST OK");
        for r in &rows {
            t.push_str(&format!(
                "{:<16} {:<40} {:<22} {}\n",
                r["name"].as_str().unwrap_or(""),
                r["target"].as_str().unwrap_or(""),
                r["last_ok"].as_str().unwrap_or("never"),
                r["last_error"].as_str().unwrap_or("")
            ));
        }
        t
    })?;
    Ok(ExitCode::SUCCESS)
}

fn status(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let m = load(&store, name)?;
    let s = read_status(store.root(), name);
    let lag = open_mirror(store.root(), name, &m, false, Access::Read)
        .and_then(|dst| Ok(store.mirror_lag(&dst)?));
    let (lag_doc, lag_error) = match &lag {
        Ok(l) => (Some(l.clone()), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let doc = serde_json::json!({
        "mirror": name, "target": m.target, "lag": lag_doc, "unreachable": lag_error,
        "last_try": s.last_try, "last_ok": s.last_ok, "last_error": s.last_error,
        "last_report": s.last_report, "passes": s.passes,
    });
    out.result(&doc, || {
        let mut t = format!("mirror {name} → {}\n", m.target);
        match &lag {
            Ok(l) if l.is_zero() => t.push_str("lag: none (holds everything)\n"),
            Ok(l) => t.push_str(&format!(
                "lag: {} versions, {} refs, {} chunks ({})\n",
                l.versions,
                l.refs,
                l.chunks,
                bytes(l.bytes)
            )),
            Err(e) => t.push_str(&format!("target unreachable: {e:#}\n")),
        }
        t.push_str(&format!(
            "last pass: {} (ok: {})\n",
            s.last_try.as_deref().unwrap_or("never"),
            s.last_ok.as_deref().unwrap_or("never")
        ));
        if let Some(e) = &s.last_error {
            t.push_str(&format!("last error: {e}\n"));
        }
        t
    })?;
    Ok(ExitCode::SUCCESS)
}

fn sync(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let m = load(&store, name)?;
    let report = {
        let bar = Bar::new(out.progress_allowed());
        pass(&store, store.root(), name, &m, &bar)?
    };
    out.result(&report, || {
        format!(
            "mirror {name}: {} versions, {} chunks ({}), {} catalog entries copied",
            report.versions,
            report.chunks,
            bytes(report.bytes),
            report.entries
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

fn verify(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let m = load(&store, name)?;
    let dst = open_mirror(store.root(), name, &m, false, Access::Read)?;
    let lag = store.mirror_lag(&dst)?;
    let fsck = {
        let bar = Bar::new(out.progress_allowed());
        dst.fsck(&bar)?
    };
    let ok = lag.is_zero() && fsck.ok;
    let doc = serde_json::json!({"mirror": name, "ok": ok, "lag": lag, "fsck": fsck});
    out.result(&doc, || {
        format!(
            "mirror {name}: {}; lag {} versions, {} refs, {} chunks; fsck {} ({} problems)",
            if ok { "ok" } else { "NOT COMPLETE OR DAMAGED" },
            lag.versions,
            lag.refs,
            lag.chunks,
            if fsck.ok { "ok" } else { "DAMAGED" },
            fsck.problems.len()
        )
    })?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn rm(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Write)?;
    let m = load(&store, name)?;
    let mut b = store.batch()?;
    b.delete_record(KIND, name)?;
    store.commit(b)?;
    let _ = std::fs::remove_file(status_path(store.root(), name));
    let doc = serde_json::json!({"mirror": name, "removed": true, "target": m.target});
    out.result(&doc, || {
        format!(
            "mirror {name} removed; the copy in {} is left as it is",
            m.target
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Runs every mirror's passes every `every` until `stop`, for the store
/// behind `gate` (the loop of `lamina server`). Each pass runs in a child
/// process (`lamina mirror sync NAME`), so a target that fails in any way —
/// full, gone, or a library aborting on a full disk — costs that pass,
/// never the server or the other mirrors. A failed pass is retried at the
/// next round; one cut by shutdown resumes at the next server's first.
pub fn spawn_loop(
    gate: Arc<Gate>,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let exe = std::env::current_exe()?;
    std::thread::Builder::new()
        .name("lamina-mirrors".into())
        .spawn(move || {
            let root = gate.root().to_owned();
            while !stop.load(Ordering::Relaxed) {
                let round = Instant::now();
                let mirrors = gate
                    .read()
                    .map_err(anyhow::Error::from)
                    .and_then(|s| all(&s));
                match mirrors {
                    Ok(mirrors) => {
                        for (name, _) in mirrors {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            child_pass(&exe, &root, &name, &stop);
                        }
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot list mirrors"),
                }
                while !stop.load(Ordering::Relaxed) && round.elapsed() < every {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
}

/// One pass of mirror `name` in a child process; records a crash.
fn child_pass(exe: &Path, root: &Path, name: &str, stop: &AtomicBool) {
    let log = mirrors_dir(root).join(format!("{name}.log"));
    let started = rfc3339(now_ns());
    let spawned = std::fs::create_dir_all(mirrors_dir(root))
        .and_then(|()| std::fs::File::create(&log))
        .and_then(|err| {
            std::process::Command::new(exe)
                .arg("--store")
                .arg(root)
                .args(["--quiet", "mirror", "sync", name])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(err)
                .spawn()
        });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(mirror = name, %e, "cannot start a mirror pass");
            return;
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if stop.load(Ordering::Relaxed) => {
                // The pass stops between durable steps; the next resumes.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                match child.wait() {
                    Ok(s) => break s,
                    Err(_) => return,
                }
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                tracing::warn!(mirror = name, %e, "lost a mirror pass");
                return;
            }
        }
    };
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    let last = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    if status.success() {
        tracing::debug!(mirror = name, "mirror pass done");
    } else if status.code().is_some() {
        // The pass recorded its own error in the status file.
        tracing::warn!(
            mirror = name,
            error = last,
            "mirror pass failed; retrying next round"
        );
    } else {
        let mut s = read_status(root, name);
        if s.last_try.as_deref().is_none_or(|t| t < started.as_str()) {
            // It died before it could say why.
            s.last_try = Some(started);
            s.last_error = Some(format!("the pass crashed ({status}): {last}"));
            write_status(root, name, &s);
        }
        tracing::warn!(mirror = name, %status, error = ?s.last_error, "mirror pass crashed; retrying next round");
    }
}
