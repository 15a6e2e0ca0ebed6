//! `lamina pull`, `lamina push`, `lamina sync` (one-shot, `--watch`,
//! `--status`).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lamina_sync::merge::ConflictState;
use lamina_sync::remote::{
    ConnectOptions, Connection, LayerReport, Mode, SyncOptions, SyncState, SyncStatus,
};
use lamina_sync::{Access, ErrorKind, LockWait, Store, VersionId};
use serde_json::json;

use crate::cli::{Cli, SyncArgs, SyncWho, TransferArgs};
use crate::cmd::{default_author, open, open_with};
use crate::output::{bytes, time, Out, UsageError};
use crate::progress::Bar;

/// This machine's name for conflict copies: `--host`, `$LAMINA_HOST`, the
/// host name.
pub(crate) fn host_name(given: &Option<String>) -> String {
    given
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(lamina_sync::merge::host_name)
}

fn short(v: Option<VersionId>) -> String {
    v.map_or_else(|| "-".into(), |v| v.short())
}

fn describe(r: &LayerReport) -> String {
    let mut s = format!("{}: {}", r.layer, r.action.as_str());
    match r.action {
        lamina_sync::remote::Action::UpToDate => s.push_str(&format!(" at {}", short(r.local))),
        _ => s.push_str(&format!(
            " (here {}, server {})",
            short(r.local),
            short(r.server)
        )),
    }
    if r.versions_received > 0 || r.received.records > 0 {
        s.push_str(&format!(
            "; received {} versions, {} in {} records",
            r.versions_received,
            bytes(r.received.bytes),
            r.received.records
        ));
    }
    if r.versions_sent > 0 || r.sent.records > 0 {
        s.push_str(&format!(
            "; sent {} versions, {} in {} records",
            r.versions_sent,
            bytes(r.sent.bytes),
            r.sent.records
        ));
    }
    if let Some(c) = &r.conflict {
        s.push_str(&format!(
            "; {} conflicts ({}, conflict {}{})",
            c.items.len(),
            c.policy,
            c.id,
            if c.state == ConflictState::Pending {
                ": waiting for an admin on the server"
            } else {
                ""
            }
        ));
    }
    s
}

pub(crate) fn connect(
    store: &Store,
    remote: &str,
    retries: u32,
    keep_alive: bool,
) -> anyhow::Result<Connection> {
    let cfg = store.remote(remote)?;
    Ok(Connection::open(
        &cfg,
        &ConnectOptions {
            retries,
            keep_alive,
            ..ConnectOptions::default()
        },
    )?)
}

pub fn transfer(cli: &Cli, out: &Out, a: &TransferArgs, mode: Mode) -> anyhow::Result<ExitCode> {
    run_once(cli, out, &a.remote, Some(&a.layers), &a.who, mode)
}

/// One-shot pull, push or sync of `layers` (default: every tracked one).
fn run_once(
    cli: &Cli,
    out: &Out,
    remote: &str,
    layers: Option<&[String]>,
    who: &SyncWho,
    mode: Mode,
) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Write)?;
    let conn = connect(&store, remote, who.retries, false)?;
    let layers = match layers {
        Some(l) if !l.is_empty() => l.to_vec(),
        _ => store.tracked(remote)?,
    };
    if layers.is_empty() {
        return Err(UsageError(format!(
            "no layer is tracked from remote {remote} yet: name layers to sync (or pull them first)"
        ))
        .into());
    }
    let bar = Bar::new(out.progress_allowed());
    let opts = SyncOptions {
        host: host_name(&who.host),
        author: who.author.clone().unwrap_or_else(default_author),
        progress: &bar,
    };
    let mut reports = Vec::new();
    for layer in &layers {
        reports.push(store.sync_layer(&conn, layer, mode, &opts)?);
    }
    drop(bar);
    print_reports(out, remote, &reports, &conn)
}

fn print_reports(
    out: &Out,
    remote: &str,
    reports: &[LayerReport],
    conn: &Connection,
) -> anyhow::Result<ExitCode> {
    let (sent, received) = conn.bytes();
    out.result(
        &json!({ "remote": remote, "layers": reports, "body_bytes": {"sent": sent, "received": received} }),
        || reports.iter().map(describe).collect::<Vec<_>>().join("\n"),
    )?;
    Ok(ExitCode::SUCCESS)
}

pub fn sync(cli: &Cli, out: &Out, a: &SyncArgs) -> anyhow::Result<ExitCode> {
    if a.status {
        return status(cli, out, a.remote.as_deref());
    }
    let remote = a
        .remote
        .clone()
        .ok_or_else(|| UsageError("name the remote to sync with".into()))?;
    if a.watch {
        let interval = humantime::parse_duration(&a.interval)
            .map_err(|e| UsageError(format!("bad --interval `{}`: {e}", a.interval)))?;
        if interval < Duration::from_secs(1) {
            return Err(UsageError("--interval must be at least 1s".into()).into());
        }
        return watch(cli, out, &remote, a, interval);
    }
    run_once(cli, out, &remote, Some(&a.layers), &a.who, Mode::Sync)
}

/// The heads of `layers` as the catalog has them now.
fn heads(store: &Store, layers: &[String]) -> Vec<Option<VersionId>> {
    layers
        .iter()
        .map(|l| {
            store
                .find_layer(l)
                .ok()
                .flatten()
                .and_then(|layer| store.head(&layer).ok().flatten())
        })
        .collect()
}

/// Commits what users are working on without stopping them: mounted
/// compositions over `layers` (their daemons commit) and served disks
/// based on them (their servers commit). Failures are logged; the round
/// goes on with what is committed.
fn check_in_live(store: &Store, layers: &[String], author: &str) {
    let msg = "check-in by lamina sync --watch";
    if let Ok(comps) = lamina_fs::compose::list(store) {
        for c in comps {
            let ours = c
                .slots
                .iter()
                .any(|s| s.writable() && layers.contains(&s.layer));
            if !ours || lamina_fs::mounted(store.root(), &c).is_none() {
                continue;
            }
            match lamina_fs::commit_mounted(store, &c.name, Some(msg), author) {
                Ok(Some(r)) => {
                    tracing::info!(composition = %c.name, busy = r.busy.len(), "committed while mounted")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(composition = %c.name, error = %e, "live commit failed"),
            }
        }
    }
    if let Ok(disks) = lamina_nbd::disk::list(store) {
        for d in disks {
            if !d.base.as_ref().is_some_and(|b| layers.contains(&b.layer)) {
                continue;
            }
            match lamina_nbd::control::request_commit(store, &d, msg, author) {
                Ok(Some(r)) => {
                    tracing::info!(disk = %d.name, clusters = r.clusters, "committed while served")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(disk = %d.name, error = %e, "live commit failed"),
            }
        }
    }
    // A stale view only delays the next round's change detection.
    let _ = store.refresh();
}

/// Sets the returned flag on SIGINT or SIGTERM.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::Builder::new()
        .name("lamina-signals".into())
        .spawn(move || {
            if set.wait().is_ok() {
                f.store(true, Ordering::SeqCst);
            }
        })?;
    Ok(flag)
}

/// The laptop daemon: one long-lived connection, a round every interval
/// and soon after a local head moves, offline work queued and retried with
/// backoff, each round recorded for `sync --status`.
fn watch(
    cli: &Cli,
    out: &Out,
    remote: &str,
    a: &SyncArgs,
    interval: Duration,
) -> anyhow::Result<ExitCode> {
    let stop = stop_flag()?;
    let reader = open(cli, out, Access::Serve)?;
    let conn = connect(&reader, remote, 0, true)?;
    let opts = SyncOptions {
        host: host_name(&a.who.host),
        author: a.who.author.clone().unwrap_or_else(default_author),
        progress: &lamina_sync::NoProgress,
    };
    let mut status = SyncStatus::load(&reader, remote)?.unwrap_or(SyncStatus {
        remote: remote.to_owned(),
        state: SyncState::Offline,
        pid: std::process::id(),
        last_success_ns: None,
        last_attempt_ns: 0,
        last_error: None,
        failures: 0,
        next_ns: 0,
    });
    status.pid = std::process::id();
    let quiet = Out::new(false, true);
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        round += 1;
        status.last_attempt_ns = lamina_sync::now_ns();
        // A stale view only means the round sees what it saw before.
        let _ = reader.refresh();
        let tracked = if a.layers.is_empty() {
            reader.tracked(remote).unwrap_or_default()
        } else {
            a.layers.clone()
        };
        check_in_live(&reader, &tracked, &opts.author);
        let result = (|| -> anyhow::Result<(Vec<String>, Vec<LayerReport>)> {
            let store = open_with(cli, &quiet, Access::Write, LockWait::Wait(None))?;
            let layers = if a.layers.is_empty() {
                store.tracked(remote)?
            } else {
                a.layers.clone()
            };
            let mut reports = Vec::new();
            for l in &layers {
                reports.push(store.sync_layer(&conn, l, Mode::Sync, &opts)?);
            }
            Ok((layers, reports))
        })();
        let (layers, wait) = match result {
            Ok((layers, reports)) => {
                status.state = SyncState::Online;
                status.last_success_ns = Some(status.last_attempt_ns);
                status.last_error = None;
                status.failures = 0;
                if out.json {
                    println!(
                        "{}",
                        json!({ "round": round, "ok": true, "layers": reports })
                    );
                } else if !out.quiet {
                    for r in reports
                        .iter()
                        .filter(|r| r.action != lamina_sync::remote::Action::UpToDate)
                    {
                        println!("{}", describe(r));
                    }
                }
                (layers, interval)
            }
            Err(e) => {
                let offline = e
                    .downcast_ref::<lamina_sync::Error>()
                    .is_some_and(|s| s.kind() == ErrorKind::Unreachable);
                status.state = if offline {
                    SyncState::Offline
                } else {
                    SyncState::Failing
                };
                status.last_error = Some(format!("{e:#}"));
                status.failures = status.failures.saturating_add(1);
                if out.json {
                    println!(
                        "{}",
                        json!({ "round": round, "ok": false, "offline": offline, "error": format!("{e:#}") })
                    );
                } else {
                    eprintln!(
                        "sync with {remote}: {e:#}{}",
                        if offline { " (working offline)" } else { "" }
                    );
                }
                let backoff = Duration::from_secs(1u64 << status.failures.min(10)).min(interval);
                (reader.tracked(remote).unwrap_or_default(), backoff)
            }
        };
        status.next_ns = lamina_sync::now_ns() + i64::try_from(wait.as_nanos()).unwrap_or(i64::MAX);
        if let Err(e) = status.save(&reader) {
            tracing::warn!(error = %e, "could not record the sync status");
        }
        // Wait for the next round, a local change, or a stop (a failed
        // refresh leaves the heads as they were: the wait just runs out).
        let _ = reader.refresh();
        let before = heads(&reader, &layers);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(250));
            if reader.refresh().is_ok() && heads(&reader, &layers) != before {
                // Let a burst of commits settle first.
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status(cli: &Cli, out: &Out, remote: Option<&str>) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let names: Vec<String> = match remote {
        Some(r) => {
            store.remote(r)?;
            vec![r.to_owned()]
        }
        None => store.remotes()?.into_iter().map(|r| r.name).collect(),
    };
    let pending: Vec<_> = store
        .conflicts()?
        .into_iter()
        .filter(|c| c.state == ConflictState::Pending)
        .collect();
    let mut rows = Vec::new();
    for r in &names {
        let st = SyncStatus::load(&store, r)?;
        let queued = store.queued(r)?;
        let tracked = store.tracked(r)?;
        rows.push(json!({
            "remote": r,
            "watch": st,
            "queued": queued,
            "pending_conflicts": pending.iter().filter(|c| tracked.contains(&c.layer)).collect::<Vec<_>>(),
        }));
    }
    out.result(&json!({ "remotes": rows }), || {
        let mut s = String::new();
        for row in &rows {
            let r = row["remote"].as_str().unwrap_or("");
            match row["watch"].as_object() {
                None => s.push_str(&format!("{r}: no watch daemon has run\n")),
                Some(w) => {
                    let last = w
                        .get("last_success_ns")
                        .and_then(|v| v.as_i64())
                        .map_or("never".into(), time);
                    s.push_str(&format!(
                        "{r}: {} (last success {last}; pid {})\n",
                        w.get("state").and_then(|v| v.as_str()).unwrap_or("?"),
                        w.get("pid").and_then(|v| v.as_u64()).unwrap_or(0)
                    ));
                    if let Some(e) = w.get("last_error").and_then(|v| v.as_str()) {
                        s.push_str(&format!("  last error: {e}\n"));
                    }
                }
            }
            for q in row["queued"].as_array().into_iter().flatten() {
                s.push_str(&format!(
                    "  {}: {} versions queued\n",
                    q["layer"].as_str().unwrap_or(""),
                    q["versions"].as_u64().unwrap_or(0)
                ));
            }
            for c in row["pending_conflicts"].as_array().into_iter().flatten() {
                s.push_str(&format!(
                    "  conflict {} on {}: waiting for an admin\n",
                    c["id"].as_str().unwrap_or(""),
                    c["layer"].as_str().unwrap_or("")
                ));
            }
        }
        s
    })?;
    Ok(ExitCode::SUCCESS)
}
