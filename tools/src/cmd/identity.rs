//! `lamina user`, `lamina group`, `lamina token`: the identities the
//! server authenticates, kept in this store's catalog.

use std::process::ExitCode;

use lamina_sync::Access;
use serde_json::json;

use crate::cli::{Cli, GroupCommand, TokenCommand, UserCommand};
use crate::cmd::open;
use crate::output::{time, NotFound, Out, UsageError};

pub fn user(cli: &Cli, out: &Out, c: &UserCommand) -> anyhow::Result<ExitCode> {
    match c {
        UserCommand::Add {
            name,
            admin,
            groups,
        } => {
            let store = open(cli, out, Access::Write)?;
            let u = store.add_user(name, *admin, groups)?;
            out.result(&u, || {
                format!(
                    "added user {}{}",
                    u.name,
                    if u.admin { " (admin)" } else { "" }
                )
            })?;
        }
        UserCommand::Ls => {
            let store = open(cli, out, Access::Read)?;
            let users = store.users()?;
            out.result(&json!({ "users": users }), || {
                let mut s = format!("{:<20} {:<6} {}\n", "NAME", "ADMIN", "GROUPS");
                for u in &users {
                    s.push_str(&format!(
                        "{:<20} {:<6} {}\n",
                        u.name,
                        if u.admin { "yes" } else { "no" },
                        u.groups.join(",")
                    ));
                }
                s
            })?;
        }
        UserCommand::Passwd {
            name,
            password_file,
            clear,
        } => {
            let store = open(cli, out, Access::Write)?;
            let broker = |e: lamina_broker::Error| match e {
                lamina_broker::Error::NotFound(m) => anyhow::Error::from(NotFound(m)),
                e if e.is_caller_fault() => UsageError(e.to_string()).into(),
                e => e.into(),
            };
            if *clear {
                let had = lamina_broker::password::clear(&store, name).map_err(broker)?;
                out.result(&json!({ "user": name, "cleared": had }), || {
                    format!("{name} has no console password now")
                })?;
            } else {
                let pw = read_password(password_file.as_deref())?;
                lamina_broker::password::set(&store, name, &pw).map_err(broker)?;
                out.result(&json!({ "user": name, "password": "set" }), || {
                    format!("set the console password of {name}")
                })?;
            }
        }
        UserCommand::Rm { name } => {
            let store = open(cli, out, Access::Write)?;
            store.remove_user(name)?;
            out.result(&json!({ "removed": name }), || {
                format!("removed user {name}")
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The first line of a password file (`-`: standard input).
fn read_password(file: Option<&std::path::Path>) -> anyhow::Result<String> {
    let text = match file {
        Some(p) if p.as_os_str() == "-" => std::io::read_to_string(std::io::stdin())?,
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| UsageError(format!("cannot read password file {}: {e}", p.display())))?,
        None => return Err(UsageError("give --password-file FILE".into()).into()),
    };
    Ok(text.lines().next().unwrap_or("").to_owned())
}

pub fn group(cli: &Cli, out: &Out, c: &GroupCommand) -> anyhow::Result<ExitCode> {
    match c {
        GroupCommand::Add { name } => {
            let store = open(cli, out, Access::Write)?;
            let g = store.add_group(name)?;
            out.result(&g, || format!("added group {}", g.name))?;
        }
        GroupCommand::Ls => {
            let store = open(cli, out, Access::Read)?;
            let users = store.users()?;
            let rows: Vec<_> = store
                .groups()?
                .into_iter()
                .map(|g| {
                    let members: Vec<&str> = users
                        .iter()
                        .filter(|u| u.groups.contains(&g.name))
                        .map(|u| u.name.as_str())
                        .collect();
                    json!({ "name": g.name, "members": members, "created": time(g.created_ns) })
                })
                .collect();
            out.result(&json!({ "groups": rows }), || {
                let mut s = format!("{:<20} {}\n", "NAME", "MEMBERS");
                for r in &rows {
                    let members: Vec<&str> = r["members"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|m| m.as_str()).collect())
                        .unwrap_or_default();
                    s.push_str(&format!(
                        "{:<20} {}\n",
                        r["name"].as_str().unwrap_or(""),
                        members.join(",")
                    ));
                }
                s
            })?;
        }
        GroupCommand::Rm { name } => {
            let store = open(cli, out, Access::Write)?;
            store.remove_group(name)?;
            out.result(&json!({ "removed": name }), || {
                format!("removed group {name}")
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses a lifetime such as `90d`, `12h`, `30m`.
fn lifetime_ns(s: &str) -> Result<i64, UsageError> {
    let d = humantime::parse_duration(s)
        .map_err(|e| UsageError(format!("bad duration `{s}`: {e} (e.g. 90d, 12h, 30m)")))?;
    i64::try_from(d.as_nanos()).map_err(|_| UsageError(format!("duration `{s}` is too long")))
}

pub fn token(cli: &Cli, out: &Out, c: &TokenCommand) -> anyhow::Result<ExitCode> {
    match c {
        TokenCommand::Create { user, expires } => {
            let life = expires.as_deref().map(lifetime_ns).transpose()?;
            let store = open(cli, out, Access::Write)?;
            let (token, info) = store.create_token(user, life)?;
            out.result(
                &json!({
                    "token": token,
                    "id": info.id,
                    "user": info.user,
                    "expires": info.expires_ns.map(time),
                }),
                || token.clone(),
            )?;
            out.note("the token is shown once; only its hash is kept");
        }
        TokenCommand::Ls => {
            let store = open(cli, out, Access::Read)?;
            let rows: Vec<_> = store
                .tokens()?
                .into_iter()
                .map(|t| {
                    json!({
                        "id": t.id,
                        "user": t.user,
                        "created": time(t.created_ns),
                        "expires": t.expires_ns.map(time),
                        "expired": t.expires_ns.is_some_and(|e| e <= lamina_sync::now_ns()),
                    })
                })
                .collect();
            out.result(&json!({ "tokens": rows }), || {
                let mut s = format!(
                    "{:<18} {:<16} {:<22} {}\n",
                    "ID", "USER", "CREATED", "EXPIRES"
                );
                for r in &rows {
                    s.push_str(&format!(
                        "{:<18} {:<16} {:<22} {}{}\n",
                        r["id"].as_str().unwrap_or(""),
                        r["user"].as_str().unwrap_or(""),
                        r["created"].as_str().unwrap_or(""),
                        r["expires"].as_str().unwrap_or("never"),
                        if r["expired"].as_bool() == Some(true) {
                            " (expired)"
                        } else {
                            ""
                        }
                    ));
                }
                s
            })?;
        }
        TokenCommand::Revoke { id } => {
            let store = open(cli, out, Access::Write)?;
            let t = store.revoke_token(id)?;
            out.result(&json!({ "revoked": t.id, "user": t.user }), || {
                format!("revoked token {} of {}", t.id, t.user)
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
