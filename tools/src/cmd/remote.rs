//! `lamina remote ...`: the servers this store syncs with.

use std::process::ExitCode;

use lamina_sync::remote::{check_url, ConnectOptions, Connection, RemoteConfig};
use lamina_sync::Access;
use serde_json::json;

use crate::cli::{Cli, KeyCommand, RemoteCommand};
use crate::cmd::{open, read_ca, read_token_file};
use crate::output::{time, Out};

pub fn run(cli: &Cli, out: &Out, c: &RemoteCommand) -> anyhow::Result<ExitCode> {
    match c {
        RemoteCommand::Add {
            name,
            url,
            token_file,
            ca,
            insecure,
            no_check,
        } => {
            let url = check_url(url, *insecure)?;
            let token = read_token_file(token_file)?;
            let ca_pem = read_ca(ca.as_deref())?;
            let mut cfg = RemoteConfig {
                name: name.clone(),
                url,
                token,
                ca_pem,
                user: None,
                added_ns: lamina_sync::now_ns(),
                keys: Vec::new(),
            };
            if !no_check {
                let conn = Connection::open(
                    &cfg,
                    &ConnectOptions {
                        retries: 0,
                        ..ConnectOptions::default()
                    },
                )?;
                let me = conn.whoami()?;
                cfg.user = Some(me.user);
                // Its signing keys, trusted from now on (see `remote trust`).
                cfg.keys = lamina_sync::sign::trust_all(&conn.keys()?);
            }
            let store = open(cli, out, Access::Write)?;
            store.add_remote(&cfg)?;
            let keys: Vec<&str> = cfg.keys.iter().map(|k| k.id.as_str()).collect();
            out.result(
                &json!({ "name": cfg.name, "url": cfg.url, "user": cfg.user, "ca": cfg.ca_pem.is_some(), "keys": keys }),
                || match &cfg.user {
                    Some(u) if keys.is_empty() => format!("added remote {} ({} as {u}; it signs nothing)", cfg.name, cfg.url),
                    Some(u) => format!("added remote {} ({} as {u}; trusting signing keys {})", cfg.name, cfg.url, keys.join(", ")),
                    None => format!("added remote {} ({}, not checked)", cfg.name, cfg.url),
                },
            )?;
        }
        RemoteCommand::Trust { name } => {
            let store = open(cli, out, Access::Write)?;
            let mut cfg = store.remote(name)?;
            let conn = Connection::open(&cfg, &ConnectOptions::default())?;
            cfg.keys = lamina_sync::sign::trust_all(&conn.keys()?);
            store.add_remote(&cfg)?;
            let keys: Vec<&str> = cfg.keys.iter().map(|k| k.id.as_str()).collect();
            out.result(&json!({ "name": name, "keys": keys }), || {
                if keys.is_empty() {
                    format!(
                        "remote {name} has no signing key: its os and group layers are not checked"
                    )
                } else {
                    format!("trusting signing keys {} of remote {name}", keys.join(", "))
                }
            })?;
        }
        RemoteCommand::Ls => {
            let store = open(cli, out, Access::Read)?;
            let remotes = store.remotes()?;
            out.result(&json!({ "remotes": remotes }), || {
                let mut s = format!("{:<12} {:<32} {:<12} {}\n", "NAME", "URL", "USER", "LAYERS");
                for r in &remotes {
                    s.push_str(&format!(
                        "{:<12} {:<32} {:<12} {}\n",
                        r.name,
                        r.url,
                        r.user.as_deref().unwrap_or("-"),
                        r.layers.join(",")
                    ));
                }
                s
            })?;
        }
        RemoteCommand::Rm { name } => {
            let store = open(cli, out, Access::Write)?;
            store.remove_remote(name)?;
            out.result(&json!({ "removed": name }), || {
                format!("removed remote {name}")
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `lamina key ...`.
pub fn key(cli: &Cli, out: &Out, c: &KeyCommand) -> anyhow::Result<ExitCode> {
    let row = |k: &lamina_sync::sign::PublicKey| {
        json!({
            "id": k.id,
            "public": k.public,
            "created": time(k.created_ns),
            "revoked": k.revoked_ns.map(time),
            "endorsed_by": k.endorsed_by.as_ref().map(|e| e.key.clone()),
        })
    };
    match c {
        KeyCommand::Generate => {
            let store = open(cli, out, Access::Write)?;
            let k = store.generate_key()?;
            out.result(&row(&k), || match &k.endorsed_by {
                Some(e) => format!(
                    "signing key {} made (endorsed by {}); it signs from now on",
                    k.id, e.key
                ),
                None => format!("signing key {} made; it signs from now on", k.id),
            })?;
        }
        KeyCommand::Ls => {
            let store = open(cli, out, Access::Read)?;
            let keys = store.signing_keys()?;
            let active = keys
                .iter()
                .rev()
                .find(|k| k.revoked_ns.is_none())
                .map(|k| k.id.clone());
            let rows: Vec<_> = keys
                .iter()
                .map(|k| {
                    let mut r = row(k);
                    r["active"] = json!(active.as_deref() == Some(k.id.as_str()));
                    r
                })
                .collect();
            out.result(&json!({ "keys": rows }), || {
                let mut s = format!(
                    "{:<18} {:<8} {:<26} {}\n",
                    "ID", "STATE", "CREATED", "ENDORSED BY"
                );
                for (k, r) in keys.iter().zip(&rows) {
                    let state = if k.revoked_ns.is_some() {
                        "revoked"
                    } else if r["active"] == true {
                        "active"
                    } else {
                        "trusted"
                    };
                    s.push_str(&format!(
                        "{:<18} {:<8} {:<26} {}\n",
                        k.id,
                        state,
                        r["created"].as_str().unwrap_or(""),
                        k.endorsed_by.as_ref().map_or("-", |e| e.key.as_str())
                    ));
                }
                s
            })?;
        }
        KeyCommand::Revoke { id } => {
            let store = open(cli, out, Access::Write)?;
            let k = store.revoke_key(id)?;
            out.result(&row(&k), || format!("revoked signing key {}", k.id))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
