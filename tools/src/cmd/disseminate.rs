//! `lamina disseminate` and `lamina collect`: the teacher's (or manager's)
//! batch flow over the `data` layers of a group's members, run on the
//! server's store.
//!
//! Dissemination commits the files into each member's data layer as a new
//! version on its head, through a temporary composition of that one layer
//! (so it is an ordinary commit: a laptop's offline changes merge with it
//! at its next sync like any other change). Collection exports each
//! member's head at a path.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use lamina_fs::compose::{CreateOptions, LayerArg, Mode as ComposeMode};
use lamina_sync::{Access, ExportOptions, LayerFormat, LayerKind, NoProgress, Principal, Store};
use serde_json::json;

use crate::cli::{Cli, CollectArgs, DisseminateArgs};
use crate::cmd::{default_author, open};
use crate::output::{Out, UsageError};

fn group_name(spec: &str, flag: &str) -> anyhow::Result<String> {
    match spec.strip_prefix('@') {
        Some(g) if !g.is_empty() => Ok(g.to_owned()),
        _ => Err(UsageError(format!("{flag} {spec:?}: expected @GROUP")).into()),
    }
}

/// The group's members, by name.
fn members(store: &Store, group: &str) -> anyhow::Result<Vec<String>> {
    if store.group(group)?.is_none() {
        return Err(UsageError(format!("no group named {group}")).into());
    }
    let m: Vec<String> = store
        .users()?
        .into_iter()
        .filter(|u| u.groups.iter().any(|g| g == group))
        .map(|u| u.name)
        .collect();
    if m.is_empty() {
        return Err(UsageError(format!("group {group} has no members")).into());
    }
    Ok(m)
}

/// `user`'s data layer: `template` with `{user}` replaced, else the one
/// data tree layer granted to the user (or in their namespace), else
/// `user/USER/data`.
fn data_layer(store: &Store, user: &str, template: Option<&str>) -> anyhow::Result<String> {
    let usable = |name: &str| -> anyhow::Result<bool> {
        Ok(match store.layer(name) {
            Ok(l) => l.kind == LayerKind::Data && l.format == LayerFormat::Tree,
            Err(lamina_sync::Error::LayerNotFound { .. }) => false,
            Err(e) => return Err(e.into()),
        })
    };
    if let Some(t) = template {
        let name = t.replace("{user}", user);
        if !usable(&name)? {
            anyhow::bail!("{user}: {name} is not a data tree layer here");
        }
        return Ok(name);
    }
    let mut found = BTreeSet::new();
    for g in store.grants(None)? {
        if g.principal == Principal::User(user.to_owned()) && usable(&g.layer)? {
            found.insert(g.layer);
        }
    }
    for l in store.layers()? {
        if lamina_sync::in_own_namespace(user, &l.name) && usable(&l.name)? {
            found.insert(l.name);
        }
    }
    let conventional = format!("user/{user}/data");
    match found.len() {
        1 => Ok(found.into_iter().next().unwrap_or_default()),
        0 => anyhow::bail!("{user} has no data tree layer (granted, or named {conventional})"),
        _ if found.contains(&conventional) => Ok(conventional),
        _ => anyhow::bail!(
            "{user} has several data layers ({}): name one with --into TEMPLATE, e.g. user/{{user}}/data",
            found.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Copies `src` (a file, link or directory) to `dst`, keeping modes.
fn copy_tree(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let m = std::fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
    if m.file_type().is_symlink() {
        let t = std::fs::read_link(src).with_context(|| format!("reading {}", src.display()))?;
        std::os::unix::fs::symlink(t, dst).with_context(|| format!("writing {}", dst.display()))?;
    } else if m.is_dir() {
        std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
        for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
            let e = e.with_context(|| format!("reading {}", src.display()))?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        std::fs::set_permissions(dst, m.permissions())
            .with_context(|| format!("writing {}", dst.display()))?;
    } else if m.is_file() {
        std::fs::copy(src, dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    } else {
        anyhow::bail!(
            "{}: only files, directories and symlinks are disseminated",
            src.display()
        );
    }
    Ok(())
}

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the temporary composition when dropped.
struct TempComposition<'s>(&'s Store, String);

impl Drop for TempComposition<'_> {
    fn drop(&mut self) {
        if let Err(e) = lamina_fs::compose::remove(self.0, &self.1) {
            tracing::warn!(composition = %self.1, %e, "could not remove a temporary composition");
        }
    }
}

fn inner_path(at: &str) -> anyhow::Result<PathBuf> {
    let mut p = PathBuf::new();
    for part in at.split('/').filter(|s| !s.is_empty()) {
        if part == "." || part == ".." {
            return Err(UsageError(format!("--at {at:?}: no . or .. components")).into());
        }
        p.push(part);
    }
    Ok(p)
}

pub fn disseminate(cli: &Cli, out: &Out, a: &DisseminateArgs) -> anyhow::Result<ExitCode> {
    let group = group_name(&a.to, "--to")?;
    let at = inner_path(&a.at)?;
    let store = open(cli, out, Access::Write)?;
    let users = members(&store, &group)?;
    let scratch = Scratch(
        store
            .root()
            .join("tmp")
            .join(format!("disseminate-{}", hex_id())),
    );
    std::fs::create_dir_all(&scratch.0)
        .with_context(|| format!("creating {}", scratch.0.display()))?;
    // What to place: a layer's head (when the one source names a layer
    // and no such path exists), else the given files.
    let staged = scratch.0.join("files");
    let single_layer = match a.sources.as_slice() {
        [one] if !Path::new(one).exists() => Some(one.clone()),
        _ => None,
    };
    if let Some(name) = &single_layer {
        let l = store.layer(name).map_err(|e| match e {
            lamina_sync::Error::LayerNotFound { .. } => {
                UsageError(format!("{name}: no such file or layer")).into()
            }
            other => anyhow::Error::from(other),
        })?;
        let head = store
            .head(&l)?
            .ok_or_else(|| UsageError(format!("layer {name} has no version")))?;
        store.export(name, head, &staged, &ExportOptions::default())?;
    } else {
        std::fs::create_dir_all(&staged)?;
        for s in &a.sources {
            let p = Path::new(s);
            let name = p
                .file_name()
                .ok_or_else(|| UsageError(format!("{s}: names no file")))?;
            copy_tree(p, &staged.join(name))?;
        }
    }
    let author = a.author.clone().unwrap_or_else(default_author);
    let message = a
        .message
        .clone()
        .unwrap_or_else(|| format!("disseminated to @{group}"));
    let mut placed = Vec::new();
    for user in &users {
        let layer = data_layer(&store, user, a.into.as_deref())?;
        let name = format!("disseminate-{}", hex_id());
        lamina_fs::compose::create(
            &store,
            &CreateOptions {
                name: name.clone(),
                layers: vec![LayerArg {
                    kind: LayerKind::Data,
                    layer: layer.clone(),
                    version: None,
                }],
                rules: None,
                mode: ComposeMode::Persistent,
                streamed: Vec::new(),
            },
        )?;
        let temp = TempComposition(&store, name.clone());
        let comp = lamina_fs::compose::get(&store, &name)?;
        let upper = comp.upper_dir(store.root(), 0).join(&at);
        std::fs::create_dir_all(&upper).with_context(|| format!("creating {}", upper.display()))?;
        for e in std::fs::read_dir(&staged)? {
            let e = e?;
            copy_tree(&e.path(), &upper.join(e.file_name()))?;
        }
        let report = lamina_fs::commit(&store, &name, Some(&message), &author, &NoProgress)?;
        drop(temp);
        let version = report.layers.first().and_then(|l| l.version);
        placed.push(json!({"user": user, "layer": layer, "version": version}));
    }
    out.result(&json!({"group": group, "members": placed}), || {
        placed
            .iter()
            .map(|p| {
                format!(
                    "{}: {} {}",
                    p["user"].as_str().unwrap_or("?"),
                    p["layer"].as_str().unwrap_or("?"),
                    p["version"]
                        .as_str()
                        .map_or("unchanged".to_owned(), |v| format!(
                            "at {}",
                            &v[..8.min(v.len())]
                        ))
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn collect(cli: &Cli, out: &Out, a: &CollectArgs) -> anyhow::Result<ExitCode> {
    let group = group_name(&a.from, "--from")?;
    let inner = inner_path(&a.path)?;
    let store = open(cli, out, Access::Read)?;
    let users = members(&store, &group)?;
    std::fs::create_dir_all(&a.dest).with_context(|| format!("creating {}", a.dest.display()))?;
    let mut rows = Vec::new();
    for user in &users {
        let layer = data_layer(&store, user, a.into.as_deref())?;
        let l = store.layer(&layer)?;
        let dest = match inner.file_name() {
            Some(n) => a.dest.join(user).join(n),
            None => a.dest.join(user),
        };
        let Some(head) = store.head(&l)? else {
            rows.push(json!({"user": user, "layer": layer, "found": false}));
            continue;
        };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let report = store.export_path(
            head,
            &inner.to_string_lossy(),
            &dest,
            &ExportOptions::default(),
        )?;
        rows.push(json!({
            "user": user,
            "layer": layer,
            "version": head,
            "found": report.is_some(),
            "dest": report.as_ref().map(|_| dest.clone()),
            "files": report.as_ref().map(|r| r.files),
            "bytes": report.as_ref().map(|r| r.bytes),
        }));
    }
    out.result(
        &json!({"group": group, "path": a.path, "members": rows}),
        || {
            rows.iter()
                .map(|r| {
                    let user = r["user"].as_str().unwrap_or("?");
                    match r["dest"].as_str() {
                        Some(d) => format!("{user}: {d}"),
                        None => format!(
                            "{user}: no {} in {}",
                            a.path,
                            r["layer"].as_str().unwrap_or("?")
                        ),
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

fn hex_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
