//! `lamina hotel ...`: OS layers cached on this client, and switching a
//! composition or a disk between them.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;

use lamina_sync::hotel::{cache_bytes, plan_eviction};
use lamina_sync::remote::{Mode, SyncOptions};
use lamina_sync::{Access, GcOptions, LayerKind, NoProgress, Store};
use serde_json::json;

use crate::cli::{Cli, HotelCommand, SyncWho};
use crate::cmd::sync::{connect, host_name};
use crate::cmd::{default_author, open};
use crate::output::{bytes, parse_size, time, NotFound, Out, UsageError};
use crate::progress::Bar;

pub fn run(cli: &Cli, out: &Out, c: &HotelCommand) -> anyhow::Result<ExitCode> {
    match c {
        HotelCommand::Ls => ls(cli, out),
        HotelCommand::Add { spec, who } => add(cli, out, spec, who),
        HotelCommand::Rm { layer } => rm(cli, out, layer),
        HotelCommand::Switch {
            target,
            layer,
            discard_changes,
        } => switch(cli, out, target, layer, *discard_changes),
        HotelCommand::Limit { size, clear } => limit(cli, out, size.as_deref(), *clear),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Who uses each layer: compositions (any slot) and disks (their base).
pub fn users(store: &Store) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in lamina_fs::compose::list(store)? {
        for s in &c.slots {
            by.entry(s.layer.clone())
                .or_default()
                .push(format!("composition {}", c.name));
        }
    }
    for d in lamina_nbd::disk::list(store)? {
        if let Some(b) = d.base {
            by.entry(b.layer)
                .or_default()
                .push(format!("disk {}", d.name));
        }
    }
    Ok(by)
}

fn ls(cli: &Cli, out: &Out) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    let occupants = store.hotel_occupants()?;
    let users = users(&store)?;
    let limit = store.hotel_limit()?;
    let mut rows = Vec::new();
    for o in &occupants {
        let layer = store.layer(&o.entry.layer)?;
        let current = store.current(&layer)?;
        rows.push(json!({
            "layer": o.entry.layer,
            "remote": o.entry.remote,
            "format": layer.format,
            "version": current,
            "bytes": o.bytes,
            "added": lamina_sync::rfc3339(o.entry.added_ns),
            "last_used": lamina_sync::rfc3339(o.entry.last_used_ns),
            "last_used_ns": o.entry.last_used_ns,
            "used_by": users.get(&o.entry.layer).cloned().unwrap_or_default(),
        }));
    }
    let total = cache_bytes(&occupants);
    out.result(
        &json!({"layers": rows, "bytes": total, "limit": limit}),
        || {
            let mut t = format!(
                "{:<28} {:<8} {:>10} {:<20} {:<10} USED BY\n",
                "LAYER", "FORMAT", "SIZE", "LAST USED", "VERSION"
            );
            for (o, r) in occupants.iter().zip(&rows) {
                let by = r["used_by"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                t.push_str(&format!(
                    "{:<28} {:<8} {:>10} {:<20} {:<10} {}\n",
                    o.entry.layer,
                    r["format"].as_str().unwrap_or("-"),
                    bytes(o.bytes),
                    time(o.entry.last_used_ns),
                    r["version"]
                        .as_str()
                        .map_or_else(|| "-".to_owned(), |v| v.chars().take(8).collect()),
                    if by.is_empty() { "-" } else { &by },
                ));
            }
            t.push_str(&format!(
                "{} cached in {} layers{}",
                bytes(total),
                occupants.len(),
                limit.map_or_else(String::new, |l| format!(", limit {}", bytes(l)))
            ));
            t
        },
    )
}

fn add(cli: &Cli, out: &Out, spec: &str, who: &SyncWho) -> anyhow::Result<()> {
    let Some((remote, layer)) = spec
        .split_once(':')
        .filter(|(r, l)| !r.is_empty() && !l.is_empty())
    else {
        return Err(UsageError(format!(
            "`{spec}`: expected REMOTE:LAYER, e.g. origin:os/debian12"
        ))
        .into());
    };
    let store = open(cli, out, Access::Write)?;
    let conn = connect(&store, remote, who.retries, false)?;
    let info = conn.layer(layer)?.ok_or_else(|| {
        NotFound(format!(
            "remote {remote} has no layer `{layer}` this user may read"
        ))
    })?;
    if info.kind != LayerKind::Os {
        return Err(UsageError(format!(
            "layer `{layer}` is a {} layer; the hotel caches os layers (pull other layers with lamina pull)",
            info.kind
        ))
        .into());
    }
    let bar = Bar::new(out.progress_allowed());
    let opts = SyncOptions {
        host: host_name(&who.host),
        author: who.author.clone().unwrap_or_else(default_author),
        progress: &bar,
    };
    let report = store.sync_layer(&conn, layer, Mode::Pull, &opts)?;
    drop(bar);
    store.hotel_add(layer, remote)?;
    let evicted = enforce_limit(store, layer)?;
    out.result(
        &json!({"added": layer, "remote": remote, "pull": report, "evicted": evicted}),
        || {
            let mut t = format!(
                "cached {layer} from {remote} ({} received)",
                bytes(report.received.bytes)
            );
            for e in &evicted {
                t.push_str(&format!(
                    "\nevicted {e} (least recently used, over the limit)"
                ));
            }
            t
        },
    )
}

/// Evicts least recently used layers that nothing uses until the cache
/// fits its limit; `keep` (just added or switched to) stays. Takes the
/// store (reopened for gc to free the space).
fn enforce_limit(store: Store, keep: &str) -> anyhow::Result<Vec<String>> {
    let Some(limit) = store.hotel_limit()? else {
        return Ok(Vec::new());
    };
    let occupants = store.hotel_occupants()?;
    let mut kept: HashSet<String> = users(&store)?.into_keys().collect();
    kept.insert(keep.to_owned());
    let evict = plan_eviction(&occupants, &kept, limit);
    if evict.is_empty() {
        if cache_bytes(&occupants) > limit {
            tracing::warn!(
                limit,
                "the hotel cache is over its limit, but every layer left is in use"
            );
        }
        return Ok(evict);
    }
    for l in &evict {
        store.forget_layer(l)?;
    }
    let root = store.root().to_owned();
    drop(store);
    collect_garbage(&root)?;
    Ok(evict)
}

/// A gc of the store at `root` (after layers were forgotten).
fn collect_garbage(root: &std::path::Path) -> anyhow::Result<()> {
    let notice = |_: &str| {};
    let store = Store::open(
        root,
        &lamina_sync::OpenOptions {
            access: Access::Gc,
            wait: lamina_sync::LockWait::Wait(Some(std::time::Duration::from_secs(60))),
            notice: &notice,
            command: "lamina hotel (freeing evicted layers)".into(),
        },
    )?;
    store.gc(&GcOptions::default(), &NoProgress)?;
    Ok(())
}

fn rm(cli: &Cli, out: &Out, layer: &str) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Write)?;
    if store.hotel_entry(layer)?.is_none() {
        return Err(NotFound(format!("layer `{layer}` is not in the hotel cache")).into());
    }
    if let Some(by) = users(&store)?.get(layer) {
        return Err(UsageError(format!(
            "layer `{layer}` is in use by {}: switch or remove those first",
            by.join(", ")
        ))
        .into());
    }
    store.forget_layer(layer)?;
    let root = store.root().to_owned();
    drop(store);
    collect_garbage(&root)?;
    out.result(&json!({"removed": layer}), || {
        format!("removed {layer} from the hotel cache")
    })
}

fn switch(cli: &Cli, out: &Out, target: &str, layer: &str, discard: bool) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Write)?;
    let is_comp = store
        .record(lamina_fs::compose::RECORD_KIND, target)?
        .is_some();
    let is_disk = store
        .record(lamina_nbd::disk::RECORD_KIND, target)?
        .is_some();
    let (kind, from, to) = match (is_comp, is_disk) {
        (true, true) => {
            return Err(UsageError(format!(
                "`{target}` names both a composition and a disk; rename one"
            ))
            .into())
        }
        (false, false) => {
            return Err(NotFound(format!("no composition or disk named `{target}`")).into())
        }
        (true, false) => {
            let before = lamina_fs::compose::get(&store, target)?;
            let old = before
                .slots
                .iter()
                .find(|s| s.kind == LayerKind::Os)
                .map(|s| s.layer.clone());
            let after = lamina_fs::compose::switch_os(&store, target, layer)?;
            let new = after
                .slots
                .iter()
                .find(|s| s.kind == LayerKind::Os)
                .and_then(|s| s.pin);
            ("composition", old, new)
        }
        (false, true) => {
            let before = lamina_nbd::disk::get(&store, target)?;
            let after = lamina_nbd::rebase::rebase(&store, target, layer, discard)?;
            (
                "disk",
                before.base.map(|b| b.layer),
                after.base.map(|b| b.version),
            )
        }
    };
    store.hotel_touch(layer)?;
    out.result(
        &json!({"switched": target, "kind": kind, "from": from, "to": layer, "version": to}),
        || {
            format!(
                "{kind} {target}: {} → {layer}{}",
                from.as_deref().unwrap_or("-"),
                to.map_or_else(String::new, |v| format!(" at {}", v.short()))
            )
        },
    )
}

fn limit(cli: &Cli, out: &Out, size: Option<&str>, clear: bool) -> anyhow::Result<()> {
    if size.is_none() && !clear {
        let store = open(cli, out, Access::Read)?;
        let l = store.hotel_limit()?;
        return out.result(&json!({"limit": l}), || {
            l.map_or_else(|| "no limit".into(), bytes)
        });
    }
    let store = open(cli, out, Access::Write)?;
    let l = size.map(parse_size).transpose()?;
    store.set_hotel_limit(l)?;
    let evicted = if l.is_some() {
        enforce_limit(store, "")?
    } else {
        Vec::new()
    };
    out.result(&json!({"limit": l, "evicted": evicted}), || {
        let mut t = l.map_or_else(|| "limit removed".into(), |l| format!("limit {}", bytes(l)));
        for e in &evicted {
            t.push_str(&format!("\nevicted {e}"));
        }
        t
    })
}

/// Notes that the cached layers `which` picks were just used (a mount, a
/// serve), when the store can be written at once; a busy store only loses
/// the note.
pub fn touch(cli: &Cli, out: &Out, which: impl FnOnce(&Store) -> anyhow::Result<Vec<String>>) {
    let store = match crate::cmd::open_with(cli, out, Access::Write, lamina_sync::LockWait::Fail) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%e, "last use of cached layers not noted");
            return;
        }
    };
    let layers = match which(&store) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(%e, "last use of cached layers not noted");
            return;
        }
    };
    for l in &layers {
        if let Err(e) = store.hotel_touch(l) {
            tracing::debug!(layer = %l, %e, "last use not noted");
        }
    }
}
