//! `lamina remote ...`: the servers this store syncs with.

use std::process::ExitCode;

use lamina_sync::remote::{check_url, ConnectOptions, Connection, RemoteConfig};
use lamina_sync::Access;
use serde_json::json;

use crate::cli::{Cli, RemoteCommand};
use crate::cmd::{open, read_ca, read_token_file};
use crate::output::Out;

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
            }
            let store = open(cli, out, Access::Write)?;
            store.add_remote(&cfg)?;
            out.result(
                &json!({ "name": cfg.name, "url": cfg.url, "user": cfg.user, "ca": cfg.ca_pem.is_some() }),
                || match &cfg.user {
                    Some(u) => format!("added remote {} ({} as {u})", cfg.name, cfg.url),
                    None => format!("added remote {} ({}, not checked)", cfg.name, cfg.url),
                },
            )?;
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
