//! `lamina layer ...`.

use std::process::ExitCode;
use std::time::Instant;

use lamina_sync::manifest::diff::Change;
use lamina_sync::{
    split_layer_spec, Access, ConflictPolicy, Diff, ExportOptions, ImportOptions, Layer,
    LayerFormat, LayerKind, Permission, Principal, Store, VersionId,
};
use serde_json::json;

use crate::cli::{Cli, CreateArgs, ExportArgs, ImportArgs, LayerCommand};
use crate::cmd::{default_author, open};
use crate::output::{bytes, bytes as bytes_h, time, NotFound, Out, UsageError};
use crate::progress::Bar;

pub fn run(cli: &Cli, out: &Out, c: &LayerCommand) -> anyhow::Result<ExitCode> {
    match c {
        LayerCommand::Create(a) => create(cli, out, a),
        LayerCommand::Import(a) => import(cli, out, a),
        LayerCommand::Ls => ls(cli, out),
        LayerCommand::Log { name } => log(cli, out, name),
        LayerCommand::Diff { from, to } => diff(cli, out, from, to),
        LayerCommand::Export(a) => export(cli, out, a),
        LayerCommand::Rm { name } => rm(cli, out, name),
        LayerCommand::Grant {
            layer,
            principal,
            permission,
            until,
            grace,
        } => grant(
            cli,
            out,
            layer,
            principal,
            permission,
            until.as_deref(),
            grace.as_deref(),
        ),
        LayerCommand::Revoke { layer, principal } => revoke(cli, out, layer, principal),
        LayerCommand::Grants { layer } => grants(cli, out, layer.as_deref()),
        LayerCommand::Set {
            name,
            conflict,
            net,
            no_net,
        } => set(cli, out, name, conflict.as_deref(), net.as_deref(), *no_net),
        LayerCommand::Pin { layer, at } => {
            let store = open(cli, out, Access::Write)?;
            let l = store.layer(layer)?;
            let v = store.resolve(&l, at)?;
            store.pin_layer(layer, v)?;
            out.result(&json!({ "layer": layer, "version": v }), || {
                format!("{layer} is held at {}", v.short())
            })
        }
        LayerCommand::Unpin { layer } => {
            let store = open(cli, out, Access::Write)?;
            let was = store.unpin_layer(layer)?;
            out.result(&json!({ "layer": layer, "was": was }), || match was {
                Some(v) => format!("{layer} follows its head again (was held at {})", v.short()),
                None => format!("{layer} was not pinned"),
            })
        }
        LayerCommand::Pins => {
            let store = open(cli, out, Access::Read)?;
            let pins = store.layer_pins()?;
            let rows: Vec<_> = pins
                .iter()
                .map(|(l, v)| json!({ "layer": l, "version": v }))
                .collect();
            out.result(&json!({ "pins": rows }), || {
                let mut s = format!("{:<32} {}\n", "LAYER", "VERSION");
                for (l, v) in &pins {
                    s.push_str(&format!("{l:<32} {}\n", v.short()));
                }
                s
            })
        }
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves `NAME[@SPEC]` (default: head).
fn resolve(store: &Store, s: &str) -> anyhow::Result<(Layer, VersionId)> {
    let (name, spec) = split_layer_spec(s);
    let layer = store.layer(name)?;
    let id = store.resolve(&layer, spec.unwrap_or("head"))?;
    Ok((layer, id))
}

fn create(cli: &Cli, out: &Out, a: &CreateArgs) -> anyhow::Result<()> {
    let kind: LayerKind = a.kind.parse()?;
    let format: LayerFormat = a.format.parse()?;
    let store = open(cli, out, Access::Write)?;
    let layer = store.create_layer(&a.name, kind, format)?;
    out.result(&layer, || {
        format!("created layer {} ({kind}, {format})", layer.name)
    })
}

fn import(cli: &Cli, out: &Out, a: &ImportArgs) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Write)?;
    let started = Instant::now();
    let report = {
        let bar = Bar::new(out.progress_allowed());
        let opts = ImportOptions {
            message: a.message.clone(),
            author: a.author.clone().unwrap_or_else(default_author),
            progress: &bar,
            threads: 0,
        };
        let layer = store.layer(&a.name)?;
        let qcow = layer.format == LayerFormat::Disk
            && a.path.is_file()
            && lamina_nbd::qcow::is_qcow2(&a.path)?;
        if qcow {
            let source = lamina_nbd::convert::ImageSource::open(&a.path)?;
            store.import_disk_source(&a.name, &source, &a.path, &opts)?
        } else {
            store.import(&a.name, &a.path, &opts)?
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let s = &report.stats;
    out.summary(&format!(
        "{}: {} files, {} in {:.1} s ({}/s); {} new chunks, {} stored{}",
        report.layer,
        s.files,
        bytes(s.bytes),
        secs,
        bytes((s.bytes as f64 / secs.max(1e-9)) as u64),
        s.chunks_new,
        bytes(s.stored_new),
        if report.unchanged {
            "; unchanged, no new version"
        } else {
            ""
        }
    ));
    out.result(&report, || report.version.to_hex())
}

fn ls(cli: &Cli, out: &Out) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    let mut rows = Vec::new();
    for layer in store.layers()? {
        let log = store.log(&layer)?;
        let head = log.first();
        rows.push(json!({
            "name": layer.name,
            "id": layer.id,
            "kind": layer.kind.as_str(),
            "format": layer.format.as_str(),
            "head": head.map(|(id, _)| id),
            "versions": log.len(),
            "updated": head.map(|(_, v)| time(v.time_ns)),
            "created": time(layer.created_ns),
        }));
    }
    out.result(&json!({ "layers": rows }), || {
        let mut s = format!(
            "{:<28} {:<9} {:<6} {:>8}  {:<12}  {}\n",
            "NAME", "KIND", "FORMAT", "VERSIONS", "HEAD", "UPDATED"
        );
        for r in &rows {
            s.push_str(&format!(
                "{:<28} {:<9} {:<6} {:>8}  {:<12}  {}\n",
                r["name"].as_str().unwrap_or(""),
                r["kind"].as_str().unwrap_or(""),
                r["format"].as_str().unwrap_or(""),
                r["versions"].as_u64().unwrap_or(0),
                r["head"].as_str().map_or("-", |h| &h[..12.min(h.len())]),
                r["updated"].as_str().unwrap_or("-"),
            ));
        }
        s
    })
}

fn log(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    let layer = store.layer(name)?;
    let versions = store.log(&layer)?;
    let docs: Vec<_> = versions
        .iter()
        .map(|(id, v)| {
            json!({
                "id": id,
                "parents": v.parents,
                "time": time(v.time_ns),
                "author": v.author,
                "message": v.message,
                "root": v.root,
            })
        })
        .collect();
    out.result(&json!({ "layer": layer.name, "versions": docs }), || {
        let mut s = String::new();
        for (id, v) in &versions {
            s.push_str(&format!(
                "{}  {}  {}  {}\n",
                id.short(),
                time(v.time_ns),
                v.author,
                v.message
            ));
        }
        s
    })
}

fn diff(cli: &Cli, out: &Out, from: &str, to: &str) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    let (la, a) = resolve(&store, from)?;
    let (lb, b) = resolve(&store, to)?;
    let d = store.diff(a, b)?;
    let mut doc = serde_json::to_value(&d)?;
    doc["from"] = json!({"layer": la.name, "version": a});
    doc["to"] = json!({"layer": lb.name, "version": b});
    let sign = |c: Change| match c {
        Change::Added => "A",
        Change::Removed => "D",
        Change::Modified => "M",
    };
    out.result(&doc, || {
        let mut s = String::new();
        match &d {
            Diff::Tree { changes } => {
                for c in changes {
                    s.push_str(&format!("{} {}", sign(c.change), c.path));
                    if !c.what.is_empty() {
                        s.push_str(&format!(" ({})", c.what.join(", ")));
                    }
                    s.push('\n');
                }
            }
            Diff::Disk {
                cluster_size,
                size_from,
                size_to,
                ranges,
            } => {
                if size_from != size_to {
                    s.push_str(&format!("size {size_from} -> {size_to}\n"));
                }
                let cs = u64::from(*cluster_size);
                for r in ranges {
                    s.push_str(&format!(
                        "{} clusters {}..{} (bytes {}..{})\n",
                        sign(r.change),
                        r.start,
                        r.end,
                        r.start * cs,
                        r.end * cs
                    ));
                }
            }
        }
        s
    })
}

fn export(cli: &Cli, out: &Out, a: &ExportArgs) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    let (layer, version) = resolve(&store, &a.layer)?;
    if layer.format == LayerFormat::Disk && a.dest.extension().is_some_and(|e| e == "qcow2") {
        let bytes = lamina_nbd::convert::export_qcow2(&store, version, &a.dest, a.force)?;
        let doc = json!({"layer": layer.name, "version": version, "dest": a.dest, "format": "qcow2", "bytes": bytes});
        return out.result(&doc, || {
            format!(
                "exported {}@{} to {} (qcow2, {})",
                layer.name,
                version.short(),
                a.dest.display(),
                bytes_h(bytes)
            )
        });
    }
    let report = {
        let bar = Bar::new(out.progress_allowed());
        let opts = ExportOptions {
            progress: &bar,
            force: a.force,
        };
        store.export(&layer.name, version, &a.dest, &opts)?
    };
    for w in &report.warnings {
        out.note(&format!("warning: {w}"));
    }
    out.result(&report, || {
        format!(
            "exported {}@{} to {} ({} files, {})",
            layer.name,
            version.short(),
            a.dest.display(),
            report.files,
            bytes(report.bytes)
        )
    })
}

fn rm(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Write)?;
    store.remove_layer(name)?;
    out.result(&json!({"removed": name}), || {
        format!("removed layer {name}")
    })
}

/// `--until`: a date, a time (RFC 3339, UTC) or a duration from now.
fn parse_until(s: &str) -> anyhow::Result<i64> {
    let now = lamina_sync::now_ns();
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now.saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)));
    }
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    let t = humantime::parse_rfc3339_weak(full.trim_end_matches('Z')).map_err(|e| {
        UsageError(format!(
            "bad --until `{s}`: {e} (a date 2027-06-30, a time 2027-06-30T18:00:00Z or a duration 90d)"
        ))
    })?;
    let ns = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| UsageError(format!("--until `{s}` is before 1970")))?
        .as_nanos();
    Ok(i64::try_from(ns).unwrap_or(i64::MAX))
}

fn grant(
    cli: &Cli,
    out: &Out,
    layer: &str,
    principal: &str,
    permission: &str,
    until: Option<&str>,
    grace: Option<&str>,
) -> anyhow::Result<()> {
    let p: Principal = principal.parse()?;
    let perm: Permission = permission.parse()?;
    let until_ns = until.map(parse_until).transpose()?;
    let grace_secs = match grace {
        Some(g) => humantime::parse_duration(g)
            .map_err(|e| UsageError(format!("bad --grace `{g}`: {e} (e.g. 3d, 12h)")))?
            .as_secs(),
        None => 0,
    };
    let store = open(cli, out, Access::Write)?;
    store.grant_until(layer, &p, perm, until_ns, grace_secs)?;
    out.result(
        &json!({
            "layer": layer,
            "principal": p.to_string(),
            "permission": perm,
            "until": until_ns.map(time),
            "grace_secs": grace_secs,
        }),
        || match until_ns {
            Some(u) => format!("{p} may {perm} {layer} until {}", time(u)),
            None => format!("{p} may {perm} {layer}"),
        },
    )
}

fn revoke(cli: &Cli, out: &Out, layer: &str, principal: &str) -> anyhow::Result<()> {
    let p: Principal = principal.parse()?;
    let store = open(cli, out, Access::Write)?;
    if !store.revoke_grant(layer, &p)? {
        return Err(NotFound(format!("{p} has no grant on layer {layer}")).into());
    }
    out.result(
        &json!({ "layer": layer, "principal": p.to_string() }),
        || format!("revoked {p}'s grant on {layer}"),
    )
}

fn grants(cli: &Cli, out: &Out, layer: Option<&str>) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    if let Some(l) = layer {
        store.layer(l)?;
    }
    let grants = store.grants(layer)?;
    out.result(&json!({ "grants": grants }), || {
        let mut s = format!(
            "{:<32} {:<20} {:<10} {}\n",
            "LAYER", "WHO", "PERMISSION", "UNTIL"
        );
        for g in &grants {
            s.push_str(&format!(
                "{:<32} {:<20} {:<10} {}\n",
                g.layer,
                g.principal.to_string(),
                g.permission.to_string(),
                g.until_ns.map_or_else(|| "-".to_owned(), time)
            ));
        }
        s
    })
}

fn set(
    cli: &Cli,
    out: &Out,
    name: &str,
    conflict: Option<&str>,
    net: Option<&str>,
    no_net: bool,
) -> anyhow::Result<()> {
    let policy: Option<ConflictPolicy> = conflict.map(str::parse).transpose()?;
    // Checked here: the store keeps the policy as text for the VM runner.
    let net = net
        .map(|n| {
            n.parse::<lamina_vm::Net>()
                .map(|p| p.to_string())
                .map_err(|e| crate::output::UsageError(format!("--net {n:?}: {e}")))
        })
        .transpose()?;
    let store = open(cli, out, Access::Write)?;
    if let Some(p) = policy {
        store.set_conflict_policy(name, p)?;
    }
    if net.is_some() || no_net {
        store.set_net_policy(name, net.as_deref())?;
    }
    out.result(
        &json!({ "layer": name, "conflict": policy.map(|p| p.as_str()), "net": store.net_policy(name)? }),
        || {
            let mut t = Vec::new();
            if let Some(p) = policy {
                t.push(format!("{name}: conflicts are settled {p}"));
            }
            if net.is_some() || no_net {
                t.push(format!(
                    "{name}: network of its VMs {}",
                    net.as_deref().unwrap_or("not restricted")
                ));
            }
            t.join("\n")
        },
    )
}
