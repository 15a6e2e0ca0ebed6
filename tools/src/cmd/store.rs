//! `lamina init`, `lamina fsck`, `lamina gc`.

use std::process::ExitCode;
use std::time::Duration;

use lamina_sync::{Access, GcOptions, Store};

use crate::cli::{Cli, GcArgs};
use crate::cmd::{open, store_path};
use crate::output::{bytes, Out, UsageError};
use crate::progress::Bar;

pub fn init(cli: &Cli, out: &Out) -> anyhow::Result<ExitCode> {
    let path = store_path(cli)?;
    Store::init(&path)?;
    let doc = serde_json::json!({"store": path, "created": true});
    out.result(&doc, || format!("initialised store {}", path.display()))?;
    Ok(ExitCode::SUCCESS)
}

pub fn fsck(cli: &Cli, out: &Out) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let report = {
        let bar = Bar::new(out.progress_allowed());
        store.fsck(&bar)?
    };
    out.result(&report, || {
        let mut s = String::new();
        for p in &report.problems {
            s.push_str(&format!("{}: {}\n", p.object, p.message));
            for u in &p.used_by {
                s.push_str(&format!("  used by {u}\n"));
            }
        }
        s.push_str(&format!(
            "{}: {} versions, {} manifest nodes, {} reachable chunks, {} stored chunks checked, {} problems",
            if report.ok { "ok" } else { "DAMAGED" },
            report.versions,
            report.manifests,
            report.chunks_reachable,
            report.chunks_checked,
            report.problems.len()
        ));
        s
    })?;
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn gc(cli: &Cli, out: &Out, args: &GcArgs) -> anyhow::Result<ExitCode> {
    let expire_reflog = match args.expire_reflog {
        None => None,
        Some(d) if d.is_finite() && d >= 0.0 => Some(Duration::from_secs_f64(d * 86_400.0)),
        Some(d) => {
            return Err(UsageError(format!(
                "--expire-reflog {d}: expected a number of days ≥ 0"
            ))
            .into())
        }
    };
    let store = open(cli, out, Access::Gc)?;
    let opts = GcOptions {
        expire_reflog,
        dry_run: args.dry_run,
    };
    let report = {
        let bar = Bar::new(out.progress_allowed());
        store.gc(&opts, &bar)?
    };
    out.result(&report, || {
        format!(
            "{}{} of {} chunks unreachable ({} stored); {} packs deleted, {} rewritten, {} freed{}",
            if report.dry_run { "dry run: " } else { "" },
            report.chunks_removed,
            report.chunks_total,
            bytes(report.bytes_removed),
            report.packs_deleted,
            report.packs_rewritten,
            bytes(report.bytes_freed),
            if report.reflog_expired > 0 {
                format!("; {} reflog entries expired", report.reflog_expired)
            } else {
                String::new()
            }
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
