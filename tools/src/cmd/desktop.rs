//! `lamina desktop`: the VDI socket — desktops of other VDI products (any
//! VNC server) registered as members of the broker's pools.

use std::process::ExitCode;

use lamina_broker::desktop;
use lamina_sync::Access;
use serde_json::json;

use crate::cli::{Cli, DesktopCommand};
use crate::cmd::broker::{audit_ok, err};
use crate::cmd::open;
use crate::output::{Out, UsageError};

pub fn run(cli: &Cli, out: &Out, c: &DesktopCommand) -> anyhow::Result<ExitCode> {
    match c {
        DesktopCommand::Add {
            name,
            vnc,
            password_file,
            pool,
        } => {
            let password = match password_file {
                Some(p) => {
                    let text = std::fs::read_to_string(p).map_err(|e| {
                        UsageError(format!("cannot read password file {}: {e}", p.display()))
                    })?;
                    Some(text.lines().next().unwrap_or("").to_owned())
                }
                None => None,
            };
            let store = open(cli, out, Access::Write)?;
            let m = desktop::add(&store, name, vnc, password.as_deref(), pool).map_err(err)?;
            audit_ok(
                &store,
                "desktop-add",
                &format!("{pool}/{name}"),
                format!(
                    "VNC {vnc}{}",
                    if password.is_some() {
                        " with a password"
                    } else {
                        ""
                    }
                ),
            )?;
            out.result(
                &json!({"desktop": m.name, "pool": m.pool, "vnc": m.vnc}),
                || format!("added desktop {name} ({vnc}) to pool {pool}"),
            )?;
        }
        DesktopCommand::Ls => {
            let store = open(cli, out, Access::Read)?;
            let list = desktop::list(&store).map_err(err)?;
            out.result(&json!({ "desktops": list }), || {
                let mut s = format!(
                    "{:<20} {:<14} {:<24} {:<9} {}\n",
                    "NAME", "POOL", "VNC", "PASSWORD", "USER"
                );
                for d in &list {
                    s.push_str(&format!(
                        "{:<20} {:<14} {:<24} {:<9} {}\n",
                        d.name,
                        d.pool,
                        d.vnc,
                        if d.password { "kept" } else { "none" },
                        d.owner.as_deref().unwrap_or("-")
                    ));
                }
                s
            })?;
        }
        DesktopCommand::Rm { name } => {
            let store = open(cli, out, Access::Write)?;
            let m = desktop::remove(&store, name).map_err(err)?;
            audit_ok(
                &store,
                "desktop-rm",
                &format!("{}/{name}", m.pool),
                String::new(),
            )?;
            out.result(&json!({ "removed": name }), || {
                format!("removed desktop {name}")
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
