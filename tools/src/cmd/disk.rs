//! `lamina disk ...`.

use std::process::ExitCode;
use std::sync::Arc;

use lamina_nbd::disk::{self, DiskRecord};
use lamina_sync::{split_layer_spec, Access, Store};
use serde_json::{json, Value};

use crate::cli::{Cli, DiskCommand};
use crate::cmd::{default_author, open};
use crate::output::{bytes, parse_size, time, Out};

pub fn run(cli: &Cli, out: &Out, c: &DiskCommand) -> anyhow::Result<ExitCode> {
    match c {
        DiskCommand::Create {
            name,
            base,
            size,
            stream: false,
        } => create(cli, out, name, base.as_deref(), size.as_deref()),
        DiskCommand::Create {
            name,
            base,
            size,
            stream: true,
        } => create_streamed(
            cli,
            out,
            name,
            base.as_deref().unwrap_or(""),
            size.as_deref(),
        ),
        DiskCommand::Ls => ls(cli, out),
        DiskCommand::Show { name } => show(cli, out, name),
        DiskCommand::Rm { name } => {
            let store = open(cli, out, Access::Write)?;
            disk::remove(&store, name)?;
            out.result(&json!({"removed": name}), || format!("removed disk {name}"))
        }
        DiskCommand::Status { name } => status(cli, out, name),
        DiskCommand::Commit {
            name,
            message,
            to,
            author,
        } => commit(
            cli,
            out,
            name,
            message.as_deref(),
            to.as_deref(),
            author.as_deref(),
        ),
        DiskCommand::Reset { name } => {
            let store = open(cli, out, Access::Write)?;
            disk::reset(&store, name)?;
            out.result(&json!({"reset": name}), || {
                format!("dropped the changes of disk {name}")
            })
        }
    }?;
    Ok(ExitCode::SUCCESS)
}

fn describe(store: &Store, d: &DiskRecord) -> Value {
    let status = disk::status(store, &d.name).ok();
    let stream = d
        .base
        .as_ref()
        .filter(|b| b.is_streaming(store).unwrap_or(false))
        .map(|b| {
            let s = lamina_nbd::stream::status(store, b.version);
            json!({
                "remote": b.stream,
                "local_clusters": s.local_clusters,
                "total_clusters": s.total_clusters,
                "prefetch_rate_bytes_s": s.rate_bytes_s,
                "fetched_bytes": s.fetched_bytes,
                "failures": s.failures,
                "last_error": s.last_error,
                "done": s.done,
            })
        });
    json!({
        "name": d.name,
        "size": d.size,
        "base": d.base.as_ref().map(|b| json!({"layer": b.layer, "version": b.version})),
        "stream": stream,
        "created": time(d.created_ns),
        "changed_clusters": status.as_ref().map(|s| s.clusters),
        "changed_bytes": status.as_ref().map(|s| s.cluster_bytes),
        "overlay_bytes": disk::file_size(&d.overlay(store)),
    })
}

fn create(
    cli: &Cli,
    out: &Out,
    name: &str,
    base: Option<&str>,
    size: Option<&str>,
) -> anyhow::Result<()> {
    let size = size.map(parse_size).transpose()?;
    let store = open(cli, out, Access::Write)?;
    let base = match base {
        Some(b) => {
            let (layer, spec) = split_layer_spec(b);
            let layer = store.layer(layer)?;
            let version = match spec {
                Some(spec) => store.resolve(&layer, spec)?,
                // The pinned version if `lamina layer pin` holds one.
                None => match store.layer_pin(&layer.name)? {
                    Some(v) => v,
                    None => store.resolve(&layer, "head")?,
                },
            };
            Some((layer, version))
        }
        None => None,
    };
    let rec = disk::create(&store, name, base.as_ref().map(|(l, v)| (l, *v)), size)?;
    let doc = describe(&store, &rec);
    out.result(&doc, || {
        format!(
            "created disk {} ({}{})",
            rec.name,
            bytes(rec.size),
            rec.base
                .as_ref()
                .map(|b| format!(" over {}@{}", b.layer, b.version.short()))
                .unwrap_or_default()
        )
    })
}

fn create_streamed(
    cli: &Cli,
    out: &Out,
    name: &str,
    base: &str,
    size: Option<&str>,
) -> anyhow::Result<()> {
    let size = size.map(parse_size).transpose()?;
    let Some((remote, spec)) = base.split_once(':') else {
        anyhow::bail!("--stream needs --base REMOTE:LAYER[@VERSION], not `{base}`");
    };
    let (layer, version) = split_layer_spec(spec);
    let store = open(cli, out, Access::Write)?;
    let (streamed, nodes, _) = store.stream_manifests(
        remote,
        layer,
        version.unwrap_or("head"),
        lamina_sync::LayerFormat::Disk,
    )?;
    let root = nodes.root(streamed.root)?;
    let rec = disk::create_streamed(&store, name, &streamed, &root, size)?;
    let doc = describe(&store, &rec);
    out.result(&doc, || {
        format!(
            "created disk {} ({}) streaming {}:{}@{} ({} data clusters on the remote, none here yet)",
            rec.name,
            bytes(rec.size),
            remote,
            streamed.layer,
            streamed.version.short(),
            streamed.chunks
        )
    })
}

fn ls(cli: &Cli, out: &Out) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    let rows: Vec<Value> = disk::list(&store)?
        .iter()
        .map(|d| describe(&store, d))
        .collect();
    out.result(&json!({ "disks": rows }), || {
        let mut s = format!(
            "{:<24} {:>10}  {:<30} {:>9}\n",
            "NAME", "SIZE", "BASE", "CHANGED"
        );
        for r in &rows {
            let base = r["base"]["layer"].as_str().map_or_else(
                || "-".to_owned(),
                |l| format!("{l}@{}", &r["base"]["version"].as_str().unwrap_or("")[..12]),
            );
            s.push_str(&format!(
                "{:<24} {:>10}  {:<30} {:>9}\n",
                r["name"].as_str().unwrap_or(""),
                bytes(r["size"].as_u64().unwrap_or(0)),
                base,
                bytes(r["changed_bytes"].as_u64().unwrap_or(0)),
            ));
        }
        s
    })
}

fn show(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    let rec = disk::get(&store, name)?;
    let doc = describe(&store, &rec);
    out.result(&doc, || {
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    })
}

fn status(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    let s = disk::status(&store, name)?;
    let mut doc = serde_json::to_value(&s)?;
    doc["disk"] = json!(name);
    out.result(&doc, || {
        let mut t = format!(
            "{name}: {} changed clusters ({}), {} of sectors written\n",
            s.clusters,
            bytes(s.cluster_bytes),
            bytes(s.sector_bytes)
        );
        for r in &s.ranges {
            t.push_str(&format!("  clusters {}..{}\n", r.start, r.end));
        }
        t
    })
}

fn commit(
    cli: &Cli,
    out: &Out,
    name: &str,
    message: Option<&str>,
    to: Option<&str>,
    author: Option<&str>,
) -> anyhow::Result<()> {
    let message = message.map_or_else(|| format!("commit of disk {name}"), str::to_owned);
    let author = author.map_or_else(default_author, str::to_owned);
    // A served disk is committed by the process serving it (which needs the
    // store's writer lock itself): ask it first.
    let served = {
        let store = open(cli, out, Access::Read)?;
        let rec = disk::get(&store, name)?;
        if to.is_some() {
            None
        } else {
            lamina_nbd::control::request_commit(&store, &rec, &message, &author)?
        }
    };
    let report = match served {
        Some(r) => r,
        None => {
            let store = Arc::new(open(cli, out, Access::Write)?);
            lamina_nbd::commit::commit(&store, name, to, &message, &author)?
        }
    };
    out.result(&report, || match report.version {
        Some(v) => format!(
            "{}: {} changed clusters ({} new chunks) committed as {}@{}",
            report.disk,
            report.clusters,
            report.chunks_new,
            report.layer,
            v.short()
        ),
        None => format!("{}: nothing to commit", report.disk),
    })?;
    if report.live {
        out.note(&format!(
            "{}: committed while served; its overlay stays until an unserved commit",
            report.disk
        ));
    }
    if let Some(c) = &report.conflict {
        out.note(&format!(
            "{}: the layer's head had moved; merged per cluster with {} conflicting ranges ({}, conflict {})",
            report.disk,
            c.items.len(),
            c.policy,
            c.id
        ));
    }
    Ok(())
}
