//! `lamina init`, `lamina fsck`, `lamina gc`.

use std::process::ExitCode;
use std::time::Duration;

use lamina_sync::rados::RadosTarget;
use lamina_sync::{Access, GcOptions, Store, StoreBackend};

use crate::cli::{BackendKind, CephArgs, Cli, GcArgs, InitArgs, MigrateArgs, StoreCommand};
use crate::cmd::{open, store_path};
use crate::output::{bytes, Out, UsageError};
use crate::progress::Bar;

pub fn init(cli: &Cli, args: &InitArgs, out: &Out) -> anyhow::Result<ExitCode> {
    let path = store_path(cli)?;
    let backend = match args.backend {
        BackendKind::Local => {
            if args.ceph.pool.is_some() {
                return Err(UsageError("--pool needs --backend rados".into()).into());
            }
            StoreBackend::Local
        }
        BackendKind::Rados => StoreBackend::Rados(rados_target(&args.ceph)?),
    };
    Store::init_with(&path, &backend)?;
    let (kind, pool) = match &backend {
        StoreBackend::Local => ("local", None),
        StoreBackend::Rados(t) => ("rados", Some(t.pool.clone())),
    };
    let doc = serde_json::json!({"store": path, "created": true, "backend": kind, "pool": pool});
    out.result(&doc, || match &pool {
        None => format!("initialised store {}", path.display()),
        Some(p) => format!(
            "initialised store {} on RADOS pool {p} (joined the store there if it had one)",
            path.display()
        ),
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The RADOS target named by `--pool`, `--ceph-conf`, `--ceph-user`.
pub fn rados_target(args: &CephArgs) -> anyhow::Result<RadosTarget> {
    let pool = args
        .pool
        .clone()
        .ok_or_else(|| UsageError("--backend rados needs --pool POOL".into()))?;
    if pool.is_empty() || pool.contains(['\0', '/']) {
        return Err(UsageError(format!("bad pool name `{}`", pool.escape_debug())).into());
    }
    let mut t = RadosTarget::new(&pool, args.ceph_conf.clone());
    t.user = args.ceph_user.clone();
    t.timeout_secs = args.ceph_timeout.max(1);
    Ok(t)
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

pub fn store(cli: &Cli, out: &Out, c: &StoreCommand) -> anyhow::Result<ExitCode> {
    match c {
        StoreCommand::Stats => stats(cli, out),
        StoreCommand::Migrate(a) => migrate(cli, out, a),
    }
}

fn backend_doc(b: &StoreBackend) -> serde_json::Value {
    match b {
        StoreBackend::Local => serde_json::json!({"kind": "local"}),
        StoreBackend::Rados(t) => serde_json::json!({
            "kind": "rados", "pool": t.pool, "conf": t.conf, "user": t.user,
        }),
    }
}

fn stats(cli: &Cli, out: &Out) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let s = store.backend().stats()?;
    let doc = serde_json::json!({
        "store": store.root(),
        "id": store.id(),
        "backend": backend_doc(&store.store_backend()),
        "chunks": s.chunks,
        "plain_bytes": s.plain_bytes,
        "stored_bytes": s.stored_bytes,
        "disk_bytes": s.disk_bytes,
    });
    out.result(&doc, || {
        let where_ = match store.store_backend() {
            StoreBackend::Local => format!("local, {}", store.root().display()),
            StoreBackend::Rados(t) => format!("RADOS pool {}", t.pool),
        };
        format!(
            "{where_}: {} chunks, {} plain, {} stored, {} occupied",
            s.chunks,
            bytes(s.plain_bytes),
            bytes(s.stored_bytes),
            bytes(s.disk_bytes)
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Record kind marking a migration's destination with its source.
const MIGRATION: &str = "migration";

fn migrate(cli: &Cli, out: &Out, a: &MigrateArgs) -> anyhow::Result<ExitCode> {
    if a.to != BackendKind::Rados {
        return Err(UsageError("store migrate moves a store --to rados".into()).into());
    }
    let src = open(cli, out, Access::Read)?;
    if src.store_backend() != StoreBackend::Local {
        return Err(
            UsageError(format!("store {} is already on Ceph", src.root().display())).into(),
        );
    }
    let target = rados_target(&a.ceph)?;
    let into = match &a.into {
        Some(d) => d.clone(),
        None => {
            let mut p = src.root().as_os_str().to_owned();
            p.push(".rados");
            std::path::PathBuf::from(p)
        }
    };
    if !into.join("lamina-store").exists() {
        Store::init_with(&into, &StoreBackend::Rados(target.clone()))?;
    }
    let dst = Store::open(&into, &lamina_sync::OpenOptions::new(Access::Write))?;
    if dst.store_backend() != StoreBackend::Rados(target.clone()) {
        return Err(UsageError(format!(
            "{} is not a store on RADOS pool {}",
            into.display(),
            target.pool
        ))
        .into());
    }
    let from = dst.record(MIGRATION, "source")?;
    match from {
        Some(id) if id == src.id().as_bytes() => {}
        Some(id) => {
            return Err(UsageError(format!(
                "pool {} holds a migration of another store ({})",
                target.pool,
                String::from_utf8_lossy(&id)
            ))
            .into())
        }
        None if !dst.layers()?.is_empty() || !dst.refs()?.is_empty() => {
            return Err(UsageError(format!(
                "pool {} already holds a store with layers; migrate into an empty pool",
                target.pool
            ))
            .into())
        }
        None => {
            let mut b = dst.batch()?;
            b.put_record(MIGRATION, "source", src.id().as_bytes())?;
            dst.commit(b)?;
        }
    }
    let report = {
        let bar = Bar::new(out.progress_allowed());
        src.replicate_into(&dst, false, &bar)?
    };
    let doc = serde_json::json!({
        "from": src.root(), "into": into, "pool": target.pool, "report": report,
    });
    out.result(&doc, || {
        format!(
            "copied {} of {} chunks ({}) and {} catalog entries onto RADOS pool {}\n\
             the store on Ceph opens as --store {} (more servers: `lamina --store DIR init --backend rados --pool {}`)",
            report.chunks_copied,
            report.chunks,
            bytes(report.bytes_copied),
            report.records_written,
            target.pool,
            into.display(),
            target.pool
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
