//! `lamina conflicts ...`: what the mediator met, and resolving what waits
//! (run on the server's store by its admin).

use std::path::PathBuf;
use std::process::ExitCode;

use lamina_sync::merge::{Choice, ConflictState};
use lamina_sync::remote::{ConnectOptions, Connection};
use lamina_sync::Access;
use serde_json::json;

use crate::cli::{Cli, ConflictsCommand};
use crate::cmd::{default_author, open};
use crate::output::{time, Out};
use crate::progress::Bar;

pub fn run(cli: &Cli, out: &Out, c: &ConflictsCommand) -> anyhow::Result<ExitCode> {
    match c {
        ConflictsCommand::Ls { all, remote } => {
            let store = open(cli, out, Access::Read)?;
            let every = match remote {
                None => store.conflicts()?,
                Some(r) => {
                    let cfg = store.remote(r)?;
                    Connection::open(&cfg, &ConnectOptions::default())?.conflicts()?
                }
            };
            let list: Vec<_> = every
                .into_iter()
                .filter(|c| *all || c.state == ConflictState::Pending)
                .collect();
            out.result(&json!({ "conflicts": list }), || {
                let mut s = format!(
                    "{:<10} {:<9} {:<24} {:<12} {:<12} {:>5}  {}\n",
                    "ID", "STATE", "LAYER", "HOST", "POLICY", "PATHS", "WHEN"
                );
                for c in &list {
                    s.push_str(&format!(
                        "{:<10} {:<9} {:<24} {:<12} {:<12} {:>5}  {}\n",
                        c.id,
                        c.state.as_str(),
                        c.layer,
                        c.host,
                        c.policy.as_str(),
                        c.items.len(),
                        time(c.created_ns)
                    ));
                }
                s
            })?;
        }
        ConflictsCommand::Show { id } => {
            let store = open(cli, out, Access::Read)?;
            let rec = store.conflict(id)?;
            let items = store.show_conflict(&rec)?;
            out.result(&json!({ "conflict": rec, "items": items }), || {
                let mut s = format!(
                    "conflict {} on {} ({}), from {} ({}), {}\nbase {}  server {}  client {}\n",
                    rec.id,
                    rec.layer,
                    rec.state.as_str(),
                    rec.host,
                    if rec.user.is_empty() { "-" } else { &rec.user },
                    time(rec.created_ns),
                    rec.base.map_or("-".into(), |b| b.short()),
                    rec.server.short(),
                    rec.client.short()
                );
                for (i, shown) in rec.items.iter().zip(&items) {
                    s.push_str(&format!("\n{}  {:?}  {}\n", i.path, i.kind, i.resolution));
                    if let Some(text) = &shown.premerged {
                        s.push_str(if shown.clean {
                            "--- merges cleanly:\n"
                        } else {
                            "--- pre-merged (<<<<<<< ours: server, >>>>>>> theirs: client):\n"
                        });
                        s.push_str(text);
                        if !text.ends_with('\n') {
                            s.push('\n');
                        }
                    }
                }
                s
            })?;
        }
        ConflictsCommand::Resolve {
            id,
            take,
            path,
            author,
        } => {
            let choice = match take.as_str() {
                "server" => Choice::Server,
                "client" => Choice::Client,
                file => Choice::File(PathBuf::from(file)),
            };
            let store = open(cli, out, Access::Write)?;
            let bar = Bar::new(out.progress_allowed());
            let (head, rec) = store.resolve_conflict(
                id,
                &choice,
                path.as_deref(),
                &author.clone().unwrap_or_else(default_author),
                &bar,
            )?;
            drop(bar);
            out.result(&json!({ "conflict": rec, "head": head }), || {
                format!(
                    "resolved conflict {} on {}: new head {}",
                    rec.id,
                    rec.layer,
                    head.short()
                )
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
