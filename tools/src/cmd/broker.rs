//! `lamina host`, `lamina pool`, `lamina session`, `lamina audit`: the
//! broker's records on this (the server's) store, and a user's desktops
//! through a remote. The rule engine and the allocator run in `lamina
//! server`; these commands change what they read.

use std::process::ExitCode;

use anyhow::Context;
use lamina_broker::audit::{self, AuditEntry};
use lamina_broker::rules::{Rules, WeekTime};
use lamina_broker::BrokerCatalog;
use lamina_sync::remote::{ConnectOptions, Connection};
use lamina_sync::{Access, Principal, Store};
use serde_json::{json, Value};

use crate::cli::{AuditCommand, Cli, HostCommand, PoolCommand, PoolCreateArgs, SessionCommand};
use crate::cmd::{open, read_ca, read_token_file};
use crate::output::{bytes, time, NotFound, Out, UsageError};

/// A broker error as the CLI reports it (exit 2 for the caller's mistakes).
pub(crate) fn err(e: lamina_broker::Error) -> anyhow::Error {
    match e {
        lamina_broker::Error::Store(s) => s.into(),
        lamina_broker::Error::NotFound(m) => NotFound(m).into(),
        e if e.is_caller_fault() => UsageError(e.to_string()).into(),
        e => e.into(),
    }
}

/// Who an admin command on the store is, in the audit log.
fn actor() -> String {
    format!("cli:{}", crate::cmd::default_author())
}

pub(crate) fn audit_ok(
    store: &Store,
    action: &str,
    target: &str,
    detail: String,
) -> anyhow::Result<()> {
    audit::record(store, &[AuditEntry::ok(&actor(), action, target, detail)]).map_err(err)
}

fn remote_conn(store: &Store, remote: &str) -> anyhow::Result<Connection> {
    let cfg = store.remote(remote)?;
    Ok(Connection::open(&cfg, &ConnectOptions::default())?)
}

pub fn host(cli: &Cli, out: &Out, c: &HostCommand) -> anyhow::Result<ExitCode> {
    match c {
        HostCommand::Add {
            name,
            url,
            token_file,
            ca,
        } => {
            let token = read_token_file(token_file)?;
            let ca_pem = read_ca(ca.as_deref())?;
            let store = open(cli, out, Access::Write)?;
            let h = store.add_host(name, url, &token, ca_pem).map_err(err)?;
            audit_ok(&store, "host-add", &h.name, h.url.clone())?;
            out.result(
                &json!({"name": h.name, "url": h.url, "ca": h.ca_pem.is_some()}),
                || format!("added host {} at {}", h.name, h.url),
            )?;
        }
        HostCommand::Ls { remote } => {
            let store = open(cli, out, Access::Read)?;
            let rows: Vec<Value> = match remote {
                Some(r) => {
                    let v = remote_conn(&store, r)?.json("GET", "hosts", None)?;
                    v.as_array().cloned().unwrap_or_default()
                }
                None => store
                    .hosts()
                    .map_err(err)?
                    .into_iter()
                    .map(|h| serde_json::to_value(h).unwrap_or_default())
                    .collect(),
            };
            out.result(&json!({ "hosts": rows }), || {
                let mut s = format!(
                    "{:<14} {:<30} {:<6} {:>6} {:>10} {:>4}\n",
                    "NAME", "URL", "STATUS", "LOAD", "MEM FREE", "VMS"
                );
                for h in &rows {
                    let st = &h["status"];
                    let up = st["status"].as_str().unwrap_or("-");
                    s.push_str(&format!(
                        "{:<14} {:<30} {:<6} {:>6} {:>10} {:>4}\n",
                        h["name"].as_str().unwrap_or(""),
                        h["url"].as_str().unwrap_or(""),
                        up,
                        st["report"]["load1"]
                            .as_f64()
                            .map_or("-".into(), |l| format!("{l:.2}")),
                        st["report"]["mem_free"].as_u64().map_or("-".into(), bytes),
                        st["report"]["vms"]
                            .as_array()
                            .map_or("-".into(), |v| v.len().to_string()),
                    ));
                }
                s
            })?;
        }
        HostCommand::Rm { name } => {
            let store = open(cli, out, Access::Write)?;
            store.remove_host(name).map_err(err)?;
            audit_ok(&store, "host-remove", name, String::new())?;
            out.result(&json!({ "removed": name }), || {
                format!("removed host {name}")
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn create_pool(cli: &Cli, out: &Out, a: &PoolCreateArgs) -> anyhow::Result<()> {
    let rules = Rules {
        min_idle: a.min_idle,
        max: a.max,
        per_user: a.per_user,
        stateless: a.stateless,
        idle_timeout: a.idle_timeout.clone(),
        windows: Vec::new(),
    };
    let store = open(cli, out, Access::Write)?;
    let p = store
        .create_pool(&a.name, &a.template, &a.base, rules)
        .map_err(err)?;
    audit_ok(
        &store,
        "pool-create",
        &p.name,
        format!("template {} over {}", p.template, p.base),
    )?;
    out.result(&p, || {
        format!(
            "created pool {} (template {} over {}; {})",
            p.name,
            p.template,
            p.base,
            p.rules.limits(WeekTime::now())
        )
    })
}

pub fn pool(cli: &Cli, out: &Out, c: &PoolCommand) -> anyhow::Result<ExitCode> {
    match c {
        PoolCommand::Create(a) => create_pool(cli, out, a)?,
        PoolCommand::Ls => {
            let store = open(cli, out, Access::Read)?;
            let members = store.members().map_err(err)?;
            let pools = store.pools().map_err(err)?;
            let now = WeekTime::now();
            let rows: Vec<Value> = pools
                .iter()
                .map(|p| {
                    let mine: Vec<_> = members.iter().filter(|m| m.pool == p.name).collect();
                    json!({
                        "name": p.name, "template": p.template, "base": p.base,
                        "limits": p.rules.limits(now), "stateless": p.rules.stateless,
                        "vms": mine.len(),
                        "idle": mine.iter().filter(|m| m.is_idle()).count(),
                        "in_use": mine.iter().filter(|m| m.session.is_some()).count(),
                    })
                })
                .collect();
            out.result(&json!({ "pools": rows }), || {
                let mut s = format!(
                    "{:<16} {:<14} {:<20} {:>8} {:>4} {:>4} {:>5} {:>6}\n",
                    "NAME", "TEMPLATE", "BASE", "MIN-IDLE", "MAX", "VMS", "IDLE", "IN-USE"
                );
                for r in &rows {
                    s.push_str(&format!(
                        "{:<16} {:<14} {:<20} {:>8} {:>4} {:>4} {:>5} {:>6}\n",
                        r["name"].as_str().unwrap_or(""),
                        r["template"].as_str().unwrap_or(""),
                        r["base"].as_str().unwrap_or(""),
                        r["limits"]["min_idle"],
                        r["limits"]["max"],
                        r["vms"],
                        r["idle"],
                        r["in_use"],
                    ));
                }
                s
            })?;
        }
        PoolCommand::Show { name } => {
            let store = open(cli, out, Access::Read)?;
            let p = store.pool(name).map_err(err)?;
            let vms: Vec<_> = store
                .members()
                .map_err(err)?
                .into_iter()
                .filter(|m| m.pool == *name)
                .collect();
            let subs = store.subscriptions(Some(name)).map_err(err)?;
            let doc = json!({"pool": p, "limits": p.rules.limits(WeekTime::now()), "vms": vms, "subscriptions": subs});
            out.result(&doc, || {
                let mut s =
                    format!(
                    "pool      {}\ntemplate  {}\nbase      {}\nnow       {}\nsubscribed {}\n\n{}\n",
                    p.name,
                    p.template,
                    p.base,
                    p.rules.limits(WeekTime::now()),
                    subs.iter().map(|s| s.principal.as_str()).collect::<Vec<_>>().join(", "),
                    p.rules.to_toml().trim_end()
                );
                s += &format!(
                    "\n{:<20} {:<10} {:<10} {:<12} {:>6} {:>10}\n",
                    "VM", "HOST", "STATE", "USER", "CPU%", "RSS"
                );
                for m in &vms {
                    s += &format!(
                        "{:<20} {:<10} {:<10} {:<12} {:>6} {:>10}\n",
                        m.name,
                        m.host,
                        m.state.to_string(),
                        m.owner
                            .as_deref()
                            .or(m.session.as_ref().map(|_| "(session)"))
                            .unwrap_or("-"),
                        m.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
                        m.rss_bytes.map_or("-".into(), bytes),
                    );
                }
                s
            })?;
        }
        PoolCommand::Rules { name, file } => match file {
            None => {
                let store = open(cli, out, Access::Read)?;
                let p = store.pool(name).map_err(err)?;
                out.result(&p.rules, || p.rules.to_toml())?;
            }
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading the rules file {}", f.display()))?;
                let rules = Rules::from_toml(&text)
                    .map_err(|e| UsageError(format!("{}: {e}", f.display())))?;
                let store = open(cli, out, Access::Write)?;
                let p = store.set_rules(name, rules).map_err(err)?;
                audit_ok(
                    &store,
                    "pool-rules",
                    name,
                    p.rules.to_toml().replace('\n', "; "),
                )?;
                out.result(&p.rules, || {
                    format!(
                        "rules of pool {name} replaced: now {}",
                        p.rules.limits(WeekTime::now())
                    )
                })?;
            }
        },
        PoolCommand::Subscribe { pool, who } => {
            let principal: Principal = who.parse()?;
            let store = open(cli, out, Access::Write)?;
            let s = store.subscribe(pool, &principal).map_err(err)?;
            audit_ok(&store, "subscribe", pool, s.principal.clone())?;
            out.result(&s, || format!("{} may use pool {pool}", s.principal))?;
        }
        PoolCommand::Unsubscribe { pool, who } => {
            let principal: Principal = who.parse()?;
            let store = open(cli, out, Access::Write)?;
            let removed = store.unsubscribe(pool, &principal).map_err(err)?;
            if !removed {
                return Err(NotFound(format!("{who} is not subscribed to pool {pool}")).into());
            }
            audit_ok(&store, "unsubscribe", pool, who.clone())?;
            out.result(&json!({"removed": who}), || {
                format!("{who} may no longer use pool {pool}")
            })?;
        }
        PoolCommand::Rm { name } => {
            let store = open(cli, out, Access::Write)?;
            store.remove_pool(name).map_err(err)?;
            audit_ok(&store, "pool-remove", name, String::new())?;
            out.result(&json!({"removed": name}), || format!("removed pool {name}"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn session_rows(list: &[Value]) -> String {
    let mut s = format!(
        "{:<18} {:<12} {:<14} {:<20} {:<10} {}\n",
        "ID", "USER", "POOL", "VM", "HOST", "SINCE"
    );
    for x in list {
        s.push_str(&format!(
            "{:<18} {:<12} {:<14} {:<20} {:<10} {}\n",
            x["id"].as_str().unwrap_or(""),
            x["user"].as_str().unwrap_or(""),
            x["pool"].as_str().unwrap_or(""),
            x["vm"].as_str().unwrap_or(""),
            x["host"].as_str().unwrap_or(""),
            x["started_ns"].as_i64().map_or("-".into(), time),
        ));
    }
    s
}

pub fn session(cli: &Cli, out: &Out, c: &SessionCommand) -> anyhow::Result<ExitCode> {
    match c {
        SessionCommand::Open {
            remote,
            pool,
            another,
        } => {
            let store = open(cli, out, Access::Read)?;
            let conn = remote_conn(&store, remote)?;
            drop(store);
            let d = conn.json(
                "POST",
                &format!("pools/{pool}/desktop"),
                Some(&json!({"another": another})),
            )?;
            out.result(&d, || {
                format!(
                    "session {} on VM {} (host {}), screen {}x{}{}",
                    d["session"]["id"].as_str().unwrap_or(""),
                    d["session"]["vm"].as_str().unwrap_or(""),
                    d["session"]["host"].as_str().unwrap_or(""),
                    d["width"],
                    d["height"],
                    if d["reused"] == true {
                        " (your open session)"
                    } else {
                        ""
                    }
                )
            })?;
        }
        SessionCommand::End { remote, id } => {
            let store = open(cli, out, Access::Read)?;
            let conn = remote_conn(&store, remote)?;
            drop(store);
            let s = conn.json("DELETE", &format!("sessions/{id}"), None)?;
            out.result(&s, || format!("ended session {id}"))?;
        }
        SessionCommand::Ls { remote } => {
            let store = open(cli, out, Access::Read)?;
            let list: Vec<Value> = match remote {
                Some(r) => remote_conn(&store, r)?
                    .json("GET", "sessions", None)?
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
                None => store
                    .sessions()
                    .map_err(err)?
                    .into_iter()
                    .map(|s| serde_json::to_value(s).unwrap_or_default())
                    .collect(),
            };
            out.result(&json!({ "sessions": list }), || session_rows(&list))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--since`: a duration back from now, or an RFC 3339 time.
fn since_ns(s: &str) -> anyhow::Result<i64> {
    if let Ok(d) = humantime::parse_duration(s) {
        let back = i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        return Ok(lamina_sync::now_ns().saturating_sub(back));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        UsageError(format!(
            "bad --since {s:?}: give a duration (1h, 2d) or a time (2026-12-01T08:00:00Z)"
        ))
    })?;
    let ns = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    Ok(ns)
}

pub fn audit(cli: &Cli, out: &Out, c: &AuditCommand) -> anyhow::Result<ExitCode> {
    match c {
        AuditCommand::Ls { since } => {
            let since = since.as_deref().map(since_ns).transpose()?;
            let store = open(cli, out, Access::Read)?;
            let list = audit::list(&store, since).map_err(err)?;
            out.result(&json!({ "entries": list }), || {
                let mut s = String::new();
                for e in &list {
                    s.push_str(&format!(
                        "{}  {:<14} {:<12} {:<26} {}{}\n",
                        time(e.at_ns),
                        e.actor,
                        e.action,
                        e.target,
                        if e.ok { "" } else { "FAILED: " },
                        e.detail
                    ));
                }
                s
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
